"""Random weights for measurements that need no accuracy (no hub weights exist here).

"timm-init" is timm's initialisation: near-uniform attention, where every ranking is a near-tie.
"sharpened" scales the query and key projections by SHARPEN, so attention peaks as in a trained DeiT
(the test suite's parity weights, tests/artifacts.py, use the same factor).
"""
from __future__ import annotations

import torch

WEIGHTS = ("timm-init", "sharpened")
SHARPEN = 6.0


def sharpen_attention(model: torch.nn.Module, factor: float = SHARPEN) -> torch.nn.Module:
    """Scale every block's query and key projections by `factor` (attention logits by factor**2), in place."""
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[: 2 * block.attn.qkv.in_features] *= factor
    return model


def random_weights(model: torch.nn.Module, weights: str) -> torch.nn.Module:
    """`model` (freshly initialised) with the named kind of random weights, in place."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    return sharpen_attention(model) if weights == "sharpened" else model
