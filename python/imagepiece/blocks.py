"""timm's ViT block and attention, extended to reduce tokens between attention and MLP.

As in ToMe and EViT, reduction sits inside the block, after the attention residual and before the
MLP. What a block does is fixed at construction: its reducer is one of the `*Reduction` modules
below, built from the static schedule, so forward has no data-dependent branches.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block
from torch import nn

from .config import BlockSchedule, ReductionConfig
from .reduce import (
    Merge,
    bipartite_soft_matching,
    class_attention,
    merge_scores,
    merge_source,
    merge_wavg,
    prune_and_fuse,
    reevaluate,
    retokenize,
    size_bias,
)

Tokens = Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]  # (x, size, source)
Rescored = Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]  # (x, size, scores)


class AttentionSummary(NamedTuple):
    """What a block's attention hands its reducer; a field is None where the reducer does not use it."""

    scores: Optional[torch.Tensor] = None  # [B, N] class attention, fp32
    metric: Optional[torch.Tensor] = None  # [B, N, d] keys averaged over heads (ToMe's similarity metric)
    cls_query: Optional[torch.Tensor] = None  # [B, H, 1, d] the [CLS] query per head (for re-evaluation)
    keys: Optional[torch.Tensor] = None  # [B, N, H * d] per-head keys, token-major (for re-evaluation)
    scale: float = 1.0  # the attention's logit scale, 1 / sqrt(d)


# How a block computes softmax(q k^T / sqrt(d) + bias) v; the same arithmetic either way, different kernels:
#   sdpa:   F.scaled_dot_product_attention (flash attention on CPU and GPU; logits and softmax in fp32);
#   matmul: timm's non-fused path, two batched GEMMs around a softmax (`matmul_attention`).
ATTENTION_KERNELS = ("sdpa", "matmul")


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, bias: Optional[torch.Tensor],
                     dropout: nn.Module) -> torch.Tensor:
    """timm's non-fused attention ([B, H, N, d] q, k, v; bias [B, 1, 1, N] or None).

    Why it exists: on a CPU without AMX, PyTorch's flash-attention kernel runs bf16 no faster than fp32,
    while oneDNN's bf16 GEMMs run about twice as fast as fp32's; compiled, these two batched GEMMs and
    Inductor's fused softmax made DeiT-S bf16 calls 1.24x (plain) and 1.14x (ImagePiece) faster than SDPA
    on an AMD EPYC with avx512_bf16 (`python -m imagepiece.bench tuning --dtype bf16 --tunings default
    sdpa-attention`). The cost: the logits are rounded to the model's dtype before the softmax (SDPA keeps
    them in fp32), so in bf16 they deviate a little more from fp32 (`bench precision`).
    """
    logits = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    return dropout(logits.softmax(dim=-1)) @ v


class ReducingAttention(Attention):
    """timm's fused (SDPA) attention plus what token reduction needs.

    Extras, each switched on only where the block's reducer uses it:
      * proportional attention: + log(size) on the logits, as an SDPA additive mask;
      * the [CLS] row of the attention (class attention), computed on its own: no N x N matrix;
      * the keys averaged over heads (the similarity metric of ToMe and ImagePiece);
      * the [CLS] query and the per-head keys, which ImagePiece's re-evaluation needs.
    """

    size_bias: bool = False
    attention_kernel: str = "sdpa"  # one of ATTENTION_KERNELS; `attention_kernel()` sets it for a whole model
    returns_class_attention: bool = False
    returns_metric: bool = False
    returns_keys: bool = False

    def forward(self, x: torch.Tensor, size: torch.Tensor) -> Tuple[torch.Tensor, AttentionSummary]:
        batch, count, _ = x.shape
        qkv = self.qkv(x).reshape(batch, count, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        bias = size_bias(size).to(q.dtype) if self.size_bias else None
        if self.attention_kernel == "matmul":
            out = matmul_attention(q, k, v, self.scale, bias, self.attn_drop)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.0)
        out = self.proj_drop(self.proj(self.norm(out.transpose(1, 2).reshape(batch, count, self.attn_dim))))
        cls_query = q[:, :, :1]
        summary = AttentionSummary(
            scores=class_attention(cls_query, k, self.scale, bias) if self.returns_class_attention else None,
            metric=k.mean(dim=1) if self.returns_metric else None,
            cls_query=cls_query if self.returns_keys else None,
            keys=k.transpose(1, 2).reshape(batch, count, self.attn_dim) if self.returns_keys else None,
            scale=self.scale,
        )
        return out, summary


class NoReduction(nn.Module):
    """Plain DeiT block: tokens pass through."""

    needs_class_attention = needs_metric = needs_keys = False

    def forward(self, x, size, attention: AttentionSummary, source=None) -> Tokens:
        return x, size, source


class ToMeReduction(nn.Module):
    """ToMe: merge `num_merges` bipartite-matched pairs by key similarity, size-weighted."""

    needs_class_attention = needs_keys = False
    needs_metric = True

    def __init__(self, num_merges: int) -> None:
        super().__init__()
        self.num_merges = num_merges

    def forward(self, x, size, attention: AttentionSummary, source=None) -> Tokens:
        merge = bipartite_soft_matching(attention.metric, self.num_merges)
        x, size, _ = merge_wavg(merge, x, size)
        return x, size, merge_source(merge, source)


class Pruning(nn.Module):
    """EViT's pruning: keep the `num_kept` highest-scored image tokens, fuse the rest into one."""

    def __init__(self, num_kept: int) -> None:
        super().__init__()
        self.num_kept = num_kept

    def forward(self, x, size, scores, source=None) -> Tokens:
        return prune_and_fuse(x, size, scores, self.num_kept, source)


class NoPruning(nn.Module):
    def forward(self, x, size, scores, source=None) -> Tokens:
        return x, size, source


class EViTReduction(nn.Module):
    """EViT: keep the `num_kept` most attended image tokens, fuse the rest into one."""

    needs_class_attention = True
    needs_metric = needs_keys = False

    def __init__(self, num_kept: int) -> None:
        super().__init__()
        self.prune = Pruning(num_kept)

    def forward(self, x, size, attention: AttentionSummary, source=None) -> Tokens:
        return self.prune(x, size, attention.scores, source)


class AttentionReevaluation(nn.Module):
    """Step 3 as the paper has it: the class attention recomputed over the merged tokens
    (`reduce.reevaluate`); the per-head keys are merged beside the features, in one scatter."""

    needs_keys = True

    def __init__(self, proportional: bool) -> None:
        super().__init__()
        self.proportional = proportional

    def forward(self, merge: Merge, x, size, attention: AttentionSummary) -> Rescored:
        x, size, keys = merge_wavg(merge, x, size, attention.keys)
        return x, size, reevaluate(attention.cls_query, keys, size, attention.scale, self.proportional)


class SummedScores(nn.Module):
    """The cheaper stand-in (`reevaluation="sum"`): a piece scores the sum of its parts' attention."""

    needs_keys = False

    def forward(self, merge: Merge, x, size, attention: AttentionSummary) -> Rescored:
        x, size, _ = merge_wavg(merge, x, size)
        return x, size, merge_scores(merge, attention.scores)


class NoScores(nn.Module):
    """Where nothing is pruned after merging, no score is needed: the next block ranks afresh."""

    needs_keys = False

    def forward(self, merge: Merge, x, size, attention: AttentionSummary) -> Rescored:
        x, size, _ = merge_wavg(merge, x, size)
        return x, size, None


class ImagePieceReduction(nn.Module):
    """ImagePiece: re-tokenize the bottom-k tokens (steps 1-2), re-evaluate (step 3), then, in
    pruning blocks, prune by the re-evaluated scores (EViT).

    A piece whose parts were each too weak to survive can be kept once merged, if [CLS] attends to
    the piece as a whole; the next block re-ranks everything by fresh class attention.

    Args:
        rescore: `AttentionReevaluation`, `SummedScores`, or `NoScores` where `prune` is `NoPruning`.
        prune: `Pruning(num_kept)` or `NoPruning()`.
    """

    needs_class_attention = needs_metric = True

    def __init__(self, num_candidates: int, num_merges: int, rescore: nn.Module, prune: nn.Module) -> None:
        super().__init__()
        self.num_candidates = num_candidates
        self.num_merges = num_merges
        self.rescore = rescore
        self.prune = prune
        self.needs_keys = rescore.needs_keys

    def forward(self, x, size, attention: AttentionSummary, source=None) -> Tokens:
        merge = retokenize(attention.scores, attention.metric, self.num_candidates, self.num_merges)
        x, size, scores = self.rescore(merge, x, size, attention)
        return self.prune(x, size, scores, merge_source(merge, source))


def make_reduction(config: ReductionConfig, block: BlockSchedule) -> nn.Module:
    """The reducer that performs `block`'s row of the schedule."""
    num_kept = block.tokens_out - 2 if block.fused else None  # minus [CLS] and the fused token
    if config.method == "tome" and block.merged:
        return ToMeReduction(block.merged)
    if config.method in ("evit", "imagepiece") and not block.merged and num_kept is not None:
        return EViTReduction(num_kept)  # pruning without merging (e.g. merge_ratio=0) is EViT's
    if config.method == "imagepiece" and block.merged:
        if num_kept is None:
            return ImagePieceReduction(block.candidates, block.merged, NoScores(), NoPruning())
        rescore = AttentionReevaluation(config.prop_attn) if config.reevaluation == "attention" else SummedScores()
        return ImagePieceReduction(block.candidates, block.merged, rescore, Pruning(num_kept))
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
        self.attn.returns_metric = reduction.needs_metric
        self.attn.returns_keys = reduction.needs_keys

    def forward(self, x: torch.Tensor, size: torch.Tensor, source: Optional[torch.Tensor] = None) -> Tokens:
        attended, summary = self.attn(self.norm1(x), size)
        x = x + self.drop_path1(self.ls1(attended))
        x, size, source = self.reduction(x, size, summary, source)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, size, source


@contextlib.contextmanager
def attention_kernel(model: nn.Module, kernel: str) -> Iterator[None]:
    """Every attention of `model` computes with `kernel` (one of ATTENTION_KERNELS) inside the block, as
    before after it: an export traces the kernel it asks for and leaves the caller's model as it was."""
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel must be one of {list(ATTENTION_KERNELS)}, got {kernel!r}")
    attentions = [module for module in model.modules() if isinstance(module, ReducingAttention)]
    before = [attention.attention_kernel for attention in attentions]
    for attention in attentions:
        attention.attention_kernel = kernel
    try:
        yield
    finally:
        for attention, kernel_before in zip(attentions, before):
            attention.attention_kernel = kernel_before
