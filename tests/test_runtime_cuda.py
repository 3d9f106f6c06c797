"""ip_runtime on a GPU: streams, CUDA graphs, pinned staging (skipped without CUDA).

Artifacts are compiled on the GPU itself (tests/artifacts.py): an AOTI artifact runs only on the
device kind and torch that built it.
"""
import threading

import pytest
import torch

import ip_runtime
from test_parity import assert_parity
from test_runtime import RuntimeModel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cuda_runtime_matches_eager(compiled):
    runtime = ip_runtime.Runtime(str(compiled.path("cuda_ti_imagepiece")))
    assert_parity(RuntimeModel(runtime), compiled.eager("cuda_ti_imagepiece"), batch=2)


@pytest.mark.parametrize("batch", [1, 5, 64, 256])
def test_cuda_graphs_equal_the_plain_path(compiled, batch):
    path = str(compiled.path("cuda_ti_imagepiece_dynamic"))
    plain = ip_runtime.Runtime(path)
    graphs = ip_runtime.Runtime(path, cuda_graphs=True)  # buckets 1, 2, 4, ..., 256: batch 5 pads to 8
    images = torch.randn(batch, 3, 224, 224, device="cuda")
    torch.testing.assert_close(graphs.run(images), plain.run(images), rtol=1e-5, atol=1e-5)
    # A host tensor is staged through pinned memory and gives the same result.
    torch.testing.assert_close(graphs.run(images.cpu()), plain.run(images), rtol=1e-5, atol=1e-5)


def test_cpu_artifact_and_cuda_artifact_devices_are_checked(compiled):
    with pytest.raises(ip_runtime.Error, match="compiled for cuda and cannot run on cpu") as error:
        ip_runtime.Runtime(str(compiled.path("cuda_ti_imagepiece")), device="cpu")
    assert error.value.code == "incompatible"
    runtime = ip_runtime.Runtime(str(compiled.path("cuda_ti_imagepiece")))
    if torch.cuda.device_count() > 1:
        with pytest.raises(ip_runtime.Error, match="images are on cuda:1") as error:
            runtime.run(torch.randn(2, 3, 224, 224, device="cuda:1"))
        assert error.value.code == "invalid_device"


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_four_instances_serve_eight_threads(compiled, cuda_graphs):
    runtime = ip_runtime.Runtime(str(compiled.path("cuda_ti_imagepiece_dynamic")), instances=4, cuda_graphs=cuda_graphs,
                                 batch_buckets=[8] if cuda_graphs else [])
    inputs = [torch.randn(8, 3, 224, 224, device="cuda", generator=torch.Generator("cuda").manual_seed(s)) for s in range(8)]
    expected = [runtime.run(x).clone() for x in inputs]
    torch.cuda.synchronize()
    mismatches = []

    def worker(index):
        for _ in range(200):
            if not torch.equal(runtime.run(inputs[index]), expected[index]):
                mismatches.append(index)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert mismatches == []

