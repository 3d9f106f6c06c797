#!/usr/bin/env python
"""The CPU speed goals, measured across paths in one interleaved loop.

The suite (benchmark.py) interleaves the models within one path; the goals compare paths too
("ip_runtime ImagePiece vs timm eager DeiT-S", "... vs our plain DeiT-S AOTI artifact"), so here every
contender takes turns in the same loop: timm eager DeiT-S, the plain DeiT-S artifact through
ip_runtime, and ImagePiece (default and hyper-speed) through ip_runtime. This machine's speed drifts;
the median ratio is the figure, the ratio of the fastest calls is shown beside it (interference only
ever adds time).

    python scripts/benchmark_goals.py                       # DeiT-S, batch 8, CPU fp32
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

import timm
import torch

import imagepiece
import ip_runtime
from imagepiece.config import PRESETS
from imagepiece.environment import machine_info, machine_slug
from imagepiece.export import compile_artifact
from imagepiece.timing import summarize, time_interleaved

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def runtime_overhead(arch: str, timm_model, workdir: Path, stats: dict, rounds: int = 200) -> list:
    """ip_runtime's cost over PyTorch's AOTI runner on the same batch-1 artifact, interleaved."""
    model = imagepiece.create_model(arch, **PRESETS["imagepiece"])
    model.load_state_dict(timm_model.state_dict())
    path = str(compile_artifact(model, workdir / "imagepiece_b1.so", batch=1).path)
    runner, runtime = torch._C._aoti.AOTIModelContainerRunnerCpu(path, 1), ip_runtime.Runtime(path)
    image, logits = torch.randn(1, 3, 224, 224), torch.empty(1, 1000)
    with torch.inference_mode():
        samples = time_interleaved({"AOTI runner (direct)": lambda: runner.run([image]), "ip_runtime.run": lambda: runtime.run(image),
                                    "ip_runtime.run into buffer": lambda: runtime.run(image, logits)}, repeats=rounds, warmup=5)
    base = summarize(samples["AOTI runner (direct)"])["p50_ms"]
    lines = [f"runtime overhead, ImagePiece batch 1, {rounds} interleaved rounds (goal <= 3%):"]
    for name, seconds in samples.items():
        p50 = summarize(seconds)["p50_ms"]
        stats[f"batch1 {name}"] = summarize(seconds)
        lines.append(f"  {name:<28} p50 {p50:7.2f} ms  {100 * (p50 / base - 1):+6.1f}%")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="deit_small_patch16_224", choices=sorted(imagepiece.ARCHS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    machine = machine_info()
    torch.manual_seed(0)
    timm_model = timm.create_model(args.arch).eval()
    workdir = Path(tempfile.mkdtemp(prefix="benchmark_goals."))
    runtimes = {}
    for preset in ("deit", "imagepiece", "imagepiece_hyper"):
        model = imagepiece.create_model(args.arch, **PRESETS[preset])
        model.load_state_dict(timm_model.state_dict())
        print(f"compiling {preset} ...", flush=True)
        runtimes[preset] = ip_runtime.Runtime(str(compile_artifact(model, workdir / f"{preset}.so", batch=args.batch).path))
    images = torch.randn(args.batch, 3, 224, 224)
    calls = {
        "timm eager DeiT": lambda: timm_model(images),
        "ip_runtime plain DeiT": lambda: runtimes["deit"].run(images),
        "ip_runtime ImagePiece": lambda: runtimes["imagepiece"].run(images),
        "ip_runtime ImagePiece hyper": lambda: runtimes["imagepiece_hyper"].run(images),
    }
    with torch.inference_mode():
        samples = time_interleaved(calls, repeats=args.repeats, warmup=3)

    stats = {name: summarize(s) | {"best_ms": min(s) * 1e3} for name, s in samples.items()}
    lines = [f"# CPU goals, {args.arch}, batch {args.batch}, fp32, {args.repeats} interleaved rounds, "
             f"{datetime.datetime.now().isoformat(timespec='seconds')}",
             f"# machine: {machine['cpu']} ({machine['cpu_cores']} cores, {machine['torch_threads']} torch threads); "
             f"torch {machine['torch']}, timm {machine['timm']}",
             f"{'contender':<30} {'p50 ms':>8} {'p90 ms':>8} {'best ms':>8} {'img/s':>7}"]
    for name, row in stats.items():
        lines.append(f"{name:<30} {row['p50_ms']:8.1f} {row['p90_ms']:8.1f} {row['best_ms']:8.1f} {args.batch / row['p50_ms'] * 1e3:7.1f}")

    def ratio(slow: str, fast: str) -> str:
        return (f"{stats[slow]['p50_ms'] / stats[fast]['p50_ms']:.2f}x (median), "
                f"{stats[slow]['best_ms'] / stats[fast]['best_ms']:.2f}x (fastest calls)")

    lines += [f"ip_runtime ImagePiece vs timm eager DeiT:        {ratio('timm eager DeiT', 'ip_runtime ImagePiece')}   goal >= 2.2x",
              f"ip_runtime ImagePiece vs plain DeiT artifact:    {ratio('ip_runtime plain DeiT', 'ip_runtime ImagePiece')}   goal >= 1.9x",
              f"ip_runtime hyper-speed vs timm eager DeiT:       {ratio('timm eager DeiT', 'ip_runtime ImagePiece hyper')}",
              f"ip_runtime hyper-speed vs plain DeiT artifact:   {ratio('ip_runtime plain DeiT', 'ip_runtime ImagePiece hyper')}"]
    lines += runtime_overhead(args.arch, timm_model, workdir, stats)
    print("\n".join(lines))
    folder = args.out / machine_slug(machine)
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"goals_{args.arch}_b{args.batch}_{datetime.datetime.now():%Y%m%d-%H%M%S}"
    stem.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"machine": machine, "stats": stats}, indent=2))
    print(f"saved {stem}.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
