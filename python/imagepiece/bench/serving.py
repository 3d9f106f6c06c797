"""serve: online serving under load: the dynamic batcher in process and over HTTP, beside batch-1 runs.

One dynamic-batch artifact (compiled from --arch/--preset, or --artifact), and a bounded closed-loop
load (load.py: N clients, a fixed number of requests, each client waits for its answer) at each
--concurrency, for:
  sequential run()   one thread calling `Runtime.run` on a batch of one: the baseline
  batcher            `ip_runtime.Batcher.submit(image).result()` from N client threads
  http               POST /v1/classify of a 500x375 JPEG to scripts/serve.py in its own process
                     (decode, resize and normalise on the server included), N keep-alive connections
Throughput, p50/p90/p99 latency and mean batch size (the batcher's own count) per contender;
`--rounds` repeat the whole order (reversed every other round) so load drift hits all alike; the
ratio to the sequential baseline is the median of the per-round ratios.
Goal (issue 13) on the 2-core CPU, DeiT-S ImagePiece fp32: batcher at 16 clients >= 1.25x sequential.
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..artifact_metadata import example_images
from ..config import PRESETS
from ..export import DYNAMIC_EXAMPLE_BATCH, compile_artifact
from ..model import create_model
from ..predict.bench import machine_load, synthetic_jpegs
from .artifact_option import checked_metadata, name_after_artifact
from .load import LoadResult, run_clients
from .results import ResultsWriter

HELP = "dynamic batcher in process and over HTTP under N concurrent clients, vs sequential batch-1 run()"
GOAL_CLIENTS, GOAL_RATIO = 16, 1.25
SEQUENTIAL = "sequential run()"
REQUEST_TIMEOUT = 120.0
MAX_DELAY_MS = 10_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--artifact", type=Path, help="a dynamic-batch artifact to serve (default: compile --arch/--preset)")
    parser.add_argument("--preset", default="imagepiece", choices=sorted(PRESETS), help="model setting to compile (default: imagepiece)")
    parser.add_argument("--max-batch", type=int, default=16, help="the batcher's largest batch; the compiled artifact's too (default 16)")
    parser.add_argument("--max-delay-ms", type=float, default=2.0, help="the batcher's max queue delay (default 2)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64], help="client counts (default 1 4 16 64)")
    parser.add_argument("--requests", type=int, default=200, help="requests per contender per round (default 200)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all contenders (default 2)")
    parser.add_argument("--no-http", action="store_true", help="skip the HTTP server contenders")
    parser.add_argument("--decode-threads", type=int, default=2, help="the server's decode threads (default 2)")


def check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.max_batch < DYNAMIC_EXAMPLE_BATCH:
        parser.error(f"--max-batch must be >= {DYNAMIC_EXAMPLE_BATCH} (a dynamic batch)")
    if min(args.concurrency) < 1 or args.requests < 1 or args.rounds < 1 or args.decode_threads < 1:
        parser.error("--concurrency, --requests, --rounds and --decode-threads must be >= 1")
    # A client count given twice would be two contenders of one name: the second's rounds pooled into the first's.
    args.concurrency = list(dict.fromkeys(args.concurrency))
    if args.requests < max(args.concurrency):  # the row would name more clients than were ever in flight
        parser.error(f"--requests {args.requests} is fewer than --concurrency {max(args.concurrency)}: "
                     "each client needs a request")
    if not 0 <= args.max_delay_ms <= MAX_DELAY_MS:
        parser.error(f"--max-delay-ms must be in [0, {MAX_DELAY_MS}] (ip_runtime.Batcher's range)")
    if args.artifact is not None:
        _check_artifact(args, parser)


def _check_artifact(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Refuse, before any work, an artifact this run cannot serve; results are named after the artifact's model."""
    args.artifact = Path(args.artifact).absolute()  # recorded in the results: a relative path names no file later
    metadata = checked_metadata(parser, "--artifact", args.artifact, args.device)
    batch = metadata["batch"]
    if batch["min"] > 1 or batch["max"] < args.max_batch:
        parser.error(f"--artifact must take every batch in 1..{args.max_batch} (batch-1 runs, and --max-batch for the batcher); "
                     f"it takes {batch['min']}..{batch['max']}: compile it with scripts/aot_compile.py --max-batch {args.max_batch}")
    name_after_artifact(args, metadata)


class Contender:
    """One way of answering requests, measured over rounds: load results and the batches it ran."""

    def __init__(self, name: str, clients: int) -> None:
        self.name, self.clients = name, clients
        self.rounds: List[LoadResult] = []
        self.batches = self.batched_images = 0

    def add(self, result: LoadResult, batches: int, batched_images: int) -> None:
        self.rounds.append(result)
        self.batches += batches
        self.batched_images += batched_images

    def summary(self, baseline: Optional["Contender"]) -> Dict:
        pooled = LoadResult(self.clients, sum(r.requests for r in self.rounds), sum(r.seconds for r in self.rounds),
                            [s for r in self.rounds for s in r.latencies])
        for result in self.rounds:
            for kind, count in result.errors.items():
                pooled.errors[kind] = pooled.errors.get(kind, 0) + count
        summary = {"name": self.name, **pooled.summary(), "img_per_s": statistics.median(r.throughput for r in self.rounds),
                   "img_per_s_rounds": [r.throughput for r in self.rounds], "errors_by_kind": pooled.errors,
                   "mean_batch": self.batched_images / self.batches if self.batches else 1.0}
        if baseline is not None:
            summary["vs_sequential"] = statistics.median(r.throughput / b.throughput for r, b in zip(self.rounds, baseline.rounds))
        return summary


CONNECTION_MARGIN = 8  # connections the server admits beyond the clients (a client's reconnect after an error)


class ServerProcess:
    """scripts/serve.py's CLI in its own process on a free loopback port, stopped with SIGINT."""

    def __init__(self, artifact: Path, args: argparse.Namespace, queue_capacity: int, log: Path) -> None:
        self.log = log
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        command = [sys.executable, "-m", "imagepiece.serve.cli", "--artifact", str(artifact), "--port", str(self.port),
                   "--max-batch", str(args.max_batch), "--max-delay-ms", str(args.max_delay_ms), "--queue-capacity", str(queue_capacity),
                   "--decode-threads", str(args.decode_threads), "--device", args.device, "--no-access-log", "--log-level", "warning",
                   # Every client's connection let in: beyond the server's default, clients would time its 503s, not serving.
                   "--max-connections", str(max(args.concurrency) + CONNECTION_MARGIN)]
        env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
        with open(log, "w") as output:  # a file, not a pipe: nobody reads it while the server runs
            self.process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)

    def __enter__(self) -> "ServerProcess":
        try:
            self._wait_until_healthy()
        except BaseException:  # an error, Ctrl-C or SIGTERM while it starts: __exit__ will not run, stop it here
            self.__exit__()
            raise
        return self

    def _wait_until_healthy(self) -> None:
        deadline = time.monotonic() + 600
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}: {self.log.read_text()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the server did not answer /healthz within 600 s") from None
                time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def batch_counts(self) -> tuple:
        """(batches, batched images) so far, from /metrics."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=30) as response:
            text = response.read().decode()
        values = {sample.name: sample.value for family in text_string_to_metric_families(text) for sample in family.samples}
        return int(values["imagepiece_batcher_batch_size_count"]), int(values["imagepiece_batcher_batch_size_sum"])


class HttpStatusError(Exception):
    pass


class JpegPosters:
    """request(client) for run_clients: POST the JPEG over the client's own keep-alive connection."""

    def __init__(self, port: int, body: bytes) -> None:
        self.port, self.body = port, body
        self.connections: Dict[int, http.client.HTTPConnection] = {}

    def __call__(self, client: int) -> None:
        connection = self.connections.get(client)
        if connection is None:
            connection = self.connections[client] = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT)
        try:
            connection.request("POST", "/v1/classify", body=self.body, headers={"Content-Type": "image/jpeg"})
            response = connection.getresponse()
            response.read()
        except (OSError, http.client.HTTPException):
            connection.close()
            del self.connections[client]
            raise
        if response.status != 200:
            raise HttpStatusError(f"HTTP {response.status}")

    def close(self) -> None:
        for connection in self.connections.values():
            connection.close()


def _artifact(args: argparse.Namespace, folder: Path, log) -> Path:
    if args.artifact is not None:
        return args.artifact
    out = folder / f"{args.arch}_{args.preset}_b{args.max_batch}.so"
    log(f"compiling {args.arch} {args.preset} (random weights) with a dynamic batch 1..{args.max_batch} for {args.device} ...")
    torch.manual_seed(0)
    compile_artifact(create_model(args.arch, **PRESETS[args.preset]), out, device=args.device, max_batch=args.max_batch)
    return out


def request_images(info: dict, count: int) -> List[torch.Tensor]:
    """One image per client, as the artifact takes it (`info`: its metadata): float or bf16 [C, H, W], or uint8
    [H, W, C] pixels for an `--input-format uint8` artifact. Each its own tensor: the batcher stacks them."""
    with torch.random.fork_rng(devices=[]):  # the same images every run, the caller's random state untouched
        torch.manual_seed(0)
        return [image.clone() for image in example_images(info, count)]


def _in_process_round(runtime, batcher, inputs: List[torch.Tensor], contenders: Dict, args: argparse.Namespace) -> None:
    batch_of_one = inputs[0].unsqueeze(0)
    contenders[SEQUENTIAL].add(run_clients(lambda _: runtime.run(batch_of_one), 1, args.requests), args.requests, args.requests)
    for clients in args.concurrency:
        before = batcher.stats
        result = run_clients(lambda client: batcher.submit(inputs[client]).result(REQUEST_TIMEOUT), clients, args.requests,
                             describe_error=lambda error: getattr(error, "code", type(error).__name__))
        after = batcher.stats
        contenders[f"batcher {clients}"].add(result, after["batches"] - before["batches"], after["batched_images"] - before["batched_images"])


def _http_round(server: ServerProcess, body: bytes, contenders: Dict, args: argparse.Namespace) -> None:
    for clients in args.concurrency:
        posters = JpegPosters(server.port, body)
        before = server.batch_counts()
        result = run_clients(posters, clients, args.requests, describe_error=str)
        after = server.batch_counts()
        posters.close()
        contenders[f"http {clients}"].add(result, after[0] - before[0], after[1] - before[1])


def report_table(summaries: List[Dict]) -> str:
    lines = [f"{'contender':<18} {'clients':>7} {'requests':>8} {'img/s':>7} {'vs seq':>7} {'p50 ms':>8} {'p90 ms':>8} "
             f"{'p99 ms':>8} {'mean batch':>10} {'errors':>6}"]
    for s in summaries:
        ratio = f"{s['vs_sequential']:.2f}x" if "vs_sequential" in s else "-"
        lines.append(f"{s['name']:<18} {s['clients']:>7} {s['requests']:>8} {s['img_per_s']:>7.1f} {ratio:>7} {s['p50_ms']:>8.1f} "
                     f"{s['p90_ms']:>8.1f} {s['p99_ms']:>8.1f} {s['mean_batch']:>10.2f} {s['errors']:>6}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import ip_runtime

    device = torch.device(args.device)
    writer = ResultsWriter(args.out, "serve", f"{args.arch}_{args.preset}_{device.type}", device=args.device)
    print(f"# {writer.provenance}", flush=True)
    load_before = machine_load()
    with tempfile.TemporaryDirectory(prefix="benchmark_serve.") as scratch:
        folder = Path(scratch)
        artifact = _artifact(args, folder, lambda message: print(message, flush=True))
        runtime = ip_runtime.Runtime(str(artifact), device=args.device)
        info = runtime.info
        inputs = request_images(info, max(args.concurrency))
        runtime.run(inputs[0].unsqueeze(0))  # model initialisation is not a request
        body = Path(synthetic_jpegs(folder / "jpegs", 1)[0].path).read_bytes()
        queue_capacity = 2 * max(args.concurrency)  # every client's request fits: no overload in this benchmark
        batcher = ip_runtime.Batcher(runtime, max_batch=args.max_batch, max_delay_ms=args.max_delay_ms, queue_capacity=queue_capacity)
        names = [SEQUENTIAL] + [f"batcher {c}" for c in args.concurrency] + ([] if args.no_http else [f"http {c}" for c in args.concurrency])
        contenders = {name: Contender(name, 1 if name == SEQUENTIAL else int(name.split()[-1])) for name in names}
        with contextlib.ExitStack() as stack:
            stack.callback(batcher.close)
            server = None if args.no_http else stack.enter_context(ServerProcess(artifact, args, queue_capacity, folder / "server.log"))
            for round_index in range(args.rounds):
                print(f"round {round_index + 1}/{args.rounds} ...", flush=True)
                steps = [lambda: _in_process_round(runtime, batcher, inputs, contenders, args)]
                if server is not None:
                    steps.append(lambda: _http_round(server, body, contenders, args))
                for step in steps if round_index % 2 == 0 else reversed(steps):
                    step()
    baseline = contenders[SEQUENTIAL]
    summaries = [contender.summary(None if name == SEQUENTIAL else baseline) for name, contender in contenders.items()]
    goal = next((s for s in summaries if s["name"] == f"batcher {GOAL_CLIENTS}"), None)
    load_after = machine_load()
    lines = [f"online serving: {info['model_name']} ({info['dtype']}, {device}), artifact batch 1..{info['batch_max']}; "
             f"batcher max_batch {args.max_batch}, max_delay {args.max_delay_ms:g} ms; {args.requests} requests per contender "
             f"per round, {args.rounds} rounds; HTTP: a {len(body):,}-byte 500x375 JPEG per request, decoded on the server",
             report_table(summaries)]
    if goal is not None:
        verdict = "met" if goal["vs_sequential"] >= GOAL_RATIO else "NOT met"
        lines.append(f"goal: batcher at {GOAL_CLIENTS} clients >= {GOAL_RATIO}x sequential batch-1: {goal['vs_sequential']:.2f}x ({verdict}); "
                     f"its p99 {goal['p99_ms']:.1f} ms")
    lines.append(f"load average before {tuple(round(x, 2) for x in load_before['loadavg'])}, after "
                 f"{tuple(round(x, 2) for x in load_after['loadavg'])}")
    print("\n".join(lines[1:]), flush=True)
    writer.report("\n".join(lines), vars(args), contenders=summaries, machine_load={"before": load_before, "after": load_after})
    return 0
