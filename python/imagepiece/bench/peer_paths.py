"""The peers as suite paths: the same models exported to ONNX, on ONNX Runtime and on OpenVINO.

Plain DeiT and every reduction preset are exported once per run (dynamic batch covering the run's
batch sizes) with the weights the other paths use, and each peer runs at the precision its name
says. They take the fp32 images every other fp32 contender gets, in the same interleaved loop, so
their ratios to timm eager and to ip_runtime are same-run ratios.
"""
from __future__ import annotations

from pathlib import Path

from ..onnx_export import export_onnx
from .paths import Context, RunPath, Runner, register_path


def onnx_file(context: Context, variant: str) -> Path:
    """The variant's ONNX file (exported once per run)."""
    key = ("onnx", variant)
    if key not in context.prepared:
        low, high = min(context.batches), max(context.batches)
        context.log(f"exporting {variant} to ONNX (batch up to {high}) ...")
        context.prepared[key] = export_onnx(context.models[variant]["ours"], context.workdir / f"{variant}.onnx",
                                            batch=high if high == low else None, max_batch=high if high > low else None)
    return context.prepared[key]


def _onnx_runtime(context: Context, variant: str) -> Runner:
    from ..peers import OnnxRuntimeModel

    return OnnxRuntimeModel(onnx_file(context, variant))


def _openvino(precision: str):
    def make(context: Context, variant: str) -> Runner:
        from ..peers import OpenVinoModel

        model = OpenVinoModel(onnx_file(context, variant), precision)
        context.log(f"OpenVINO {variant}: inference precision {model.precision}")
        return model

    return make


register_path(RunPath("ort", "ONNX Runtime (CPU execution provider, fp32) on the model exported to ONNX", devices=("cpu",),
                      make_runner=_onnx_runtime, requires=("onnxruntime", "onnxscript"), dtypes=("fp32",), in_default=False,
                      precision="fp32"))
register_path(RunPath("openvino_fp32", "OpenVINO CPU on the ONNX file, INFERENCE_PRECISION_HINT=f32", devices=("cpu",),
                      make_runner=_openvino("fp32"), requires=("openvino", "onnxscript"), dtypes=("fp32",), in_default=False,
                      precision="fp32"))
register_path(RunPath("openvino_bf16", "OpenVINO CPU on the ONNX file, INFERENCE_PRECISION_HINT=bf16 (its silent default "
                      "on CPUs with bf16 instructions)", devices=("cpu",), make_runner=_openvino("bf16"),
                      requires=("openvino", "onnxscript"), dtypes=("fp32",), in_default=False, precision="bf16"))
