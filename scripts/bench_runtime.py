#!/usr/bin/env python
"""google-benchmark (Python API) of ip_runtime.Runtime.run vs the Python AOTI loader vs eager PyTorch.

All three run the same model (DeiT-S ImagePiece, random weights) at each batch size; the AOTI paths
share one compiled artifact per batch. google-benchmark repeats each case and, with random
interleaving, alternates them so that drift on a noisy machine hits all alike. The JSON report goes
to benchmarks/results/<machine>/ (google-benchmark's own format, with machine and torch in its context).

    python scripts/bench_runtime.py                          # batch 1 and 8
    python scripts/bench_runtime.py --batch 1 8 64 -- --benchmark_repetitions=10
"""
from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
from pathlib import Path

import google_benchmark as benchmark
import torch

import imagepiece
import ip_runtime
from imagepiece.environment import machine_info, machine_slug
from imagepiece.export import compile_artifact, load

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def register(name: str, call, batch: int) -> None:
    def case(state):
        while state:
            call()
        state.items_processed = state.iterations * batch

    case.__name__ = f"{name}/batch:{batch}"
    benchmark.register(case, name=f"{name}/batch:{batch}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="deit_small_patch16_224", choices=sorted(imagepiece.ARCHS))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args, benchmark_flags = parser.parse_known_args()
    args.batch = [b for b in args.batch if b > 0] or parser.error("--batch sizes must be >= 1")

    torch.manual_seed(0)
    model = imagepiece.create_model(args.arch, "imagepiece")
    workdir = Path(tempfile.mkdtemp(prefix="bench_runtime."))
    keep = []  # the runners must outlive registration
    for batch in args.batch:
        artifact = compile_artifact(model, workdir / f"b{batch}.so", batch=batch).path
        images = torch.randn(batch, 3, 224, 224)
        runtime, loader = ip_runtime.Runtime(str(artifact)), load(artifact)
        keep += [runtime, loader]
        register("ip_runtime.Runtime.run", lambda r=runtime, x=images: r.run(x), batch)
        register("imagepiece.export.load (AOTI runner)", lambda m=loader, x=images: m(x), batch)
        register("eager", lambda x=images: torch.inference_mode()(model)(x), batch)

    machine = machine_info()
    folder = args.out / machine_slug(machine)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"bench_runtime_py_{args.arch}_{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    defaults = ["--benchmark_repetitions=5", "--benchmark_enable_random_interleaving=true",
                "--benchmark_min_time=1s", f"--benchmark_out={out}", "--benchmark_out_format=json",
                f"--benchmark_context=machine={machine['cpu']} ({machine['cpu_cores']} cores)",
                f"--benchmark_context=torch={machine['torch']}"]
    benchmark.main([sys.argv[0], *defaults, *[flag for flag in benchmark_flags if flag != "--"]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
