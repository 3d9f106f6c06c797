"""Compiled artifacts (CPU fp32) against the eager model they were compiled from.

Tie-free inputs: token reduction makes discrete choices, and a choice between two nearly equal
scores can legitimately flip under compiled arithmetic. `decision_margins` measures each image's
smallest decision gap (relative for class attention, absolute for cosine similarity); images whose
gap exceeds TIE_FREE (~50x the fp32 discrepancy between eager and compiled scores) must give
logits within 1e-4. On all random images, near-ties included, top-1 must agree and cosine >= 0.9999.
"""
import pytest
import torch
import torch.nn.functional as F

from imagepiece.diagnostics import decision_margins
from imagepiece.export import load
from inputs import random_images

TIE_FREE = 1e-5
MAX_ABS_DIFF = 1e-4


def run_in_batches(model, images, batch):
    with torch.inference_mode():
        return torch.cat([model(images[i : i + batch]) for i in range(0, len(images), batch)])


def assert_parity(compiled_model, eager, batch, count=64):
    images = random_images(count, seed=1).to(compiled_model.device)
    with torch.inference_mode():
        margins = decision_margins(eager, images)
    expected, actual = run_in_batches(eager, images, batch), run_in_batches(compiled_model, images, batch)
    margins = margins.to(actual.device)

    tie_free = margins > TIE_FREE
    assert tie_free.sum() >= count // 2, f"only {int(tie_free.sum())} tie-free images; test inputs degenerate"
    assert (actual[tie_free] - expected[tie_free]).abs().max() <= MAX_ABS_DIFF
    assert (actual.argmax(1) == expected.argmax(1)).all()
    assert F.cosine_similarity(actual, expected).mean() >= 0.9999


@pytest.mark.parametrize("name", ["ti_none", "ti_tome_pt2", "ti_evit", "ti_imagepiece"])
def test_deit_tiny_static_batch_matches_eager(compiled, name):
    assert_parity(load(compiled.path(name)), compiled.eager(name), batch=2)


def test_deit_small_imagepiece_matches_eager(compiled):
    assert_parity(load(compiled.path("s_imagepiece")), compiled.eager("s_imagepiece"), batch=2, count=16)


@pytest.mark.parametrize("batch", [64, 5, 1])
def test_dynamic_batch_matches_eager_at_sizes_other_than_the_example(compiled, batch):
    model = load(compiled.path("ti_imagepiece_dynamic"))
    assert model.metadata["batch"] == {"min": 1, "max": 64, "dynamic": True}
    assert_parity(model, compiled.eager("ti_imagepiece_dynamic"), batch=batch, count=64 if batch == 64 else 10)

