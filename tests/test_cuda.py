"""CUDA parity: artifacts compiled on this GPU against eager fp32 (skipped without CUDA).

fp32 follows the CPU parity rules (tests/test_parity.py), with TF32 off: cuDNN convolutions use TF32
by default, noise near 1e-3 that no 1e-4 parity survives, and fp32 means fp32 here. Static and dynamic
batch both count: a dynamic artifact is checked at sizes other than its example, up to its maximum.

fp16/bf16 are compared with the fp32 eager model over 256 random scene images with plain random
weights, beside the eager model cast to the same precision (as the compile casts it). Random weights
leave most images' top two classes close, so half precision alone flips top-1 on several percent of
them, eager PyTorch included: on the H100, the compiled ImagePiece DeiT-S agreed with fp32 on 93.4%
(bf16) and 95.7% (fp16) of these images with a mean cosine of 0.9996-0.9998, and eager CPU bf16
agrees no better (benchmarks/results/nvidia-h100-80gb-hbm3/README.md). So the compiled kernels must
lose no more top-1 agreement than eager PyTorch at their precision (within 256 images' noise) and keep
the scores' direction (mean cosine); the 99% of issue 15 is a bar for trained weights, not these.
fp16 is a static-batch artifact, bf16 a dynamic one.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from imagepiece.artifact import DTYPES
from imagepiece.export import load
from inputs import scene_images
from test_parity import assert_parity

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

HALF_PRECISION = ["cuda_s_imagepiece_fp16", "cuda_s_imagepiece_bf16"]
AGREEMENT_SLACK = 0.03  # ~2 standard errors of a top-1 agreement near 0.95 over 256 images
MIN_MEAN_COSINE = 0.999


@pytest.fixture(autouse=True, scope="module")
def full_fp32():
    """TF32 off for cuDNN and cuBLAS while these tests run (restored afterwards)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def half_precision_inputs(count: int = 256) -> torch.Tensor:
    return scene_images(count, seed=2).cuda()


def eager_logits(compiled, name: str, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The eager model's fp32 logits with weights and images cast to `dtype`, as the compile casts them."""
    eager = copy.deepcopy(compiled.eager(name)).to(dtype)
    with torch.inference_mode():
        return torch.cat([eager(chunk.to(dtype)) for chunk in images.split(64)]).float()


def top1_agreement(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.argmax(1) == expected.argmax(1)).float().mean().item()


def assert_half_precision_agrees(compiled, name: str, label: str, actual: torch.Tensor, images: torch.Tensor) -> None:
    """Top-1 agreement with fp32 eager no worse than eager's own at that precision; mean cosine to fp32."""
    fp32 = eager_logits(compiled, name, images)
    eager_floor = top1_agreement(eager_logits(compiled, name, images, actual.dtype), fp32)
    actual = actual.float()
    agreement = top1_agreement(actual, fp32)
    cosine = F.cosine_similarity(actual, fp32).mean().item()
    print(f"{label}: {len(actual)} images, top-1 agreement with fp32 {agreement:.4f} (eager at this precision "
          f"{eager_floor:.4f}), mean cosine {cosine:.6f}")
    assert agreement >= eager_floor - AGREEMENT_SLACK, f"{label}: top-1 agreement {agreement:.4f} < eager's {eager_floor:.4f} - {AGREEMENT_SLACK}"
    assert cosine >= MIN_MEAN_COSINE, f"{label}: mean cosine {cosine:.6f} < {MIN_MEAN_COSINE}"


def test_cuda_fp32_static_batch_matches_eager(compiled):
    model = load(compiled.path("cuda_ti_imagepiece"))
    assert model.metadata["batch"] == {"min": 2, "max": 2, "dynamic": False}
    assert_parity(model, compiled.eager("cuda_ti_imagepiece"), batch=2)


@pytest.mark.parametrize("batch, count", [(1, 8), (5, 20), (64, 128), (256, 256)])
def test_cuda_fp32_dynamic_batch_matches_eager(compiled, batch, count):
    model = load(compiled.path("cuda_ti_imagepiece_dynamic"))
    assert model.metadata["batch"] == {"min": 1, "max": 256, "dynamic": True}
    assert_parity(model, compiled.eager("cuda_ti_imagepiece_dynamic"), batch=batch, count=count)


@pytest.mark.parametrize("name", HALF_PRECISION)
def test_cuda_half_precision_agrees_with_fp32_eager(compiled, name):
    model = load(compiled.path(name))
    images = half_precision_inputs()
    batch = model.metadata["batch"]["max"]  # 64 (fp16, static) or 256 (bf16, dynamic: all in one call)
    with torch.inference_mode():
        actual = torch.cat([model(chunk.to(DTYPES[model.metadata["dtype"]])) for chunk in images.split(batch)])
    assert actual.dtype == DTYPES[model.metadata["dtype"]]
    assert_half_precision_agrees(compiled, name, name, actual, images)


def test_cuda_numpy_in_gives_numpy_out_for_run_and_batcher(compiled):
    """The logits live on the GPU; numpy input still gets host numpy logits (a Batcher future never hangs)."""
    import numpy as np

    import ip_runtime

    runtime = ip_runtime.Runtime(str(compiled.path("cuda_ti_imagepiece_dynamic")))
    images = torch.randn(2, *runtime.info["input_shape"], generator=torch.Generator().manual_seed(5))
    expected = runtime.run(images.cuda()).cpu()
    from_run = runtime.run(images.numpy())
    with ip_runtime.Batcher(runtime, max_delay_ms=0) as batcher:
        from_batcher = batcher.submit(images[0].numpy()).result(120)
    assert isinstance(from_run, np.ndarray) and isinstance(from_batcher, np.ndarray)
    np.testing.assert_allclose(from_run, expected.numpy(), rtol=0, atol=1e-3)  # conversion, not parity, is tested
    np.testing.assert_allclose(from_batcher, expected[0].numpy(), rtol=0, atol=1e-3)
