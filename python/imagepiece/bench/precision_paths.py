"""ip_runtime at another precision than the run's images: bf16 (with its default attention kernel, and with
PyTorch's fused SDPA) and int8 artifacts in an fp32 run.

All take the run's fp32 images, as the OpenVINO bf16 peer does: the bf16 artifact gets them cast
to bf16 inside the timed call (a user with fp32 images pays that cast too), the int8 artifact takes
fp32 images as they are (it quantizes its activations itself). Each is compiled once per run from a
copy of the run's fp32 model, with a dynamic batch covering the run's batch sizes.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import torch

from ..environment import bf16_support, int8_support
from ..export import compile_artifact
from .paths import Context, RunPath, Runner, register_path


def precision_artifact(context: Context, variant: str, precision: str, attention: Optional[str] = None) -> Path:
    """The artifact of `variant` at `precision`, compiled once per run; `attention`: a kernel other than the
    compile's default for the precision (`export.default_attention`)."""
    key = ("artifact", variant, precision, attention)
    path_name = f"ip_runtime_{precision}" + (f"_{attention}" if attention else "")
    if key not in context.prepared:
        support = bf16_support() if precision == "bf16" else int8_support()
        if not support.native:
            context.log(f"warning: {support.reason}")
        low, high = min(context.batches), max(context.batches)
        out = context.workdir / f"{variant}_{path_name}.so"
        context.log(f"compiling {variant} with AOTInductor (cpu {precision}, batch up to {high}) ...")
        report = compile_artifact(copy.deepcopy(context.models[variant]["ours"]), out, device="cpu", dtype=precision,
                                  batch=high if high == low else None, max_batch=high if high > low else None, attention=attention)
        context.compile_seconds[(variant, path_name, "torch.export")] = report.export_seconds
        context.compile_seconds[(variant, path_name, "AOTInductor compile")] = report.compile_seconds
        context.prepared[key] = out
    return context.prepared[key]


def _ip_runtime_at(precision: str, attention: Optional[str] = None):
    def make(context: Context, variant: str) -> Runner:
        import ip_runtime

        runtime = ip_runtime.Runtime(str(precision_artifact(context, variant, precision, attention)), device="cpu")
        if precision == "bf16":
            return lambda images: runtime.run(images.to(torch.bfloat16))
        return runtime.run

    return make


register_path(RunPath("ip_runtime_bf16", "a bf16 artifact through ip_runtime, fed the run's fp32 images cast to bf16",
                      devices=("cpu",), make_runner=_ip_runtime_at("bf16"), dtypes=("fp32",), in_default=False, precision="bf16"))
register_path(RunPath("ip_runtime_bf16_sdpa", "the bf16 artifact compiled with PyTorch's fused SDPA attention instead of "
                      "the CPU bf16 default, two batched GEMMs and a softmax (`blocks.matmul_attention`)", devices=("cpu",),
                      make_runner=_ip_runtime_at("bf16", "sdpa"), dtypes=("fp32",), in_default=False, precision="bf16"))
register_path(RunPath("ip_runtime_int8", "an int8 (PT2E, X86InductorQuantizer) artifact through ip_runtime, fp32 images",
                      devices=("cpu",), make_runner=_ip_runtime_at("int8"), requires=("torchao",), dtypes=("fp32",),
                      in_default=False, precision="int8"))
