"""A bounded closed-loop load generator: N concurrent clients share a fixed number of requests.

Each client sends one request, waits for its answer, sends the next, until the shared count is used
up: the run stops by itself, and the offered load follows the concurrency (what a pool of users or
upstream workers does), never an open-loop rate that can only grow a queue. Clients are threads:
the request function must release the GIL while it waits (a socket, a future's result, a C++ call).
"""
from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from .timing import latency_percentiles


@dataclass
class LoadResult:
    clients: int
    requests: int
    seconds: float
    latencies: List[float] = field(default_factory=list)  # per successful request
    errors: Dict[str, int] = field(default_factory=dict)  # failed requests by error kind

    @property
    def throughput(self) -> float:
        """Successful requests per second of wall time."""
        return len(self.latencies) / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> Dict[str, float]:
        return {"clients": self.clients, "requests": self.requests, "seconds": self.seconds, "img_per_s": self.throughput,
                "errors": sum(self.errors.values()), **latency_percentiles(self.latencies)}


def run_clients(request: Callable[[int], None], clients: int, requests: int,
                describe_error: Optional[Callable[[BaseException], str]] = None) -> LoadResult:
    """`requests` calls of `request(client_index)` from `clients` threads; a call that raises counts as an error.

    `describe_error` names an exception's kind for the error count (default: its type name).
    """
    describe_error = describe_error or (lambda error: type(error).__name__)
    tickets = itertools.count()  # next() on a count is atomic under the GIL: each ticket goes to one client
    lock = threading.Lock()
    result = LoadResult(clients, requests, 0.0)
    stop = threading.Event()  # the caller was interrupted (Ctrl-C, SIGTERM): clients end after their request

    def client(index: int) -> None:
        latencies, errors = [], {}
        while not stop.is_set() and next(tickets) < requests:
            began = time.perf_counter()
            try:
                request(index)
            except Exception as error:  # a failed request is a measurement, not a crash
                kind = describe_error(error)
                errors[kind] = errors.get(kind, 0) + 1
            else:
                latencies.append(time.perf_counter() - began)
        with lock:
            result.latencies += latencies
            for kind, count in errors.items():
                result.errors[kind] = result.errors.get(kind, 0) + count

    threads = [threading.Thread(target=client, args=(index,), name=f"load-client-{index}") for index in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join()
    finally:
        stop.set()
    result.seconds = time.perf_counter() - began
    return result
