"""How close an input comes to flipping a discrete token-reduction decision.

Merging and pruning choose tokens by comparing scores; when two compared values are nearly equal,
rounding differences between eager PyTorch and a compiled artifact (or between dtypes) can flip the
choice and change the output legitimately. `decision_margins` measures, per image, the smallest gap
among the comparisons that decide something, so parity tests can separate tie-free inputs (where
outputs must match tightly) from near-ties (where only agreement statistics are meaningful).
"""
from __future__ import annotations

from typing import List

import torch

from .blocks import EViTReduction, ImagePieceReduction, ToMeReduction
from .reduce import merge_wavg, retokenize


def _gap(larger: torch.Tensor, smaller: torch.Tensor, relative: bool) -> torch.Tensor:
    # Class attention is a probability that can be tiny; fp32 error scales with its size, so its
    # gaps count relative to the larger value. Cosine similarities have absolute error.
    return (larger - smaller) / larger.abs() if relative else larger - smaller


def _boundary_gap(values: torch.Tensor, count: int, relative: bool) -> torch.Tensor:
    """Per row: gap between the count-th and (count+1)-th largest value (decides a top-count set)."""
    if count <= 0 or count >= values.shape[1]:
        return torch.full(values.shape[:1], torch.inf, device=values.device)
    top = values.topk(count + 1, dim=1).values
    return _gap(top[:, count - 1], top[:, count], relative)


def _adjacent_gap(values: torch.Tensor, relative: bool) -> torch.Tensor:
    """Per row: smallest gap between neighbours in sorted order (decides a whole ranking)."""
    ordered = values.sort(dim=1).values
    return _gap(ordered[:, 1:], ordered[:, :-1], relative).min(dim=1).values


def _matching_margins(metric: torch.Tensor, a_index: torch.Tensor, b_index: torch.Tensor, num_merges: int) -> torch.Tensor:
    """Smallest of: the r-th/(r+1)-th best-match gap, and each A token's best-vs-runner-up gap."""
    metric = metric.float()
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a = metric.gather(1, a_index[..., None].expand(-1, -1, metric.shape[-1]))
    b = metric.gather(1, b_index[..., None].expand(-1, -1, metric.shape[-1]))
    similarity = a @ b.transpose(-1, -2)
    best_two = similarity.topk(min(2, similarity.shape[-1]), dim=-1).values
    runner_up = best_two[..., 0] - best_two[..., 1] if best_two.shape[-1] > 1 else torch.full_like(best_two[..., 0], torch.inf)
    return torch.minimum(_boundary_gap(best_two[..., 0], num_merges, relative=False), runner_up.min(dim=1).values)


def _imagepiece_margin(reducer: ImagePieceReduction, x, size, scores, keys) -> torch.Tensor:
    margins = []
    image_scores = scores[:, 1:].float()
    if reducer.num_merges:
        k = reducer.num_candidates
        bottom = (-image_scores).topk(k + 1 if k < image_scores.shape[1] else k, dim=1).values.neg()
        margins.append(_adjacent_gap(bottom, relative=True))  # the candidate set and its A/B alternation
        ascending = image_scores.argsort(dim=1)[:, :k] + 1
        margins.append(_matching_margins(keys, ascending[:, 0::2], ascending[:, 1::2], reducer.num_merges))
        _, _, scores = merge_wavg(retokenize(scores, keys, k, reducer.num_merges), x, size, scores)
    if reducer.num_kept is not None:
        margins.append(_boundary_gap(scores[:, 1:].float(), reducer.num_kept, relative=True))
    return torch.stack(margins).min(dim=0).values


def _tome_margin(reducer: ToMeReduction, keys) -> torch.Tensor:
    count = keys.shape[1]
    a_index = torch.arange(2, count, 2, device=keys.device).expand(keys.shape[0], -1)  # [CLS] never merges
    b_index = torch.arange(1, count, 2, device=keys.device).expand(keys.shape[0], -1)
    return _matching_margins(keys, a_index, b_index, reducer.num_merges)


@torch.no_grad()
def decision_margins(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Per image, the smallest decision gap over all blocks of an eager ImagePiece-family model.

    Gaps are relative for class attention (a probability) and absolute for cosine similarity.
    Returns +inf for a model that makes no decisions (method "none").
    """
    margins: List[torch.Tensor] = []

    def probe(reducer, args):
        x, size, scores, keys = args[:4]
        if isinstance(reducer, ImagePieceReduction):
            margins.append(_imagepiece_margin(reducer, x, size, scores, keys))
        elif isinstance(reducer, ToMeReduction):
            margins.append(_tome_margin(reducer, keys))
        elif isinstance(reducer, EViTReduction):
            margins.append(_boundary_gap(scores[:, 1:].float(), reducer.num_kept, relative=True))

    hooks = [block.reduction.register_forward_pre_hook(probe) for block in model.blocks]
    try:
        model(images)
    finally:
        for hook in hooks:
            hook.remove()
    if not margins:
        return torch.full((images.shape[0],), torch.inf)
    return torch.stack(margins).min(dim=0).values.cpu()
