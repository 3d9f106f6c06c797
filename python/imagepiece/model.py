"""The ImagePiece DeiT family: timm's VisionTransformer with static token reduction and LCB.

Built the way timm builds its own models: `default_cfgs` (preprocessing metadata; no download
location, as no hub weights exist), one four-line `@register_model` entry point per arch and method,
and `_create_imagepiece`, which hands the class to timm's `build_model_with_cfg`. After
`import imagepiece` every entry point is a timm model name:

    timm.create_model("imagepiece_deit_small_patch16_224")          # or tome_, evit_, plain_
    imagepiece.create_model("deit_small_patch16_224", "imagepiece", checkpoint="deit_s.pth")
    imagepiece.create_model("deit_small_patch16_224.imagepiece")    # the same, timm-style tag
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import List, Optional, Tuple, Union

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import PatchEmbed
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._builder import pretrained_cfg_for_features
from timm.models._features import FeatureGetterNet, feature_take_indices
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from .blocks import ReducingBlock, Tokens, make_reduction
from .config import METHODS, BlockSchedule, ReductionConfig, token_schedule
from .lcb import ConvStemPatchEmbed, LocalCoherenceResidual

ARCHS = {
    "deit_tiny_patch16_224": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "deit_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "deit_base_patch16_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
}
# timm keyword arguments a user may pass through create_model (training-time regularisation, head size).
VIT_OPTIONS = ("num_classes", "drop_rate", "drop_path_rate", "attn_drop_rate", "proj_drop_rate", "pos_drop_rate")
# What timm.create_model and its builder take besides those: factory and builder arguments, feature extraction.
TIMM_FACTORY_OPTIONS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "pretrained_model_args", "pretrained_strict",
                        "kwargs_filter", "features_only", "out_indices", "feature_cls", "device", "dtype")
# VisionTransformer arguments that set the tokens the static schedule counts, or how the output is pooled: taken at
# DeiT's own values (timm's validate.py passes img_size and in_chans), refused at any other, not silently mis-scheduled.
DEIT_LAYOUT = {"img_size": 224, "in_chans": 3, "global_pool": "token", "class_token": True, "reg_tokens": 0,
               "no_embed_class": False, "dynamic_img_size": False, "dynamic_img_pad": False, "patch_drop_rate": 0.0}
# Method names of earlier releases, still accepted by name parsing (with a warning).
RENAMED_METHODS = {"none": "plain"}


class ImagePieceViT(VisionTransformer):
    """A DeiT whose blocks reduce tokens according to `reduction` (a `ReductionConfig`).

    The config chooses the layers: `ReducingBlock` for every block, `ConvStemPatchEmbed` as the
    `embed_layer` for LCB "stem" (timm's PatchEmbed otherwise), `LocalCoherenceResidual` or
    `nn.Identity()` after it; each block's reducer comes from the static token schedule.

    Args:
        reduction: method, schedule parameters and LCB variant; its depth must match the ViT's.
        **vit_kwargs: timm `VisionTransformer` arguments (patch_size, embed_dim, depth, num_heads, ...).
    """

    def __init__(self, reduction: ReductionConfig = ReductionConfig(), **vit_kwargs) -> None:
        embed_layer = ConvStemPatchEmbed if reduction.lcb == "stem" else PatchEmbed
        super().__init__(block_fn=ReducingBlock, embed_layer=embed_layer, **vit_kwargs)
        grid = self.patch_embed.grid_size
        if (reduction.depth, reduction.num_patches) != (len(self.blocks), grid[0] * grid[1]):
            raise ValueError(
                f"config is for depth {reduction.depth} / {reduction.num_patches} patches, the ViT has "
                f"{len(self.blocks)} blocks / {grid[0] * grid[1]} patches"
            )
        self.reduction_config = reduction
        self.schedule: Tuple[BlockSchedule, ...] = token_schedule(reduction)
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

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)
        x = self.lcb(x)
        x = self._pos_embed(x)
        return self.norm_pre(self.patch_drop(x))

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """timm's, for the pooling this model has ([CLS]) or none ('': the tokens themselves, as timm's feature
        extraction asks): merged and pruned tokens have sizes that an average would ignore."""
        if global_pool not in (None, "", DEIT_LAYOUT["global_pool"]):
            raise ValueError(f"global_pool={global_pool!r} is not supported: the token reduction schedules DeiT's own "
                             f"layout (global_pool={DEIT_LAYOUT['global_pool']!r})")
        super().reset_classifier(num_classes, global_pool)

    def _run_block(self, block: nn.Module, x: torch.Tensor, size: torch.Tensor, source: Optional[torch.Tensor]) -> Tokens:
        """One block; with timm's set_grad_checkpointing(True), its activations are recomputed in the backward pass
        instead of kept (training memory, as timm's ViT does)."""
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint(block, x, size, source, use_reentrant=False)
        return block(x, size, source)

    def forward_tokens(self, images: torch.Tensor, trace_source: bool = False) -> Tokens:
        """Run the encoder; returns (tokens, sizes, sources).

        sources (only with trace_source) is a [B, N_out, 1 + num_patches] map of which input tokens
        each output token covers ([CLS] is column 0): 1 where merged into it, 0.5 (PRUNED_SOURCE)
        where pruned into it (EViT's fused token).
        """
        x = self._embed(images)
        size = x.new_ones(x.shape[0], x.shape[1], 1)
        source = torch.eye(x.shape[1], device=x.device, dtype=x.dtype).expand(x.shape[0], -1, -1) if trace_source else None
        for block in self.blocks:
            x, size, source = self._run_block(block, x, size, source)
        return self.norm(x), size, source

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NLC",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's feature API (`features_only=True`, `forward_intermediates`) over reduced tokens.

        Each intermediate is the image tokens after a block, [B, n, C] with n from the token schedule
        ([CLS] dropped): merged and pruned tokens have no place on the patch grid, so "NCHW" exists
        only for method "plain".
        """
        if output_fmt not in ("NLC", "NCHW"):
            raise ValueError(f"output_fmt must be 'NLC' or 'NCHW', got {output_fmt!r}")
        if output_fmt == "NCHW" and self.reduction_config.method != "plain":
            raise ValueError(f"output_fmt 'NCHW' needs every patch token in place; method "
                             f"{self.reduction_config.method!r} reduces them, use 'NLC'")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
        batch = x.shape[0]
        x = self._embed(x)
        size = x.new_ones(batch, x.shape[1], 1)
        intermediates = []
        for index, block in enumerate(blocks):
            x, size, _ = self._run_block(block, x, size, None)
            if index in take_indices:
                intermediates.append((self.norm(x) if norm else x)[:, self.num_prefix_tokens :])
        if output_fmt == "NCHW":
            grid = self.patch_embed.grid_size
            intermediates = [y.reshape(batch, *grid, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

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
            if method is not None and method != prefix:
                raise ValueError(f"model name {name!r} says method {prefix!r} but method={method!r} was passed")
            arch, method = arch[len(prefix) + 1 :], prefix
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
    method = method or "imagepiece"
    if method in RENAMED_METHODS:
        warnings.warn(f"method {method!r} is now called {RENAMED_METHODS[method]!r}", FutureWarning, stacklevel=3)
        method = RENAMED_METHODS[method]
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    return arch, method


def create_model(
    arch: str = "deit_small_patch16_224",
    method: Optional[str] = None,
    checkpoint: Optional[Union[str, Path]] = None,
    *,
    config: Optional[ReductionConfig] = None,
    allow_untrained_lcb: bool = False,
    **overrides,
) -> ImagePieceViT:
    """Build an ImagePiece-family DeiT in eval mode, optionally loading a local checkpoint.

    Args:
        arch: "deit_{tiny,small,base}_patch16_224", optionally tagged with the method
            ("deit_small_patch16_224.tome") or prefixed ("tome_deit_small_patch16_224").
        method: "plain", "tome", "evit" or "imagepiece" (default "imagepiece").
        checkpoint: a local timm/DeiT `.pth` or `.safetensors` file; None keeps random weights.
        config: a full `ReductionConfig`; `overrides` then change single fields of it.
        allow_untrained_lcb: accept a checkpoint without LCB "stem" weights (they stay random).
        **overrides: `ReductionConfig` fields (p, merge_ratio, keep_rate, prune_blocks, tome_r, lcb,
            prop_attn, reevaluation) and timm options (num_classes, drop_rate, drop_path_rate, ...).
    """
    if config is not None and method is not None and RENAMED_METHODS.get(method, method) != config.method:
        raise ValueError(f"method={method!r} but config is for method {config.method!r}: give one of them")
    arch, method = parse_model_name(arch, method if config is None else (method or config.method))
    config_fields = {field.name for field in dataclasses.fields(ReductionConfig)}
    unknown = set(overrides) - config_fields - set(VIT_OPTIONS)
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)}; config fields: {sorted(config_fields)}, timm options: {list(VIT_OPTIONS)}")
    model = _create_imagepiece(arch, method, checkpoint=checkpoint, config=config, allow_untrained_lcb=allow_untrained_lcb, **overrides)
    return model.eval()


def _create_imagepiece(
    arch: str,
    method: str,
    pretrained: bool = False,
    *,
    checkpoint: Optional[Union[str, Path]] = None,
    config: Optional[ReductionConfig] = None,
    allow_untrained_lcb: bool = False,
    **kwargs,
) -> nn.Module:
    """What every entry point runs: config from keyword arguments, then timm's `build_model_with_cfg`, the checkpoint,
    and for features_only=True the feature wrapper (else the `ImagePieceViT` itself).

    `kwargs` holds `ReductionConfig` fields and timm's own arguments (num_classes, drop_path_rate,
    features_only, pretrained_cfg_overlay, ...).
    """
    variant = f"{method}_{arch}"
    if pretrained:
        raise ValueError(
            f"{variant}: no hub weights exist; build it with pretrained=False and pass "
            "checkpoint=<local .pth/.safetensors> (imagepiece.create_model or timm.create_model)"
        )
    config_fields = {field.name for field in dataclasses.fields(ReductionConfig)}
    overrides = {key: kwargs.pop(key) for key in list(kwargs) if key in config_fields}
    _take_deit_layout(variant, kwargs)
    unsupported = sorted(set(kwargs) - set(VIT_OPTIONS) - set(TIMM_FACTORY_OPTIONS))
    if unsupported:
        raise ValueError(f"{variant}: option(s) {unsupported} are not supported; timm options: "
                         f"{list(VIT_OPTIONS + TIMM_FACTORY_OPTIONS)} (and {list(DEIT_LAYOUT)} at DeiT's values), "
                         f"config fields: {sorted(config_fields)}")
    config = config.replace(method=method, **overrides) if config else ReductionConfig(method=method, **overrides)
    features_only, out_indices = kwargs.pop("features_only", False), kwargs.pop("out_indices", 3)
    if features_only:
        if kwargs.pop("feature_cls", "getter") != "getter":  # timm's hook/fx extractors see the patch grid, which merging ends
            raise ValueError(f"{variant}: features_only takes feature_cls 'getter' only (the tokens after chosen blocks)")
        kwargs.setdefault("num_classes", 0)  # as timm's builder: no head, so a checkpoint of any head size loads
    model = build_model_with_cfg(ImagePieceViT, variant, pretrained=False, reduction=config, **ARCHS[arch], **kwargs)
    model.arch = arch
    if checkpoint is not None:
        from .weights import load_checkpoint  # deferred: weights imports this module's types

        load_checkpoint(model, checkpoint, allow_untrained_lcb=allow_untrained_lcb)
    if features_only:  # wrapped after the checkpoint is loaded: the wrapper drops the head that a checkpoint fills
        model = _feature_extractor(model, out_indices, output_fmt="NCHW" if method == "plain" else "NLC")
    return model


def _take_deit_layout(variant: str, kwargs: dict) -> None:
    """Remove the DEIT_LAYOUT options from `kwargs` where they hold DeiT's values; ValueError where one does not."""
    for name, deit_value in DEIT_LAYOUT.items():
        if name not in kwargs:
            continue
        value = kwargs.pop(name)
        same = (tuple(value) == (deit_value, deit_value) if isinstance(value, (tuple, list)) else value == deit_value)
        if not same:
            raise ValueError(f"{variant}: {name}={value!r} is not supported: the token reduction schedules DeiT's own layout "
                             f"({name}={deit_value!r})")


def _feature_extractor(model: ImagePieceViT, out_indices, output_fmt: str) -> nn.Module:
    """What timm's builder makes of a ViT with features_only=True: its intermediate-layer getter, with the model's
    pretrained cfg for features and its input traits."""
    features = FeatureGetterNet(model, out_indices=out_indices, output_fmt=output_fmt)
    features.pretrained_cfg = features.default_cfg = pretrained_cfg_for_features(model.pretrained_cfg)
    try:  # timm >= 1.0.2x records input traits, and its builder copies them onto the wrapper
        from timm.models._input import get_model_traits
    except ImportError:
        get_model_traits = None
    if get_model_traits is not None and hasattr(model, "_traits"):
        features._traits = dict(model._traits)
        traits = get_model_traits(model)
        if "in_chans" in traits:
            features.in_chans = traits["in_chans"]
    features.arch = model.arch
    return features


def _cfg(**kwargs) -> dict:
    """DeiT's preprocessing (timm's deit cfg) without a download location."""
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 0.9, "interpolation": "bicubic", "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0",
        **kwargs,
    }


# register_model finds each entry point's pretrained cfg here, by name.
default_cfgs = generate_default_cfgs({
    "plain_deit_tiny_patch16_224": _cfg(),
    "plain_deit_small_patch16_224": _cfg(),
    "plain_deit_base_patch16_224": _cfg(),
    "tome_deit_tiny_patch16_224": _cfg(),
    "tome_deit_small_patch16_224": _cfg(),
    "tome_deit_base_patch16_224": _cfg(),
    "evit_deit_tiny_patch16_224": _cfg(),
    "evit_deit_small_patch16_224": _cfg(),
    "evit_deit_base_patch16_224": _cfg(),
    "imagepiece_deit_tiny_patch16_224": _cfg(),
    "imagepiece_deit_small_patch16_224": _cfg(),
    "imagepiece_deit_base_patch16_224": _cfg(),
})


@register_model
def plain_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> ImagePieceViT:
    """DeiT-Ti without token reduction: timm's outputs from our blocks (the exportable baseline)."""
    return _create_imagepiece("deit_tiny_patch16_224", "plain", pretrained, **kwargs)


@register_model
def plain_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> ImagePieceViT:
    """DeiT-S without token reduction: timm's outputs from our blocks (the exportable baseline)."""
    return _create_imagepiece("deit_small_patch16_224", "plain", pretrained, **kwargs)


@register_model
def plain_deit_base_patch16_224(pretrained: bool = False, **kwargs) -> ImagePieceViT:
    """DeiT-B without token reduction: timm's outputs from our blocks (the exportable baseline)."""
    return _create_imagepiece("deit_base_patch16_224", "plain", pretrained, **kwargs)


@register_model
def tome_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> ImagePieceViT:
    """DeiT-Ti with ToMe: r=13 bipartite merges per block."""
    return _create_imagepiece("deit_tiny_patch16_224", "tome", pretrained, **kwargs)


@register_model
def tome_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> ImagePieceViT:
    """DeiT-S with ToMe: r=13 bipartite merges per block."""
    return _create_imagepiece("deit_small_patch16_224", "tome", pretrained, **kwargs)


@register_model
def tome_deit_base_patch16_224(pretrained: bool = False, **kwargs) -> ImagePieceViT:
    """DeiT-B with ToMe: r=13 bipartite merges per block."""
    return _create_imagepiece("deit_base_patch16_224", "tome", pretrained, **kwargs)


@register_model
def evit_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> ImagePieceViT:
    """DeiT-Ti with EViT: keep 70% of image tokens at blocks 3, 6, 9, fuse the rest."""
    return _create_imagepiece("deit_tiny_patch16_224", "evit", pretrained, **kwargs)


@register_model
def evit_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> ImagePieceViT:
    """DeiT-S with EViT: keep 70% of image tokens at blocks 3, 6, 9, fuse the rest."""
    return _create_imagepiece("deit_small_patch16_224", "evit", pretrained, **kwargs)


@register_model
def evit_deit_base_patch16_224(pretrained: bool = False, **kwargs) -> ImagePieceViT:
    """DeiT-B with EViT: keep 70% of image tokens at blocks 3, 6, 9, fuse the rest."""
    return _create_imagepiece("deit_base_patch16_224", "evit", pretrained, **kwargs)


@register_model
def imagepiece_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> ImagePieceViT:
    """DeiT-Ti with ImagePiece: re-tokenization in every block, re-evaluated pruning at blocks 3, 6, 9."""
    return _create_imagepiece("deit_tiny_patch16_224", "imagepiece", pretrained, **kwargs)


@register_model
def imagepiece_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> ImagePieceViT:
    """DeiT-S with ImagePiece: re-tokenization in every block, re-evaluated pruning at blocks 3, 6, 9."""
    return _create_imagepiece("deit_small_patch16_224", "imagepiece", pretrained, **kwargs)


@register_model
def imagepiece_deit_base_patch16_224(pretrained: bool = False, **kwargs) -> ImagePieceViT:
    """DeiT-B with ImagePiece: re-tokenization in every block, re-evaluated pruning at blocks 3, 6, 9."""
    return _create_imagepiece("deit_base_patch16_224", "imagepiece", pretrained, **kwargs)
