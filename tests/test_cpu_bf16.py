"""bf16 artifacts on the CPU: one DeiT-Ti ImagePiece compile per session (tests/artifacts.py "ti_imagepiece_bf16",
timm-init weights), compiled with the CPU's default bf16 attention kernel (two batched GEMMs and a softmax,
`imagepiece.blocks.matmul_attention`, instead of PyTorch's flash-attention kernel).

Agreement with the fp32 eager model is measured, not exactness (bf16 noise reshuffles some merges of a random
model, see `python -m imagepiece.bench precision`), and held to what eager PyTorch itself does in bf16 with its
own fused attention, with a margin: the faster kernel must not cost a precision eager bf16 has. Without
avx512_bf16 or AMX, bf16 is emulated (slowly) with the same products, so the thresholds hold on any x86-64 CPU.
"""
import copy

import numpy as np
import torch
import torch.nn.functional as F

from imagepiece.export import load
from inputs import random_images

NAME = "ti_imagepiece_bf16"
TOP1_SLACK = 0.1  # of the images: compiled bf16 may agree with fp32 on this many fewer than eager bf16 does
MIN_MEAN_COSINE = 0.99


def test_a_cpu_bf16_artifact_takes_bf16_images_and_names_its_attention_kernel(compiled):
    metadata = load(compiled.path(NAME)).metadata
    assert (metadata["dtype"], metadata["precision"], metadata["device_type"]) == ("bf16", "bf16", "cpu")
    assert metadata["attention"] == "matmul"


def test_cpu_bf16_artifact_agrees_with_fp32_as_well_as_eager_bf16_does(compiled):
    import ip_runtime

    runtime = ip_runtime.Runtime(str(compiled.path(NAME)), device="cpu")
    eager = compiled.eager(NAME).eval()
    eager_bf16 = copy.deepcopy(eager).to(torch.bfloat16)  # its own attention: PyTorch's fused SDPA
    images = random_images(32, seed=1)
    with torch.inference_mode():
        expected = torch.cat([eager(chunk) for chunk in images.split(2)])
        actual = torch.cat([runtime.run(chunk.to(torch.bfloat16)).float() for chunk in images.split(2)])
        eager_low = torch.cat([eager_bf16(chunk.to(torch.bfloat16)).float() for chunk in images.split(2)])
        python_loader = load(compiled.path(NAME))(images[:2].to(torch.bfloat16)).float()
    torch.testing.assert_close(python_loader, actual[:2], rtol=0, atol=0)  # one library, two loaders
    agreement = (actual.argmax(1) == expected.argmax(1)).float().mean().item()
    eager_agreement = (eager_low.argmax(1) == expected.argmax(1)).float().mean().item()
    cosine = F.cosine_similarity(actual, expected).mean().item()
    summary = f"top-1 agreement with fp32 {agreement:.3f} (eager bf16 {eager_agreement:.3f}), mean cosine {cosine:.5f}"
    assert agreement >= eager_agreement - TOP1_SLACK and cosine >= MIN_MEAN_COSINE, summary


def test_numpy_pixels_into_a_bf16_artifact_give_float32_numpy_logits(compiled):
    # numpy has no bf16: the logits come back as float32 (exactly the bf16 values), from run() and from a Batcher alike.
    import ip_runtime

    runtime = ip_runtime.Runtime(str(compiled.path("ti_plain_bf16_uint8")), device="cpu")
    pixels = np.random.default_rng(0).integers(0, 256, size=(2, 224, 224, 3), dtype=np.uint8)
    expected = runtime.run(torch.from_numpy(pixels))
    assert expected.dtype == torch.bfloat16
    logits = runtime.run(pixels)
    assert isinstance(logits, np.ndarray) and logits.dtype == np.float32
    np.testing.assert_array_equal(logits, expected.float().numpy())
    with ip_runtime.Batcher(runtime, max_batch=2, max_delay_ms=1) as batcher:
        row = batcher.submit(pixels[1]).result(timeout=60)
    assert isinstance(row, np.ndarray) and row.dtype == np.float32
    # Padded into a batch of its own (as row 0): equal up to the GEMMs' bf16 rounding, not bit for bit.
    np.testing.assert_allclose(row, expected[1].float().numpy(), rtol=0, atol=0.05)
