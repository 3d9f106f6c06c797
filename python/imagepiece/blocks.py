"""timm's ViT block and attention, extended to reduce tokens between attention and MLP.

As in ToMe and EViT, reduction sits inside the block, after the attention residual and before the
MLP. What a block does is fixed at construction: its reducer is one of the `*Reduction` modules
below, built from the static schedule, so forward has no data-dependent branches.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block
from torch import nn

from .config import BlockSchedule, ReductionConfig
from .reduce import bipartite_soft_matching, class_attention, merge_source, merge_wavg, prune_and_fuse, retokenize

Tokens = Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]  # (x, size, source)


class ReducingAttention(Attention):
    """timm's fused (SDPA) attention plus what token reduction needs.

    Extras, each switched on only where the block's reducer uses it:
      * proportional attention: + log(size) on the logits, as an SDPA additive mask;
      * the [CLS] row of the attention (class attention), computed on its own: no N x N matrix;
      * the keys averaged over heads (the similarity metric of ToMe and ImagePiece).
    """

    size_bias: bool = False
    returns_class_attention: bool = False
    returns_keys: bool = False

    def forward(self, x: torch.Tensor, size: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        batch, count, _ = x.shape
        qkv = self.qkv(x).reshape(batch, count, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        bias = size.log().to(q.dtype).view(batch, 1, 1, count) if self.size_bias else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.0)
        out = self.proj_drop(self.proj(self.norm(out.transpose(1, 2).reshape(batch, count, self.attn_dim))))
        scores = class_attention(q, k, self.scale, bias) if self.returns_class_attention else None
        keys = k.mean(dim=1) if self.returns_keys else None
        return out, scores, keys


class NoReduction(nn.Module):
    """Plain DeiT block: tokens pass through."""

    needs_class_attention = False
    needs_keys = False

    def forward(self, x, size, scores, keys, source=None) -> Tokens:
        return x, size, source


class ToMeReduction(nn.Module):
    """ToMe: merge `num_merges` bipartite-matched pairs by key similarity, size-weighted."""

    needs_class_attention = False
    needs_keys = True

    def __init__(self, num_merges: int) -> None:
        super().__init__()
        self.num_merges = num_merges

    def forward(self, x, size, scores, keys, source=None) -> Tokens:
        merge = bipartite_soft_matching(keys, self.num_merges)
        x, size, _ = merge_wavg(merge, x, size)
        return x, size, merge_source(merge, source)


class EViTReduction(nn.Module):
    """EViT: keep the `num_kept` most attended image tokens, fuse the rest into one."""

    needs_class_attention = True
    needs_keys = False

    def __init__(self, num_kept: int) -> None:
        super().__init__()
        self.num_kept = num_kept

    def forward(self, x, size, scores, keys, source=None) -> Tokens:
        return prune_and_fuse(x, size, scores, self.num_kept, source)


class ImagePieceReduction(nn.Module):
    """ImagePiece: re-tokenize the bottom-k tokens, re-evaluate, then (in pruning blocks) prune.

    Re-evaluation: a merged piece's class attention is the sum of its parts' attention (the mass
    [CLS] now pays to the piece, which proportional attention preserves), so a piece whose parts
    together matter leaves the bottom set and survives this block's pruning; the next block
    re-ranks everything by fresh class attention.
    """

    needs_class_attention = True
    needs_keys = True

    def __init__(self, num_candidates: int, num_merges: int, num_kept: Optional[int]) -> None:
        super().__init__()
        self.num_candidates = num_candidates
        self.num_merges = num_merges
        self.num_kept = num_kept

    def forward(self, x, size, scores, keys, source=None) -> Tokens:
        if self.num_merges > 0:
            merge = retokenize(scores, keys, self.num_candidates, self.num_merges)
            x, size, scores = merge_wavg(merge, x, size, scores)
            source = merge_source(merge, source)
        if self.num_kept is not None:
            x, size, source = prune_and_fuse(x, size, scores, self.num_kept, source)
        return x, size, source


def make_reduction(config: ReductionConfig, block: BlockSchedule) -> nn.Module:
    """The reducer that performs `block`'s row of the schedule."""
    num_kept = block.tokens_out - 2 if block.fused else None  # minus [CLS] and the fused token
    if config.method == "tome" and block.merged:
        return ToMeReduction(block.merged)
    if config.method == "evit" and num_kept is not None:
        return EViTReduction(num_kept)
    if config.method == "imagepiece" and (block.merged or num_kept is not None):
        return ImagePieceReduction(block.candidates, block.merged, num_kept)
    return NoReduction()


class ReducingBlock(Block):
    """timm's pre-norm block with a token reducer between the attention residual and the MLP.

    Built by timm's VisionTransformer as `block_fn`; `set_reduction` then installs the reducer of
    its schedule row (default: none, i.e. exactly timm's block).
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs["attn_layer"] = ReducingAttention
        super().__init__(*args, **kwargs)
        self.reduction: nn.Module = NoReduction()

    def set_reduction(self, reduction: nn.Module, size_bias: bool) -> None:
        self.reduction = reduction
        self.attn.size_bias = size_bias
        self.attn.returns_class_attention = reduction.needs_class_attention
        self.attn.returns_keys = reduction.needs_keys

    def forward(self, x: torch.Tensor, size: torch.Tensor, source: Optional[torch.Tensor] = None) -> Tokens:
        attended, scores, keys = self.attn(self.norm1(x), size)
        x = x + self.drop_path1(self.ls1(attended))
        x, size, source = self.reduction(x, size, scores, keys, source)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, size, source
