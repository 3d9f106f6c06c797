"""The vectorised reduction ops against naive references written here.

The references work per sample with Python lists, explicit `sorted` calls and per-pair dot products,
so they share no code path with imagepiece.reduce. Inputs are drawn tie-free: every comparison a
decision depends on (score ranks, best-match margins, merge order) differs by at least TIE_MARGIN,
far above fp32 rounding, so both implementations must take identical decisions. Only the comparisons that decide something
count: the merge boundary (r-th vs (r+1)-th best match), the best-vs-runner-up margin of each merged
token, and the score ranks that choose and split candidates.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from imagepiece.reduce import bipartite_soft_matching, class_attention, merge_wavg, prune_and_fuse, retokenize

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
    x_out, size_out, scores_out = merge_wavg(retokenize(scores, metric, k, r), x, size, scores)
    assert x_out.shape == (3, 61 - r, 12)
    for b in range(x.shape[0]):
        groups, margin = imagepiece_groups_reference(scores[b], metric[b], k, r)
        assert margin > TIE_MARGIN, "inputs are not tie-free; pick another seed"
        ref_x, ref_size, ref_scores = merge_groups_reference(x[b], size[b], scores[b], groups)
        torch.testing.assert_close(x_out[b, 0], ref_x[0])  # [CLS] stays first and untouched
        rows = torch.cat([x_out[b], size_out[b], scores_out[b, :, None]], dim=1)
        ref_rows = torch.cat([ref_x, ref_size[:, None], ref_scores[:, None]], dim=1)
        torch.testing.assert_close(as_row_set(rows), as_row_set(ref_rows), atol=1e-5, rtol=1e-5)


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


def test_class_attention_is_the_cls_row_of_full_attention():
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 30, 8, generator=generator), torch.randn(2, 4, 30, 8, generator=generator)
    size = torch.randint(1, 5, (2, 30), generator=generator).float()
    bias = size.log().view(2, 1, 1, 30)
    full = ((q @ k.transpose(-1, -2)) * 8**-0.5 + bias).softmax(-1)
    torch.testing.assert_close(class_attention(q, k, 8**-0.5, bias), full[:, :, 0].mean(1))


def test_proportional_attention_weights_a_merged_token_like_its_parts():
    """A token of size s attended once must act like s identical tokens (ToMe's proportional attention)."""
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 1, 5, 4, generator=generator) for _ in range(3))
    expanded_k = torch.cat([k, k[:, :, 4:].expand(-1, -1, 2, -1)], dim=2)  # token 4 three times
    expanded_v = torch.cat([v, v[:, :, 4:].expand(-1, -1, 2, -1)], dim=2)
    bias = torch.tensor([1.0, 1, 1, 1, 3]).log().view(1, 1, 1, 5)
    merged = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    torch.testing.assert_close(merged, F.scaled_dot_product_attention(q, expanded_k, expanded_v))
