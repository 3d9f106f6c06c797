"""The server's Prometheus metrics (GET /metrics, text format 0.0.4).

HTTP side, counted by the app: requests by status, end-to-end latency, errors by code, uploads waiting
for (or in) decoding; the requests the server refuses below the app, on any path (malformed HTTP, a head
too slow, over --max-connections: http_protocol.py), are counted by status and code too.
Batcher side, read from `ip_runtime.Batcher.stats` at scrape time (the C++ batcher keeps the counts,
so nothing is added to the request path): queue depth, requests in flight, batches, batch sizes,
queue wait and run time histograms, rejections by code.
Each app has its own registry, so several servers (or tests) in one process do not mix.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Tuple

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PREFIX = "imagepiece"


def cumulative_buckets(upper_bounds: Iterable[float], counts: List[int]) -> List[Tuple[str, int]]:
    """Per-bucket counts (the last for the rest) -> Prometheus' cumulative (le, count) pairs ending at +Inf."""
    labels = [repr(float(bound)) for bound in upper_bounds] + ["+Inf"]
    total, buckets = 0, []
    for label, count in zip(labels, counts):
        total += int(count)
        buckets.append((label, total))
    return buckets


def batch_size_buckets(sizes: List[int]) -> List[Tuple[str, int]]:
    """Runs per exact batch size ([n] = runs of n requests) -> cumulative buckets at powers of two and the largest size."""
    largest = len(sizes) - 1
    bounds = sorted({2**i for i in range(largest.bit_length()) if 2**i < largest} | {largest})
    per_bucket, start = [], 0
    for bound in bounds:
        per_bucket.append(sum(sizes[start : bound + 1]))
        start = bound + 1
    return cumulative_buckets(bounds, per_bucket + [0])


class BatcherCollector:
    """The batcher's own counters as Prometheus metrics, read when scraped."""

    def __init__(self, batcher) -> None:
        self.batcher = batcher

    def collect(self) -> Iterable[Metric]:
        stats = self.batcher.stats
        name = f"{PREFIX}_batcher"
        yield GaugeMetricFamily(f"{name}_queue_depth", "Requests waiting for a batch", value=stats["queue_depth"])
        yield GaugeMetricFamily(f"{name}_in_flight", "Requests in a batch being run", value=stats["in_flight"])
        yield CounterMetricFamily(f"{name}_batches", "Batches run", value=stats["batches"])
        # Finished requests only: a counter never goes down, and the ones still pending are the two gauges above.
        outcomes = CounterMetricFamily(f"{name}_requests", "Requests the batcher finished, by outcome", labels=["outcome"])
        for outcome in ("completed", "failed", "cancelled"):
            outcomes.add_metric([outcome], stats[outcome])
        yield outcomes
        rejected = CounterMetricFamily(f"{name}_rejected", "Requests the batcher refused at submit, by error code", labels=["code"])
        for code, count in sorted(stats["rejected"].items()):
            rejected.add_metric([code], count)
        yield rejected
        yield HistogramMetricFamily(f"{name}_batch_size", "Requests per batch run", buckets=batch_size_buckets(stats["batch_sizes"]),
                                    sum_value=stats["batched_images"])
        for key, help_text in (("queue_wait", "Seconds a request waited in the queue"),
                               ("run_time", "Seconds to assemble and run a batch")):
            histogram = stats[key]
            yield HistogramMetricFamily(f"{name}_{key}_seconds", help_text,
                                        buckets=cumulative_buckets(histogram["upper_bounds"], histogram["counts"]),
                                        sum_value=histogram["sum_seconds"])


class ServerMetrics:
    """The registry behind GET /metrics."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, batcher, admission) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(f"{PREFIX}_http_requests", "Classification requests answered, and requests refused before "
                                "reaching the app (malformed, too slow a head, over --max-connections), by HTTP status",
                                ["status"], registry=self.registry)
        self.latency = Histogram(f"{PREFIX}_http_request_duration_seconds",
                                 "Seconds from a classification request's arrival to its answer (upload read, decode, queue, run)",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.errors = Counter(f"{PREFIX}_http_errors", "Classification requests that failed, and requests refused before "
                              "reaching the app, by error code", ["code"], registry=self.registry)
        decoding = Gauge(f"{PREFIX}_http_decoding", "Uploads waiting for or in the decode threads", registry=self.registry)
        decoding.set_function(lambda: admission.count)
        self.registry.register(BatcherCollector(batcher))

    def observe(self, status: int, seconds: float, error_code: Optional[str] = None) -> None:
        self.count(status, error_code)
        self.latency.observe(seconds)

    def count(self, status: int, error_code: Optional[str] = None) -> None:
        """An answer outside the latency histogram (a refusal of a request that never reached the app)."""
        self.requests.labels(status=str(status)).inc()
        if error_code:
            self.errors.labels(code=error_code).inc()

    def exposition(self) -> bytes:
        return generate_latest(_WithoutCreated(self.registry))


class _WithoutCreated:
    """A registry's metrics without their `*_created` samples: each would be a series of its own (a timestamp) that
    no dashboard of this server reads. prometheus_client.disable_created_metrics() would drop them from every
    registry in the process, not only this server's."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterable[Metric]:
        for metric in self.registry.collect():
            metric.samples = [sample for sample in metric.samples if not sample.name.endswith("_created")]
            yield metric
