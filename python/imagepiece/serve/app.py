"""The HTTP API (FastAPI on any ASGI server; scripts/serve.py runs it with uvicorn).

    POST /v1/classify[?topk=K]   an image file: multipart/form-data (field `file`) or the raw request body
                                 -> 200 {"model", "predictions": [{"index", "label", "probability"}, ...]}
    GET  /healthz                -> 200 {"status": "ok", "model", "queue_depth", "in_flight"}
    GET  /metrics                -> Prometheus text format (metrics.py)

Every failure is JSON {"error": {"code", "message"}} with a 4xx/5xx status: 400 empty upload, missing
file field, malformed form or bad topk; 413 over the upload limit (checked against Content-Length
before reading, and while reading); 422 not a usable image (predict's decode rules: not an image,
corrupt, 16-bit, over the pixel limit); 503 (Retry-After) when the batcher's queue is full or it is
shutting down; 500 if the model fails (or anything unexpected: logged with its traceback). The event loop only moves bytes: decoding and preprocessing
run in a thread pool, and the model's result arrives through the batcher's future.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Dict, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

import ip_runtime
from imagepiece.predict.decode import ImageError

from .metrics import ServerMetrics
from .service import MiB, ClassificationService, ServeConfig

FORM_OVERHEAD = 64 * 1024  # multipart boundaries and part headers around the file, beyond the upload limit
RETRY_AFTER_SECONDS = "1"
# What an ip_runtime.Error from the batcher means for the client.
RUNTIME_STATUS = {"overloaded": 503, "cancelled": 503}
log = logging.getLogger(__name__)


class RequestError(Exception):
    """A request that gets an error answer: HTTP status, a stable code and a message for people."""

    def __init__(self, status: int, code: str, message: str, headers: Optional[Dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"code": self.code, "message": self.message}}, status_code=self.status, headers=self.headers)


def _too_large(limit: int) -> RequestError:
    return RequestError(413, "too_large", f"upload is larger than the limit of {limit:,} bytes ({limit / MiB:g} MiB)")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed `limit`."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(limit)
    return bytes(body)


async def read_image_bytes(request: Request, max_upload_bytes: int) -> bytes:
    """The uploaded file's bytes: the `file` field of a multipart form (or its only file), else the raw body."""
    multipart = request.headers.get("content-type", "").startswith("multipart/form-data")
    body = await read_body(request, max_upload_bytes + (FORM_OVERHEAD if multipart else 0))
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

    try:
        form = await MultiPartParser(request.headers, stream(), max_files=1, max_fields=8).parse()
    except MultiPartException as error:
        raise RequestError(400, "bad_form", f"malformed multipart form: {error.message}") from None
    try:
        files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        chosen = form.get("file") if isinstance(form.get("file"), UploadFile) else (files[0] if len(files) == 1 else None)
        if chosen is None:
            raise RequestError(400, "no_file", "the form has no file: send the image as the multipart field 'file' "
                                               "(curl -F file=@photo.jpg) or as the raw request body")
        return await chosen.read()
    finally:
        await form.close()


def topk_parameter(request: Request, default: int, limit: int) -> int:
    value = request.query_params.get("topk")
    if value is None:
        return default
    if not value.isdigit() or not 1 <= int(value) <= limit:
        raise RequestError(400, "bad_topk", f"topk must be an integer in [1, {limit}], got {value!r}")
    return int(value)


def create_app(config: ServeConfig, service: Optional[ClassificationService] = None) -> FastAPI:
    """The app over `service` (made from `config` when not given); closing the app drains the batcher."""
    service = service or ClassificationService(config)
    metrics = ServerMetrics(service.batcher)
    decoders = ThreadPoolExecutor(max_workers=config.decode_threads, thread_name_prefix="imagepiece-decode")

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        # Requests still waiting get their answers, then the threads go.
        await asyncio.get_running_loop().run_in_executor(None, service.close)
        decoders.shutdown(wait=True)

    app = FastAPI(title="ImagePiece classifier", summary=f"{service.model_name} through ip_runtime", lifespan=lifespan)
    app.state.service, app.state.metrics = service, metrics

    @app.post("/v1/classify")
    async def classify(request: Request) -> Response:
        began = time.perf_counter()
        try:
            topk = topk_parameter(request, config.topk, service.num_classes)
            data = await read_image_bytes(request, config.max_upload_bytes)
            loop = asyncio.get_running_loop()
            try:
                image = await loop.run_in_executor(decoders, service.prepare, data)
            except ImageError as error:
                raise RequestError(422, "invalid_image", f"cannot classify the upload: {error}") from None
            try:
                logits = await asyncio.wrap_future(service.submit(image))
            except ip_runtime.Error as error:
                status = RUNTIME_STATUS.get(error.code, 500)
                headers = {"Retry-After": RETRY_AFTER_SECONDS} if status == 503 else None
                raise RequestError(status, error.code, str(error), headers) from None
            answer = {"model": service.model_name, "predictions": service.top_k(logits, topk)}
        except ClientDisconnect:
            error = RequestError(400, "client_disconnected", "the client went away before sending the whole upload")
        except RequestError as failure:
            error = failure
        except Exception as failure:
            log.exception("classification failed")
            error = RequestError(500, "internal", f"internal error ({type(failure).__name__}): see the server log")
        else:
            metrics.observe(200, time.perf_counter() - began)
            return JSONResponse(answer)
        metrics.observe(error.status, time.perf_counter() - began, error.code)
        return error.response()

    @app.get("/healthz")
    async def healthz() -> Response:
        stats = service.batcher.stats
        return JSONResponse({"status": "ok", "model": service.model_name, "queue_depth": stats["queue_depth"],
                             "in_flight": stats["in_flight"]})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=metrics.content_type)

    return app
