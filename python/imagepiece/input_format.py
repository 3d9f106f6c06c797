"""What an artifact takes as input: normalised float images, or uint8 pixels it normalises itself.

"float_nchw" (the default): [B, C, H, W] images already normalised by the caller, as timm's eval
transform makes them. "uint8_nhwc" (`aot_compile.py --input-format uint8`): [B, H, W, C] RGB pixels,
already resized and cropped (what a decoder and `imagepiece.predict.preprocess.Preprocess` give);
`PixelInput` compiles the rest of timm's transform into the artifact: /255, - mean, / std and the
NHWC -> NCHW change. A host then moves 4x fewer bytes to the device and does no float work.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .artifact_metadata import INPUT_FORMATS

# --input-format on the command line -> the metadata's input_format.
CLI_INPUT_FORMATS = {"float": "float_nchw", "uint8": "uint8_nhwc"}
assert set(CLI_INPUT_FORMATS.values()) == set(INPUT_FORMATS)


class PixelInput(nn.Module):
    """`model` behind its own normalisation: uint8 [B, H, W, C] pixels -> the model's logits.

    The arithmetic is timm's `ToTensor` + `Normalize` in fp32 (the same ops, in the same order, as
    `imagepiece.predict.preprocess.normalise`), then a cast to the model's dtype: an artifact that
    takes pixels computes what a float artifact computes on the host-normalised image.

    Args:
        model: the classifier, taking [B, C, H, W] images of `dtype`.
        mean, std: per-channel normalisation (the model's pretrained cfg; the artifact's metadata).
        dtype: the model's input dtype.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        images = pixels.permute(0, 3, 1, 2).to(torch.float32).div(255).sub(self.mean).div(self.std)
        return self.model(images.to(self.dtype))


def random_pixels(count: int, height: int = 224, width: int = 224, channels: int = 3, seed: int = 0) -> torch.Tensor:
    """uint8 [count, height, width, channels] uniform noise (examples for export and tests)."""
    return torch.randint(0, 256, (count, height, width, channels), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
