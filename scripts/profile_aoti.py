#!/usr/bin/env python
"""Where an AOTI artifact spends its time: plain DeiT vs a reduction preset, kernel by kernel.

Compiles both with Inductor's kernel profiling on (each generated C++ kernel records itself), runs them
alternately under torch.profiler, and groups self time into GEMMs (oneDNN/MKL linear), attention (SDPA), generated
kernels (layer norm, GELU, residuals, gathers...), sorts and the rest. The ratio column shows which part
falls short of the FLOPs reduction. Output goes to benchmarks/results/<machine>/.

    python scripts/profile_aoti.py --preset imagepiece --batch 8
"""
from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
from torch.profiler import ProfilerActivity, profile

import imagepiece
from imagepiece.bench.measure import gflops_per_image
from imagepiece.config import PRESETS
from imagepiece.environment import machine_info, machine_slug
from imagepiece.export import compile_artifact, load

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
GROUPS = (("linear", ("linear", "mkl")), ("attention (SDPA)", ("scaled_dot_product",)), ("sort", ("sort",)),
          ("generated kernels", ("cpp_fused",)), ("convolution (patchify)", ("conv",)))


def group_of(name: str) -> str:
    for group, needles in GROUPS:
        if any(needle in name for needle in needles):
            return group
    return "other (allocation, views, bmm, wrapper)"


def profile_interleaved(paths: dict, batch: int, runs: int) -> dict:
    """Self time per group and artifact, profiling one call of each artifact in turn, `runs` times:
    this machine's speed drifts, and alternating keeps the drift out of the ratios."""
    models = {name: load(path) for name, path in paths.items()}
    images = torch.randn(batch, 3, 224, 224)
    for model in models.values():
        for _ in range(3):
            model(images)
    groups = {name: {} for name in models}
    for _ in range(runs):
        for name, model in models.items():
            with profile(activities=[ProfilerActivity.CPU]) as trace:
                model(images)
            for event in trace.key_averages():
                key = group_of(event.key)
                groups[name][key] = groups[name].get(key, 0.0) + event.self_cpu_time_total / runs / 1e3
    return groups


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="deit_small_patch16_224", choices=sorted(imagepiece.ARCHS))
    parser.add_argument("--preset", default="imagepiece", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    inductor_config.cpp.enable_kernel_profile = True  # the artifacts record each kernel
    machine = machine_info()
    workdir = Path(tempfile.mkdtemp(prefix="profile_aoti."))
    torch.manual_seed(0)
    paths, flops = {}, {}
    for preset in ("deit", args.preset):
        model = imagepiece.create_model(args.arch, **PRESETS[preset])
        flops[preset] = gflops_per_image(model, (3, 224, 224), torch.device("cpu"), torch.float32)
        paths[preset] = compile_artifact(model, workdir / f"{preset}.so", batch=args.batch).path
    results = profile_interleaved(paths, args.batch, args.runs)

    lines = [f"# AOTI kernel-time breakdown, {args.arch}, batch {args.batch}, CPU fp32, mean of {args.runs} interleaved runs "
             f"(profiler on: absolute times are inflated), {datetime.datetime.now().isoformat(timespec='seconds')}",
             f"# machine: {machine['cpu']} ({machine['cpu_cores']} cores); torch {machine['torch']}",
             f"# GFLOPs/image: deit {flops['deit']:.2f}, {args.preset} {flops[args.preset]:.2f} "
             f"(ratio {flops['deit'] / flops[args.preset]:.2f}x)",
             f"{'part':<42} {'deit ms':>9} {args.preset + ' ms':>16} {'ratio':>7}"]
    names = sorted(set(results["deit"]) | set(results[args.preset]), key=lambda k: -results["deit"].get(k, 0))
    for name in names + ["total"]:
        plain = sum(results["deit"].values()) if name == "total" else results["deit"].get(name, 0.0)
        ours = sum(results[args.preset].values()) if name == "total" else results[args.preset].get(name, 0.0)
        ratio = f"{plain / ours:6.2f}x" if ours else "     -"
        lines.append(f"{name:<42} {plain:9.2f} {ours:16.2f} {ratio:>7}")
    print("\n".join(lines))
    folder = args.out / machine_slug(machine)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"profile_aoti_{args.arch}_{args.preset}_b{args.batch}_{datetime.datetime.now():%Y%m%d-%H%M%S}.txt"
    out.write_text("\n".join(lines) + "\n")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
