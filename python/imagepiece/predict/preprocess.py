"""timm's evaluation transform split in two at the uint8 boundary.

`Preprocess` (per image, in decode workers): resize + crop exactly as the artifact's metadata says,
using timm's own transform objects (built by `imagepiece.data.eval_transform`, the same call
`evaluate.py` makes), and stops at uint8 HWC pixels: a [H, W, 3] array, the image the model sees.
It refuses (ImageError) an image whose *resized* size would exceed the pixel limit (or the default
limit, if that is higher: a low --max-pixels is about the files, and must not refuse a thumbnail that
is scaled up): timm resizes the whole image before it crops, so a 1 x 20000 strip (a 138-byte PNG,
far under the decode limit) would become 256 x 5,120,000 pixels, gigabytes. (Resizing only the crop's region would avoid it, but
Pillow takes that region in float32 and then differs from timm's pixels by one here and there.)
`normalise` (per batch, next to the model): uint8 [B, H, W, 3] -> float [B, 3, H, W] with the same
torch ops as timm's `ToTensor` + `Normalize` (so the result equals timm's up to nothing at all), on
the model's device: on CUDA only the uint8 batch crosses the bus. An artifact that takes uint8
input (normalisation compiled in) skips `normalise` and takes the first stage's batch as it is.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms.functional import _compute_resized_output_size

from imagepiece.data import eval_transform

from .decode import DEFAULT_MAX_PIXELS, ImageError

_TENSOR_AND_NORMALISE = ("MaybeToTensor", "ToTensor", "Normalize")


class Preprocess:
    """PIL RGB image -> uint8 [H, W, 3], the resize/crop part of timm's eval transform."""

    def __init__(self, preprocessing: dict, input_shape: Sequence[int] = (3, 224, 224)) -> None:
        steps = eval_transform(preprocessing, tuple(input_shape)).transforms
        tail = [type(step).__name__ for step in steps[-2:]]
        if tail[0] not in _TENSOR_AND_NORMALISE[:2] or tail[1] != "Normalize":
            raise ValueError(f"timm's eval transform no longer ends in ToTensor + Normalize (got {tail}); "
                             "imagepiece.predict.preprocess must be updated")
        self.geometry = transforms.Compose(steps[:-2])
        self.size = tuple(input_shape[1:])

    def __call__(self, image: Image.Image, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        check_resizes(image, self.geometry, max_pixels, advice="; --max-pixels raises the limit")
        try:
            pixels = np.array(self.geometry(image))  # a writable copy (PIL exposes read-only memory)
        except ValueError as error:  # e.g. timm's "border" mode shrinking a 5000x2 strip to 248x0
            raise ImageError(f"cannot resize and crop a {image.width}x{image.height} image ({error})") from None
        if pixels.shape != (*self.size, 3):  # a transform that changed shape would corrupt a whole batch
            raise ValueError(f"preprocessing produced {pixels.shape}, expected {(*self.size, 3)}")
        return pixels


def check_resizes(image: Image.Image, transform, max_pixels: int = DEFAULT_MAX_PIXELS, advice: str = "") -> None:
    """ImageError if a `transforms.Resize` in `transform` (a timm/torchvision transform or Compose) would make
    more pixels than the limit (or the default limit, if that is higher) out of `image`."""
    limit = max(max_pixels, DEFAULT_MAX_PIXELS)
    for resize in getattr(transform, "transforms", [transform]):  # timm's eval transform has one, first
        if not isinstance(resize, transforms.Resize):
            continue
        size = list(resize.size) if isinstance(resize.size, (list, tuple)) else [resize.size]
        height, width = _compute_resized_output_size((image.height, image.width), size, resize.max_size)
        if height * width > limit:
            raise ImageError(f"image is {image.width}x{image.height}: resizing it to {width}x{height} before the centre "
                             f"crop would make {width * height:,} pixels, over the limit of {limit:,} "
                             f"(an extreme aspect ratio{advice})")


def _per_channel(values: Sequence[float], device: torch.device) -> torch.Tensor:
    """Per-channel constants shaped to broadcast over [B, 3, H, W]."""
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, 3, 1, 1)


def normalise(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> `dtype` [B, 3, H, W]: /255, - mean, / std (timm's op order: same floats)."""
    mean_, std_ = _per_channel(mean, pixels.device), _per_channel(std, pixels.device)
    images = pixels.permute(0, 3, 1, 2).contiguous().to(torch.float32).div_(255).sub_(mean_).div_(std_)
    return images.to(dtype)


def pixels_of(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """`normalise` undone: float [B, 3, H, W] -> the uint8 [B, H, W, 3] pixels they were made from (exact:
    the float error of normalising is far below the half step that rounding removes). For code that
    holds timm-normalised images and an artifact that takes pixels (`evaluate.py`)."""
    mean_, std_ = _per_channel(mean, images.device), _per_channel(std, images.device)
    pixels = (images.float() * std_ + mean_).mul_(255).round_().clamp_(0, 255)
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).contiguous()
