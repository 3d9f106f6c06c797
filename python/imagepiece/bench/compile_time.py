"""compile: export and AOTInductor compile time, artifact size, and eager vs AOTI latency.

Compiles with a fresh, empty Inductor cache (a cold compile, as on a user's first run) unless
--warm-cache, one static-batch artifact per --batch, then times the eager model and the artifact
interleaved in the same process.
"""
from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path

import torch

from ..config import PRESETS
from ..model import create_model
from .results import ResultsWriter
from .timing import summarize, time_interleaved
from .tuning import inductor_cache

HELP = "cold export + AOTInductor compile time, artifact size, eager vs AOTI latency"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="imagepiece", choices=sorted(PRESETS), help="model setting (default: imagepiece)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="one static-batch artifact per size")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warm-cache", action="store_true", help="keep the user's Inductor cache (default: a cold compile)")


def check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if any(b < 1 for b in args.batch) or args.repeats < 1:
        parser.error("--batch sizes and --repeats must be >= 1")
    args.batch = list(dict.fromkeys(args.batch))  # a size given twice would be compiled twice, its row written twice


def measure(model: torch.nn.Module, batch: int, workdir: Path, args: argparse.Namespace) -> dict:
    from ..export import compile_artifact, load

    report = compile_artifact(model, workdir / f"b{batch}.so", device=args.device, batch=batch)
    compiled = load(report.path, args.device)  # cuda:N, not the artifact's default cuda:0
    images = torch.randn(batch, 3, 224, 224, device=args.device)
    with torch.inference_mode():
        samples = time_interleaved({"eager": lambda: model(images), "aoti": lambda: compiled(images)},
                                   repeats=args.repeats, device=torch.device(args.device))
    eager, aoti = summarize(samples["eager"]), summarize(samples["aoti"])
    return dict(batch=batch, export_s=report.export_seconds, compile_s=report.compile_seconds,
                size_mib=report.size_bytes / 2**20, eager_p50_ms=eager["p50_ms"], aoti_p50_ms=aoti["p50_ms"],
                eager_p90_ms=eager["p90_ms"], aoti_p90_ms=aoti["p90_ms"], speedup=eager["p50_ms"] / aoti["p50_ms"])


def run(args: argparse.Namespace) -> int:
    writer = ResultsWriter(args.out, "compile", f"{args.arch}_{args.preset}_{args.device.split(':')[0]}", device=args.device)
    lines = [f"AOTInductor compile + latency, {args.arch} {args.preset}, {args.device} fp32, "
             f"{'warm' if args.warm_cache else 'cold'} Inductor cache"]
    print(f"# {writer.provenance}\n{lines[0]}", flush=True)
    torch.manual_seed(0)
    model = create_model(args.arch, **PRESETS[args.preset]).to(args.device)
    rows = []
    with tempfile.TemporaryDirectory(prefix="benchmark_compile.") as folder, \
            contextlib.nullcontext() if args.warm_cache else inductor_cache(Path(folder) / "inductor-cache"):
        for batch in args.batch:
            rows.append(row := measure(model, batch, Path(folder), args))
            lines.append(f"batch {batch:>3}: export {row['export_s']:5.1f} s  compile {row['compile_s']:5.1f} s  "
                         f"size {row['size_mib']:6.1f} MiB  eager p50 {row['eager_p50_ms']:7.1f} ms  "
                         f"aoti p50 {row['aoti_p50_ms']:7.1f} ms  ({row['speedup']:.2f}x)")
            print(lines[-1], flush=True)
    writer.report("\n".join(lines), vars(args), rows=rows)
    return 0
