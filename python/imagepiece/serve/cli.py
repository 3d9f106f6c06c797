"""imagepiece-serve: classify images over HTTP with a compiled artifact (scripts/serve.py is the same CLI).

examples:
  imagepiece-serve --artifact deit_s_ip_dyn.so                         # http://127.0.0.1:8000
  curl -F file=@photo.jpg http://127.0.0.1:8000/v1/classify            # or: --data-binary @photo.jpg
  imagepiece-serve --artifact deit_s_ip_dyn.so --max-batch 16 --max-delay-ms 2 --queue-capacity 256
  curl http://127.0.0.1:8000/metrics                                   # Prometheus text format

One process, one model: concurrent requests are grouped into batches by ip_runtime.Batcher (up to
--max-batch images per run; a request waits at most --max-delay-ms for others to join it). Compile a
dynamic-batch artifact for it (scripts/aot_compile.py --max-batch 16); a static-batch artifact runs
its own batch, padded. A full queue (of uploads to decode, or of images to batch) answers 503 with
Retry-After. Listens on 127.0.0.1 unless --host
says otherwise (there is no authentication: put a proxy in front before exposing it).
"""
from __future__ import annotations

import argparse
import contextlib
import ipaddress
import math
import os
import resource
import socket
import sys
from pathlib import Path
from typing import Callable, Optional

import ip_runtime

from imagepiece import command_line
from imagepiece.artifact import ArtifactError
from imagepiece.termination import STOPPED, exit_status, how_stopped, sigterm_unwinds

from .app import FORM_OVERHEAD, create_app
from .draining_server import DrainingServer
from .http_protocol import uvicorn_config
from .service import MiB, BatcherOptionError, ClassificationService, ServeConfig, in_flag_names

DEFAULT_MAX_CONNECTIONS = 1000
# Open files the server holds besides its connections (~10: libraries, the event loop, logs), with room for the
# connections over --max-connections it accepts only to refuse.
OTHER_DESCRIPTORS = 64


def program_name(argv) -> str:
    return command_line.program_name(argv, "imagepiece-serve")


def parse_args(argv=None) -> argparse.Namespace:
    parser = command_line.OneLineErrors(prog=program_name(argv),
                            description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = ServeConfig(artifact=Path())
    parser.add_argument("--artifact", type=Path, required=True, help="compiled .so/.pt2 (scripts/aot_compile.py)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    parser.add_argument("--device", default="", help="run on this device (default: the artifact's), e.g. cuda:1")
    parser.add_argument("--topk", type=int, default=defaults.topk, help="classes per answer unless ?topk= says (default 5)")
    parser.add_argument("--labels", type=Path, help="class names, one per line (default: the artifact's own, else timm's ImageNet names)")
    batching = parser.add_argument_group("batching (ip_runtime.Batcher)")
    batching.add_argument("--max-batch", type=int, default=defaults.max_batch, help="images per run (default: the artifact's largest batch)")
    batching.add_argument("--max-delay-ms", type=float, default=defaults.max_delay_ms,
                          help=f"how long a request may wait for others to join its batch (default {defaults.max_delay_ms:g})")
    batching.add_argument("--queue-capacity", type=int, default=defaults.queue_capacity,
                          help=f"requests that may wait to be decoded, and again for a batch; beyond, 503 (default {defaults.queue_capacity})")
    batching.add_argument("--preferred-batch", type=int, nargs="+", default=[], help="batch sizes to run as soon as they are queued")
    limits = parser.add_argument_group("uploads")
    limits.add_argument("--max-upload-mb", type=float, default=defaults.max_upload_bytes / MiB,
                        help=f"largest upload in MiB (default {defaults.max_upload_bytes / MiB:g}); larger gets 413")
    limits.add_argument("--max-buffered-mb", type=float, default=defaults.max_buffered_bytes / MiB,
                        help=f"MiB that all uploads in progress may hold together (each is buffered whole before its decode); "
                             f"beyond, 503 (default {defaults.max_buffered_bytes / MiB:g})")
    limits.add_argument("--max-pixels", type=int, default=defaults.max_pixels,
                        help=f"refuse images with more pixels, before decoding them (default {defaults.max_pixels:,})")
    limits.add_argument("--decode-threads", type=int, default=defaults.decode_threads,
                        help=f"threads decoding and resizing uploads (default {defaults.decode_threads})")
    limits.add_argument("--read-timeout", type=float, default=defaults.read_timeout_s,
                        help=f"seconds an upload may send nothing, and a request's headers may take to arrive, before it gets 408 "
                             f"(default {defaults.read_timeout_s:g})")
    limits.add_argument("--min-upload-rate", type=float, default=defaults.min_upload_rate / 1024,
                        help=f"KiB/s an upload must average once --read-timeout has passed, or it gets 408 "
                             f"(default {defaults.min_upload_rate / 1024:g})")
    limits.add_argument("--upload-timeout", type=float, default=defaults.upload_timeout_s,
                        help=f"seconds an upload may take in all, however steadily it arrives, before it gets 408 "
                             f"(default {defaults.upload_timeout_s:g})")
    connections = parser.add_argument_group("connections")
    connections.add_argument("--max-connections", type=int,
                             help=f"open connections beyond which new ones get 503 (default {DEFAULT_MAX_CONNECTIONS}, or fewer where "
                                  "the open-file limit allows fewer)")
    connections.add_argument("--shutdown-timeout", type=float, default=10.0,
                             help="on SIGINT/SIGTERM, seconds to let open requests finish (queued images run at once) "
                                  "before the rest get 503 (default 10)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument("--no-access-log", action="store_true", help="do not log every request")
    args = parser.parse_args(argv)
    for name in ("topk", "max_pixels", "decode_threads", "max_connections"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.host.strip():  # binds every interface, unsaid: the warning would name no address
        parser.error("--host is empty; give an address (0.0.0.0 or :: to listen on every interface)")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in [0, 65535], got {args.port}")
    for name in ("max_upload_mb", "max_buffered_mb"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):  # inf would overflow int() below
            parser.error(f"--{name.replace('_', '-')} must be a finite number > 0, got {value}")
        if int(value * MiB) < 1:
            parser.error(f"--{name.replace('_', '-')} {value:g} is less than one byte")
    if args.max_buffered_mb * MiB < args.max_upload_mb * MiB + FORM_OVERHEAD:
        parser.error(f"--max-buffered-mb {args.max_buffered_mb:g} cannot hold one upload of --max-upload-mb {args.max_upload_mb:g} "
                     f"and its multipart form ({FORM_OVERHEAD // 1024} KiB)")
    for name in ("read_timeout", "shutdown_timeout", "upload_timeout"):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) > 0):
            parser.error(f"--{name.replace('_', '-')} must be a finite number of seconds > 0, got {getattr(args, name)}")
    if not (math.isfinite(args.min_upload_rate) and args.min_upload_rate > 0):
        parser.error(f"--min-upload-rate must be a finite number of KiB/s > 0, got {args.min_upload_rate}")
    if not args.artifact.is_file():
        parser.error(f"--artifact {str(args.artifact)!r} is not a file")
    return args


def config_from(args: argparse.Namespace) -> ServeConfig:
    return ServeConfig(artifact=args.artifact, device=args.device, topk=args.topk, labels=args.labels, max_batch=args.max_batch,
                       max_delay_ms=args.max_delay_ms, queue_capacity=args.queue_capacity, preferred_batches=args.preferred_batch,
                       max_upload_bytes=int(args.max_upload_mb * MiB), max_buffered_bytes=int(args.max_buffered_mb * MiB),
                       max_pixels=args.max_pixels, decode_threads=args.decode_threads, read_timeout_s=args.read_timeout,
                       min_upload_rate=args.min_upload_rate * 1024, upload_timeout_s=args.upload_timeout)


def connection_limit(requested: Optional[int], warn: Callable[[str], None]) -> int:
    """The connections to serve at once: `requested` (--max-connections; None: the default), with an open file for
    each. The soft open-file limit (often 1,024) is raised to the hard one, as nginx and Go do: past it accept()
    fails, the server answers nothing (no 503) and a burst is refused only by waiting. ValueError where the hard limit
    cannot hold `requested`; the default is lowered to what it can hold, with a warning."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(ValueError, OSError):  # hard "unlimited" is above the kernel's nr_open: keep the soft one
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    wanted = requested or DEFAULT_MAX_CONNECTIONS
    if soft == resource.RLIM_INFINITY or wanted + OTHER_DESCRIPTORS <= soft:
        return wanted
    fits = max(1, soft - OTHER_DESCRIPTORS)
    if requested is not None:
        # Under OTHER_DESCRIPTORS + 1 files no value fits: lowering --max-connections is no advice then.
        lower = f"lower --max-connections to {fits:,}, or " if fits < requested else ""
        raise ValueError(f"--max-connections {requested:,} needs {requested + OTHER_DESCRIPTORS:,} open files, and this "
                         f"process may open at most {soft:,} (ulimit -Hn): {lower}raise the limit")
    warn(f"serving at most {fits:,} connections at once, not {DEFAULT_MAX_CONNECTIONS:,}: this process may open "
         f"{soft:,} files (ulimit -Hn)")
    return fits


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads: a port in use fails at once, in one line, and
    --port 0 serves on a free port that the start-up line names."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def main(argv=None) -> int:
    args = parse_args(argv)
    prog = program_name(argv)
    # SIGTERM unwinds as Ctrl-C does: before serving (loading the model), one line and 143/130; once serving,
    # uvicorn handles both, drains, then raises the signal again, and a drained server exits 0 whichever it was.
    with sigterm_unwinds():
        try:
            return serve(args, prog)
        except STOPPED as stop:
            print(f"{prog}: {how_stopped(stop)} before serving", file=sys.stderr)
            return exit_status(stop)


def serve(args: argparse.Namespace, prog: str) -> int:
    try:
        max_connections = connection_limit(args.max_connections, command_line.warning_printer(prog))
    except ValueError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    try:
        listener = listening_socket(args.host, args.port)
    except OSError as error:
        print(f"{prog}: error: cannot listen on {args.host}:{args.port} ({error.strerror or error})", file=sys.stderr)
        return 2
    with listener:
        try:
            service = ClassificationService(config_from(args))
        except BatcherOptionError as error:
            print(f"{prog}: error: {in_flag_names(str(error))}", file=sys.stderr)
            return 2
        except (ValueError, ArtifactError, ip_runtime.Error, OSError) as error:
            print(f"{prog}: error: {error}", file=sys.stderr)
            return 2
        options = service.batcher.options
        if options["queue_capacity"] < options["max_batch"]:
            print(f"{prog}: warning: --queue-capacity {options['queue_capacity']} is below the batch size "
                  f"{options['max_batch']}: no batch can fill, so every request waits out --max-delay-ms", file=sys.stderr)
        if not is_loopback(args.host):
            print(f"{prog}: warning: listening on {args.host}, reachable from other machines, with no authentication "
                  "or TLS: put a proxy in front of it", file=sys.stderr)
        host, port = listener.getsockname()[:2]
        print(f"serving {service.model_name} from {args.artifact} on http://{f'[{host}]' if ':' in host else host}:{port} "
              f"(batcher: {service.batcher.options}; pid {os.getpid()})", file=sys.stderr, flush=True)
        app = create_app(service.config, service)
        config = uvicorn_config(app, service.config.read_timeout_s, app.state.metrics, max_connections=max_connections,
                                log_level=args.log_level, access_log=not args.no_access_log,
                                timeout_graceful_shutdown=args.shutdown_timeout)
        server = DrainingServer(config, service)
        try:
            server.run(sockets=[listener])
        except STOPPED:  # uvicorn raises the SIGINT/SIGTERM it handled again once it has shut down (uvicorn.run ignores it)
            pass
        finally:  # a second Ctrl-C forces uvicorn out before its lifespan closes the batcher: what is queued is cancelled
            service.close(drain=False)
    if server.force_exit:
        print(f"{prog}: stopped at once by a second Ctrl-C: requests still open were not answered", file=sys.stderr)
        return exit_status(KeyboardInterrupt())
    return 0


if __name__ == "__main__":
    sys.exit(main())
