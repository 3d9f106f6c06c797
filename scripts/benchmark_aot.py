#!/usr/bin/env python
"""Export/compile time, artifact size, and eager vs AOTInductor latency for one model.

Compiles with a fresh, empty Inductor cache (a cold compile, as a user's first run) unless --warm-cache,
one static-batch artifact per --batch, then times eager and compiled interleaved in one process.
Raw output goes to benchmarks/results/<machine>/.

    python scripts/benchmark_aot.py                         # DeiT-S ImagePiece, batch 1 and 8, CPU fp32
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

import imagepiece
from imagepiece.environment import machine_info, machine_slug
from imagepiece.timing import summarize, time_interleaved

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="deit_small_patch16_224", choices=sorted(imagepiece.ARCHS))
    parser.add_argument("--method", default="imagepiece", choices=imagepiece.METHODS)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warm-cache", action="store_true", help="keep the user's Inductor cache (default: cold compile)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="benchmark_aot."))
    if not args.warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(workdir / "inductor-cache")
    from imagepiece.export import compile_artifact, load  # after the cache location is set

    info = machine_info()
    lines = [
        f"# AOTInductor compile + latency, {args.arch}.{args.method}, {args.device} fp32, "
        f"{'warm' if args.warm_cache else 'cold'} Inductor cache, {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"# machine: {info['cpu']} ({info['cpu_cores']} cores, {info['torch_threads']} torch threads), GPU {info['gpu']}; torch {info['torch']}",
    ]
    print("\n".join(lines), flush=True)
    torch.manual_seed(0)
    model = imagepiece.create_model(args.arch, args.method).to(args.device)
    rows = []
    for batch in args.batch:
        report = compile_artifact(model, workdir / f"b{batch}.so", device=args.device, batch=batch)
        compiled = load(report.path)
        images = torch.randn(batch, 3, 224, 224, device=args.device)
        with torch.inference_mode():
            samples = time_interleaved({"eager": lambda: model(images), "aoti": lambda: compiled(images)},
                                       repeats=args.repeats, device=torch.device(args.device))
        eager, aoti = summarize(samples["eager"]), summarize(samples["aoti"])
        row = dict(batch=batch, export_s=report.export_seconds, compile_s=report.compile_seconds,
                   size_mib=report.size_bytes / 2**20, eager_p50_ms=eager["p50_ms"], aoti_p50_ms=aoti["p50_ms"],
                   eager_p90_ms=eager["p90_ms"], aoti_p90_ms=aoti["p90_ms"], speedup=eager["p50_ms"] / aoti["p50_ms"])
        rows.append(row)
        line = (f"batch {batch:>3}: export {row['export_s']:5.1f} s  compile {row['compile_s']:5.1f} s  size {row['size_mib']:6.1f} MiB  "
                f"eager p50 {row['eager_p50_ms']:7.1f} ms  aoti p50 {row['aoti_p50_ms']:7.1f} ms  ({row['speedup']:.2f}x)")
        lines.append(line)
        print(line, flush=True)

    folder = args.out / machine_slug(info)
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"aot_{args.arch}_{args.method}_{args.device}_{datetime.datetime.now():%Y%m%d-%H%M%S}"
    (folder / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    (folder / f"{stem}.json").write_text(json.dumps({"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    print(f"saved {folder / stem}.txt and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
