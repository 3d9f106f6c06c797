"""CUDA parity: artifacts compiled on this GPU against eager fp32 (skipped without CUDA).

fp32 follows the CPU parity rules (tests/test_parity.py). fp16/bf16 are compared with the fp32
eager model over 256 scene images with plain random weights: half precision perturbs every score,
and on random-weight models with noise images that alone reshuffles merges (see tests/artifacts.py),
so these inputs are the ones where agreement measures the compiled kernels rather than chaos.
"""
import pytest
import torch
import torch.nn.functional as F

from imagepiece.artifact import DTYPES
from imagepiece.export import load
from inputs import scene_images
from test_parity import assert_parity

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cuda_fp32_static_batch_matches_eager(compiled):
    assert_parity(load(compiled.path("cuda_ti_imagepiece")), compiled.eager("cuda_ti_imagepiece"), batch=2)


def test_cuda_fp32_dynamic_batch_matches_eager(compiled):
    model = load(compiled.path("cuda_ti_imagepiece_dynamic"))
    assert_parity(model, compiled.eager("cuda_ti_imagepiece_dynamic"), batch=64, count=128)


@pytest.mark.parametrize("name", ["cuda_s_imagepiece_fp16", "cuda_s_imagepiece_bf16"])
def test_cuda_half_precision_agrees_with_fp32_eager(compiled, name):
    model = load(compiled.path(name))
    eager = compiled.eager(name)
    images = scene_images(256, seed=2).cuda()
    with torch.inference_mode():
        expected = torch.cat([eager(chunk) for chunk in images.split(64)])
        actual = torch.cat([model(chunk.to(DTYPES[model.metadata["dtype"]])).float() for chunk in images.split(64)])
    agreement = (actual.argmax(1) == expected.argmax(1)).float().mean()
    cosine = F.cosine_similarity(actual, expected).mean()
    print(f"{name}: top-1 agreement {agreement:.4f}, mean cosine {cosine:.6f}")
    assert agreement >= 0.99 and cosine >= 0.999
