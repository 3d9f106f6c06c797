"""The one timing helper of the benchmarks (and the demo): interleaved latency measurement.

The contenders compared in one table take turns, call by call, so a noisy neighbour or a CPU
frequency change hits all of them alike and their ratios stay meaningful."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    runs: Dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 2,
    device: torch.device = torch.device("cpu"),
    min_seconds: float = 0.0,
) -> Dict[str, List[float]]:
    """Seconds per call of each run; every round calls each run once, in turn.

    Args:
        runs: name -> zero-argument callable doing one batch.
        repeats: rounds (at least this many samples per run).
        warmup: untimed rounds first (allocator, caches, lazy init).
        min_seconds: keep adding rounds until this much time has passed (short runs on a GPU).
    """
    for _ in range(warmup):
        for run in runs.values():
            run()
    synchronize(device)
    samples: Dict[str, List[float]] = {name: [] for name in runs}
    started = time.perf_counter()
    while min(len(s) for s in samples.values()) < repeats or time.perf_counter() - started < min_seconds:
        for name, run in runs.items():
            begin = time.perf_counter()
            run()
            synchronize(device)
            samples[name].append(time.perf_counter() - begin)
    return samples


def summarize(seconds: List[float]) -> Dict[str, float]:
    """Median, p90 and fastest latency (ms) of the samples.

    The fastest call is a second view on a machine that drifts: interference only ever adds time.
    """
    ordered = sorted(seconds)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return {"p50_ms": statistics.median(ordered) * 1e3, "p90_ms": p90 * 1e3, "min_ms": ordered[0] * 1e3, "samples": len(ordered)}


def latency_percentiles(seconds: List[float]) -> Dict[str, float]:
    """p50, p90, p99 and mean latency (ms) of many requests' latencies (a load test's, where the tail matters)."""
    if not seconds:
        return {"p50_ms": float("nan"), "p90_ms": float("nan"), "p99_ms": float("nan"), "mean_ms": float("nan")}
    ordered = sorted(seconds)

    def percentile(q: float) -> float:  # nearest rank, as the p90 above
        return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] * 1e3

    return {"p50_ms": percentile(50), "p90_ms": percentile(90), "p99_ms": percentile(99), "mean_ms": statistics.fmean(ordered) * 1e3}
