"""overhead: what ip_runtime adds over calling PyTorch's AOTI runner directly, on the same artifact.

Contenders, interleaved call by call: the AOTI container runner itself, `imagepiece.export.load`
(the Python loader with input checks), `ip_runtime.Runtime.run` (allocating its output),
`run(images, logits)` into a caller buffer, and the eager model for scale.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from ..config import PRESETS
from ..export import compile_artifact, load
from ..model import create_model
from .results import ResultsWriter
from .timing import summarize, time_interleaved

HELP = "ip_runtime's cost over PyTorch's AOTI runner (and the Python loader, and eager)"
BASELINE = "AOTI runner (direct)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="imagepiece", choices=sorted(PRESETS), help="model setting (default: imagepiece)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="one static-batch artifact per size")
    parser.add_argument("--rounds", type=int, default=200, help="interleaved rounds per batch size")


def check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if any(b < 1 for b in args.batch) or args.rounds < 1:
        parser.error("--batch sizes and --rounds must be >= 1")
    args.batch = list(dict.fromkeys(args.batch))  # a size given twice would be measured twice, its stats overwritten


def _aoti_runner(path: Path, device: torch.device):
    if device.type == "cuda":
        return torch._C._aoti.AOTIModelContainerRunnerCuda(str(path), 1, str(device))
    return torch._C._aoti.AOTIModelContainerRunnerCpu(str(path), 1)


def time_contenders(model: torch.nn.Module, folder: Path, batch: int, device: torch.device, rounds: int) -> dict:
    """Seconds per call of each contender on one static-batch artifact, interleaved."""
    import ip_runtime

    path = compile_artifact(model, folder / f"b{batch}.so", device=str(device), batch=batch).path
    runner, loader = _aoti_runner(path, device), load(path, device=device)
    runtime = ip_runtime.Runtime(str(path), device=str(device))
    images = torch.randn(batch, 3, 224, 224, device=device)
    logits = torch.empty(batch, model.num_classes, device=device)
    with torch.inference_mode():
        return time_interleaved({BASELINE: lambda: runner.run([images]), "imagepiece.export.load": lambda: loader(images),
                                 "ip_runtime.run": lambda: runtime.run(images),
                                 "ip_runtime.run into buffer": lambda: runtime.run(images, logits),
                                 "eager": lambda: model(images)}, repeats=rounds, warmup=5, device=device)


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    writer = ResultsWriter(args.out, "overhead", f"{args.arch}_{args.preset}_{device.type}", device=args.device)
    torch.manual_seed(0)
    model = create_model(args.arch, **PRESETS[args.preset]).to(device)
    lines = [f"ip_runtime overhead over the AOTI runner, {args.arch} {args.preset}, {device} fp32, {args.rounds} interleaved rounds"]
    print(f"# {writer.provenance}\n{lines[0]}", flush=True)
    stats = {}
    for batch in args.batch:
        with tempfile.TemporaryDirectory(prefix="benchmark_overhead.") as folder:
            samples = time_contenders(model, Path(folder), batch, device, args.rounds)
        base = summarize(samples[BASELINE])["p50_ms"]
        lines.append(f"batch {batch}:")
        for name, seconds in samples.items():
            stats[f"batch {batch} {name}"] = summary = summarize(seconds)
            lines.append(f"  {name:<28} p50 {summary['p50_ms']:8.2f} ms  fastest {summary['min_ms']:8.2f} ms  "
                         f"{100 * (summary['p50_ms'] / base - 1):+7.1f}% vs the runner")
        print("\n".join(lines[-len(samples) - 1:]), flush=True)
    writer.report("\n".join(lines), vars(args), stats=stats)
    return 0
