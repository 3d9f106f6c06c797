#!/usr/bin/env python
"""Side-by-side speed of DeiT / ToMe / EViT / ImagePiece across eager, torch.compile, AOTI and ip_runtime.

Every (path, batch) step times all model variants interleaved, so each row's ratio to plain DeiT on the
same path is measured in the same run. Rows: p50/p90 latency, img/s, peak memory, GFLOPs per image,
tokens entering each block. Results (CSV, JSON, markdown, PNG plots) go to benchmarks/results/<machine>/.

examples:
  python scripts/benchmark.py                        # CPU: fp32, batch 1 8 64, all variants and paths
  python scripts/benchmark.py --quick                # DeiT-Ti, batch 2, two variants, eager + AOTI + ip_runtime
  python scripts/benchmark.py --device cuda          # GPU: fp16 and bf16, batch 1 8 64 256, CUDA graphs too
  python scripts/benchmark.py --variants deit imagepiece --paths eager ip_runtime --batch 8
"""
from __future__ import annotations

import argparse
import datetime
import math
import shutil
import sys
import tempfile
from pathlib import Path

import torch

import imagepiece
from imagepiece.bench import report
from imagepiece.bench.measure import PeakMemory, gflops_per_image
from imagepiece.bench.paths import CPU_ONLY, CUDA_ONLY, PATHS, Context, make_runner, run_cpp_bench
from imagepiece.bench.variants import BASELINE, VARIANTS, build_models
from imagepiece.config import PRESETS, ReductionConfig, token_schedule
from imagepiece.environment import machine_info, machine_slug
from imagepiece.timing import summarize, time_interleaved

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CPP_BENCH = ROOT / "build" / "bench" / "bench_runtime"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmark.py", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="deit_small_patch16_224", choices=sorted(imagepiece.ARCHS))
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--paths", nargs="+", choices=PATHS, help="default: every path the device supports")
    parser.add_argument("--batch", type=int, nargs="+", help="default: 1 8 64 (CPU), 1 8 64 256 (CUDA)")
    parser.add_argument("--dtype", nargs="+", choices=["fp32", "fp16", "bf16"], help="default: fp32 (CPU), fp16 bf16 (CUDA)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds per step (median and p90 reported)")
    parser.add_argument("--min-seconds", type=float, default=0.0, help="keep timing a step at least this long (GPU)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="a CI-sized run: DeiT-Ti, batch 2, plain and ImagePiece")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results root (a machine folder is added)")
    parser.add_argument("--cpp-bench", type=Path, default=CPP_BENCH, help="the built cpp/bench binary")
    args = parser.parse_args(argv)

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda was requested but no CUDA GPU is available")
    if args.quick:
        args.arch, args.variants, args.batch, args.repeats = "deit_tiny_patch16_224", ["deit", "imagepiece"], [2], min(args.repeats, 3)
        args.paths = args.paths or ["eager", "aoti", "ip_runtime"]
    args.batch = args.batch or ([1, 8, 64, 256] if cuda else [1, 8, 64])
    args.dtype = args.dtype or (["fp16", "bf16"] if cuda else ["fp32"])
    args.paths = args.paths or [p for p in PATHS if p not in (CPU_ONLY if cuda else CUDA_ONLY)]
    if any(b < 1 for b in args.batch):
        parser.error(f"--batch sizes must be >= 1, got {args.batch}")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    wrong_device = [p for p in args.paths if p in (CPU_ONLY if cuda else CUDA_ONLY)]
    if wrong_device:
        parser.error(f"path(s) {wrong_device} cannot run on {args.device}")
    if not cuda and "fp16" in args.dtype:
        parser.error("fp16 is not supported on cpu; use fp32 or bf16")
    if "cpp" in args.paths and not args.cpp_bench.exists():
        parser.error(f"path 'cpp' needs the google-benchmark binary at {args.cpp_bench}: "
                     "cmake -S cpp/bench -B build/bench -DCMAKE_PREFIX_PATH=$(python -c 'import ip_runtime; print(ip_runtime.cmake_prefix_path)') "
                     "&& cmake --build build/bench (needs libbenchmark-dev)")
    if BASELINE not in args.variants:
        args.variants = [BASELINE] + args.variants  # every ratio needs plain DeiT on the same path
    return args


def schedule_of(variant: str) -> list:
    return [row.tokens_in for row in token_schedule(ReductionConfig(**PRESETS[variant]))]


def measure_step(context: Context, path: str, batch: int, args, progress) -> list:
    """Time every variant on `path` at `batch`, interleaved; one row per variant."""
    images = torch.randn(batch, 3, 224, 224, device=context.device, dtype=context.torch_dtype)
    if path == "cpp":
        samples = {variant: run_cpp_bench(context, variant, batch, args.repeats) for variant in args.variants}
        memory = {variant: float("nan") for variant in args.variants}
    else:
        runners = {variant: make_runner(context, path, variant) for variant in args.variants}
        progress.set_postfix_str(f"{path} batch {batch}: warming up")
        calls = {variant: (lambda run=run: run(images)) for variant, run in runners.items()}
        samples = time_interleaved(calls, repeats=args.repeats, device=context.device, min_seconds=args.min_seconds)
        memory = {}
        for variant, call in calls.items():
            with PeakMemory(context.device) as peak:
                call()
            memory[variant] = peak.mib
    baseline = summarize(samples[BASELINE])["p50_ms"]
    rows = []
    for variant in args.variants:
        stats = summarize(samples[variant])
        tokens = schedule_of(variant)
        rows.append(dict(variant=variant, label=VARIANTS[variant].label, path=path, batch=batch, device=context.device.type,
                         dtype=context.dtype, p50_ms=stats["p50_ms"], p90_ms=stats["p90_ms"], img_per_s=batch / stats["p50_ms"] * 1e3,
                         peak_mem_mib=memory[variant], gflops_per_image=context.gflops[variant],
                         mean_tokens=sum(tokens) / len(tokens), tokens_per_block=" ".join(map(str, tokens)),
                         vs_plain=baseline / stats["p50_ms"], samples=stats["samples"]))
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    machine = machine_info()
    folder = args.out / machine_slug(machine)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = f"suite_{args.arch}_{device.type}{'_quick' if args.quick else ''}_{stamp}"
    workdir = Path(tempfile.mkdtemp(prefix="benchmark."))
    print(f"# {report.provenance(machine)}\n# {args.arch}, {device}, dtypes {args.dtype}, batch {args.batch}, "
          f"variants {args.variants}, paths {args.paths}", flush=True)

    rows = []
    try:
        for dtype in args.dtype:
            models = build_models(args.arch, args.variants)
            for pair in models.values():
                for name, model in pair.items():
                    pair[name] = model.to(device=device, dtype=imagepiece.artifact.DTYPES[dtype]).eval()
            context = Context(args.arch, device, dtype, args.batch, workdir, models,
                              cpp_bench=args.cpp_bench if args.cpp_bench.exists() else None, log=tqdm.write)
            context.gflops = {v: gflops_per_image(context.eager_model(v), (3, 224, 224), device, context.torch_dtype) for v in args.variants}
            steps = [(path, batch) for path in args.paths for batch in args.batch]
            with tqdm(steps, desc=f"{dtype}", unit="step", file=sys.stderr) as progress:
                for path, batch in progress:
                    progress.set_postfix_str(f"{path} batch {batch}")
                    step_rows = measure_step(context, path, batch, args, progress)
                    rows += step_rows
                    for row in step_rows:
                        tqdm.write(f"{row['dtype']} {row['path']:<18} b{row['batch']:<4} {row['label']:<24} "
                                   f"p50 {row['p50_ms']:9.2f} ms  {row['img_per_s']:9.1f} img/s  {row['vs_plain']:5.2f}x")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    report.write_csv(rows, folder / f"{stem}.csv", machine)
    report.write_json(rows, folder / f"{stem}.json", machine, settings)
    title = f"{args.arch} on {device.type} ({', '.join(args.dtype)}), {stamp}"
    (folder / f"{stem}.md").write_text(report.markdown_table(rows, machine, title))
    for dtype in args.dtype:
        suffix = "" if len(args.dtype) == 1 else f"_{dtype}"
        report.plot([r for r in rows if r["dtype"] == dtype and not math.isnan(r["img_per_s"])], folder / f"{stem}{suffix}.png", machine)
    print(report.markdown_table(rows, machine, title))
    print(f"saved {folder / stem}.csv/.json/.md/.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
