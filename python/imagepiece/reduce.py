"""Pure token-reduction ops: class attention, ToMe matching, ImagePiece re-tokenization and
re-evaluation, EViT pruning.

No timm here and no module state: every function takes tensors plus Python ints fixed at model
construction, so each op exports with static shapes (argsort / gather / scatter_reduce of fixed
sizes, no boolean masks, no `.item()`).

Every ranking is a stable sort: equal scores keep their token order (lower index first), so ties are
broken by position, the same way in eager PyTorch, in an AOTInductor artifact and in ONNX's TopK. That holds
for bitwise-equal values; compiled kernels may compute a score an ulp apart from eager (a fused cosine, say),
so values that tie in eager need not tie there (the parity tests draw inputs without near-ties).

Sequences are [B, N, C] with [CLS] at index 0; [CLS] is never merged or pruned. A matching returns
a `merge(t, mode)` closure (as ToMe does) that applies the same decision to any per-token tensor:
features, sizes, keys, class-attention scores, or source maps for visualisation.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

Merge = Callable[..., torch.Tensor]

# Source-map value of a patch pruned into EViT's fused token (a merged patch has 1).
PRUNED_SOURCE = 0.5


def class_attention(cls_query: torch.Tensor, keys: torch.Tensor, scale: float, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """EViT's token importance: the [CLS] query's softmax row, averaged over heads.

    Computes only that one row ([B, H, 1, N]) beside the fused attention. The logits, softmax and head
    mean are fp32, so in a bf16/fp16 model the ranking adds no rounding of its own; the query and keys
    it reads are the model's, rounded to its dtype, so low precision still moves scores and may flip
    near-tie decisions (`python -m imagepiece.bench precision` measures how many).

    With proportional attention (`bias` = log(size)) this is the row the block's attention itself
    computes, so a merged piece scores what [CLS] pays all its patches together, as EViT reads the
    importance off the attention matrix. Ranking candidates by it (the design notes' A_cls has no size term;
    README "Choices that are ours") keeps a piece whose parts together draw more than the bottom-k out of
    the candidates: it is grouped "until it carries meaning" and is not merged further, and pruning and
    re-evaluation see it the same way.

    Args:
        cls_query: [B, H, 1, d] the [CLS] token's query per head.
        keys: [B, H, N, d] keys per head.
        bias: [B, 1, 1, N] additive logit bias (proportional attention) or None.
    Returns:
        [B, N] attention of [CLS] to every token; column 0 is [CLS] itself and is ignored by callers.
    """
    logits = (cls_query.float() * scale) @ keys.float().transpose(-2, -1)
    if bias is not None:
        logits = logits + bias.float()
    return logits.softmax(dim=-1).mean(dim=1).squeeze(1)


def size_bias(size: torch.Tensor) -> torch.Tensor:
    """Proportional attention's logit bias, log(size), shaped [B, 1, 1, N] for a [B, N, 1] size."""
    return size.log().view(size.shape[0], 1, 1, size.shape[1])


def gather_tokens(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t[b, index[b, i], :] for a [B, N, C] tensor and a [B, M] index."""
    return t.gather(1, index.unsqueeze(-1).expand(-1, -1, t.shape[-1]))


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B, Na, Nb] cosine similarity of every A token to every B token ([B, Na, d] and [B, Nb, d]), fp32."""
    a, b = a.float(), b.float()
    a = a / a.norm(dim=-1, keepdim=True)
    b = b / b.norm(dim=-1, keepdim=True)
    return a @ b.transpose(-1, -2)


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
        # Step 2: each A token's most similar B token (cosine); [CLS] (A's first) may never merge.
        scores = cosine_similarity(metric[:, ::2], metric[:, 1::2])
        scores[:, 0, :] = -torch.inf
        best_score, best_b = scores.max(dim=-1)
        # Step 3: the r most similar edges merge; the rest of A stays, in its original order.
        edges = best_score.argsort(dim=-1, descending=True, stable=True)
        unmerged, merged = edges[:, r:].sort(dim=-1).values, edges[:, :r]
        destinations = best_b.gather(1, merged)

        num_a, num_b = scores.shape[1], scores.shape[2]
        b_positions = torch.arange(num_b, device=metric.device) * 2 + 1
        survivors = torch.cat([unmerged * 2, b_positions.expand(metric.shape[0], -1)], dim=1)
        sources = merged * 2
        slots = destinations + (num_a - r)
    return _merge_by_index(survivors, sources, slots)


def split_candidates(scores: torch.Tensor, num_candidates: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ImagePiece's steps 1-2a: the bottom-k image tokens by class attention, split alternately by rank.

    Splitting by rank, not position, makes A and B span the same attention range.

    Args:
        scores: [B, N] class attention (column 0 is [CLS], never a candidate).
    Returns:
        (a_index, b_index, semantic): token indices of A (ranks 0, 2, 4, ... from the bottom), B
        (ranks 1, 3, ...) and of the other (semantic) image tokens.
    """
    ascending = scores[:, 1:].argsort(dim=-1, stable=True) + 1
    candidates, semantic = ascending[:, :num_candidates], ascending[:, num_candidates:]
    return candidates[:, 0::2], candidates[:, 1::2], semantic


def retokenize(scores: torch.Tensor, metric: torch.Tensor, num_candidates: int, num_merges: int) -> Merge:
    """ImagePiece's re-tokenization (MaxMatch-like merge of non-semantic tokens), steps 1 and 2.

    Args:
        scores: [B, N] class attention (column 0 is [CLS]).
        metric: [B, N, d] keys averaged over heads.
        num_candidates: k, the bottom-k image tokens by class attention that may merge.
        num_merges: r <= k // 2 merges (fewer than the k/2 A tokens: only the most similar pairs).
    Returns:
        merge(t, mode) mapping [B, N, c] to [B, N - r, c] ordered [CLS, semantic tokens, unmerged A,
        B (with merged A folded in)].
    """
    r = num_merges
    with torch.no_grad():
        # Step 1: rank image tokens by class attention; the bottom k are non-semantic candidates.
        # Step 2: split them alternately by that rank into A and B; match each A to its most
        # similar B (cosine of the keys) and merge the r most similar pairs.
        a_index, b_index, semantic = split_candidates(scores, num_candidates)
        similarity = cosine_similarity(gather_tokens(metric, a_index), gather_tokens(metric, b_index))
        best_similarity, best_b = similarity.max(dim=-1)
        edges = best_similarity.argsort(dim=-1, descending=True, stable=True)
        merged, unmerged = edges[:, :r], edges[:, r:]
        cls_index = torch.zeros_like(scores[:, :1], dtype=torch.long)
        survivors = torch.cat([cls_index, semantic, a_index.gather(1, unmerged), b_index], dim=1)
        slots = best_b.gather(1, merged) + (survivors.shape[1] - b_index.shape[1])
        sources = a_index.gather(1, merged)
    return _merge_by_index(survivors, sources, slots)


def merge_wavg(merge: Merge, x: torch.Tensor, size: torch.Tensor,
               extra: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """ToMe's size-weighted average of merged features; sizes add up.

    `extra` (e.g. the per-head keys that re-evaluation needs) is averaged with the same weights in
    the same gather/scatter, by stacking it beside the features on the channel axis.

    Args:
        x: [B, N, C] features; size: [B, N, 1] patches per token; extra: [B, N, E] or None.
    Returns:
        (x, size, extra) after merging; extra is None if not given.
    """
    channels = x.shape[-1]
    parts = [x * size] + ([extra * size] if extra is not None else []) + [size]
    merged = merge(torch.cat(parts, dim=-1), mode="sum")
    size = merged[..., -1:]
    if extra is None:
        return merged[..., :-1] / size, size, None
    # Slice, then divide (not the reverse): OpenVINO 2026.4 folds a Slice that feeds a gather into the
    # gather and then rejects the ONNX graph; dividing each part on its own is the same arithmetic.
    return merged[..., :channels] / size, size, merged[..., channels:-1] / size


def merge_scores(merge: Merge, scores: torch.Tensor) -> torch.Tensor:
    """The "sum" stand-in for re-evaluation: a merged piece scores the sum of its parts' class
    attention (the mass [CLS] paid them); every other token keeps its score. [B, N] -> [B, N - r]."""
    return merge(scores.unsqueeze(-1), mode="sum").squeeze(-1)


def reevaluate(cls_query: torch.Tensor, merged_keys: torch.Tensor, size: torch.Tensor, scale: float,
               proportional: bool = True) -> torch.Tensor:
    """ImagePiece's step 3: recompute the class attention of the merged abstractions and of the
    remaining tokens, so that pruning sees which pieces gained relevance.

    The [CLS] row of the block's attention is evaluated again over the N' tokens after merging: the
    [CLS] query is unchanged ([CLS] never merges), a merged token's key is the size-weighted average
    of its parts' keys (as its features are), and with proportional attention its logit gets
    + log(size), as it will in the next block's attention. Softmax over the N' tokens, mean over
    heads. One row, O(N' d) per head: no N x N matrix.

    Args:
        cls_query: [B, H, 1, d] the block's [CLS] query per head.
        merged_keys: [B, N', H * d] per-head keys after `merge_wavg` (token-major, heads concatenated).
        size: [B, N', 1] sizes after merging.
        proportional: add log(size) to the logits (the model's `prop_attn`).
    Returns:
        [B, N'] fp32 class attention over the merged tokens (column 0 is [CLS]).
    """
    batch, count, _ = merged_keys.shape
    heads, head_dim = cls_query.shape[1], cls_query.shape[-1]
    keys = merged_keys.reshape(batch, count, heads, head_dim).transpose(1, 2)
    return class_attention(cls_query, keys, scale, size_bias(size) if proportional else None)


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
        descending = scores[:, 1:].argsort(dim=-1, descending=True, stable=True) + 1
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
