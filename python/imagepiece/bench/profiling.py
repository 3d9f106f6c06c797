"""profile: where an AOTI artifact spends its time, plain DeiT vs a reduction preset, kernel by kernel.

Compiles both, runs them alternately under torch.profiler, and groups self time into GEMMs
(oneDNN/MKL linear; cuBLAS/CUTLASS on a GPU), attention (SDPA; flash kernels), batched matmuls, generated kernels
(Inductor's C++ or Triton: layer norm, GELU, residuals, gathers...), sorts and the rest: medians over
the calls, then each artifact's slowest kernels. The ratio column shows which part falls short of the
FLOPs reduction. On the CPU the artifacts are compiled with Inductor's kernel profiling on (each
generated C++ kernel records itself) and the times are host times; on a GPU they are the kernels'
device times, and the report adds kernel launches per call, which bound a small batch's latency.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Optional

import torch

from ..artifact import DTYPES
from ..config import PRESETS
from ..model import create_model
from .measure import gflops_per_image
from .results import ResultsWriter
from .variants import BASELINE

HELP = "kernel-time breakdown (GEMM, attention, generated kernels, sorts) of plain vs a preset"
# Lower-case event-name needles: CPU ops and kernels first, then CUDA kernels (cuBLAS/CUTLASS GEMMs, flash
# attention, CUB radix sorts, Triton kernels named triton_*).
# Batched matmuls get their own part: the matmul attention kernel's two per block (its softmax is a generated kernel),
# the one-row class attention, the merge's similarity matrix.
GROUPS = (("attention (SDPA)", ("scaled_dot_product", "flash", "fmha")),  # before "linear": fmha_cutlass* is attention
          ("batched matmul (bmm)", ("bmm",)),
          # before "linear": oneDNN's convolution is "mkldnn__convolution", cuDNN's an xmma "fprop" (implicit GEMM)
          ("convolution (patchify)", ("mkldnn__convolution", "aten::conv", "aten::_convolution", "cudnn", "fprop")),
          ("linear", ("linear", "mkl", "gemm", "cutlass", "xmma", "nvjet")), ("sort", ("sort", "radix")),
          ("generated kernels", ("cpp_fused", "triton_")))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="imagepiece", choices=sorted(p for p in PRESETS if p != BASELINE))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16", "int8"],
                        help="fp16: GPU only; int8: CPU, quantized Linear layers (synthetic calibration), fp32 images")
    parser.add_argument("--runs", type=int, default=10, help="profiled calls of each artifact, alternating")
    parser.add_argument("--top-kernels", type=int, default=15, help="also list each artifact's N slowest events (0: none)")


def check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from ..export import check_device_and_dtype

    try:  # the compile's own rules (fp16 GPU only, bf16 on a GPU of compute capability >= 8.0), before anything runs
        check_device_and_dtype(args.device, args.dtype)
    except ValueError as error:
        parser.error(str(error))
    if args.batch < 1 or args.runs < 1:
        parser.error("--batch and --runs must be >= 1")
    if args.top_kernels < 0:
        parser.error("--top-kernels must be >= 0")


def group_of(name: str) -> str:
    name = name.lower()  # CUDA kernels are CamelCase (DeviceRadixSort...)
    for group, needles in GROUPS:
        if any(needle in name for needle in needles):
            return group
    return "other (allocation, views, copies, wrapper)"


def profile_interleaved(paths: dict, batch: int, runs: int, device: str = "cpu", dtype: str = "fp32") -> tuple:
    """(samples, launches): name -> one {event: self ms} per run, and name -> kernels launched per call
    (GPU; empty on the CPU), profiling one call of each artifact in turn, `runs` times: the machine's
    speed drifts, and alternating keeps the drift out of the ratios."""
    from torch.profiler import ProfilerActivity, profile

    from ..export import load

    on_gpu = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]
    models = {name: load(path, device) for name, path in paths.items()}
    images = torch.randn(batch, 3, 224, 224).to(device=device, dtype=DTYPES.get(dtype, torch.float32))  # int8 takes fp32
    for model in models.values():
        for _ in range(3):
            model(images)
    samples = {name: [] for name in models}
    launches = {name: [] for name in models} if on_gpu else {}
    for _ in range(runs):
        for name, model in models.items():
            with profile(activities=activities) as trace:
                model(images)
                if on_gpu:
                    torch.cuda.synchronize(device)
            events = trace.key_averages()
            if on_gpu:  # the kernels themselves: host-side ops and launch calls have no device time of their own
                kernels = [event for event in events if event.device_type == torch.autograd.DeviceType.CUDA]
                samples[name].append({event.key: event.self_device_time_total / 1e3 for event in kernels})
                launches[name].append(sum(event.count for event in kernels))
            else:
                samples[name].append({event.key: event.self_cpu_time_total / 1e3 for event in events})
    return samples, launches


def median_times(runs: list, key=group_of) -> dict:
    """Median over runs of each key's self ms (events summed per key within a run), plus "total".

    Medians, not means: one call the host stalled would otherwise inflate whichever part it hit."""
    per_run = []
    for events in runs:
        summed = {"total": sum(events.values())}
        for event, ms in events.items():
            summed[key(event)] = summed.get(key(event), 0.0) + ms
        per_run.append(summed)
    keys = set().union(*per_run)
    return {k: statistics.median(summed.get(k, 0.0) for summed in per_run) for k in keys}


def format_report(args: argparse.Namespace, flops: dict, parts: dict, samples: dict, launches: Optional[dict] = None) -> str:
    """The report: `parts` (name -> `median_times` of its calls) side by side, `launches` (GPU kernels
    per call) if any, then from `samples` each artifact's slowest events."""
    plain, ours = parts[BASELINE], parts[args.preset]
    on_gpu = torch.device(args.device).type == "cuda"
    lines = [f"AOTI kernel-time breakdown, {args.arch}, batch {args.batch}, {args.device} {args.dtype}, median of {args.runs} "
             f"interleaved runs ({'GPU kernel time' if on_gpu else 'profiler on: absolute times are inflated'})",
             f"GFLOPs/image: {BASELINE} {flops[BASELINE]:.2f}, {args.preset} {flops[args.preset]:.2f} "
             f"(ratio {flops[BASELINE] / flops[args.preset]:.2f}x)",
             f"{'part':<42} {BASELINE + ' ms':>9} {args.preset + ' ms':>16} {'ratio':>7}"]
    for name in sorted(set(plain) - {"total"}, key=lambda k: -plain[k]) + sorted(set(ours) - set(plain)) + ["total"]:
        a, b = plain.get(name, 0.0), ours.get(name, 0.0)
        lines.append(f"{name:<42} {a:9.2f} {b:16.2f} {f'{a / b:6.2f}x' if a and b else '     -':>7}")  # a part only one has
    if launches:
        a, b = (statistics.median(launches[name]) for name in (BASELINE, args.preset))
        lines.append(f"{'kernel launches per call':<42} {a:9.0f} {b:16.0f} {f'{a / b:6.2f}x' if b else '     -':>7}")
    if args.top_kernels:
        # Generated kernels are numbered per artifact, so names do not pair up across the two: each is listed on its own.
        for preset in (BASELINE, args.preset):
            kernels = median_times(samples[preset], key=lambda event: event)
            kernels.pop("total")
            top = sorted(kernels.items(), key=lambda item: -item[1])[:args.top_kernels]
            lines += ["", f"{preset}: top {len(top)} events by median self ms"]
            lines += [f"  {ms:8.3f}  {event}  ({group_of(event)})" for event, ms in top]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch._inductor.config as inductor_config

    from ..export import compile_artifact

    inductor_config.cpp.enable_kernel_profile = True  # CPU artifacts record each kernel (a GPU's profiler sees them anyway)
    writer = ResultsWriter(args.out, "profile", f"{args.arch}_{args.preset}_{args.device.split(':')[0]}_{args.dtype}_b{args.batch}",
                           device=args.device)
    torch.manual_seed(0)
    paths, flops = {}, {}
    with tempfile.TemporaryDirectory(prefix="benchmark_profile.") as folder:
        for preset in (BASELINE, args.preset):
            model = create_model(args.arch, **PRESETS[preset])
            flops[preset] = gflops_per_image(model, (3, 224, 224), torch.device("cpu"), torch.float32)
            paths[preset] = compile_artifact(model, Path(folder) / f"{preset}.so", device=args.device, dtype=args.dtype,
                                             batch=args.batch).path
        samples, launches = profile_interleaved(paths, args.batch, args.runs, args.device, args.dtype)

    parts = {name: median_times(runs) for name, runs in samples.items()}
    report = format_report(args, flops, parts, samples, launches)
    print(f"# {writer.provenance}\n{report}")
    writer.report(report, vars(args), gflops=flops, ms=parts, kernel_launches=launches)
    return 0
