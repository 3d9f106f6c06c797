"""ip_runtime on a GPU: parity, CUDA graphs, pinned staging, concurrency (skipped without CUDA).

Artifacts are compiled on the GPU itself (tests/artifacts.py): an AOTI artifact runs only on the
device kind and torch that built it. Where two compiled paths run different shapes (a CUDA graph
pads a batch up to its bucket), outputs must agree tightly on tie-free images only, as in
tests/test_parity.py; where they run the same kernels on the same shapes (host vs device input,
threads vs one caller) they must be identical.
"""
import pytest
import torch

import ip_runtime
from diagnostics import decision_margins
from imagepiece.artifact import DTYPES, ArtifactError
from imagepiece.export import load
from inputs import random_images
from test_cuda import assert_half_precision_agrees, full_fp32, half_precision_inputs  # noqa: F401 (fixture)
from test_parity import TIE_FREE, assert_parity, run_in_batches
from test_runtime import RuntimeModel, assert_threads_reproduce

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DYNAMIC = "cuda_ti_imagepiece_dynamic"  # DeiT-Ti ImagePiece fp32, batch 1..256


@pytest.fixture(scope="module")
def dynamic_inputs(compiled):
    """256 noise images on the GPU and each one's decision margin under the eager model."""
    images = random_images(256, seed=3).cuda()
    with torch.inference_mode():
        margins = decision_margins(compiled.eager(DYNAMIC), images)
    return images, margins.to(images.device)


def graph_runtime(path, buckets=(), instances=1):
    return ip_runtime.Runtime(str(path), cuda_graphs=True, batch_buckets=list(buckets), instances=instances)


@pytest.mark.parametrize("name, batch, count, cuda_graphs", [
    ("cuda_ti_imagepiece", 2, 16, False),
    ("cuda_ti_imagepiece", 2, 16, True),
    (DYNAMIC, 5, 20, False),
    (DYNAMIC, 256, 256, False),
])
def test_cuda_runtime_matches_eager(compiled, name, batch, count, cuda_graphs):
    runtime = ip_runtime.Runtime(str(compiled.path(name)), cuda_graphs=cuda_graphs)
    assert runtime.info["device_type"] == "cuda"
    assert_parity(RuntimeModel(runtime), compiled.eager(name), batch=batch, count=count)


@pytest.fixture(scope="module")
def plain_and_graphs(compiled):
    path = compiled.path(DYNAMIC)
    return RuntimeModel(ip_runtime.Runtime(str(path))), RuntimeModel(graph_runtime(path))  # buckets 1, 2, 4, ..., 256


@pytest.mark.parametrize("batch, count", [(1, 8), (5, 20), (64, 128), (256, 256)])
def test_cuda_graphs_equal_the_plain_path(plain_and_graphs, dynamic_inputs, batch, count):
    plain, graphs = plain_and_graphs  # batch 5 runs the graph of bucket 8
    images, margins = dynamic_inputs[0][:count], dynamic_inputs[1][:count]
    expected, actual = run_in_batches(plain, images, batch), run_in_batches(graphs, images, batch)
    tie_free = margins > TIE_FREE
    assert tie_free.sum() >= count // 2, f"only {int(tie_free.sum())} tie-free images; test inputs degenerate"
    torch.testing.assert_close(actual[tie_free], expected[tie_free], rtol=1e-5, atol=1e-5)
    assert (actual.argmax(1) == expected.argmax(1)).all()


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_host_tensors_are_staged_through_pinned_memory(compiled, dynamic_inputs, cuda_graphs):
    path = compiled.path(DYNAMIC)
    runtime = graph_runtime(path, buckets=[8]) if cuda_graphs else ip_runtime.Runtime(str(path))
    batches = list(dynamic_inputs[0][:32].split(8))
    expected = [runtime.run(images).clone() for images in batches]
    # Back to back without synchronising: each copy must leave the pinned buffer before the next
    # host batch overwrites it.
    staged = [runtime.run(images.cpu()) for images in batches]
    already_pinned = [runtime.run(images.cpu().pin_memory()) for images in batches]
    for want, got, got_pinned in zip(expected, staged, already_pinned):
        assert got.is_cuda and torch.equal(got, want)
        assert torch.equal(got_pinned, want)
    # Host in, host out (the caller's memory, filled once the stream is done).
    logits = torch.empty(8, 1000)
    assert runtime.run(batches[1].cpu(), logits) is logits
    assert torch.equal(logits, expected[1].cpu())


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_four_instances_serve_eight_threads(compiled, cuda_graphs):
    path = compiled.path(DYNAMIC)
    runtime = graph_runtime(path, buckets=[8], instances=4) if cuda_graphs else ip_runtime.Runtime(str(path), instances=4)
    device_inputs = [random_images(8, seed=10 + s).cuda() for s in range(8)]
    # Odd threads send host tensors: staging runs concurrently with other slots' kernels.
    inputs = [x.cpu() if i % 2 else x for i, x in enumerate(device_inputs)]
    expected = [runtime.run(x).clone() for x in inputs]
    torch.cuda.synchronize()
    assert_threads_reproduce(runtime, inputs, expected, calls=100)


@pytest.mark.parametrize("name", ["cuda_s_imagepiece_fp16", "cuda_s_imagepiece_bf16"])
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_half_precision_runtime_agrees_with_fp32_eager(compiled, name, cuda_graphs):
    path = compiled.path(name)
    runtime = graph_runtime(path, buckets=[64]) if cuda_graphs else ip_runtime.Runtime(str(path))
    dtype = DTYPES[runtime.info["dtype"]]
    images = half_precision_inputs()
    actual = torch.cat([runtime.run(chunk.to(dtype)) for chunk in images.split(64)])
    assert actual.dtype == dtype and actual.is_cuda
    with torch.inference_mode():
        via_loader = torch.cat([load(path)(chunk.to(dtype)) for chunk in images[:64].split(64)])
    # Same artifact and kernels as PyTorch's own runner: only the wrapper differs.
    torch.testing.assert_close(actual[:64].float(), via_loader.float(), rtol=2e-2, atol=5e-2)
    assert_half_precision_agrees(compiled, name, f"{name} via ip_runtime{' + CUDA graphs' if cuda_graphs else ''}", actual, images)


def test_cpu_artifact_and_cuda_artifact_devices_are_checked(compiled):
    with pytest.raises(ip_runtime.Error, match="compiled for cuda and cannot run on cpu") as error:
        ip_runtime.Runtime(str(compiled.path("cuda_ti_imagepiece")), device="cpu")
    assert error.value.code == "incompatible"
    runtime = ip_runtime.Runtime(str(compiled.path("cuda_ti_imagepiece")))
    if torch.cuda.device_count() > 1:
        with pytest.raises(ip_runtime.Error, match="images are on cuda:1") as error:
            runtime.run(torch.randn(2, 3, 224, 224, device="cuda:1"))
        assert error.value.code == "invalid_device"


def test_a_cuda_device_past_the_last_gpu_is_an_invalid_option(compiled):
    # It reached getDeviceProperties, which failed with a PyTorch internal assert reported as load_failed.
    path, gpus = compiled.path("cuda_ti_imagepiece"), torch.cuda.device_count()
    missing = f"cuda:{gpus}"
    message = f"device '{missing}' does not exist: this machine has {gpus} GPU"
    with pytest.raises(ip_runtime.Error, match=message) as error:
        ip_runtime.Runtime(str(path), device=missing)
    assert error.value.code == "invalid_option"
    with pytest.raises(ArtifactError, match=message) as error:
        load(path, missing)
    assert error.value.code == "invalid_option"


def test_a_batcher_reads_cuda_images_after_the_submitters_stream_wrote_them(compiled, dynamic_inputs):
    # The worker copies each image into its batch on its own stream: without waiting for the submitter's
    # stream, it read images still queued to be written there (behind a long kernel) as they were: unwritten.
    images = dynamic_inputs[0][:16]
    runtime = ip_runtime.Runtime(str(compiled.path(DYNAMIC)))
    expected = runtime.run(images).clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())  # `images` are ready before the side stream reads them
    with ip_runtime.Batcher(runtime, max_batch=16, max_delay_ms=1000) as batcher:  # one batch, once all 16 are queued
        with torch.cuda.stream(side):
            torch.cuda._sleep(1_000_000_000)  # about half a second of GPU time before anything below is written
            written = [image * 1.0 for image in images]
            futures = [batcher.submit(image) for image in written]
        logits = torch.stack([future.result(120) for future in futures])
    assert batcher.stats["batches"] == 1
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make, code, message", [
    (lambda: torch.randn(16, 3, 224, 224, device="cuda"), "invalid_batch", "larger than the largest CUDA graph bucket"),
    (lambda: torch.randn(4, 3, 224, 224, device="cuda", dtype=torch.bfloat16), "invalid_dtype", "images must be Float"),
    (lambda: torch.randn(4, 224, 224, 3, device="cuda").permute(0, 3, 1, 2), "not_contiguous", "contiguous"),
])
def test_bad_cuda_input_is_refused_with_a_clear_error(compiled, make, code, message):
    runtime = graph_runtime(compiled.path(DYNAMIC), buckets=[8])
    with pytest.raises(ip_runtime.Error, match=message) as error:
        runtime.run(make())
    assert error.value.code == code
    assert runtime.run(torch.randn(8, 3, 224, 224, device="cuda")).shape == (8, 1000)  # still serves after refusing


def test_a_batcher_over_graph_buckets_runs_batches_no_larger_than_the_largest_bucket(compiled, dynamic_inputs):
    # With buckets [1, 2, 4] on a 1..256 artifact, the default max_batch was 256: every batch above 4 failed under load.
    images, _ = dynamic_inputs
    runtime = graph_runtime(compiled.path(DYNAMIC), buckets=(1, 2, 4))
    with ip_runtime.Batcher(runtime, max_delay_ms=50) as batcher:
        assert batcher.options["max_batch"] == 4
        futures = [batcher.submit(images[i]) for i in range(12)]
        logits = torch.stack([future.result(120) for future in futures])
    with pytest.raises(ip_runtime.Error, match=r"max_batch must be in \[1, 4\] \(the largest CUDA graph bucket\)"):
        ip_runtime.Batcher(runtime, max_batch=8)
    assert torch.isfinite(logits).all() and logits.shape == (12, 1000)
