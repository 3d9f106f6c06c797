"""The HTTP API (FastAPI on any ASGI server; scripts/serve.py runs it with uvicorn).

    POST /v1/classify[?topk=K]   an image file: multipart/form-data (field `file`) or the raw request body
                                 -> 200 {"model", "predictions": [{"index", "label", "probability"}, ...]}
    GET  /healthz                -> 200 {"status": "ok", "model", "decoding", "queue_depth", "in_flight"}
    GET  /metrics                -> Prometheus text format (metrics.py)
    (HEAD as GET on /healthz and /metrics, without the body)

Every failure is JSON {"error": {"code", "message"}} with a 4xx/5xx status: 400 empty upload, missing
file field, malformed form or bad topk; 404/405 unknown route or method; 408 (connection closed) when
the upload stalls for `read_timeout_s`, falls behind `min_upload_rate` or outlasts `upload_timeout_s` (or, from scripts/serve.py's
protocol, http_protocol.py, when the request line and headers take longer than `read_timeout_s`); 413 over
the upload limit (checked against Content-Length before reading, and while reading; the connection is
closed); 422 not a usable image (predict's decode rules: not a raster image, corrupt, 16-bit, over the pixel
limit); 503 (Retry-After) when `queue_capacity` requests already wait to be decoded, when the uploads in
progress already hold `max_buffered_bytes`, when the batcher's queue is full, or when the server is shutting
down (scripts/serve.py's protocol also answers over --max-connections, and malformed HTTP, in this JSON
shape); 500 if the model fails
(or anything unexpected: logged with its traceback). The event loop only moves bytes: decoding and
preprocessing run in a thread pool, and the model's result arrives through the batcher's future. A
client that hangs up before its upload is decoded costs no decode (its work is cancelled); one that hangs up while
its image waits for a batch is counted as 499, not as answered.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from typing import Callable, Dict, Iterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser, parse_options_header
from starlette.requests import ClientDisconnect

import ip_runtime
from imagepiece.predict.decode import ImageError

from .metrics import ServerMetrics
from .service import MiB, ClassificationService, ServeConfig, in_flag_names

FORM_OVERHEAD = 64 * 1024  # multipart boundaries and part headers around the file, beyond the upload limit
RETRY_AFTER_SECONDS = "1"
# What an ip_runtime.Error from the batcher means for the client.
RUNTIME_STATUS = {"overloaded": 503, "cancelled": 503}
HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed"}
log = logging.getLogger(__name__)


class RequestError(Exception):
    """A request that gets an error answer: HTTP status, a stable code and a message for people."""

    def __init__(self, status: int, code: str, message: str, headers: Optional[Dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"code": self.code, "message": self.message}}, status_code=self.status, headers=self.headers)


def _too_large(limit: int) -> RequestError:
    # Closing the connection is the only way to stop a client from sending the rest of the body.
    return RequestError(413, "too_large", f"upload is larger than the limit of {limit:,} bytes ({limit / MiB:g} MiB)",
                        {"Connection": "close"})


def _is_decimal(text: str) -> bool:
    return text.isascii() and text.isdecimal()  # str.isdigit() also takes "²", which int() refuses


class UploadBudget:
    """The upload bytes all requests in progress hold together (each body is buffered whole, then decoded),
    bounded by `capacity`: beyond it, 503. Used on the event loop only (no lock needed)."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.held = capacity, 0

    @contextmanager
    def holding(self) -> Iterator[Callable[[int], None]]:
        """A request's share: call it with each chunk's size; all of it is given back when the request ends."""
        share = 0

        def take(size: int) -> None:
            nonlocal share
            if self.held + size > self.capacity:
                raise RequestError(503, "overloaded", f"uploads in progress already hold {self.held:,} bytes (the limit is "
                                                      f"{self.capacity / MiB:g} MiB, --max-buffered-mb); retry later",
                                   {"Retry-After": RETRY_AFTER_SECONDS, "Connection": "close"})
            self.held += size
            share += size

        try:
            yield take
        finally:
            self.held -= share


async def read_body(request: Request, limit: int, config: ServeConfig, take: Callable[[int], None]) -> bytes:
    """The request body, refused (413, naming the user's `max_upload_bytes`) as soon as it is known to
    exceed `limit`, and (408) when no data arrives for `read_timeout_s`, the upload falls behind
    `min_upload_rate` bytes/s after a grace of `read_timeout_s` (Apache mod_reqtimeout's rule), or it takes
    longer than `upload_timeout_s` in all: a client that stalls, or trickles a byte now and then, must not
    hold its connection (one of --max-connections), its buffer, and a graceful shutdown, forever. Each chunk
    is `take`n from the upload budget first (503 beyond it)."""
    max_upload_bytes, read_timeout_s, min_upload_rate = config.max_upload_bytes, config.read_timeout_s, config.min_upload_rate
    declared = request.headers.get("content-length")
    # (h11 refuses an absurdly long Content-Length itself; another ASGI server may pass it on: too large, unparsed.)
    if declared is not None and _is_decimal(declared) and (len(declared) > 18 or int(declared) > limit):
        raise _too_large(max_upload_bytes)
    loop = asyncio.get_running_loop()
    started = loop.time()
    body = bytearray()
    chunks = request.stream().__aiter__()
    while True:
        # What has arrived buys time at the minimum rate; the wait for the next chunk never outlasts any limit.
        behind_at = started + read_timeout_s + len(body) / min_upload_rate
        wait = min(read_timeout_s, behind_at - loop.time(), started + config.upload_timeout_s - loop.time())
        try:
            if wait <= 0:
                raise asyncio.TimeoutError
            chunk = await asyncio.wait_for(chunks.__anext__(), wait)
        except StopAsyncIteration:
            return bytes(body)
        except asyncio.TimeoutError:
            elapsed = loop.time() - started
            if elapsed >= config.upload_timeout_s:
                message = f"the upload took longer than {config.upload_timeout_s:g} s ({len(body):,} bytes arrived)"
            elif loop.time() >= behind_at:
                message = f"the upload arrives slower than {min_upload_rate:g} bytes/s ({len(body):,} bytes in {elapsed:.1f} s)"
            else:
                message = f"no upload data arrived for {read_timeout_s:g} s"
            raise RequestError(408, "request_timeout", message, {"Connection": "close"}) from None
        if len(body) + len(chunk) > limit:
            raise _too_large(max_upload_bytes)
        take(len(chunk))
        body += chunk


async def read_image_bytes(request: Request, config: ServeConfig, take: Callable[[int], None]) -> bytes:
    """The uploaded file's bytes: the `file` field of a multipart form (or its only file), else the raw body."""
    multipart = request.headers.get("content-type", "").lower().startswith("multipart/form-data")
    max_upload_bytes = config.max_upload_bytes
    limit = max_upload_bytes + (FORM_OVERHEAD if multipart else 0)
    body = await read_body(request, limit, config, take)
    if multipart:
        body = await _file_from_form(request, body)
    if not body:
        raise RequestError(400, "empty_upload", "the upload is empty (0 bytes)")
    if len(body) > max_upload_bytes:
        raise _too_large(max_upload_bytes)
    return body


async def _file_from_form(request: Request, body: bytes) -> bytes:
    async def stream():
        yield body

    how = "send the image as the multipart file field 'file' (curl -F file=@photo.jpg) or as the raw request body"
    try:
        form = await MultiPartParser(request.headers, stream(), max_files=1, max_fields=8).parse()
    except MultiPartException as error:
        raise RequestError(400, "bad_form", f"malformed multipart form: {error.message} ({how}; one file per request)") from None
    try:
        # The parser takes a form cut short (a client that hung up, a proxy's size limit) as a form without that part.
        closing = b"--" + parse_options_header(request.headers["content-type"])[1][b"boundary"] + b"--"
        if closing not in body:
            raise RequestError(400, "bad_form", f"malformed multipart form: it ends before its closing boundary "
                                                f"{closing.decode('latin-1')!r} (cut short?)")
        files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        chosen = form.get("file") if isinstance(form.get("file"), UploadFile) else (files[0] if len(files) == 1 else None)
        if chosen is None:
            if isinstance(form.get("file"), str):  # curl -F 'file=<photo.jpg' sends the bytes as a text field
                raise RequestError(400, "no_file", f"the form field 'file' holds text, not a file upload: {how}")
            raise RequestError(400, "no_file", f"the form has no file: {how}")
        return await chosen.read()
    finally:
        await form.close()


def topk_parameter(request: Request, default: int, limit: int) -> int:
    value = request.query_params.get("topk")
    if value is None:
        return default
    # int() refuses more than 4300 digits (a 500, once): a long value is out of range anyway.
    if not _is_decimal(value) or len(value) > 9 or not 1 <= int(value) <= limit:
        raise RequestError(400, "bad_topk", f"topk must be an integer in [1, {limit}], got {value!r}")
    return int(value)


async def _disconnected(request: Request) -> None:
    """Returns when the client has closed the connection (its body already read: nothing else arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class HangUpWatch:
    """Watches one request for its client hanging up, from the end of its upload to its answer: one watch over both
    of its waits (its decode, then its batch)."""

    def __init__(self, request: Request) -> None:
        self._hung_up = asyncio.ensure_future(_disconnected(request))

    async def result_of(self, job: concurrent.futures.Future):
        """`job`'s result; if the client goes away first, ClientDisconnect, and `job` is cancelled (a decode that
        has not started never starts: a client that uploads and hangs up must not cost a decode anyway; a batcher's
        request runs anyway, but is not counted as answered). Cancelled itself, it cancels `job` too: at shutdown,
        the decodes of requests already answered 503 would otherwise all run before the process could exit. `job`
        is cancelled here, at once: cancelling only its asyncio wrapper passes that on a loop iteration later, when a
        decode thread may already have taken it."""
        work = asyncio.wrap_future(job)
        try:
            done, _ = await asyncio.wait({work, self._hung_up}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the request itself was cancelled (shutdown's grace is over)
            _abandon(job, work)
            raise
        if work not in done:
            _abandon(job, work)
            raise ClientDisconnect()
        return work.result()

    def close(self) -> None:
        self._hung_up.cancel()


def _abandon(job: concurrent.futures.Future, work: asyncio.Future) -> None:
    """Nobody waits for `job` any more: it is cancelled if it has not started, and so is its asyncio wrapper, whose
    failure (a bad image decoded, a batch that failed) would otherwise be logged as an exception never retrieved."""
    job.cancel()
    work.cancel()


class DecodeAdmission:
    """Bounds the requests waiting for (or in) the decode threads, as the batcher bounds its queue: without it,
    uploads that are slow to decode pile up in the thread pool's unbounded queue, unseen, and are never refused.
    Used on the event loop only (no lock needed)."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.count = capacity, 0

    def __enter__(self) -> "DecodeAdmission":
        if self.count >= self.capacity:
            raise RequestError(503, "overloaded", f"{self.count} uploads are already waiting to be decoded "
                                                  f"(--queue-capacity {self.capacity}); retry later",
                               {"Retry-After": RETRY_AFTER_SECONDS})
        self.count += 1
        return self

    def __exit__(self, *exc) -> None:
        self.count -= 1


def create_app(config: ServeConfig, service: Optional[ClassificationService] = None) -> FastAPI:
    """The app over `service` (made from `config` when not given); closing the app drains the batcher."""
    if config.max_buffered_bytes < config.max_upload_bytes + FORM_OVERHEAD:
        raise ValueError(f"max_buffered_bytes {config.max_buffered_bytes:,} cannot hold one upload of the largest size "
                         f"({config.max_upload_bytes:,} bytes, and {FORM_OVERHEAD:,} of multipart form around it)")
    service = service or ClassificationService(config)
    admission = DecodeAdmission(config.queue_capacity)
    uploads = UploadBudget(config.max_buffered_bytes)
    metrics = ServerMetrics(service.batcher, admission)
    decoders = ThreadPoolExecutor(max_workers=config.decode_threads, thread_name_prefix="imagepiece-decode")

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        # Requests still waiting get their answers, then the threads go.
        await asyncio.get_running_loop().run_in_executor(None, service.close)
        decoders.shutdown(wait=True, cancel_futures=True)  # no request waits for a decode not yet started

    # No /docs, /redoc or /openapi.json: an inference endpoint, not a web page (Swagger's page loads scripts from a CDN).
    # No redirect from "/v1/classify/": Starlette would build its Location from the client's Host header.
    app = FastAPI(title="ImagePiece classifier", summary=f"{service.model_name} through ip_runtime", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)
    app.state.service, app.state.metrics = service, metrics

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, failure: HTTPException) -> Response:
        # Unknown routes and methods answer in the same JSON shape as the API's own errors.
        code = HTTP_ERROR_CODES.get(failure.status_code, f"http_{failure.status_code}")
        return RequestError(failure.status_code, code, str(failure.detail), dict(failure.headers or {})).response()

    @app.post("/v1/classify")
    async def classify(request: Request) -> Response:
        began = time.perf_counter()
        watch = None  # from the end of the upload on
        try:
            topk = topk_parameter(request, config.topk, service.num_classes)
            with uploads.holding() as take:  # until the upload is decoded (its bytes are then dropped)
                data = await read_image_bytes(request, config, take)
                watch = HangUpWatch(request)
                with admission:
                    try:
                        image = await watch.result_of(decoders.submit(service.prepare, data))
                    except ImageError as error:
                        raise RequestError(422, "invalid_image", f"cannot classify the upload: {error}") from None
                del data
            try:
                logits = await watch.result_of(service.submit(image))
            except ip_runtime.Error as error:
                status = RUNTIME_STATUS.get(error.code, 500)
                headers = {"Retry-After": RETRY_AFTER_SECONDS} if status == 503 else None
                raise RequestError(status, error.code, in_flag_names(str(error)), headers) from None
            answer = {"model": service.model_name, "predictions": service.top_k(logits, topk)}
        except ClientDisconnect:
            # Never sent: counted as nginx logs it (499), not as a client error the server answered.
            error = RequestError(499, "client_disconnected", "the client went away before its answer was ready")
        except asyncio.CancelledError:
            # uvicorn cancels the requests still open when its graceful-shutdown time is up: they get an answer
            # that says so (and are counted) rather than a bare 500 from the server.
            error = RequestError(503, "shutting_down", "the server is shutting down; retry (on another instance)",
                                 {"Retry-After": RETRY_AFTER_SECONDS, "Connection": "close"})
        except RequestError as failure:
            error = failure
        except Exception as failure:
            log.exception("classification failed")
            error = RequestError(500, "internal", f"internal error ({type(failure).__name__}): see the server log")
        else:
            metrics.observe(200, time.perf_counter() - began)
            return JSONResponse(answer)
        finally:
            if watch is not None:
                watch.close()
        if watch is None:  # answered before the whole upload arrived: only closing stops the rest of it
            error.headers.setdefault("Connection", "close")
        metrics.observe(error.status, time.perf_counter() - began, error.code)
        return error.response()

    @app.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz() -> Response:
        stats = service.batcher.stats
        return JSONResponse({"status": "ok", "model": service.model_name, "decoding": admission.count,
                             "queue_depth": stats["queue_depth"], "in_flight": stats["in_flight"]})

    @app.api_route("/metrics", methods=["GET", "HEAD"])
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=metrics.content_type)

    return app
