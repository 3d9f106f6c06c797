"""How close an input comes to flipping a discrete token-reduction decision (test support).

Merging and pruning choose tokens by comparing scores; when two compared values are nearly equal,
rounding differences between eager PyTorch and a compiled artifact (or between dtypes) can flip the
choice and change the output legitimately. `decision_margins` measures, per image, the smallest gap
among the comparisons that decide something, so parity tests can separate tie-free inputs (where
outputs must match tightly) from near-ties (where only agreement statistics are meaningful).

It watches the model's own reducers (forward pre-hooks) and computes the compared values with the
library's own functions (candidate split, cosine similarity, re-evaluation), so it measures the
decisions the model really takes.
"""
from __future__ import annotations

from typing import List

import torch

from imagepiece.blocks import EViTReduction, ImagePieceReduction, Pruning, ToMeReduction
from imagepiece.input_format import PixelInput
from imagepiece.reduce import cosine_similarity, gather_tokens, retokenize, split_candidates


def _gap(larger: torch.Tensor, smaller: torch.Tensor, relative: bool) -> torch.Tensor:
    # Class attention is a probability that can be tiny; fp32 error scales with its size, so its
    # gaps count relative to the larger value. Cosine similarities have absolute error.
    return (larger - smaller) / larger.abs() if relative else larger - smaller


def _boundary_gap(values: torch.Tensor, count: int, relative: bool) -> torch.Tensor:
    """Per row: gap between the count-th and (count+1)-th largest value (decides a top-count set)."""
    if count <= 0 or count >= values.shape[1]:
        return torch.full(values.shape[:1], torch.inf, device=values.device)
    top = values.float().topk(count + 1, dim=1).values
    return _gap(top[:, count - 1], top[:, count], relative)


def _adjacent_gap(values: torch.Tensor, relative: bool) -> torch.Tensor:
    """Per row: smallest gap between neighbours in sorted order (decides a whole ranking)."""
    ordered = values.sort(dim=1).values
    return _gap(ordered[:, 1:], ordered[:, :-1], relative).min(dim=1).values


def _matching_margin(similarity: torch.Tensor, num_merges: int) -> torch.Tensor:
    """Smallest of: the r-th/(r+1)-th best-match gap, and each A token's best-vs-runner-up gap."""
    best_two = similarity.topk(min(2, similarity.shape[-1]), dim=-1).values
    runner_up = best_two[..., 0] - best_two[..., 1] if best_two.shape[-1] > 1 else torch.full_like(best_two[..., 0], torch.inf)
    return torch.minimum(_boundary_gap(best_two[..., 0], num_merges, relative=False), runner_up.min(dim=1).values)


def _imagepiece_margin(reducer: ImagePieceReduction, x, size, attention) -> torch.Tensor:
    k, scores, metric = reducer.num_candidates, attention.scores, attention.metric
    # The candidate set and its A/B alternation depend on the ranks of the bottom k (+1) scores.
    image_scores = scores[:, 1:].float()
    bottom = (-image_scores).topk(min(k + 1, image_scores.shape[1]), dim=1).values.neg()
    margins = [_adjacent_gap(bottom, relative=True)]
    a_index, b_index, _ = split_candidates(scores, k)
    similarity = cosine_similarity(gather_tokens(metric, a_index), gather_tokens(metric, b_index))
    margins.append(_matching_margin(similarity, reducer.num_merges))
    if isinstance(reducer.prune, Pruning):
        merge = retokenize(scores, metric, k, reducer.num_merges)
        _, _, rescored = reducer.rescore(merge, x, size, attention)
        margins.append(_boundary_gap(rescored[:, 1:], reducer.prune.num_kept, relative=True))
    return torch.stack(margins).min(dim=0).values


def _tome_margin(reducer: ToMeReduction, attention) -> torch.Tensor:
    metric = attention.metric  # A is every even position but [CLS], which never merges; B the odd ones
    return _matching_margin(cosine_similarity(metric[:, 2::2], metric[:, 1::2]), reducer.num_merges)


@torch.no_grad()
def decision_margins(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Per image, the smallest decision gap over all blocks of an eager ImagePiece-family model.

    Gaps are relative for class attention (a probability) and absolute for cosine similarity.
    Returns +inf for a model that makes no decisions (method "plain"). A `PixelInput` takes uint8
    pixels: its inner model's decisions are measured.
    """
    margins: List[torch.Tensor] = []

    def probe(reducer, args):
        x, size, attention = args[:3]
        if isinstance(reducer, ImagePieceReduction):
            margins.append(_imagepiece_margin(reducer, x, size, attention))
        elif isinstance(reducer, ToMeReduction):
            margins.append(_tome_margin(reducer, attention))
        elif isinstance(reducer, EViTReduction):
            margins.append(_boundary_gap(attention.scores[:, 1:], reducer.prune.num_kept, relative=True))

    deciding = model.model if isinstance(model, PixelInput) else model
    hooks = [block.reduction.register_forward_pre_hook(probe) for block in deciding.blocks]
    try:
        model(images)
    finally:
        for hook in hooks:
            hook.remove()
    if not margins:
        return torch.full((images.shape[0],), torch.inf)
    return torch.stack(margins).min(dim=0).values.cpu()
