"""ImageNet-style folders (one sub-folder per class) and timm's transforms, with clear errors."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional, Union

from PIL import Image
from timm.data import ImageDataset, create_transform
from timm.data import auto_augment as timm_auto_augment

# The pretrained-cfg entries that decide how an image becomes the model's input; an artifact stores
# exactly these, and evaluation must use the same ones.
PREPROCESSING_KEYS = ("mean", "std", "interpolation", "crop_pct", "crop_mode")


class DatasetError(ValueError):
    """A dataset folder that is missing, empty, or does not fit the model."""


def preprocessing_config(pretrained_cfg: dict) -> dict:
    """The PREPROCESSING_KEYS entries of a model's pretrained cfg, as plain values."""
    return {key: pretrained_cfg[key] for key in PREPROCESSING_KEYS}


def image_folder(root: Union[str, Path], transform=None) -> ImageDataset:
    """The images under `root/<class>/...` (timm's folder reader: classes sorted by folder name)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {str(root)!r} does not exist or is not a folder")
    try:
        dataset = ImageDataset(str(root), transform=transform)
    except RuntimeError as error:  # timm: "Found 0 images in subfolders of ..."
        raise DatasetError(f"dataset folder {str(root)!r} holds no images ({error})") from None
    if len(dataset) == 0:
        raise DatasetError(f"dataset folder {str(root)!r} holds no images in class sub-folders")
    return dataset


def num_classes(dataset: ImageDataset) -> int:
    return len(dataset.reader.class_to_idx)


def check_num_classes(dataset: ImageDataset, head_classes: int, root: Union[str, Path]) -> None:
    """The dataset's classes must be exactly the model head's (labels index the logits)."""
    found = num_classes(dataset)
    if found != head_classes:
        raise DatasetError(
            f"dataset {str(root)!r} has {found} classes but the model head has {head_classes}; "
            "use a checkpoint trained for these classes, with --num-classes set to its head size (finetune.py trains one per class folder)"
        )


def eval_transform(preprocessing: dict, input_size=(3, 224, 224)):
    """timm's evaluation transform: resize, centre crop, normalise, as the model's pretrained cfg says."""
    return create_transform(input_size=tuple(input_size), is_training=False,
                            **{key: preprocessing[key] for key in PREPROCESSING_KEYS if key in preprocessing})


def train_transform(preprocessing: dict, auto_augment: Optional[str], re_prob: float, input_size=(3, 224, 224)):
    """timm's training transform (random resized crop, flip, RandAugment, random erasing) as in DeiT.

    Its posterize ops keep the all-black result of "keep 0 bits" (see `_posterize_keeping_zero_bits`).
    """
    transform = create_transform(input_size=tuple(input_size), is_training=True, auto_augment=auto_augment, re_prob=re_prob,
                                 interpolation=preprocessing["interpolation"], mean=preprocessing["mean"], std=preprocessing["std"])
    for op in _augment_ops(transform):
        if op.aug_fn is timm_auto_augment.posterize:
            op.aug_fn = _posterize_keeping_zero_bits
    return transform


def _posterize_keeping_zero_bits(img, bits_to_keep, **kwargs):
    # DeiT's RandAugment ("rand-m9-mstd0.5-inc1") asks timm's posterize to keep 0 bits whenever the
    # magnitude noise reaches 10; Pillow >= 13 raises for that instead of returning the all-black
    # image older Pillow gave, and timm (1.0.31) passes 0 through. Keep the old result, in this
    # transform's ops only: timm itself is left as it is.
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return timm_auto_augment.posterize(img, bits_to_keep, **kwargs)


def _augment_ops(transform) -> Iterator[timm_auto_augment.AugmentOp]:
    """The AugmentOps inside a timm transform (RandAugment and AugMix keep `ops`, AutoAugment a `policy`)."""
    for step in getattr(transform, "transforms", [transform]):
        yield from getattr(step, "ops", [])
        for sub_policy in getattr(step, "policy", []):
            yield from sub_policy
