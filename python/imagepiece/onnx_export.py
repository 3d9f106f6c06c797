"""An ImagePiece-family model as an ONNX file, for the peers it is measured against (ONNX Runtime,
OpenVINO; see `imagepiece.peers`).

The same static-token model that AOTInductor compiles goes through `torch.onnx.export`'s dynamo path
(opset 18): argsort becomes TopK, gather GatherElements, scatter_reduce(sum) ScatterElements with
reduction="add". The model's sorts are stable (ties broken by position, `imagepiece.reduce`); ONNX's
TopK breaks ties the same way (lower index first), so the stable overload, which the exporter has no
function for, is given torchlib's sort translation. Attention is exported as its math form (MatMul, Softmax): the CPU flash-attention op
that torch.export records has no ONNX function, and decomposing it after tracing breaks a view of its
output (torch 2.14).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .export import DYNAMIC_EXAMPLE_BATCH, batch_range

OPSET = 18  # ScatterElements with reduction "max" (ToMe's source maps) needs 18
INPUT_NAME, OUTPUT_NAME = "images", "logits"


def _stable_sort_translation() -> dict:
    from onnxscript.function_libs.torch_lib.ops.core import aten_sort

    return {torch.ops.aten.sort.stable: aten_sort}


def export_onnx(model: torch.nn.Module, out: Union[str, Path], *, batch: Optional[int] = None,
                max_batch: Optional[int] = None) -> Path:
    """Write `model` (fp32, CPU) to `out` (.onnx) for a static batch or a dynamic batch 1..max_batch.

    The file is written beside `out` and renamed into place, so a failed export leaves nothing behind.
    """
    out = Path(out)
    if out.suffix != ".onnx":
        raise ValueError(f"output {str(out)!r} must end in .onnx")
    low, high = batch_range(batch, max_batch)
    model = model.to(device="cpu", dtype=torch.float32).eval()
    example = torch.randn(low if low == high else DYNAMIC_EXAMPLE_BATCH, model.in_chans, *model.patch_embed.img_size)
    dynamic = ({0: torch.export.Dim("batch", min=1, max=high)},) if low != high else None
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as workdir, sdpa_kernel(SDPBackend.MATH):
        staged = Path(workdir) / out.name
        program = torch.onnx.export(model, (example,), dynamo=True, opset_version=OPSET, input_names=[INPUT_NAME],
                                    output_names=[OUTPUT_NAME], dynamic_shapes=dynamic, optimize=True, verbose=False,
                                    custom_translation_table=_stable_sort_translation())
        program.save(str(staged))
        staged.replace(out)
    return out
