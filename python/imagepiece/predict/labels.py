"""Class names for an artifact's head: a user's file, the fine-tune's class folders, or timm's ImageNet names."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Union

from timm.data import ImageNetInfo, infer_imagenet_subset


def class_names(metadata: dict, labels_file: Optional[Union[str, Path]] = None) -> List[str]:
    """One name per class index of the artifact whose `metadata` this is.

    `labels_file`: one name per line, in label order. Otherwise the class folder names the artifact's
    checkpoint was fine-tuned on (scripts/finetune.py records them; aot_compile copies them into the
    metadata), else timm's ImageNet names when the head's size is an ImageNet subset timm knows
    (1k: "tench, Tinca tinca", ...), else empty strings: the class index is in the row anyway, and a
    made-up name would look like knowledge.
    """
    num_classes = int(metadata["num_classes"])
    if labels_file is not None:
        try:  # -sig: a BOM (Windows editors write one) must not become part of class 0's name
            names = Path(labels_file).read_text(encoding="utf-8-sig").splitlines()
        except OSError as error:
            raise ValueError(f"labels file {str(labels_file)!r} cannot be read ({error.strerror})") from None
        except UnicodeDecodeError as error:
            raise ValueError(f"labels file {str(labels_file)!r} is not UTF-8 text ({error.reason} at byte {error.start})") from None
        if len(names) != num_classes:
            raise ValueError(f"labels file {str(labels_file)!r} has {len(names)} lines, the model has {num_classes} classes")
        return names
    if metadata.get("class_names"):
        return list(metadata["class_names"])
    subset = infer_imagenet_subset({"num_classes": num_classes})
    if subset is None:
        return [""] * num_classes
    info = ImageNetInfo(subset)
    return [info.index_to_description(index) for index in range(num_classes)]
