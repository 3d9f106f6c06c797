"""The vectorised reduction ops (and the project's attention) against naive references written here.

The references work per sample with Python lists, explicit `sorted` calls, per-pair dot products and
`math.exp`, so they share no code path with imagepiece.reduce. Inputs are drawn tie-free: every comparison a
decision depends on (score ranks, best-match margins, merge order) differs by at least TIE_MARGIN,
far above fp32 rounding, so both implementations must take identical decisions. Only the comparisons that decide something
count: the merge boundary (r-th vs (r+1)-th best match), the best-vs-runner-up margin of each merged
token, and the score ranks that choose and split candidates.
"""
import math

import pytest
import torch

from imagepiece.blocks import (
    AttentionReevaluation,
    AttentionSummary,
    ImagePieceReduction,
    Pruning,
    ReducingAttention,
    SummedScores,
)
from imagepiece.reduce import (
    PRUNED_SOURCE,
    bipartite_soft_matching,
    class_attention,
    merge_scores,
    merge_wavg,
    prune_and_fuse,
    reevaluate,
    retokenize,
)

TIE_MARGIN = 1e-5


def boundary_gap(values, count):
    """Gap between the count-th and (count+1)-th largest value: decides which `count` are chosen."""
    ordered = sorted((float(v) for v in values), reverse=True)
    return ordered[count - 1] - ordered[count] if 0 < count < len(ordered) else math.inf


def min_gap(values):
    ordered = sorted(float(v) for v in values)
    return min((b - a for a, b in zip(ordered, ordered[1:])), default=math.inf)


def cosine(u, v):
    return float(sum(a * b for a, b in zip(u.tolist(), v.tolist())) / (u.norm() * v.norm()))


def best_matches(a_tokens, b_tokens, metric):
    """For each A token: (best cosine, best B token, margin over the runner-up)."""
    result = []
    for a in a_tokens:
        sims = sorted(((cosine(metric[a], metric[b]), b) for b in b_tokens), reverse=True)
        margin = sims[0][0] - sims[1][0] if len(sims) > 1 else math.inf
        result.append((sims[0][0], sims[0][1], margin))
    return result


def draw_inputs(seed, batch=3, tokens=61, channels=12, key_dim=6):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, channels, generator=generator)
    size = torch.randint(1, 4, (batch, tokens, 1), generator=generator).float()
    size[:, 0] = 1
    # Distinct ranks with gaps of 1/sum(1..tokens) ~ 5e-4: attention-like, positive, tie-free.
    ranks = torch.stack([torch.randperm(tokens, generator=generator) for _ in range(batch)]) + 1
    scores = ranks.float() / ranks.sum(dim=1, keepdim=True)
    metric = torch.randn(batch, tokens, key_dim, generator=generator)
    return x, size, scores, metric


def draw_queries_and_keys(seed, batch=3, tokens=61, heads=2, head_dim=4):
    """A [CLS] query per head [B, H, 1, d] and per-head keys, token-major [B, N, H * d]."""
    generator = torch.Generator().manual_seed(seed + 1000)
    cls_query = 2 * torch.randn(batch, heads, 1, head_dim, generator=generator)
    keys = torch.randn(batch, tokens, heads * head_dim, generator=generator)
    return cls_query, keys


# ---- naive references ------------------------------------------------------------------------


def merge_groups_reference(x, size, scores, groups):
    """Tokens of each group (list of input indices) become one size-weighted token; scores add."""
    out_x, out_size, out_scores = [], [], []
    for group in groups:
        total = sum(float(size[i]) for i in group)
        out_x.append(sum(x[i] * float(size[i]) for i in group) / total)
        out_size.append(total)
        out_scores.append(sum(float(scores[i]) for i in group))
    return torch.stack(out_x), torch.tensor(out_size), torch.tensor(out_scores)


def reevaluate_reference(cls_query, keys, size, groups, scale):
    """Step 3 on one sample: per group, the size-weighted mean key of each head; [CLS]'s softmax over
    the groups with + log(group size) on the logits, per head; then the mean over heads."""
    heads, head_dim = cls_query.shape[0], cls_query.shape[-1]
    per_head = []
    for h in range(heads):
        query = cls_query[h, 0].tolist()
        logits = []
        for group in groups:
            total = sum(float(size[i]) for i in group)
            key = [sum(float(size[i]) * float(keys[i, h * head_dim + j]) for i in group) / total for j in range(head_dim)]
            logits.append(scale * sum(q * k for q, k in zip(query, key)) + math.log(total))
        largest = max(logits)
        weights = [math.exp(value - largest) for value in logits]
        per_head.append([w / sum(weights) for w in weights])
    return [sum(column) / heads for column in zip(*per_head)]


def tome_groups_reference(metric, r):
    """ToMe on one sample: groups in ToMe's output order (unmerged A by position, then B)."""
    n = metric.shape[0]
    a_tokens, b_tokens = list(range(0, n, 2)), list(range(1, n, 2))
    matches = dict(zip(a_tokens[1:], best_matches(a_tokens[1:], b_tokens, metric)))
    by_similarity = sorted(matches, key=lambda a: matches[a][0], reverse=True)
    merged = set(by_similarity[:r])
    groups = [[a] for a in a_tokens if a not in merged]
    for b in b_tokens:
        groups.append([b] + [a for a in merged if matches[a][1] == b])
    decisions = [matches[a][2] for a in merged] + [boundary_gap([m[0] for m in matches.values()], r)]
    return groups, min(decisions)


def imagepiece_groups_reference(scores, metric, k, r):
    """ImagePiece on one sample: groups in any order ([CLS] first)."""
    n = scores.shape[0]
    ranked = sorted(range(1, n), key=lambda i: float(scores[i]))
    candidates, semantic = ranked[:k], ranked[k:]
    a_tokens, b_tokens = candidates[0::2], candidates[1::2]
    matches = dict(zip(a_tokens, best_matches(a_tokens, b_tokens, metric)))
    by_similarity = sorted(a_tokens, key=lambda a: matches[a][0], reverse=True)
    merged = set(by_similarity[:r])
    groups = [[0]] + [[i] for i in semantic] + [[a] for a in a_tokens if a not in merged]
    for b in b_tokens:
        groups.append([b] + [a for a in merged if matches[a][1] == b])
    decisions = [matches[a][2] for a in merged] + [boundary_gap([m[0] for m in matches.values()], r)]
    decisions += [min_gap(scores[1:])]
    return groups, min(decisions)


def prune_reference(x, scores, num_kept):
    """EViT on one sample: [CLS], kept tokens, then sum(score * x) of the rest; as a list of rows."""
    ranked = sorted(range(1, x.shape[0]), key=lambda i: float(scores[i]), reverse=True)
    kept, dropped = ranked[:num_kept], ranked[num_kept:]
    fused = sum(x[i] * float(scores[i]) for i in dropped)
    return [x[0]] + [x[i] for i in kept] + [fused], min_gap(scores[1:])


def as_row_set(rows):
    """Order-free comparison: rows sorted by their first channel (tie-free for random inputs)."""
    rows = torch.stack(list(rows))
    return rows[rows[:, 0].argsort()]


# ---- tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tome_equals_naive_reference(seed):
    x, size, _, metric = draw_inputs(seed)
    r = 13
    x_out, size_out, _ = merge_wavg(bipartite_soft_matching(metric, r), x, size)
    assert x_out.shape == (3, 61 - r, 12)
    for b in range(x.shape[0]):
        groups, margin = tome_groups_reference(metric[b], r)
        assert margin > TIE_MARGIN, "inputs are not tie-free; pick another seed"
        ref_x, ref_size, _ = merge_groups_reference(x[b], size[b], torch.zeros(61), groups)
        # ToMe's order matters (its next A/B split is by position), so compare in order.
        torch.testing.assert_close(x_out[b], ref_x, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(size_out[b, :, 0], ref_size)


@pytest.mark.parametrize("seed", [0, 3, 4])
def test_imagepiece_retokenize_equals_naive_reference(seed):
    x, size, scores, metric = draw_inputs(seed)
    k, r = 18, 5
    merge = retokenize(scores, metric, k, r)
    x_out, size_out, _ = merge_wavg(merge, x, size)
    scores_out = merge_scores(merge, scores)
    assert x_out.shape == (3, 61 - r, 12)
    for b in range(x.shape[0]):
        groups, margin = imagepiece_groups_reference(scores[b], metric[b], k, r)
        assert margin > TIE_MARGIN, "inputs are not tie-free; pick another seed"
        ref_x, ref_size, ref_scores = merge_groups_reference(x[b], size[b], scores[b], groups)
        torch.testing.assert_close(x_out[b, 0], ref_x[0])  # [CLS] stays first and untouched
        rows = torch.cat([x_out[b], size_out[b], scores_out[b, :, None]], dim=1)
        ref_rows = torch.cat([ref_x, ref_size[:, None], ref_scores[:, None]], dim=1)
        torch.testing.assert_close(as_row_set(rows), as_row_set(ref_rows), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 3, 4])
def test_reevaluation_then_pruning_equals_naive_reference(seed):
    """ImagePiece's steps 1-3 and pruning in one reducer, against the per-image reference."""
    x, size, scores, metric = draw_inputs(seed)
    cls_query, keys = draw_queries_and_keys(seed)
    k, r, num_kept, scale = 18, 5, 40, 0.5
    reducer = ImagePieceReduction(k, r, AttentionReevaluation(proportional=True), Pruning(num_kept))
    attention = AttentionSummary(scores=scores, metric=metric, cls_query=cls_query, keys=keys, scale=scale)
    x_out, size_out, _ = reducer(x, size, attention)
    assert x_out.shape == (3, 1 + num_kept + 1, 12)
    for b in range(x.shape[0]):
        groups, margin = imagepiece_groups_reference(scores[b], metric[b], k, r)
        assert margin > TIE_MARGIN, "inputs are not tie-free; pick another seed"
        ref_x, ref_size, _ = merge_groups_reference(x[b], size[b], scores[b], groups)
        ref_scores = reevaluate_reference(cls_query[b], keys[b], size[b], groups, scale)
        assert abs(sum(ref_scores) - 1) < 1e-9
        ranked = sorted(range(1, len(groups)), key=lambda g: ref_scores[g], reverse=True)
        assert boundary_gap([ref_scores[g] for g in ranked], num_kept) > TIE_MARGIN * max(ref_scores)
        kept, dropped = ranked[:num_kept], ranked[num_kept:]
        torch.testing.assert_close(x_out[b, 0], ref_x[0])
        kept_rows = torch.cat([ref_x[kept], ref_size[kept, None]], dim=1)
        torch.testing.assert_close(as_row_set(torch.cat([x_out[b, 1:-1], size_out[b, 1:-1]], dim=1)), as_row_set(kept_rows),
                                   atol=1e-5, rtol=1e-5)
        fused = sum(ref_x[g] * ref_scores[g] for g in dropped)  # weighted by the re-evaluated scores
        torch.testing.assert_close(x_out[b, -1], fused.float(), atol=1e-5, rtol=1e-4)


def test_reevaluate_equals_naive_reference_over_merged_keys():
    x, size, scores, metric = draw_inputs(7)
    cls_query, keys = draw_queries_and_keys(7)
    merge = retokenize(scores, metric, 18, 9)
    _, merged_size, merged_keys = merge_wavg(merge, x, size, keys)
    rescored = reevaluate(cls_query, merged_keys, merged_size, scale=0.5)
    assert rescored.dtype == torch.float32 and rescored.shape == (3, 61 - 9)
    for b in range(3):
        groups, _ = imagepiece_groups_reference(scores[b], metric[b], 18, 9)
        reference = reevaluate_reference(cls_query[b], keys[b], size[b], groups, 0.5)
        # merge order differs from the reference's group order: compare (size, score) pairs as sets
        ours = sorted(zip(merged_size[b, :, 0].tolist(), rescored[b].tolist()))
        theirs = sorted(zip([sum(float(size[b, i]) for i in g) for g in groups], reference))
        torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs, dtype=torch.float32), atol=1e-6, rtol=1e-5)


def test_a_merged_piece_survives_pruning_through_reevaluation():
    """Two weak look-alike tokens are each outranked by a third token, but merged into one piece
    [CLS] attends to the piece as a whole: re-evaluation keeps it, and the third token is pruned."""
    # One head, 2-d keys, [CLS] query along the first axis: a token's logit is its key's first
    # coordinate. Ranks (ascending): 1, 2 (the pair), 3, 4 (a bit stronger each), 5..8 (semantic).
    first = torch.tensor([0.0, 1.00, 1.01, 1.5, 1.52, 4.0, 4.1, 4.2, 4.3])
    second = torch.tensor([0.0, 3.0, 3.0, -3.0, 3.0, 0.0, 0.0, 0.0, 0.0])
    keys = torch.stack([first, second], dim=-1)[None]  # [1, 9, 2]
    cls_query = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    scores = class_attention(cls_query, keys[:, None], scale=1.0)
    # The metric: tokens 1 and 2 identical, token 3 unlike anything, token 4 half-like the pair.
    metric = torch.tensor([[0, 0, 1.0], [1, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1], [0, 1, 1], [1, 0, 1], [1, 1, 1]])[None]
    x = torch.randn(1, 9, 8)
    source = torch.eye(9)[None]
    num_kept = 5  # of 7 image tokens after one merge: the 4 semantic ones and one more
    assert scores[0, 1] < scores[0, 3] and scores[0, 2] < scores[0, 3]  # each part alone loses to token 3
    reducer = ImagePieceReduction(4, 1, AttentionReevaluation(proportional=True), Pruning(num_kept))
    attention = AttentionSummary(scores=scores, metric=metric, cls_query=cls_query, keys=keys.reshape(1, 9, 2), scale=1.0)
    _, size, source = reducer(x, torch.ones(1, 9, 1), attention, source)
    kept = source[0, 1:-1]  # [CLS] first, the fused token last
    piece = kept[:, 1] == 1
    assert piece.sum() == 1 and kept[piece][0, 2] == 1 and size[0, 1:-1][piece].item() == 2  # tokens 1+2, kept
    assert (kept[:, 3] == 0).all() and source[0, -1, 3] == PRUNED_SOURCE  # token 3 was pruned instead
    # EViT alone, on the scores before merging, keeps as many image tokens and prunes both parts.
    _, _, evit_source = prune_and_fuse(x, torch.ones(1, 9, 1), scores, num_kept, torch.eye(9)[None])
    assert (evit_source[0, :-1, 1:3] == 0).all()
    # Without the size bias, the piece would count as one token again and lose to token 4.
    reducer.rescore.proportional = False
    _, _, source = reducer(x, torch.ones(1, 9, 1), attention, torch.eye(9)[None])
    assert (source[0, 1:-1, 1] == 0).all() and (source[0, 1:-1, 4] == 1).any()


def test_summed_scores_are_the_parts_attention_mass():
    x, size, scores, metric = draw_inputs(8)
    merge = retokenize(scores, metric, 18, 9)
    _, _, summed = SummedScores()(merge, x, size, AttentionSummary(scores=scores))
    torch.testing.assert_close(summed.sum(dim=1), scores.sum(dim=1))
    assert summed.shape == (3, 61 - 9)


def test_imagepiece_never_merges_semantic_tokens_or_cls():
    x, size, scores, metric = draw_inputs(5)
    k, r = 18, 9
    merge = retokenize(scores, metric, k, r)
    top = scores[:, 1:].argsort(dim=-1, descending=True)[:, : 60 - k] + 1
    marker = torch.zeros(3, 61, 1)
    marker.scatter_(1, top[..., None], 1.0)
    marker[:, 0] = 1.0
    # Every protected token keeps size 1: nothing merged into it.
    merged_sizes = merge(torch.ones(3, 61, 1), mode="sum")
    protected = merge(marker, mode="amax")
    assert (merged_sizes[protected == 1] == 1).all()
    assert protected.sum() == marker.sum()


@pytest.mark.parametrize("seed", [0, 6])
def test_evit_prune_and_fuse_equals_naive_reference(seed):
    x, size, scores, _ = draw_inputs(seed)
    num_kept = 40
    x_out, size_out, _ = prune_and_fuse(x, size, scores, num_kept)
    assert x_out.shape == (3, 1 + num_kept + 1, 12)
    for b in range(x.shape[0]):
        rows, margin = prune_reference(x[b], scores[b], num_kept)
        assert margin > TIE_MARGIN
        torch.testing.assert_close(x_out[b, 0], rows[0])
        torch.testing.assert_close(x_out[b, -1], rows[-1], atol=1e-5, rtol=1e-5)  # the fused token
        torch.testing.assert_close(as_row_set(x_out[b, 1:-1]), as_row_set(rows[1:-1]))
        assert size_out[b, -1, 0] == 1  # fused token: a new token of size 1 (see prune_and_fuse)


def make_attention(dim=16, heads=2, seed=0):
    torch.manual_seed(seed)
    attention = ReducingAttention(dim, num_heads=heads, qkv_bias=True).eval()
    attention.returns_class_attention = attention.returns_metric = attention.returns_keys = True
    return attention


def test_the_attention_gives_the_cls_row_of_full_attention_and_what_reevaluation_needs():
    attention = make_attention()
    attention.size_bias = True
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 30, 16, generator=generator)
    size = torch.randint(1, 5, (2, 30, 1), generator=generator).float()
    with torch.no_grad():
        _, summary = attention(x, size)
        q, k, _ = attention.qkv(x).reshape(2, 30, 3, 2, 8).permute(2, 0, 3, 1, 4)
    # The naive way: the full N x N attention with the size bias, then its [CLS] row.
    full = ((q @ k.transpose(-1, -2)) * 8**-0.5 + size.log().view(2, 1, 1, 30)).softmax(-1)
    torch.testing.assert_close(summary.scores, full[:, :, 0].mean(1))
    torch.testing.assert_close(summary.metric, k.mean(1))
    torch.testing.assert_close(summary.cls_query, q[:, :, :1])
    torch.testing.assert_close(summary.keys, k.transpose(1, 2).reshape(2, 30, 16))
    # With nothing merged, re-evaluating over the same tokens and sizes gives the same row again.
    torch.testing.assert_close(reevaluate(summary.cls_query, summary.keys, size, summary.scale), summary.scores)


def test_proportional_attention_weights_a_merged_token_like_its_parts():
    """In the project's attention, a token of size s acts like s identical tokens (ToMe's
    proportional attention), for the other tokens' outputs and for [CLS]'s attention to it."""
    attention = make_attention(seed=1)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 5, 16, generator=generator)
    expanded = torch.cat([x, x[:, 4:].expand(-1, 2, -1)], dim=1)  # token 4 three times
    with torch.no_grad():
        attention.size_bias = True
        merged_out, merged = attention(x, torch.tensor([1.0, 1, 1, 1, 3]).view(1, 5, 1))
        attention.size_bias = False
        expanded_out, unmerged = attention(expanded, torch.ones(1, 7, 1))
    torch.testing.assert_close(merged_out, expanded_out[:, :5])
    torch.testing.assert_close(merged.scores[:, :4], unmerged.scores[:, :4])
    torch.testing.assert_close(merged.scores[:, 4], unmerged.scores[:, 4:].sum(dim=1))
