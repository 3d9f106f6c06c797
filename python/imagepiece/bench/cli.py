"""`python -m imagepiece.bench MODE ...` (and scripts/benchmark.py, the same CLI).

Each mode is a module with HELP, `add_arguments(parser)`, `check(args, parser)` and `run(args)`,
listed in MODES; the arguments every mode shares are added here. Every mode writes its raw results
through `results.ResultsWriter` to benchmarks/results/<machine>/.

examples:
  python -m imagepiece.bench suite                     # CPU: DeiT-S, every variant and path, batch 1 8 64
  python -m imagepiece.bench suite --quick             # CI-sized: DeiT-Ti, batch 2, plain and ImagePiece
  python -m imagepiece.bench suite --device cuda       # GPU: fp16 and bf16, batch 1..256, CUDA graphs too
  python -m imagepiece.bench compile --batch 1 8       # cold export + AOTInductor time, size, eager vs AOTI
  python -m imagepiece.bench overhead                  # ip_runtime vs PyTorch's AOTI runner at batch 1
  python -m imagepiece.bench profile --preset imagepiece --batch 8   # kernel-time breakdown vs plain
  python -m imagepiece.bench reevaluation              # decisions re-evaluation changes vs summed scores
  python -m imagepiece.bench precision                 # bf16 vs fp32: flipped decisions, logit deviation
  python -m imagepiece.bench contention --neighbours 0 1   # OpenMP settings when other processes share the cores
  python -m imagepiece.bench tuning --batch 8          # freezing/prepacking, max-autotune: latency, compile time
  python -m imagepiece.bench serve                     # dynamic batcher + HTTP server, 1..64 clients, vs batch-1 runs
  python -m imagepiece.bench artifact-load --cycles 200   # load time with/without the digest check; RSS over reloads
  python -m imagepiece.bench e2e --uint8 --ray           # JPEG files -> predictions vs model-only img/s (DeiT-S, batch 8)
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Dict, Optional, Sequence

import torch

from ..command_line import machine_failure
from ..environment import machine_info
from ..model import ARCHS
from ..termination import STOPPED, Terminated, exit_status, sigterm_unwinds
from . import (artifact_load, compile_time, contention, overhead, precision, predict_e2e, profiling, reevaluation, serving, suite,
               tuning)
from .results import RESULTS_ROOT, begin_record, remove_unfinished_record, results_folder
from .variants import DEFAULT_ARCH

DESCRIPTION = "Benchmarks of the ImagePiece family; raw results go to benchmarks/results/<machine>/."
MODES: Dict[str, ModuleType] = {"suite": suite, "compile": compile_time, "overhead": overhead, "profile": profiling,
                                "reevaluation": reevaluation, "precision": precision,
                                "contention": contention, "serve": serving, "tuning": tuning,
                                "artifact-load": artifact_load, "e2e": predict_e2e}


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default=DEFAULT_ARCH, choices=sorted(ARCHS))
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=RESULTS_ROOT, help="results root; a folder per machine is made below it")


def check_common_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    try:
        device = torch.device(args.device)
    except RuntimeError:  # "cudafoo", "tpu"
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index not in (None, 0)):
        parser.error(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was requested but no CUDA GPU is available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        parser.error(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    cores = len(os.sched_getaffinity(0))  # the cores this process may use (a container's or taskset's share)
    if args.threads is not None and args.threads > cores:
        print(f"{parser.prog}: warning: --threads {args.threads} is more than the {cores} cores this process may use: "
              "the threads take turns, and the figures measure that", file=sys.stderr)


def parse_args(argv: Optional[Sequence[str]] = None, prog: str = "python -m imagepiece.bench") -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog="examples:" + __doc__.split("examples:", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True, metavar="MODE")
    subparsers = {}
    for name, mode in MODES.items():
        subparsers[name] = modes.add_parser(name, help=mode.HELP, description=mode.__doc__.split("\n\n")[0])
        add_common_arguments(subparsers[name])
        mode.add_arguments(subparsers[name])
    args = parser.parse_args(argv)
    check_common_arguments(args, subparsers[args.mode])
    MODES[args.mode].check(args, subparsers[args.mode])
    try:  # <out>/<machine>, before the measurement rather than after it; made with the run's first file
        results_folder(args.out, machine_info(args.device))
    except ValueError as error:
        subparsers[args.mode].error(str(error))
    return args


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m imagepiece.bench") -> int:
    args = parse_args(argv, prog)
    if args.threads:
        torch.set_num_threads(args.threads)
    begin_record()
    try:
        # SIGTERM unwinds too: the modes' `with` and `finally` blocks stop their child processes (busy neighbours,
        # the HTTP server, measuring children) and remove their temporary folders.
        with sigterm_unwinds():
            return MODES[args.mode].run(args)
    except STOPPED as stop:
        how = "terminated (SIGTERM)" if isinstance(stop, Terminated) else "interrupted"
        remove_unfinished_record()  # stopped between two of its files: none of them stays
        print(f"{prog}: {args.mode} {how}; its child processes and temporary files are gone, its results were not written",
              file=sys.stderr)
        return exit_status(stop)
    except Exception as error:  # noqa: BLE001  (a machine out of memory or disk is said in one line; bugs keep their traceback)
        reason = machine_failure(error)
        if reason is None:
            raise
        remove_unfinished_record()
        print(f"{prog}: error: {args.mode} failed: {reason}; its results were not written", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
