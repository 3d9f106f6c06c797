"""The peers (ONNX Runtime, OpenVINO) run the same models as ip_runtime: the ONNX exports of plain and
ImagePiece DeiT-Ti give the eager model's logits on tie-free inputs (the parity rules of
test_parity), and each peer states its precision. Correctness only: their speed is the benchmarks'."""
import pytest
import torch

pytest.importorskip("onnxscript", reason="the peers are optional extras: pip install 'imagepiece[peers]'")

import imagepiece  # noqa: E402
from artifacts import random_state_dict  # noqa: E402
from imagepiece.onnx_export import export_onnx  # noqa: E402
from test_parity import assert_parity  # noqa: E402

ARCH = "deit_tiny_patch16_224"
EXPORT_MAX_BATCH = 8


class OnCpu:
    """A peer model with the `device` attribute the parity helper reads."""

    device = torch.device("cpu")

    def __init__(self, peer):
        self.peer = peer

    def __call__(self, images):
        return self.peer(images)


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    """method -> (ONNX file with a dynamic batch 1..8, the eager fp32 model it came from); sharpened weights."""
    folder, files = tmp_path_factory.mktemp("onnx"), {}
    for method in ("plain", "imagepiece"):
        model = imagepiece.create_model(ARCH, method)
        model.load_state_dict(random_state_dict(ARCH, "sharpened"))
        files[method] = (export_onnx(model, folder / f"{method}.onnx", max_batch=EXPORT_MAX_BATCH), model)
    return files


@pytest.mark.parametrize("method", ["plain", "imagepiece"])
def test_onnx_runtime_matches_eager(onnx_files, method):
    from imagepiece.peers import OnnxRuntimeModel

    path, eager = onnx_files[method]
    peer = OnnxRuntimeModel(path, threads=2)
    assert peer.precision == "fp32"
    assert_parity(OnCpu(peer), eager, batch=EXPORT_MAX_BATCH)


@pytest.mark.parametrize("method", ["plain", "imagepiece"])
def test_openvino_f32_matches_eager(onnx_files, method):
    from imagepiece.peers import OpenVinoModel

    path, eager = onnx_files[method]
    peer = OpenVinoModel(path, "fp32", threads=2)
    assert peer.precision == "f32"  # set explicitly: its default is bf16 on CPUs with bf16 instructions
    assert_parity(OnCpu(peer), eager, batch=3)  # a batch size other than the export's example


def test_openvino_bf16_says_so_or_is_refused_without_bf16_instructions(onnx_files):
    from imagepiece.environment import bf16_support
    from imagepiece.peers import OpenVinoModel

    path, eager = onnx_files["plain"]
    if not bf16_support().native:
        with pytest.raises(ValueError, match="bf16 instructions"):
            OpenVinoModel(path, "bf16")
        return
    peer = OpenVinoModel(path, "bf16", threads=2)
    assert peer.precision == "bf16"
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected = eager(images)
    assert torch.nn.functional.cosine_similarity(peer(images), expected).min() > 0.99  # plain DeiT: no decisions to flip


def test_peers_refuse_bad_requests_clearly(onnx_files, tmp_path):
    from imagepiece.peers import OnnxRuntimeModel, OpenVinoModel

    path, eager = onnx_files["plain"]
    with pytest.raises(ValueError, match="must be one of"):
        OpenVinoModel(path, "fp16")
    with pytest.raises(TypeError, match="must be float32"):
        OnnxRuntimeModel(path)(torch.zeros(2, 3, 224, 224, dtype=torch.float64))
    with pytest.raises(ValueError, match="must end in .onnx"):
        export_onnx(eager, tmp_path / "model.so", batch=2)
    with pytest.raises(ValueError, match="exactly one of batch"):
        export_onnx(eager, tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []
