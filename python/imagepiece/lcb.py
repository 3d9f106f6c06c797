"""Local Coherence Bias (LCB): overlapping convolutions that make neighbouring patches similar.

ImagePiece adds LCB so that nearby non-semantic patches end up with similar keys and merge into one
piece. No official code is public; the paper describes "four 3x3 convs and one 1x1 conv". Two ways
to place them are offered:

* `ConvStem` ("stem"): the convolutional stem of Xiao et al. 2021 ("Early convolutions help
  transformers see better") in place of the 16x16 patchify: four 3x3 stride-2 convs with BN+ReLU,
  then a 1x1 conv to the embedding width -> a 14x14 token grid. The model gets it as its
  `embed_layer` (`ConvStemPatchEmbed`, timm's way of choosing a patch embedding). It replaces
  weights a DeiT checkpoint has, so it must be trained.
* `LocalCoherenceResidual` ("residual"): 3x3 convs on the 14x14 token grid after the patch
  embedding, added as a residual whose last (1x1) layer starts at zero. At init the model equals
  plain DeiT, so a pretrained DeiT checkpoint loads unchanged and fine-tunes from there.
"""
from __future__ import annotations

from typing import Tuple

import torch
from timm.layers import PatchEmbed
from torch import nn


class ConvStem(nn.Module):
    """Xiao et al.'s stem: 3x3/s2 conv-BN-ReLU x4, then a 1x1 conv; [B,3,H,W] -> [B,D,H/16,W/16].

    Widths are D/8, D/4, D/2, D, the ratios of Xiao et al.'s ViT-1GF/4GF stems
    (24-48-96-192 for DeiT-Ti's D=192).
    """

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        widths = [embed_dim // 8, embed_dim // 4, embed_dim // 2, embed_dim]
        layers = []
        previous = in_chans
        for width in widths:
            layers += [
                nn.Conv2d(previous, width, kernel_size=3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            previous = width
        layers.append(nn.Conv2d(previous, embed_dim, kernel_size=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


class ConvStemPatchEmbed(PatchEmbed):
    """timm's `PatchEmbed` with `ConvStem` as its projection: an `embed_layer` for VisionTransformer.

    Everything but the projection (image-size checks, grid size, flattening to tokens) is timm's,
    so the ViT around it cannot tell the difference. Its weights are `patch_embed.proj.layers.*`.
    """

    def __init__(self, img_size=224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768, **kwargs) -> None:
        if patch_size != 16:
            raise ValueError(f"the LCB stem downsamples by 16 (four stride-2 convs); patch_size {patch_size} does not fit")
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, **kwargs)
        self.proj = ConvStem(in_chans, embed_dim)


class LocalCoherenceResidual(nn.Module):
    """x + f(x) on the token grid, f = 3x3 conv, GELU, 3x3 conv, GELU, 1x1 conv (zero-init).

    Two overlapping 3x3 convs give each token a 5x5-token neighbourhood. The hidden width is
    `hidden_ratio * dim` to keep the parameter cost small (about 1.4M for DeiT-S at 0.25).
    """

    def __init__(self, dim: int, grid_size: Tuple[int, int], hidden_ratio: float = 0.25) -> None:
        super().__init__()
        hidden = max(8, int(dim * hidden_ratio))
        self.grid_size = tuple(grid_size)
        self.conv1 = nn.Conv2d(dim, hidden, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1)
        self.act = nn.GELU()
        self.proj = nn.Conv2d(hidden, dim, kernel_size=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Zero last layer: the branch starts as an exact no-op, so DeiT weights keep their accuracy.
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, _, dim = tokens.shape
        grid = tokens.transpose(1, 2).reshape(batch, dim, *self.grid_size)
        branch = self.proj(self.act(self.conv2(self.act(self.conv1(grid)))))
        return tokens + branch.flatten(2).transpose(1, 2)
