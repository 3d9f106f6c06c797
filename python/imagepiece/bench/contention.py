"""contention: an artifact's latency through ip_runtime when other processes share the cores, per OpenMP setting.

The compiled kernels and oneDNN run on OpenMP (GNU libgomp) threads, one per core. By default a
waiting thread spins before it sleeps; when a busy neighbour holds a core, the thread that a barrier
waits for may not be running while its partner burns the other core spinning. Each setting runs in
its own child process (libgomp reads its environment once, when it loads):

  * default:          libgomp's own default (spins 300,000 times, then sleeps), given as GOMP_SPINCOUNT=300000:
                      with no setting at all, `import ip_runtime` would make the child PASSIVE;
  * passive:          OMP_WAIT_POLICY=PASSIVE (a waiting thread sleeps at once);
  * 1 thread:         OMP_NUM_THREADS=1, waiting as in default (GOMP_SPINCOUNT=300000 again: without it this
                      would be "passive, 1 thread");
  * passive, 1 thread.

Each runs alone and beside N busy processes (spin loops), in rounds that alternate the settings, so
the machine's drift hits them alike. Reported: p50 latency per setting and neighbour count, and each
setting's slowdown relative to the default setting alone.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch

from ..config import PRESETS
from ..model import create_model
from .artifact_option import checked_metadata, name_after_artifact
from .results import ResultsWriter
from .timing import summarize

HELP = "latency under busy neighbour processes, per OpenMP wait policy / thread count"
# libgomp's spin count when OMP_WAIT_POLICY is unset (its documentation, GOMP_SPINCOUNT). Named explicitly because
# `import ip_runtime` (and `import imagepiece`) set OMP_WAIT_POLICY=PASSIVE where neither variable is set.
LIBGOMP_DEFAULT_SPINCOUNT = "300000"
SETTINGS: Dict[str, Dict[str, str]] = {
    "default": {"GOMP_SPINCOUNT": LIBGOMP_DEFAULT_SPINCOUNT},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "1 thread": {"OMP_NUM_THREADS": "1", "GOMP_SPINCOUNT": LIBGOMP_DEFAULT_SPINCOUNT},
    "passive, 1 thread": {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"},
}
OPENMP_VARIABLES = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
SPIN = "while True: pass"
CHILD = ("import json, sys, time, ip_runtime\n"
         "from imagepiece.artifact_metadata import example_images\n"
         "path, batch, calls = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])\n"
         "runtime = ip_runtime.Runtime(path, device='cpu')\n"
         "images = example_images(runtime.info, batch)  # fp32, bf16 or uint8 pixels, as the artifact takes them\n"
         "runtime.run(images); runtime.run(images)\n"
         "seconds = []\n"
         "for _ in range(calls):\n"
         "    start = time.perf_counter(); runtime.run(images); seconds.append(time.perf_counter() - start)\n"
         "print(json.dumps(seconds))\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="imagepiece", choices=sorted(PRESETS))
    parser.add_argument("--artifact", type=Path, help="a CPU artifact to run (default: compile --preset at --batch)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--neighbours", type=int, nargs="+", default=[0, 1], help="busy processes beside the model")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--rounds", type=int, default=3, help="rounds over every setting and neighbour count")
    parser.add_argument("--calls", type=int, default=10, help="timed calls per child process")


def check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.device != "cpu":
        parser.error("contention runs on cpu only (it is about OpenMP threads sharing cores)")
    if args.threads is not None:
        parser.error("contention sets each child's thread count through --settings; drop --threads")
    if args.batch < 1 or args.rounds < 1 or args.calls < 1 or any(n < 0 for n in args.neighbours):
        parser.error("--batch, --rounds and --calls must be >= 1, --neighbours >= 0")
    if max(args.neighbours) > max_neighbours():
        parser.error(f"--neighbours {max(args.neighbours)} is more busy processes than this machine can time anything beside "
                     f"(at most {max_neighbours()}, 4 per core)")
    # A value given twice would be timed twice as often as the others and its rows pooled under one name.
    args.neighbours, args.settings = list(dict.fromkeys(args.neighbours)), list(dict.fromkeys(args.settings))
    if args.artifact is not None:
        name_after_artifact(args, checked_metadata(parser, "--artifact", args.artifact, args.device, batch=args.batch))


def max_neighbours() -> int:
    """The most busy neighbours a run may start: 4 per core already starves the measured process."""
    return 4 * (os.cpu_count() or 1)


def child_environment(setting: Dict[str, str]) -> Dict[str, str]:
    """This process's environment with its OpenMP variables replaced by `setting`'s."""
    environment = {key: value for key, value in os.environ.items() if key not in OPENMP_VARIABLES}
    return {**environment, **setting}


def child_seconds(artifact: Path, batch: int, calls: int, setting: Dict[str, str]) -> List[float]:
    result = subprocess.run([sys.executable, "-c", CHILD, str(artifact), str(batch), str(calls)],
                            env=child_environment(setting), capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def with_neighbours(count: int, measure):
    neighbours = []
    try:
        for _ in range(count):  # in the try: an interruption between two starts stops the first one too
            # stderr dropped: a Ctrl-C reaches the whole process group, and each spinner would print a traceback
            neighbours.append(subprocess.Popen([sys.executable, "-c", SPIN], stderr=subprocess.DEVNULL))
        time.sleep(0.5 if count else 0.0)  # let them take their cores
        return measure()
    finally:
        for process in neighbours:
            process.kill()
            process.wait()


def run(args: argparse.Namespace) -> int:
    writer = ResultsWriter(args.out, "contention", f"{args.arch}_{args.preset}_b{args.batch}", device=args.device)
    with tempfile.TemporaryDirectory(prefix="benchmark_contention.") as folder:
        artifact = args.artifact
        if artifact is None:
            from ..export import compile_artifact

            torch.manual_seed(0)
            artifact = compile_artifact(create_model(args.arch, **PRESETS[args.preset]), Path(folder) / "model.so", batch=args.batch).path
        samples: Dict[tuple, List[float]] = {}
        for _ in range(args.rounds):
            for count in args.neighbours:
                for name in args.settings:
                    seconds = with_neighbours(count, lambda: child_seconds(artifact, args.batch, args.calls, SETTINGS[name]))
                    samples.setdefault((name, count), []).extend(seconds)
    stats = {key: summarize(seconds) for key, seconds in samples.items()}
    base = stats[(args.settings[0], args.neighbours[0])]["p50_ms"]
    lines = [f"ip_runtime latency with busy neighbour processes, {args.arch} {args.preset} batch {args.batch}, "
             f"{os.cpu_count()} cores, {args.rounds} rounds x {args.calls} calls per setting",
             f"{'setting':<20} {'neighbours':>10} {'p50 ms':>9} {'p90 ms':>9}  vs {args.settings[0]!r} with {args.neighbours[0]}"]
    for (name, count), row in sorted(stats.items(), key=lambda item: (item[0][1], args.settings.index(item[0][0]))):
        lines.append(f"{name:<20} {count:>10} {row['p50_ms']:9.2f} {row['p90_ms']:9.2f}  {row['p50_ms'] / base:5.2f}x")
    print(f"# {writer.provenance}\n" + "\n".join(lines))
    writer.report("\n".join(lines), vars(args), stats={f"{name} | {count} neighbours": row for (name, count), row in stats.items()},
                  settings_env=SETTINGS)
    return 0
