"""CUDA parity: artifacts compiled on this GPU against eager fp32 (skipped without CUDA).

fp32 follows the CPU parity rules (tests/test_parity.py), with TF32 off: cuDNN convolutions use TF32
by default, noise near 1e-3 that no 1e-4 parity survives, and fp32 means fp32 here. Static and dynamic
batch both count: a dynamic artifact is checked at sizes other than its example, up to its maximum.

fp16/bf16 are compared with the fp32 eager model over 256 random scene images with plain random
weights: half precision perturbs every score, and on random-weight models with noise images that
alone reshuffles merges (see tests/artifacts.py), so these inputs are the ones where agreement
measures the compiled kernels rather than chaos. fp16 is a static-batch artifact, bf16 a dynamic one.
"""
import pytest
import torch
import torch.nn.functional as F

from imagepiece.artifact import DTYPES
from imagepiece.export import load
from inputs import scene_images
from test_parity import assert_parity

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

HALF_PRECISION = ["cuda_s_imagepiece_fp16", "cuda_s_imagepiece_bf16"]
MIN_TOP1_AGREEMENT = 0.99
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


def fp32_eager_logits(compiled, name: str, images: torch.Tensor) -> torch.Tensor:
    eager = compiled.eager(name)
    with torch.inference_mode():
        return torch.cat([eager(chunk) for chunk in images.split(64)])


def assert_half_precision_agrees(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Top-1 agreement and mean cosine of half-precision logits against fp32 eager logits."""
    actual = actual.float()
    agreement = (actual.argmax(1) == expected.argmax(1)).float().mean().item()
    cosine = F.cosine_similarity(actual, expected).mean().item()
    print(f"{name}: {len(actual)} images, top-1 agreement {agreement:.4f}, mean cosine {cosine:.6f}")
    assert agreement >= MIN_TOP1_AGREEMENT, f"{name}: top-1 agreement {agreement:.4f} < {MIN_TOP1_AGREEMENT}"
    assert cosine >= MIN_MEAN_COSINE, f"{name}: mean cosine {cosine:.6f} < {MIN_MEAN_COSINE}"


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
    assert_half_precision_agrees(name, actual, fp32_eager_logits(compiled, name, images))


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
