"""The ImagePiece DeiT family: timm's VisionTransformer with static token reduction and LCB.

`create_model("deit_small_patch16_224", method="imagepiece")` (or the timm-style name
"deit_small_patch16_224.imagepiece") builds it; after `import imagepiece` every
`{method}_{arch}` is also a timm model name, e.g. `timm.create_model("imagepiece_deit_small_patch16_224")`.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Optional, Tuple, Union

import torch
from timm.models import get_pretrained_cfg, register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .blocks import ReducingBlock, Tokens, make_reduction
from .config import METHODS, BlockSchedule, ReductionConfig, token_schedule
from .lcb import ConvStem, LocalCoherenceResidual

ARCHS = {
    "deit_tiny_patch16_224": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "deit_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "deit_base_patch16_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
}
# timm keyword arguments a user may pass through create_model (training-time regularisation, head size).
VIT_OPTIONS = ("num_classes", "drop_rate", "drop_path_rate", "attn_drop_rate", "proj_drop_rate")


class ImagePieceViT(VisionTransformer):
    """A DeiT whose blocks reduce tokens according to `reduction` (a `ReductionConfig`).

    Args:
        reduction: method, schedule parameters and LCB variant; its depth must match the ViT's.
        **vit_kwargs: timm `VisionTransformer` arguments (patch_size, embed_dim, depth, num_heads, ...).
    """

    def __init__(self, reduction: ReductionConfig, **vit_kwargs) -> None:
        super().__init__(block_fn=ReducingBlock, **vit_kwargs)
        grid = self.patch_embed.grid_size
        if (reduction.depth, reduction.num_patches) != (len(self.blocks), grid[0] * grid[1]):
            raise ValueError(
                f"config is for depth {reduction.depth} / {reduction.num_patches} patches, the ViT has "
                f"{len(self.blocks)} blocks / {grid[0] * grid[1]} patches"
            )
        self.reduction_config = reduction
        self.schedule: Tuple[BlockSchedule, ...] = token_schedule(reduction)

        if reduction.lcb == "stem":
            self.patch_embed.proj = ConvStem(self.in_chans, self.embed_dim)
        self.lcb = LocalCoherenceResidual(self.embed_dim, grid) if reduction.lcb == "residual" else nn.Identity()

        # Sizes differ from 1 only after a merge, so proportional attention starts one block later.
        merged_before = False
        for block, row in zip(self.blocks, self.schedule):
            block.set_reduction(make_reduction(reduction, row), size_bias=reduction.prop_attn and merged_before)
            merged_before |= row.merged > 0

    def token_schedule(self) -> Tuple[BlockSchedule, ...]:
        """Per-block token bookkeeping (tokens in / candidates / merged / pruned / out)."""
        return self.schedule

    def check_images(self, images: torch.Tensor) -> None:
        """Raise a clear error unless `images` is a float [B, C, H, W] batch of the model's size."""
        expected = (self.in_chans, *self.patch_embed.img_size)
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must have shape [B, {', '.join(map(str, expected))}], got {list(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor, got {images.dtype}")

    def forward_tokens(self, images: torch.Tensor, trace_source: bool = False) -> Tokens:
        """Run the encoder; returns (tokens, sizes, sources).

        sources (only with trace_source) is a [B, N_out, 1 + num_patches] map of which input tokens
        each output token covers ([CLS] is column 0): 1 where merged into it, 0.5 (PRUNED_SOURCE)
        where pruned into it (EViT's fused token).
        """
        x = self.patch_embed(images)
        x = self.lcb(x)
        x = self._pos_embed(x)
        x = self.norm_pre(self.patch_drop(x))
        size = x.new_ones(x.shape[0], x.shape[1], 1)
        source = torch.eye(x.shape[1], device=x.device, dtype=x.dtype).expand(x.shape[0], -1, -1) if trace_source else None
        for block in self.blocks:
            x, size, source = block(x, size, source)
        return self.norm(x), size, source

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(images)[0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        return self.forward_head(self.forward_features(images))


def parse_model_name(name: str, method: Optional[str] = None) -> Tuple[str, str]:
    """Split "deit_small_patch16_224.imagepiece" or "imagepiece_deit_small_patch16_224" into (arch, method)."""
    arch = name
    if "." in name:
        arch, tagged = name.split(".", 1)
        if method is not None and method != tagged:
            raise ValueError(f"model name {name!r} says method {tagged!r} but method={method!r} was passed")
        method = tagged
    for prefix in METHODS:
        if arch.startswith(prefix + "_") and arch[len(prefix) + 1 :] in ARCHS:
            arch, method = arch[len(prefix) + 1 :], method or prefix
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
    method = method or "imagepiece"
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    return arch, method


def _pretrained_cfg(arch: str, method: str) -> dict:
    """DeiT's preprocessing metadata (mean/std/crop/interpolation), without any download location."""
    cfg = get_pretrained_cfg(f"{arch}.fb_in1k").to_dict()
    cfg.update(url="", hf_hub_id=None, architecture=f"{method}_{arch}", tag=None)
    return cfg


def create_model(
    arch: str = "deit_small_patch16_224",
    method: Optional[str] = None,
    checkpoint: Optional[Union[str, Path]] = None,
    *,
    config: Optional[ReductionConfig] = None,
    allow_untrained_lcb: bool = False,
    **overrides,
) -> ImagePieceViT:
    """Build an ImagePiece-family DeiT, optionally loading a local checkpoint.

    Args:
        arch: "deit_{tiny,small,base}_patch16_224", optionally tagged with the method
            ("deit_small_patch16_224.tome") or prefixed ("tome_deit_small_patch16_224").
        method: "none", "tome", "evit" or "imagepiece" (default "imagepiece").
        checkpoint: a local timm/DeiT `.pth` or `.safetensors` file; None keeps random weights.
        config: a full `ReductionConfig`; `overrides` then change single fields of it.
        allow_untrained_lcb: accept a checkpoint without LCB "stem" weights (they stay random).
        **overrides: `ReductionConfig` fields (p, merge_ratio, keep_rate, prune_blocks, tome_r, lcb,
            prop_attn) and timm options (num_classes, drop_rate, drop_path_rate, ...).
    """
    arch, method = parse_model_name(arch, method if config is None else (method or config.method))
    vit_options = {key: overrides.pop(key) for key in VIT_OPTIONS if key in overrides}
    config_fields = {field.name for field in dataclasses.fields(ReductionConfig)}
    unknown = set(overrides) - config_fields
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)}; config fields: {sorted(config_fields)}, timm options: {list(VIT_OPTIONS)}")
    if config is None:
        config = ReductionConfig(method=method, **overrides)
    else:
        config = config.replace(method=method, **overrides)

    model = ImagePieceViT(config, **ARCHS[arch], **vit_options)
    model.arch = arch
    model.pretrained_cfg = model.default_cfg = _pretrained_cfg(arch, method)
    if checkpoint is not None:
        from .weights import load_checkpoint  # deferred: weights imports this module's types

        load_checkpoint(model, checkpoint, allow_untrained_lcb=allow_untrained_lcb)
    return model.eval()


def _make_entrypoint(arch: str, method: str):
    def entrypoint(pretrained: bool = False, **kwargs) -> ImagePieceViT:
        if pretrained:
            raise ValueError(
                f"{method}_{arch}: no hub weights exist; build it with pretrained=False and pass "
                "checkpoint_path=<local .pth/.safetensors> (timm) or checkpoint=... (imagepiece.create_model)"
            )
        overlay = kwargs.pop("pretrained_cfg_overlay", None) or {}
        for timm_only in ("pretrained_cfg", "cache_dir"):
            kwargs.pop(timm_only, None)
        model = create_model(arch, method, **kwargs)
        model.pretrained_cfg.update(overlay)
        return model

    entrypoint.__name__ = entrypoint.__qualname__ = f"{method}_{arch}"
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"{arch} with {method!r} token reduction (ImagePiece family); random weights."
    return entrypoint


def _register_all() -> None:
    module = sys.modules[__name__]
    for arch in ARCHS:
        for method in METHODS:
            entrypoint = _make_entrypoint(arch, method)
            setattr(module, entrypoint.__name__, entrypoint)
            register_model(entrypoint)


_register_all()
