"""Compiled artifacts (CPU fp32) against the eager model they were compiled from.

Tie-free inputs: token reduction makes discrete choices, and a choice between two nearly equal
scores can legitimately flip under compiled arithmetic (which differs between CPUs: AVX-512 on one
machine, AVX2 on another). `decision_margins` measures each image's smallest decision gap (relative
for class attention, absolute for cosine similarity); images whose gap exceeds TIE_FREE (~50x the
fp32 discrepancy between eager and compiled scores) must give logits within MAX_ABS_DIFF and the same
top-1. On the near-tie rest a flipped decision changes the output (one flipped merge can move top-1 of
a random-weight model), so only agreement is asserted there: top-1 equal on all but
NEAR_TIE_MISMATCHES of them, and mean cosine similarity >= NEAR_TIE_COSINE. The suite thus passes on
any x86-64 CPU without accepting a broken artifact (which fails the tie-free checks).
"""
import pytest
import torch
import torch.nn.functional as F

from diagnostics import decision_margins
from imagepiece.blocks import attention_kernel
from imagepiece.export import load
from imagepiece.input_format import random_pixels
from imagepiece.predict.preprocess import normalise
from inputs import random_images

TIE_FREE = 1e-5
MAX_ABS_DIFF = 1e-4
NEAR_TIE_COSINE = 0.8


def near_tie_mismatches_allowed(near_ties: int) -> int:
    """At most half of the near-tie images (at least one) may change top-1."""
    return max(1, near_ties // 2)


def run_in_batches(model, images, batch):
    with torch.inference_mode():
        return torch.cat([model(images[i : i + batch]) for i in range(0, len(images), batch)])


def assert_parity(compiled_model, eager, batch, count=64, images=None, reference=None):
    """`compiled_model` matches `reference` (default: `eager`) on `images` (default: `count` Gaussian
    images); `eager`'s decision margins say which images are tie-free."""
    images = (random_images(count, seed=1) if images is None else images).to(compiled_model.device)
    count, reference = len(images), reference or eager
    with torch.inference_mode():
        margins = decision_margins(eager, images)
    expected, actual = run_in_batches(reference, images, batch), run_in_batches(compiled_model, images, batch)
    margins = margins.to(actual.device)

    tie_free = margins > TIE_FREE
    assert tie_free.sum() >= count // 2, f"only {int(tie_free.sum())} tie-free images; test inputs degenerate"
    assert (actual[tie_free] - expected[tie_free]).abs().max() <= MAX_ABS_DIFF
    same_top1 = actual.argmax(1) == expected.argmax(1)
    assert same_top1[tie_free].all()
    near_tie = ~tie_free
    if near_tie.any():
        mismatches, cosine = int((~same_top1[near_tie]).sum()), F.cosine_similarity(actual[near_tie], expected[near_tie])
        summary = f"{mismatches} of {int(near_tie.sum())} near-tie images changed top-1; cosine mean {cosine.mean():.5f}"
        assert mismatches <= near_tie_mismatches_allowed(int(near_tie.sum())), summary
        assert cosine.mean() >= NEAR_TIE_COSINE, summary


@pytest.mark.parametrize("name", ["ti_plain", "ti_tome_pt2", "ti_evit", "ti_imagepiece"])
def test_deit_tiny_static_batch_matches_eager(compiled, name):
    assert_parity(load(compiled.path(name)), compiled.eager(name), batch=2)


def test_deit_small_imagepiece_matches_eager(compiled):
    assert_parity(load(compiled.path("s_imagepiece")), compiled.eager("s_imagepiece"), batch=2, count=16)


class WithAttentionKernel:
    """The eager model, run with another attention kernel: the same arithmetic, other rounding."""

    def __init__(self, model, kernel):
        self.model, self.kernel, self.device = model, kernel, torch.device("cpu")

    def __call__(self, images):
        with attention_kernel(self.model, self.kernel):
            return self.model(images)


def test_matmul_attention_computes_what_sdpa_computes_and_leaves_the_model_as_it_was(compiled):
    eager = compiled.eager("ti_imagepiece")  # proportional attention: the size-bias path as well
    assert_parity(WithAttentionKernel(eager, "matmul"), eager, batch=2, count=16)
    assert {block.attn.attention_kernel for block in eager.blocks} == {"sdpa"}
    with pytest.raises(ValueError, match="attention kernel must be one of"):
        with attention_kernel(eager, "flash"):
            pass


@pytest.mark.parametrize("batch", [64, 5, 1])
def test_dynamic_batch_matches_eager_at_sizes_other_than_the_example(compiled, batch):
    model = load(compiled.path("ti_imagepiece_dynamic"))
    assert model.metadata["batch"] == {"min": 1, "max": 64, "dynamic": True}
    assert_parity(model, compiled.eager("ti_imagepiece_dynamic"), batch=batch, count=64 if batch == 64 else 10)


class OnPixels:
    """A float artifact fed uint8 pixels normalised on the host, as predict feeds one."""

    def __init__(self, model):
        self.model, self.device = model, model.device
        self.mean, self.std = model.metadata["preprocessing"]["mean"], model.metadata["preprocessing"]["std"]

    def __call__(self, pixels):
        return self.model(normalise(pixels, self.mean, self.std))


def test_uint8_input_artifact_matches_eager_with_the_same_normalisation(compiled):
    model = load(compiled.path("ti_imagepiece_uint8"))
    assert (model.metadata["input_format"], model.metadata["dtype"], model.metadata["precision"]) == ("uint8_nhwc", "uint8", "fp32")
    assert_parity(model, compiled.eager("ti_imagepiece_uint8"), batch=2, images=random_pixels(64, seed=1))


def test_uint8_input_artifact_matches_the_float_artifact_on_the_same_pixels(compiled):
    pixels = random_pixels(64, seed=2)
    assert_parity(load(compiled.path("ti_imagepiece_uint8")), compiled.eager("ti_imagepiece_uint8"), batch=2, images=pixels,
                  reference=OnPixels(load(compiled.path("ti_imagepiece"))))


class SwappedTop2:
    """The eager model, except that the top two logits of one image are swapped (its top-1 changes):
    what a flipped near-tie decision can do to a random-weight model."""

    def __init__(self, eager, image):
        self.eager, self.image, self.device = eager, image, torch.device("cpu")

    def __call__(self, images):
        logits = self.eager(images)
        for row in range(len(images)):
            if torch.equal(images[row], self.image):
                top2 = logits[row].topk(2).indices
                logits[row, top2] = logits[row, top2.flip(0)]
        return logits


def test_a_top1_flip_is_tolerated_on_a_near_tie_image_only(compiled):
    eager = compiled.eager("ti_imagepiece")
    images = random_images(64, seed=1)  # what assert_parity feeds
    with torch.inference_mode():
        margins = decision_margins(eager, images)
    near_tie, tie_free = int(margins.argmin()), int(margins.argmax())
    assert margins[near_tie] <= TIE_FREE < margins[tie_free]
    assert_parity(SwappedTop2(eager, images[near_tie]), eager, batch=8)
    with pytest.raises(AssertionError):
        assert_parity(SwappedTop2(eager, images[tie_free]), eager, batch=8)
