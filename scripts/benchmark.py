#!/usr/bin/env python
"""Eager PyTorch throughput of plain DeiT (timm) vs ToMe / EViT / ImagePiece, side by side.

All models run interleaved in one process (same weights, same input) and each row reports its ratio
to plain DeiT measured in the same run. The table and a JSON copy go to
benchmarks/results/<machine>/ with the machine and torch version.

    python scripts/benchmark.py                      # DeiT-S, batch 8 and 64, CPU fp32
    python scripts/benchmark.py --batch 1 8 --repeats 10
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import timm
import torch

import imagepiece
from imagepiece.environment import machine_info, machine_slug
from imagepiece.timing import summarize, time_interleaved

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
BASELINE = "plain (timm)"


def build_models(arch: str) -> dict:
    torch.manual_seed(0)
    plain = timm.create_model(arch).eval()
    models = {BASELINE: plain}
    for label, method in (("ToMe r=13", "tome"), ("EViT keep 0.7", "evit"), ("ImagePiece", "imagepiece")):
        model = imagepiece.create_model(arch, method)
        model.load_state_dict(plain.state_dict())
        models[label] = model
    return models


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="deit_small_patch16_224", choices=sorted(imagepiece.ARCHS))
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 64], help="batch sizes (default: 8 64)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per batch size (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (a machine subfolder is added)")
    args = parser.parse_args(argv)
    if any(b < 1 for b in args.batch) or args.repeats < 1:
        parser.error("--batch and --repeats must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    models = build_models(args.arch)
    lines = [
        f"# eager fp32 CPU throughput, {args.arch}, {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"# machine: {info['cpu']} ({info['cpu_cores']} cores, {info['torch_threads']} torch threads); "
        f"torch {info['torch']}, timm {info['timm']}",
        f"{'model':<16} {'batch':>5} {'tokens/block':>12} {'p50 ms':>9} {'p90 ms':>9} {'img/s':>8} {'vs plain':>9}",
    ]
    print("\n".join(lines), flush=True)
    rows = []
    for batch in args.batch:
        images = torch.randn(batch, 3, 224, 224)
        with torch.inference_mode():
            runs = {name: (lambda m=model: m(images)) for name, model in models.items()}
            samples = time_interleaved(runs, repeats=args.repeats)
        baseline = summarize(samples[BASELINE])["p50_ms"]
        for name, model in models.items():
            stats = summarize(samples[name])
            schedule = model.token_schedule() if hasattr(model, "token_schedule") else None
            mean_tokens = sum(b.tokens_in for b in schedule) / len(schedule) if schedule else 197
            row = dict(model=name, batch=batch, mean_tokens=mean_tokens, **stats,
                       img_per_s=batch / stats["p50_ms"] * 1e3, vs_plain=baseline / stats["p50_ms"])
            rows.append(row)
            line = (f"{name:<16} {batch:>5} {mean_tokens:>12.1f} {row['p50_ms']:>9.1f} {row['p90_ms']:>9.1f} "
                    f"{row['img_per_s']:>8.1f} {row['vs_plain']:>8.2f}x")
            lines.append(line)
            print(line, flush=True)

    folder = args.out / machine_slug(info)
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"eager_{args.arch}_{datetime.datetime.now():%Y%m%d-%H%M%S}"
    (folder / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    (folder / f"{stem}.json").write_text(json.dumps({"machine": info, "arch": args.arch, "rows": rows}, indent=2))
    print(f"saved {folder / stem}.txt and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
