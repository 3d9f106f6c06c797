"""Pure token-reduction ops: class attention, ToMe matching, ImagePiece re-tokenization, EViT pruning.

No timm here and no module state: every function takes tensors plus Python ints fixed at model
construction, so each op exports with static shapes (argsort / gather / scatter_reduce of fixed
sizes, no boolean masks, no `.item()`).

Sequences are [B, N, C] with [CLS] at index 0; [CLS] is never merged or pruned. A matching returns
a `merge(t, mode)` closure (as ToMe does) that applies the same decision to any per-token tensor:
features, sizes, class-attention scores, or source maps for visualisation.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

Merge = Callable[..., torch.Tensor]

# Source-map value of a patch pruned into EViT's fused token (a merged patch has 1).
PRUNED_SOURCE = 0.5


def class_attention(q: torch.Tensor, k: torch.Tensor, scale: float, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """EViT's token importance: the [CLS] query's softmax row, averaged over heads.

    Computes only that one row ([B, H, 1, N]) beside the fused attention, in fp32 so that the
    ranking decisions do not depend on the model's dtype.

    Args:
        q, k: [B, H, N, d] queries and keys.
        bias: [B, 1, 1, N] additive logit bias (proportional attention) or None.
    Returns:
        [B, N] attention of [CLS] to every token; column 0 is [CLS] itself and is ignored by callers.
    """
    logits = (q[:, :, :1].float() * scale) @ k.float().transpose(-2, -1)
    if bias is not None:
        logits = logits + bias.float()
    return logits.softmax(dim=-1).mean(dim=1).squeeze(1)


def gather_tokens(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t[b, index[b, i], :] for a [B, N, C] tensor and a [B, M] index."""
    return t.gather(1, index.unsqueeze(-1).expand(-1, -1, t.shape[-1]))


def _merge_by_index(survivors: torch.Tensor, sources: torch.Tensor, destinations: torch.Tensor) -> Merge:
    """A merge closure: keep `survivors` in order, fold each `sources` token into slot `destinations`."""

    def merge(t: torch.Tensor, mode: str = "sum") -> torch.Tensor:
        out = gather_tokens(t, survivors)
        src = gather_tokens(t, sources)
        slots = destinations.unsqueeze(-1).expand(-1, -1, t.shape[-1])
        return out.scatter_reduce(1, slots, src, reduce=mode)

    return merge


def bipartite_soft_matching(metric: torch.Tensor, r: int) -> Merge:
    """ToMe's matching (Bolya et al. 2023), with [CLS] protected.

    Args:
        metric: [B, N, d] keys averaged over heads.
        r: merges; the caller has already clamped it to (N - 1) // 2.
    Returns:
        merge(t, mode) mapping [B, N, c] to [B, N - r, c], ordered as ToMe orders it: unmerged A tokens
        in their original order ([CLS] first), then all B tokens.
    """
    with torch.no_grad():
        # Step 1: split the sequence alternately by position into A (even) and B (odd).
        metric = metric.float()
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, ::2], metric[:, 1::2]
        # Step 2: each A token's most similar B token (cosine); [CLS] (A's first) may never merge.
        scores = a @ b.transpose(-1, -2)
        scores[:, 0, :] = -torch.inf
        best_score, best_b = scores.max(dim=-1)
        # Step 3: the r most similar edges merge; the rest of A stays, in its original order.
        edges = best_score.argsort(dim=-1, descending=True)
        unmerged, merged = edges[:, r:].sort(dim=-1).values, edges[:, :r]
        destinations = best_b.gather(1, merged)

        num_a, num_b = a.shape[1], b.shape[1]
        b_positions = torch.arange(num_b, device=metric.device) * 2 + 1
        survivors = torch.cat([unmerged * 2, b_positions.expand(metric.shape[0], -1)], dim=1)
        sources = merged * 2
        slots = destinations + (num_a - r)
    return _merge_by_index(survivors, sources, slots)


def retokenize(scores: torch.Tensor, metric: torch.Tensor, num_candidates: int, num_merges: int) -> Merge:
    """ImagePiece's re-tokenization (MaxMatch-like merge of non-semantic tokens).

    Args:
        scores: [B, N] class attention (column 0 is [CLS]).
        metric: [B, N, d] keys averaged over heads.
        num_candidates: k, the bottom-k image tokens by class attention that may merge.
        num_merges: r <= k // 2 merges.
    Returns:
        merge(t, mode) mapping [B, N, c] to [B, N - r, c] ordered [CLS, semantic tokens, unmerged A,
        B (with merged A folded in)].
    """
    k, r = num_candidates, num_merges
    with torch.no_grad():
        # Step 1: rank image tokens by class attention; the bottom k are non-semantic candidates.
        ascending = scores[:, 1:].argsort(dim=-1) + 1
        candidates, semantic = ascending[:, :k], ascending[:, k:]
        # Step 2: split the candidates alternately by that rank into A and B, so both halves span
        # the same attention range; match each A to its most similar B (cosine of the keys).
        a_index, b_index = candidates[:, 0::2], candidates[:, 1::2]
        metric = metric.float()
        metric = metric / metric.norm(dim=-1, keepdim=True)
        similarity = gather_tokens(metric, a_index) @ gather_tokens(metric, b_index).transpose(-1, -2)
        best_similarity, best_b = similarity.max(dim=-1)
        # Step 3: merge the r most similar pairs; Step 4 (re-evaluation) happens in the caller by
        # merging the scores too: a piece's relevance is the attention mass of its parts.
        edges = best_similarity.argsort(dim=-1, descending=True)
        merged, unmerged = edges[:, :r], edges[:, r:]
        cls_index = torch.zeros_like(scores[:, :1], dtype=torch.long)
        survivors = torch.cat([cls_index, semantic, a_index.gather(1, unmerged), b_index], dim=1)
        slots = best_b.gather(1, merged) + (survivors.shape[1] - b_index.shape[1])
        sources = a_index.gather(1, merged)
    return _merge_by_index(survivors, sources, slots)


def merge_wavg(merge: Merge, x: torch.Tensor, size: torch.Tensor, scores: Optional[torch.Tensor] = None):
    """Size-weighted average of merged features; sizes (and attention scores, if given) add up.

    Features, sizes and scores go through one gather/scatter by stacking them on the channel axis.

    Args:
        x: [B, N, C] features; size: [B, N, 1] patches per token; scores: [B, N] or None.
    Returns:
        (x, size, scores) after merging; scores is None if not given.
    """
    # Scores stay in their own (fp32) tensor for half-precision models: they decide what is pruned.
    stack_scores = scores is not None and scores.dtype == x.dtype
    parts = [x * size, size] + ([scores.unsqueeze(-1)] if stack_scores else [])
    merged = merge(torch.cat(parts, dim=-1), mode="sum")
    channels = x.shape[-1]
    size = merged[..., channels : channels + 1]
    if stack_scores:
        scores = merged[..., channels + 1]
    elif scores is not None:
        scores = merge(scores.unsqueeze(-1), mode="sum").squeeze(-1)
    return merged[..., :channels] / size, size, scores


def merge_source(merge: Merge, source: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Track which input patches each token covers ([B, N, num_patches + 1] map), as ToMe does."""
    return None if source is None else merge(source, mode="amax")


def prune_and_fuse(
    x: torch.Tensor,
    size: torch.Tensor,
    scores: torch.Tensor,
    num_kept: int,
    source: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """EViT (Liang et al. 2022): keep the top `num_kept` image tokens by class attention, fuse the rest.

    The fused token is the attention-weighted sum of the dropped tokens (EViT does not renormalise)
    and is appended last. It is a new summary token, not an average of its parts, so its size is 1:
    proportional attention does not up-weight it, and the sizes of the dropped tokens leave the sum.
    Its source map covers the dropped tokens' patches with the value PRUNED_SOURCE.

    Args:
        x: [B, N, C]; size: [B, N, 1]; scores: [B, N] class attention (column 0 is [CLS]).
    Returns:
        (x, size, source) with N' = 1 + num_kept + 1 tokens.
    """
    with torch.no_grad():
        descending = scores[:, 1:].argsort(dim=-1, descending=True) + 1
        cls_index = torch.zeros_like(descending[:, :1])
        kept = torch.cat([cls_index, descending[:, :num_kept]], dim=1)
        dropped = descending[:, num_kept:]
    weights = gather_tokens(scores.unsqueeze(-1), dropped).to(x.dtype)
    fused = (gather_tokens(x, dropped) * weights).sum(dim=1, keepdim=True)
    x = torch.cat([gather_tokens(x, kept), fused], dim=1)
    size = torch.cat([gather_tokens(size, kept), torch.ones_like(size[:, :1])], dim=1)
    if source is not None:
        # 0.5 marks "pruned into this token" (1 is "merged into it"), so merges, which take the
        # max, keep telling the two apart.
        fused_source = gather_tokens(source, dropped).amax(dim=1, keepdim=True).clamp(max=PRUNED_SOURCE)
        source = torch.cat([gather_tokens(source, kept), fused_source], dim=1)
    return x, size, source
