"""ImageNet-style folders (one sub-folder per class) and timm's transforms, with clear errors."""
from __future__ import annotations

import os
import unicodedata
from pathlib import Path
from typing import Iterator, List, NamedTuple, Optional, Union

import torch
from PIL import Image
from timm.data import ImageDataset, create_transform
from timm.data.readers.img_extensions import get_img_extensions
from timm.utils.misc import natural_key
from timm.data import auto_augment as timm_auto_augment
from torch.utils.data import default_collate

# The file suffixes timm's folder reader lists (others in a class folder are left out).
IMAGE_SUFFIXES = frozenset(get_img_extensions())

# The pretrained-cfg entries that decide how an image becomes the model's input; an artifact stores
# exactly these, and evaluation must use the same ones.
PREPROCESSING_KEYS = ("mean", "std", "interpolation", "crop_pct", "crop_mode")


class DatasetError(ValueError):
    """A dataset folder that is missing, empty, or does not fit the model."""


def preprocessing_config(pretrained_cfg: dict) -> dict:
    """The PREPROCESSING_KEYS entries of a model's pretrained cfg, as plain values."""
    return {key: pretrained_cfg[key] for key in PREPROCESSING_KEYS}


class Unreadable(NamedTuple):
    """A sample whose file did not decode: `ImageFolder` hands it on instead of an image."""

    path: str
    error: str


class ImageFolder(ImageDataset):
    """timm's folder dataset, except that a file that does not decode is never replaced by another.

    timm's ImageDataset logs a warning and returns the *next* image, with that image's label, so a
    corrupt file was silently scored as a copy of its neighbour. Here it comes back as `Unreadable`,
    and `collate_readable` takes it out of the batch, so that it is counted, named and never scored.

    `max_pixels`: the command's --max-pixels, whose refusals then advise it; None where the command has no such
    flag (the decoder's default limit). An attribute of the dataset, not a setting of this process: the data
    loader's workers, other processes, decode with it."""

    def __init__(self, root: str, transform=None, max_pixels: Optional[int] = None) -> None:
        super().__init__(root, transform=transform)
        self.max_pixels = max_pixels

    def __getitem__(self, index):
        # The predict CLI's decoder: its refusals too (16-bit images, which Pillow would clip to a white picture;
        # decompression bombs). Imported here: the predict package imports this module.
        from .predict.decode import DEFAULT_MAX_PIXELS, MAX_PIXELS_ADVICE, ImageError, decode_rgb
        from .predict.preprocess import check_resizes

        path, target = self.reader.samples[index]
        limit, advice = (DEFAULT_MAX_PIXELS, "") if self.max_pixels is None else (self.max_pixels, MAX_PIXELS_ADVICE)
        try:
            image = decode_rgb(path, limit, advice=advice)
            if self.transform is None:
                return image, target
            # A 100000x1 strip is a few hundred bytes, but timm's eval Resize would make 18 GB of it.
            check_resizes(image, self.transform, limit, advice=advice)
            try:
                return self.transform(image), target
            except ValueError as error:  # e.g. a resize that shrinks a strip's short side to 0
                raise ImageError(f"cannot resize and crop a {image.width}x{image.height} image ({error})") from None
        except ImageError as error:
            return Unreadable(path, str(error))


class Batch(NamedTuple):
    images: Optional[torch.Tensor]  # None when no file of the batch decoded
    targets: Optional[torch.Tensor]
    unreadable: List[Unreadable]


def collate_readable(samples: list) -> Batch:
    """A DataLoader's collate_fn for `ImageFolder`: the decoded samples as one batch, the others apart."""
    unreadable = [sample for sample in samples if isinstance(sample, Unreadable)]
    readable = [sample for sample in samples if not isinstance(sample, Unreadable)]
    images, targets = default_collate(readable) if readable else (None, None)
    return Batch(images, targets, unreadable)


def image_folder(root: Union[str, Path], transform=None, max_pixels: Optional[int] = None) -> ImageFolder:
    """The images under `root/<class>/...` (timm's folder reader). Labels follow `class_order`. `max_pixels`: see
    `ImageFolder`."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {str(root)!r} does not exist or is not a folder")
    _check_each_folder_listed_once(root)
    try:
        dataset = ImageFolder(str(root), transform=transform, max_pixels=max_pixels)
    except RuntimeError as error:  # timm: "Found 0 images in subfolders of ..."
        raise DatasetError(f"dataset folder {str(root)!r} holds no images ({error})") from None
    if len(dataset) == 0:
        raise DatasetError(f"dataset folder {str(root)!r} holds no images in class sub-folders")
    if "" in dataset.reader.class_to_idx:
        raise DatasetError(f"dataset folder {str(root)!r} holds images directly; put each in a class sub-folder (<root>/<class>/<image>)")
    _check_one_level_of_classes(root, dataset)
    _break_class_order_ties(dataset)
    return dataset


def class_order(names) -> List[str]:
    """Class folder names in label order: timm's natural sort (case-insensitive, digit runs by value:
    "class2" before "class10"), ties broken by the exact name. A labels file for predict lists them so."""
    return sorted(names, key=lambda name: (natural_key(name), name))


def _break_class_order_ties(dataset: ImageFolder) -> None:
    # timm sorts a *set* of names with natural_key alone, under which "Cat" and "cat" (or "a1" and "a01") are
    # equal: they kept the set's order, which PYTHONHASHSEED changes from run to run, so their labels could swap
    # between a fine-tune and its evaluation. Only such ties are re-ordered; every other label stays timm's.
    reader = dataset.reader
    ordered = class_order(reader.class_to_idx)
    if ordered == class_names(dataset):
        return
    label = {name: index for index, name in enumerate(ordered)}
    relabel = {old: label[name] for name, old in reader.class_to_idx.items()}
    reader.samples = [(path, relabel[target]) for path, target in reader.samples]
    reader.class_to_idx = label


def _check_one_level_of_classes(root: Path, dataset: ImageFolder) -> None:
    # timm labels an image by the folder it sits in, at any depth: given imagenet/ instead of imagenet/val/,
    # train and val would merge into one set of classes, and <class>/<sub>/<image> would be a class <sub>.
    # String tests per sample (ImageNet's train set has 1.28 million); the relative path only for the message.
    for path, _ in dataset.reader.samples:
        if os.path.dirname(os.path.dirname(path)) != str(root):
            raise DatasetError(f"dataset folder {str(root)!r} holds {os.path.relpath(path, root)!r}, not <class>/<image>: give the "
                               "folder whose sub-folders are the classes (e.g. imagenet/val), each holding its images directly")
    # An empty class folder has no label in timm's reader: the class count would silently be one short.
    empty = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and entry.name not in dataset.reader.class_to_idx
                   and not entry.name.startswith("."))
    if empty:
        raise DatasetError(f"dataset folder {str(root)!r}: class folder(s) {empty} hold no images "
                           f"(image files: {', '.join(sorted(IMAGE_SUFFIXES))}); fill or remove them")


def _check_each_folder_listed_once(root: Path) -> None:
    # timm's reader follows symbolic links to folders: a link back up the tree repeats every image under it
    # (41 times, seen) and a link to a sibling counts its images twice. Same walk, stopped at the first repeat.
    first_listed_as = {}
    for folder, _, _ in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in first_listed_as:
            earlier = first_listed_as[real]
            # The walk may reach the link first: the message names the link, and the folder it repeats.
            link, target = (earlier, folder) if _through_a_link(root, earlier) and not _through_a_link(root, folder) else (folder, earlier)
            raise DatasetError(f"dataset folder {str(root)!r}: {link!r} is a link to a folder already listed ({target!r}); "
                               "each image must appear once")
        first_listed_as[real] = folder


def _through_a_link(root: Path, folder: str) -> bool:
    """Whether `folder` (below `root`) is reached through a symbolic link."""
    current = Path(root)
    for part in Path(folder).relative_to(root).parts:
        current = current / part
        if current.is_symlink():
            return True
    return False


def class_names(dataset: ImageFolder) -> List[str]:
    """The class folder names, in label order."""
    return sorted(dataset.reader.class_to_idx, key=dataset.reader.class_to_idx.get)


def unstorable_class_name(names: List[str]) -> Optional[str]:
    """The first name that is not valid UTF-8 on disk, as its bytes (None if every one is): a fine-tune records the
    class names in its checkpoints, and an artifact in its JSON metadata, which holds only UTF-8 text (Python gives
    a name in another encoding lone surrogates)."""
    for name in names:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            return repr(os.fsencode(name))
    return None


def check_storable_class_names(names: List[str]) -> None:
    """DatasetError naming the first class folder whose name is not UTF-8 (see `unstorable_class_name`)."""
    name = unstorable_class_name(names)
    if name is not None:
        raise DatasetError(f"class folder {name} is not a UTF-8 name; rename it: class names are recorded in checkpoints "
                           "and artifacts, as UTF-8 text")


def describe_class_differences(expected: List[str], found: List[str], expected_as: str) -> str:
    """What differs between two lists of class folder names, for an error message."""
    only_expected, only_found = [n for n in expected if n not in found], [n for n in found if n not in expected]
    if not only_expected and not only_found:
        return f"the same names in another order: {expected_as} {expected[:8]}, here {found[:8]}"
    text = f"only in {expected_as}: {only_expected[:5]}; only here: {only_found[:5]}"
    if sorted(map(_nfc, only_expected)) == sorted(map(_nfc, only_found)):
        # A folder copied from macOS spells "żółw" decomposed (NFD): it prints the same and is another name.
        text += " (the same letters in other Unicode normal forms, NFC vs NFD: rename the folders to one form)"
    return text


def _nfc(name: str) -> str:
    return unicodedata.normalize("NFC", name)


def num_classes(dataset: ImageFolder) -> int:
    return len(dataset.reader.class_to_idx)


def check_num_classes(dataset: ImageFolder, head_classes: int, root: Union[str, Path], compiled: bool = False) -> None:
    """The dataset's classes must be exactly the model head's (labels index the logits). `compiled`: the model is
    an artifact, whose head no flag resizes."""
    found = num_classes(dataset)
    if found == head_classes:
        return
    # Hidden folders are named here, not refused: timm's reader makes a class of every folder that holds images,
    # dot or not, so a model trained on this very folder (by timm, or finetune.py) has that class in its head, and
    # refusing it would leave the model nothing to be evaluated on. One that came by accident (a notebook's
    # .ipynb_checkpoints, macOS's .AppleDouble) makes the count differ from the head's, and is then named.
    hidden = [name for name in class_names(dataset) if name.startswith(".")]
    including = f", including hidden folder(s) {', '.join(map(repr, hidden))}, which hold images and so count as classes," if hidden else ""
    advice = ("an artifact's head is fixed: compile one (aot_compile.py) from a checkpoint trained for these classes" if compiled
              else "use a checkpoint trained for these classes, with --num-classes set to its head size")
    if hidden:  # most likely come by accident (a notebook's autosave): the way out is to take them away
        advice = f"move {'it' if len(hidden) == 1 else 'them'} out of the folder, or {advice}"
    raise DatasetError(f"dataset {str(root)!r} has {found} classes{including} but the model head has {head_classes}; {advice} "
                       "(finetune.py trains one per class folder)")


def spread_subset(dataset: torch.utils.data.Dataset, limit: int) -> torch.utils.data.Dataset:
    """`limit` images spread evenly over the dataset, in order, or all of it if it holds no more.

    A class folder's images are listed together, so the first N images would cover only the first
    classes and give a top-1 that says nothing about the rest; evenly spaced indices reach every class
    that has at least len / limit images, and the same limit always picks the same images.
    """
    if limit < 1:
        raise ValueError(f"a subset needs a limit >= 1, got {limit}")
    count = len(dataset)
    if limit >= count:
        return dataset
    return torch.utils.data.Subset(dataset, [index * count // limit for index in range(limit)])


def eval_transform(preprocessing: dict, input_size=(3, 224, 224)):
    """timm's evaluation transform: resize, centre crop, normalise, as the model's pretrained cfg says."""
    return create_transform(input_size=tuple(input_size), is_training=False,
                            **{key: preprocessing[key] for key in PREPROCESSING_KEYS if key in preprocessing})


def train_transform(preprocessing: dict, auto_augment: Optional[str], re_prob: float, input_size=(3, 224, 224)):
    """timm's training transform (random resized crop, flip, RandAugment, random erasing) as in DeiT.

    Its posterize ops keep the all-black result of "keep 0 bits" (see `_posterize_keeping_zero_bits`).
    """
    # DeiT erases with per-pixel noise (its --remode pixel); timm's default fills a constant.
    transform = create_transform(input_size=tuple(input_size), is_training=True, auto_augment=auto_augment, re_prob=re_prob,
                                 re_mode="pixel",
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
