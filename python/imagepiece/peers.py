"""The peers ImagePiece's runtime is measured against: an ONNX file on ONNX Runtime or on OpenVINO,
each at a precision that is set explicitly and read back.

OpenVINO's CPU plugin silently runs bf16 on CPUs with bf16 instructions unless told otherwise, so
every OpenVINO model here is compiled with an explicit INFERENCE_PRECISION_HINT, and `precision`
reports what the plugin says it uses. Both take float32 images (torch or numpy) and return torch
logits. Install with `pip install imagepiece[peers]`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from .onnx_export import INPUT_NAME

# Our precision names -> OpenVINO's inference precision hints.
OPENVINO_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}


def _numpy(images: Union[torch.Tensor, np.ndarray]) -> np.ndarray:
    array = images.numpy() if isinstance(images, torch.Tensor) else images
    if array.dtype != np.float32:
        raise TypeError(f"images must be float32, got {array.dtype}")
    return np.ascontiguousarray(array)


class OnnxRuntimeModel:
    """An ONNX file on ONNX Runtime's CPU execution provider, fp32 (its only CPU precision for these ops)."""

    precision = "fp32"

    def __init__(self, path: Union[str, Path], threads: Optional[int] = None) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.version = onnxruntime.__version__

    def __call__(self, images) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {INPUT_NAME: _numpy(images)})[0])


class OpenVinoModel:
    """An ONNX file compiled by OpenVINO for the CPU at an explicit precision ("fp32" or "bf16").

    bf16 is refused on a CPU without bf16 instructions: OpenVINO would quietly run f32 instead.
    """

    def __init__(self, path: Union[str, Path], precision: str = "fp32", threads: Optional[int] = None) -> None:
        import openvino

        from .environment import bf16_support

        if precision not in OPENVINO_PRECISIONS:
            raise ValueError(f"OpenVINO precision must be one of {sorted(OPENVINO_PRECISIONS)}, got {precision!r}")
        if precision == "bf16" and not bf16_support().native:
            raise ValueError(f"OpenVINO bf16 needs a CPU with bf16 instructions: {bf16_support().reason}")
        config = {"INFERENCE_PRECISION_HINT": OPENVINO_PRECISIONS[precision], "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_NUM_THREADS": threads or torch.get_num_threads()}
        self.compiled = openvino.Core().compile_model(str(path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string()  # what it runs: "f32", "bf16"
        self.version = openvino.__version__

    def __call__(self, images) -> torch.Tensor:
        # copy: the request's output buffer is reused by the next call
        return torch.from_numpy(np.array(self.request.infer([_numpy(images)])[0], copy=True))
