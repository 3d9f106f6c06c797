"""suite: side-by-side speed of DeiT / ToMe / EViT / ImagePiece on every way to run them.

At each batch size every contender (variant x path) takes turns in one interleaved loop, so each
row's ratios are measured in the same run: to plain DeiT on the same path ("vs plain") and to plain
DeiT in timm eager ("vs timm eager", when the eager path runs). Paths with their own harness (the C++
google-benchmark binary) are timed after the loop. Rows: p50/p90/fastest latency, img/s, peak
memory, GFLOPs per image, tokens entering each block; compile times of the compiled paths beside
them. Files: CSV, JSON, markdown, PNG plots.
"""
from __future__ import annotations

import argparse
import functools
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from ..artifact import DTYPES
from ..command_line import missing_modules
from . import report
from .measure import PeakMemory, gflops_per_image
from .paths import PATHS, Context
from .results import ResultsWriter, json_setting
from .timing import summarize, time_interleaved
from .variants import BASELINE, DEFAULT_ARCH, DEFAULT_VARIANTS, VARIANTS, build_models

HELP = "DeiT / ToMe / EViT / ImagePiece across eager, torch.compile, AOTI, ip_runtime, C++"
CPP_BENCH = Path(__file__).resolve().parents[3] / "build" / "bench" / "bench_runtime"
CPP_BUILD = ("cmake -S cpp/bench -B build/bench -DCMAKE_PREFIX_PATH=$(python -c 'import ip_runtime; print(ip_runtime.cmake_prefix_path)') "
             "&& cmake --build build/bench (needs libbenchmark-dev)")
CPP_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # what the binary registers (cpp/bench/bench_runtime.cpp)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help=f"default: {' '.join(DEFAULT_VARIANTS)}")
    parser.add_argument("--paths", nargs="+", choices=list(PATHS), help="default: every path the device supports, except the optional peers and the bf16/int8 ones (name them)")
    parser.add_argument("--batch", type=int, nargs="+", help="default: 1 8 64 (CPU), 1 8 64 256 (CUDA)")
    parser.add_argument("--dtype", nargs="+", choices=["fp32", "fp16", "bf16"], help="default: fp32 (CPU), fp16 bf16 (CUDA)")
    parser.add_argument("--repeats", type=int, help="timed rounds per batch size (median and p90 reported; default 10, --quick 3)")
    parser.add_argument("--min-seconds", type=float, default=0.0, help="keep timing a batch size at least this long (GPU)")
    parser.add_argument("--quick", action="store_true", help="a CI-sized run: DeiT-Ti, batch 2, plain and ImagePiece, 3 rounds, "
                        "paths eager, aoti and ip_runtime unless --paths names others")
    parser.add_argument("--cpp-bench", type=Path, default=CPP_BENCH, help="the built cpp/bench binary")
    parser.set_defaults(arch=None)  # resolved in check: --quick must tell a given --arch from the default


def check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    device = "cuda" if args.device.startswith("cuda") else "cpu"
    if args.quick:
        given = [f"--{name}" for name in ("arch", "variants", "batch") if getattr(args, name) is not None]
        if given:
            parser.error(f"--quick sets --arch, --variants and --batch itself; drop {' and '.join(given)} or --quick")
        args.arch, args.variants, args.batch = "deit_tiny_patch16_224", ["plain", "imagepiece"], [2]
        args.repeats = 3 if args.repeats is None else args.repeats
        args.paths = args.paths or ["eager", "aoti", "ip_runtime"]
    args.repeats = 10 if args.repeats is None else args.repeats
    args.arch = args.arch or DEFAULT_ARCH
    args.variants = args.variants or list(DEFAULT_VARIANTS)
    args.batch = args.batch or ([1, 8, 64, 256] if device == "cuda" else [1, 8, 64])
    args.dtype = args.dtype or (["fp16", "bf16"] if device == "cuda" else ["fp32"])
    if args.paths is None:
        args.paths = [name for name, path in PATHS.items()
                      if path.in_default and device in path.devices and set(args.dtype) & set(path.dtypes)]
        unusable = "cpp" in args.paths and why_not_cpp_bench(args.cpp_bench)
        if unusable:  # asked for by default, not by name: say so and go on
            args.paths.remove("cpp")
            print(f"suite: the 'cpp' path is left out: {unusable}", file=sys.stderr)
    # The tables need no plot: without matplotlib (imagepiece[scripts]) the figures are left out, said before timing.
    args.plot = not missing_modules(["matplotlib"])
    if not args.plot:
        print("suite: no figures: matplotlib is not installed (pip install 'imagepiece[scripts]'); the tables are written",
              file=sys.stderr)
    # A value given twice would be timed twice and its plot written twice.
    args.batch, args.dtype, args.paths, args.variants = (list(dict.fromkeys(values))
                                                         for values in (args.batch, args.dtype, args.paths, args.variants))
    if any(b < 1 for b in args.batch):
        parser.error(f"--batch sizes must be >= 1, got {args.batch}")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if not (math.isfinite(args.min_seconds) and args.min_seconds >= 0):
        parser.error(f"--min-seconds must be a finite number >= 0, got {args.min_seconds}")
    wrong_device = [name for name in args.paths if device not in PATHS[name].devices]
    if wrong_device:
        parser.error(f"path(s) {wrong_device} cannot run on {args.device}")
    for name in args.paths:
        if PATHS[name].missing():
            extra = "int8" if "torchao" in PATHS[name].missing() else "peers"
            parser.error(f"path {name!r} needs {PATHS[name].missing()}: pip install 'imagepiece[{extra}]'")
        if not set(args.dtype) & set(PATHS[name].dtypes):
            parser.error(f"path {name!r} runs only in a --dtype {' or '.join(PATHS[name].dtypes)} run (its own precision is in its name)")
    for dtype in args.dtype:  # a dtype no path runs would time nothing, and leave nothing to plot or tabulate
        if not any(dtype in PATHS[name].dtypes for name in args.paths):
            runs = ", ".join(f"{name} in {'/'.join(PATHS[name].dtypes)}" for name in args.paths)
            parser.error(f"--dtype {dtype}: none of the chosen --paths runs in a {dtype} run ({runs}); drop {dtype} or add a path "
                         "that runs in it")
    if device == "cpu" and "fp16" in args.dtype:
        parser.error("fp16 is not supported on cpu; use fp32 or bf16")
    unusable = "cpp" in args.paths and why_not_cpp_bench(args.cpp_bench)
    if unusable:
        parser.error(f"path 'cpp': {unusable}")
    if "cpp" in args.paths and set(args.batch) - set(CPP_BATCHES):
        parser.error(f"path 'cpp' times batch sizes {', '.join(map(str, CPP_BATCHES))} only (cpp/bench/bench_runtime.cpp), "
                     f"not {sorted(set(args.batch) - set(CPP_BATCHES))}")
    if BASELINE not in args.variants:
        args.variants = [BASELINE] + args.variants  # every ratio needs plain DeiT on the same path


@functools.lru_cache(maxsize=None)  # asked by the default paths and by the check of the paths
def why_not_cpp_bench(binary: Path) -> Optional[str]:
    """Why `binary` is not cpp/bench's google-benchmark program (None when it is), found before anything is compiled:
    run without arguments, it prints its usage line."""
    if not binary.is_file():
        return f"no google-benchmark binary at {binary} ({CPP_BUILD})"
    try:
        result = subprocess.run([str(binary)], capture_output=True, text=True, errors="replace", timeout=120)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"{binary} cannot be run ({getattr(error, 'strerror', None) or error})"
    if "usage: bench_runtime" not in result.stderr:
        said = result.stderr.strip().splitlines()[:1]  # a bench_runtime that cannot start says why (a library missing)
        return (f"{binary} is not cpp/bench's bench_runtime, or does not start (run without arguments, it does not print "
                f"its usage line{': ' + said[0] if said else ''})")
    return None


def measure_batch(context: Context, batch: int, args) -> List[dict]:
    """Time every (variant, path) contender at `batch`: one interleaved loop, then self-timed paths."""
    images = torch.randn(batch, 3, 224, 224, device=context.device, dtype=context.torch_dtype)
    calls, samples, memory = {}, {}, {}
    for path in args.paths:
        if PATHS[path].make_runner is None or context.dtype not in PATHS[path].dtypes:
            continue
        for variant in args.variants:
            run = PATHS[path].make_runner(context, variant)
            calls[(variant, path)] = lambda run=run: run(images)
            started = time.perf_counter()
            calls[(variant, path)]()  # the first call compiles where a path compiles lazily (torch.compile)
            if path == "compile":
                context.compile_seconds[(variant, path, f"first call, batch {batch}")] = time.perf_counter() - started
    if calls:
        samples.update(time_interleaved(calls, repeats=args.repeats, device=context.device, min_seconds=args.min_seconds))
        for key, call in calls.items():
            with PeakMemory(context.device) as peak:
                call()
            memory[key] = peak.mib
    for path in args.paths:
        if PATHS[path].time_itself is not None and context.dtype in PATHS[path].dtypes:
            for variant in args.variants:
                samples[(variant, path)] = PATHS[path].time_itself(context, variant, batch, args.repeats)
                memory[(variant, path)] = float("nan")
    return make_rows(context, batch, samples, memory)


def make_rows(context: Context, batch: int, samples: Dict[Tuple[str, str], List[float]], memory: dict) -> List[dict]:
    stats = {key: summarize(seconds) for key, seconds in samples.items()}
    eager_plain = stats.get((BASELINE, "eager"), {}).get("p50_ms", math.nan)
    rows = []
    for (variant, path), row_stats in stats.items():
        tokens = VARIANTS[variant].tokens_per_block()
        p50 = row_stats["p50_ms"]
        rows.append(dict(variant=variant, label=VARIANTS[variant].label, path=path, batch=batch, device=context.device.type,
                         dtype=context.dtype, precision=PATHS[path].precision or context.dtype, p50_ms=p50, p90_ms=row_stats["p90_ms"], min_ms=row_stats["min_ms"],
                         img_per_s=batch / p50 * 1e3, peak_mem_mib=memory[(variant, path)],
                         gflops_per_image=context.gflops[variant], mean_tokens=sum(tokens) / len(tokens),
                         tokens_per_block=" ".join(map(str, tokens)), vs_plain=stats[(BASELINE, path)]["p50_ms"] / p50,
                         vs_eager_plain=eager_plain / p50, samples=row_stats["samples"]))
    return sorted(rows, key=lambda row: (list(PATHS).index(row["path"]), list(VARIANTS).index(row["variant"])))


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    device = torch.device(args.device)
    subject = f"{args.arch}_{device.type}_{'-'.join(args.dtype)}{'_quick' if args.quick else ''}"
    writer = ResultsWriter(args.out, "suite", subject, device=args.device)
    print(f"# {writer.provenance}\n# {args.arch}, {device}, dtypes {args.dtype}, batch {args.batch}, "
          f"variants {args.variants}, paths {args.paths}", flush=True)
    rows, compile_seconds = [], {}
    with tempfile.TemporaryDirectory(prefix="benchmark.") as workdir:
        for dtype in args.dtype:
            models = build_models(args.arch, args.variants)
            for pair in models.values():
                for name, model in pair.items():
                    pair[name] = model.to(device=device, dtype=DTYPES[dtype]).eval()
            context = Context(args.arch, device, dtype, args.batch, Path(workdir), models,
                              cpp_bench=args.cpp_bench if args.cpp_bench.exists() else None, log=tqdm.write)
            context.gflops = {v: gflops_per_image(context.eager_model(v), (3, 224, 224), device, context.torch_dtype) for v in args.variants}
            with tqdm(args.batch, desc=dtype, unit="batch size", file=sys.stderr) as progress:
                for batch in progress:
                    progress.set_postfix_str(f"batch {batch}")
                    batch_rows = measure_batch(context, batch, args)
                    rows += batch_rows
                    for row in batch_rows:
                        tqdm.write(f"{row['dtype']} {row['path']:<18} b{row['batch']:<4} {row['label']:<26} "
                                   f"p50 {row['p50_ms']:9.2f} ms  {row['img_per_s']:9.1f} img/s  {row['vs_plain']:5.2f}x")
            for (variant, path, what), seconds in context.compile_seconds.items():
                precision = (PATHS[path].precision if path in PATHS else None) or dtype  # bf16/int8 paths run in an fp32 run
                compile_seconds[(variant, path, f"{precision}: {what}")] = seconds

    title = f"{args.arch} on {device.type} ({', '.join(args.dtype)}), {writer.created:%Y-%m-%d %H:%M}"
    markdown = report.markdown_table(rows, writer.machine, title)
    if compile_seconds:
        markdown += "\nTime to a running compiled model:\n\n" + report.compile_table(compile_seconds)
    writer.csv(rows, report.COLUMNS)
    writer.json({"settings": json_setting(vars(args)), "columns": report.COLUMNS, "rows": rows,
                 "compile_seconds": [dict(variant=v, path=p, what=w, seconds=s) for (v, p, w), s in compile_seconds.items()]})
    writer.text(markdown, ".md")
    for dtype in args.dtype if args.plot else ():
        dtype_rows = [r for r in rows if r["dtype"] == dtype and not math.isnan(r["img_per_s"])]
        if not dtype_rows:  # check() refuses a dtype no path runs; a plot of nothing is no plot either way
            continue
        writer.figure(lambda path: report.plot(dtype_rows, path, writer.machine), "" if len(args.dtype) == 1 else f"_{dtype}")
    print(markdown)
    print(writer.summary())
    return 0
