"""ip_runtime at another precision than the run's images: bf16 and int8 artifacts in an fp32 run.

Both take the run's fp32 images, as the OpenVINO bf16 peer does: the bf16 artifact gets them cast
to bf16 inside the timed call (a user with fp32 images pays that cast too), the int8 artifact takes
fp32 images as they are (it quantizes its activations itself). Each is compiled once per run from a
copy of the run's fp32 model, with a dynamic batch covering the run's batch sizes.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from ..environment import bf16_support, int8_support
from ..export import compile_artifact
from .paths import Context, RunPath, Runner, register_path


def precision_artifact(context: Context, variant: str, precision: str) -> Path:
    key = ("artifact", variant, precision)
    if key not in context.prepared:
        support = bf16_support() if precision == "bf16" else int8_support()
        if not support.native:
            context.log(f"warning: {support.reason}")
        low, high = min(context.batches), max(context.batches)
        out = context.workdir / f"{variant}_{precision}.so"
        context.log(f"compiling {variant} with AOTInductor (cpu {precision}, batch up to {high}) ...")
        report = compile_artifact(copy.deepcopy(context.models[variant]["ours"]), out, device="cpu", dtype=precision,
                                  batch=high if high == low else None, max_batch=high if high > low else None)
        context.compile_seconds[(variant, f"ip_runtime_{precision}", "torch.export")] = report.export_seconds
        context.compile_seconds[(variant, f"ip_runtime_{precision}", "AOTInductor compile")] = report.compile_seconds
        context.prepared[key] = out
    return context.prepared[key]


def _ip_runtime_at(precision: str):
    def make(context: Context, variant: str) -> Runner:
        import ip_runtime

        runtime = ip_runtime.Runtime(str(precision_artifact(context, variant, precision)), device="cpu")
        if precision == "bf16":
            return lambda images: runtime.run(images.to(torch.bfloat16))
        return runtime.run

    return make


register_path(RunPath("ip_runtime_bf16", "a bf16 artifact through ip_runtime, fed the run's fp32 images cast to bf16",
                      devices=("cpu",), make_runner=_ip_runtime_at("bf16"), dtypes=("fp32",), in_default=False, precision="bf16"))
register_path(RunPath("ip_runtime_int8", "an int8 (PT2E, X86InductorQuantizer) artifact through ip_runtime, fp32 images",
                      devices=("cpu",), make_runner=_ip_runtime_at("int8"), requires=("torchao",), dtypes=("fp32",),
                      in_default=False, precision="int8"))
