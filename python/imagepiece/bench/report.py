"""The suite's tables and plots (the files themselves are written by `results.ResultsWriter`)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List

from .results import provenance
from .variants import BASELINE

COLUMNS = ["variant", "label", "path", "batch", "device", "dtype", "precision", "p50_ms", "p90_ms", "min_ms", "img_per_s", "peak_mem_mib",
           "gflops_per_image", "mean_tokens", "tokens_per_block", "vs_plain", "vs_eager_plain", "samples"]


def markdown_table(rows: List[dict], machine: dict, title: str) -> str:
    """Latency table; "vs plain" compares with plain DeiT on the same path, "vs timm eager" with
    plain DeiT in timm eager (when the eager path ran), both timed in the same interleaved loop."""
    lines = [f"### {title}", "", f"{provenance(machine)}", "",
             "| model | path | precision | batch | p50 ms | p90 ms | img/s | vs plain | vs timm eager | GFLOPs/img | mean tokens | peak MiB |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['label']} | {row['path']} | {row['precision']} | {row['batch']} | {row['p50_ms']:.2f} | {row['p90_ms']:.2f} | "
                     f"{row['img_per_s']:.1f} | {row['vs_plain']:.2f}x | {_ratio(row['vs_eager_plain'])} | {row['gflops_per_image']:.2f} | "
                     f"{row['mean_tokens']:.1f} | {_mib(row['peak_mem_mib'])} |")
    return "\n".join(lines) + "\n"


def compile_table(seconds: Dict[tuple, float]) -> str:
    """What it took to get each compiled contender running, in seconds."""
    lines = ["| model | path | what | seconds |", "|---|---|---|---:|"]
    for (variant, path, what), value in sorted(seconds.items()):
        lines.append(f"| {variant} | {path} | {what} | {value:.1f} |")
    return "\n".join(lines) + "\n"


def plot(rows: List[dict], path: Path, machine: dict) -> None:
    """Left: img/s vs batch, one panel per path. Right: speed-up vs FLOPs reduction (largest batch)."""
    if not rows:
        raise ValueError("no rows to plot: nothing was timed")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = list(dict.fromkeys(row["path"] for row in rows))
    variants: Dict[str, str] = dict((row["variant"], row["label"]) for row in rows)
    figure, axes = plt.subplots(1, len(paths) + 1, figsize=(4.2 * (len(paths) + 1), 4), squeeze=False)
    for axis, path_name in zip(axes[0], paths):
        for variant, label in variants.items():
            points = sorted((r["batch"], r["img_per_s"]) for r in rows if r["path"] == path_name and r["variant"] == variant)
            if points:
                axis.plot(*zip(*points), marker="o", label=label)
        axis.set(title=path_name, xlabel="batch", ylabel="img/s", xscale="log")
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    scatter = axes[0][-1]
    largest = max(row["batch"] for row in rows)
    plain_flops = {r["path"]: r["gflops_per_image"] for r in rows if r["variant"] == BASELINE and r["batch"] == largest}
    for path_name in paths:
        points = [(plain_flops[path_name] / r["gflops_per_image"], r["vs_plain"]) for r in rows
                  if r["path"] == path_name and r["batch"] == largest and path_name in plain_flops and r["gflops_per_image"] > 0]
        if points:
            scatter.scatter(*zip(*points), label=path_name)
    limit = max([3.0] + [r["vs_plain"] for r in rows if not math.isnan(r["vs_plain"])])
    scatter.plot([1, limit], [1, limit], "k--", linewidth=0.8, label="speed-up = FLOPs reduction")
    scatter.set(title=f"speed-up vs FLOPs reduction, batch {largest}", xlabel="plain GFLOPs / model GFLOPs", ylabel="img/s vs plain")
    scatter.grid(alpha=0.3)
    scatter.legend(fontsize=7)
    figure.suptitle(provenance(machine), fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _mib(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.0f}"  # the CPU has no per-call figure (measure.PeakMemory)


def _ratio(value: float) -> str:
    """A ratio cell; "-" where there is none (no timm eager path in the run)."""
    return "-" if math.isnan(value) else f"{value:.2f}x"
