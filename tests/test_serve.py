"""The HTTP server (imagepiece.serve, scripts/serve.py): a real server on a free loopback port, real requests."""
import asyncio
import contextlib
import http.client
import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from image_files import POSTSCRIPT, huge_png, photo
from imagepiece.data import eval_transform
from imagepiece.serve import ClassificationService, ServeConfig, create_app
from imagepiece.serve.draining_server import DrainingServer
from imagepiece.serve.http_protocol import uvicorn_config

ROOT = Path(__file__).resolve().parent.parent
UPLOAD_LIMIT = 256 * 1024
TIMEOUT = 120
TEXT_ONLY_FORM = b'--x\r\nContent-Disposition: form-data; name="note"\r\n\r\nno file here\r\n--x--\r\n'
CUT_SHORT_FORM = b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n\xff\xd8\xff'  # no closing "--x--"


class ServerThread:
    """uvicorn serving `app` in a thread, on a loopback socket bound before it starts (no port race)."""

    def __init__(self, app, head_timeout_s=ServeConfig.read_timeout_s, **uvicorn_options):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        config = uvicorn_config(app, head_timeout_s, app.state.metrics, log_level="warning", **uvicorn_options)
        self.server = DrainingServer(config, app.state.service)  # as scripts/serve.py runs it
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + TIMEOUT
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        return httpx.Client(base_url=self.url, timeout=TIMEOUT)

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(TIMEOUT)
        self.socket.close()
        assert not self.thread.is_alive(), "the server did not stop"

    def wait_for_connections(self, count):
        """Until the server holds `count` connections (it sees them open and close a little after the client does)."""
        deadline = time.monotonic() + TIMEOUT
        while len(self.server.server_state.connections) != count:
            assert time.monotonic() < deadline, f"the server holds {len(self.server.server_state.connections)} connections"
            time.sleep(0.01)


def wait_until(condition, failure, every_s=0.01):
    """Polls `condition` until it holds; fails with `failure` (a message, or a callable making one) after TIMEOUT."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, failure() if callable(failure) else failure
        time.sleep(every_s)


def jpeg_bytes(seed, size=(320, 240)):
    buffer = io.BytesIO()
    Image.fromarray(photo(*size, seed=seed)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def png_bytes(mode, size):
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, "PNG")
    return buffer.getvalue()


def multipart(data, content_type="multipart/form-data; boundary=x"):
    """A form with one file field `file`, built by hand (so that its headers can be spelled as a client may)."""
    body = (b'--x\r\nContent-Disposition: form-data; name="file"; filename="photo.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
            + data + b"\r\n--x--\r\n")
    return {"content": body, "headers": {"content-type": content_type}}


class HeldDecoder:
    """Stands in for `service.prepare`: records each upload and holds those `holds` picks until `release` is set."""

    def __init__(self, service, holds=lambda data: True):
        self.prepare, self.holds = service.prepare, holds
        self.decoding, self.release, self.prepared = threading.Event(), threading.Event(), []
        service.prepare = self

    def __call__(self, data):
        self.prepared.append(data)
        if self.holds(data):
            self.decoding.set()
            self.release.wait(TIMEOUT)
        return self.prepare(data)


def post_in_background(client, data):
    """(thread, answer): the thread posts `data` and leaves the response in answer["response"]."""
    answer = {}
    thread = threading.Thread(target=lambda: answer.update(response=client.post("/v1/classify", content=data)))
    thread.start()
    return thread, answer


@pytest.fixture(scope="module")
def artifact(compiled):
    return compiled.path("ti_imagepiece_dynamic")


@pytest.fixture(scope="module")
def served(artifact):
    """(client, service) of one server for the module; stopped (and its batcher drained) at the end."""
    config = ServeConfig(artifact=artifact, max_batch=8, max_delay_ms=2, max_upload_bytes=UPLOAD_LIMIT, decode_threads=1)
    service = ClassificationService(config)
    with ServerThread(create_app(config, service)) as client:
        yield client, service


def counted(client, name):
    """{label value: count} of the one-label counter `name` (e.g. imagepiece_http_requests_total) in /metrics."""
    families = text_string_to_metric_families(client.get("/metrics").text)
    return {next(iter(sample.labels.values())): sample.value for family in families for sample in family.samples
            if sample.name == name}


def expected_probs(service, data):
    """The artifact's softmax on timm's own eval transform of the image: independent of the server's code."""
    metadata = service.runtime.info["metadata"]
    with Image.open(io.BytesIO(data)) as image:
        images = eval_transform(metadata["preprocessing"], metadata["input_shape"])(image.convert("RGB"))[None]
    return service.runtime.run(images)[0].softmax(dim=0)


def test_classify_answers_top_k_from_multipart_and_raw_uploads(served):
    client, service = served
    data = jpeg_bytes(seed=1)
    probs = expected_probs(service, data)
    for response in (client.post("/v1/classify", files={"file": ("photo.jpg", data, "image/jpeg")}),
                     client.post("/v1/classify?topk=3", content=data, headers={"content-type": "image/jpeg"}),
                     client.post("/v1/classify", **multipart(data, "Multipart/Form-Data; boundary=x"))):  # media types ignore case
        assert response.status_code == 200, response.text
        answer = response.json()
        predictions = answer["predictions"]
        assert answer["model"] == "deit_tiny_patch16_224.imagepiece"
        assert len(predictions) == (5 if "topk" not in str(response.url) else 3)
        got = torch.tensor([p["probability"] for p in predictions])
        torch.testing.assert_close(got, probs[[p["index"] for p in predictions]], rtol=0, atol=1e-6)
        assert got[-1] >= probs.topk(len(predictions)).values[-1] - 1e-6, "not the top-k"
        assert all(p["label"] == service.names[p["index"]] and p["label"] for p in predictions)


@pytest.mark.parametrize("send, status, code, message", [
    (lambda c: c.post("/v1/classify", content=b"plain text, not a picture"), 422, "invalid_image", "not an image"),
    # Pillow would hand PostScript to Ghostscript: only raster formats are opened.
    (lambda c: c.post("/v1/classify", content=POSTSCRIPT), 422, "invalid_image", "not an image"),
    (lambda c: c.post("/v1/classify", content=png_bytes("I;16", (64, 64))), 422, "invalid_image", "16-bit"),
    (lambda c: c.post("/v1/classify", content=huge_png(20_000, 20_000)), 422, "invalid_image", "decompression-bomb"),
    # 20,000 pixels in a few bytes, but timm's resize would make 1.2 billion of them before cropping.
    (lambda c: c.post("/v1/classify", content=png_bytes("L", (20_000, 1))), 422, "invalid_image", "extreme aspect ratio"),
    (lambda c: c.post("/v1/classify", content=b""), 400, "empty_upload", "empty"),
    (lambda c: c.post("/v1/classify", files={"file": ("empty.jpg", b"", "image/jpeg")}), 400, "empty_upload", "empty"),
    (lambda c: c.post("/v1/classify", content=TEXT_ONLY_FORM, headers={"content-type": "multipart/form-data; boundary=x"}),
     400, "no_file", "no file"),
    (lambda c: c.post("/v1/classify", content=TEXT_ONLY_FORM, headers={"content-type": "multipart/form-data"}),
     400, "bad_form", "malformed multipart form: Missing boundary"),
    # An upload cut short: the parser alone would answer "no file".
    (lambda c: c.post("/v1/classify", content=CUT_SHORT_FORM, headers={"content-type": "multipart/form-data; boundary=x"}),
     400, "bad_form", "ends before its closing boundary '--x--'"),
    (lambda c: c.post("/v1/classify", content=b"\xff" * (UPLOAD_LIMIT + 1)), 413, "too_large", "larger than the limit"),
    # Streamed (chunked, no Content-Length): refused while reading.
    (lambda c: c.post("/v1/classify", content=iter([b"\xff" * 65536] * 8)), 413, "too_large", "larger than the limit"),
    # curl -F 'file=<photo.jpg' sends the bytes as a text field.
    (lambda c: c.post("/v1/classify", files={"file": (None, b"some text")}), 400, "no_file", "holds text, not a file upload"),
    (lambda c: c.post("/v1/classify?topk=0", content=b"x"), 400, "bad_topk", "topk"),
    (lambda c: c.post("/v1/classify?topk=%C2%B2", content=b"x"), 400, "bad_topk", "topk"),  # "²".isdigit(), not int()
    (lambda c: c.post("/v1/classify?topk=" + "9" * 5000, content=b"x"), 400, "bad_topk", "topk"),  # past int()'s 4300 digits: a 500
    (lambda c: c.get("/v1/classify"), 405, "method_not_allowed", "Method Not Allowed"),
    (lambda c: c.get("/v2/classify"), 404, "not_found", "Not Found"),
    # No redirect to the path without the slash (its Location would come from the client's Host header).
    (lambda c: c.post("/v1/classify/", content=b"x", headers={"host": "elsewhere.example"}), 404, "not_found", "Not Found"),
])
def test_bad_uploads_get_a_4xx_json_error(served, send, status, code, message):
    client, _ = served
    response = send(client)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and message in error["message"]


def test_healthz_and_metrics_parse(served):
    client, service = served
    assert client.get("/healthz").json()["status"] == "ok"
    client.post("/v1/classify", content=jpeg_bytes(seed=2))
    client.post("/v1/classify", content=b"")
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    assert client.head("/metrics").status_code == 200
    families = {family.name: family for family in text_string_to_metric_families(response.text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for family in families.values() for s in family.samples}
    assert not [name for name, _ in samples if name.endswith("_created")]  # a timestamp series per counter and histogram
    assert families["imagepiece_http_requests"].type == "counter"
    assert samples[("imagepiece_http_requests_total", (("status", "200"),))] >= 1
    assert samples[("imagepiece_http_errors_total", (("code", "empty_upload"),))] >= 1
    assert families["imagepiece_http_request_duration_seconds"].type == "histogram"
    assert families["imagepiece_batcher_batch_size"].type == "histogram"
    stats = service.batcher.stats
    assert samples[("imagepiece_batcher_batch_size_count", ())] == stats["batches"] >= 1
    assert samples[("imagepiece_batcher_batch_size_bucket", (("le", "+Inf"),))] == stats["batches"]
    assert samples[("imagepiece_batcher_queue_depth", ())] == 0 and samples[("imagepiece_http_decoding", ())] == 0
    assert ("imagepiece_batcher_queue_wait_seconds_sum", ()) in samples
    # Counters never go down: requests still pending are the gauges, not an outcome of the counter.
    assert {labels for name, labels in samples if name == "imagepiece_batcher_requests_total"} == {
        (("outcome", outcome),) for outcome in ("completed", "failed", "cancelled")}


def test_a_full_queue_answers_503_with_retry_after(artifact):
    # One waiting request fills the queue: the batch cannot fill and the delay outlasts the test, so it
    # waits until close() drains it (however slow a loaded machine is to send the second request).
    config = ServeConfig(artifact=artifact, max_batch=64, max_delay_ms=10_000, queue_capacity=1, decode_threads=1, warmup=False)
    service = ClassificationService(config)
    with ServerThread(create_app(config, service)) as client:
        waiting, first = post_in_background(client, jpeg_bytes(seed=3))
        wait_until(lambda: service.batcher.stats["queue_depth"] >= 1, "the first request never reached the queue", every_s=0.005)
        refused = client.post("/v1/classify", content=jpeg_bytes(seed=4))
        service.close(drain=True)  # runs the waiting request now
        waiting.join(TIMEOUT)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "overloaded"
    assert "(--queue-capacity)" in refused.json()["error"]["message"], "named as the server's other limits are"
    assert first["response"].status_code == 200


def test_uploads_beyond_the_queue_capacity_wait_for_no_decoder(artifact):
    # Uploads slow to decode used to queue in the decode pool without bound, unseen; now they count against
    # queue_capacity like images waiting for a batch.
    config = ServeConfig(artifact=artifact, queue_capacity=1, decode_threads=1, warmup=False)
    service = ClassificationService(config)
    decoder = HeldDecoder(service)
    with ServerThread(create_app(config, service)) as client:
        waiting, first = post_in_background(client, jpeg_bytes(seed=6))
        assert decoder.decoding.wait(TIMEOUT), "the first upload never reached the decoder"
        assert client.get("/healthz").json()["decoding"] == 1
        refused = client.post("/v1/classify", content=jpeg_bytes(seed=7))
        decoder.release.set()
        waiting.join(TIMEOUT)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "overloaded" and "waiting to be decoded" in refused.json()["error"]["message"]
    assert first["response"].status_code == 200


def test_a_stalled_upload_gets_408_and_its_connection_closed(artifact):
    config = ServeConfig(artifact=artifact, read_timeout_s=0.5, decode_threads=1, warmup=False)
    with ServerThread(create_app(config, ClassificationService(config))) as client:
        host, port = client.base_url.host, client.base_url.port
        with socket.create_connection((host, port), timeout=TIMEOUT) as stalled:
            stalled.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nabc")  # then nothing
            answer = b""
            while chunk := stalled.recv(65536):  # ends when the server closes the connection
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer


def raw_exchange(client, request: bytes, trickle: bytes = b"", every_s: float = 0.0) -> bytes:
    """Sends `request`, then `trickle` a byte at a time (stopping once the server closes), and returns all
    the server sent until it closed the connection."""
    with socket.create_connection((client.base_url.host, client.base_url.port), timeout=TIMEOUT) as connection:
        connection.sendall(request)
        for byte in trickle:
            time.sleep(every_s)
            try:
                connection.sendall(bytes([byte]))
            except OSError:  # closed by the server: what it sent is still to be read
                break
        answer = b""
        try:
            while chunk := connection.recv(65536):  # ends when the server closes the connection
                answer += chunk
        except ConnectionResetError:
            pass
    return answer


def test_an_upload_that_trickles_below_the_minimum_rate_gets_408(artifact):
    """A byte every 0.1 s never stalls for the read timeout, but falls behind the minimum rate after it."""
    config = ServeConfig(artifact=artifact, read_timeout_s=0.5, min_upload_rate=1024, decode_threads=1, warmup=False)
    with ServerThread(create_app(config, ClassificationService(config))) as client:
        started = time.monotonic()
        answer = raw_exchange(client, b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n",
                              trickle=b"\xff" * 100, every_s=0.1)
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408") and b"slower than 1024 bytes/s" in answer
    assert elapsed < 8, "the trickle held its connection to the end"


def test_an_upload_over_the_limit_gets_413_and_its_connection_closed(served):
    """Not read to its end (a client could send gigabytes) and not answered twice (a 408 after the 413)."""
    client, _ = served
    head = f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: {UPLOAD_LIMIT * 100}\r\n\r\n".encode()
    answer = raw_exchange(client, head + b"\xff" * 1000)
    assert answer.startswith(b"HTTP/1.1 413") and b"connection: close" in answer.lower() and answer.count(b"HTTP/1.1") == 1


def test_a_client_that_sends_its_whole_upload_before_reading_still_gets_its_413(served):
    """urllib and http.client send all of a body before they read the answer: a close on an upload left unread
    reset the connection under them (ECONNRESET), and the JSON 413 never arrived."""
    client, _ = served
    for _ in range(2):
        connection = http.client.HTTPConnection(client.base_url.host, client.base_url.port, timeout=TIMEOUT)
        try:
            connection.request("POST", "/v1/classify", body=b"\xff" * (UPLOAD_LIMIT * 40))
            answer = connection.getresponse()
            assert answer.status == 413 and json.loads(answer.read())["error"]["code"] == "too_large"
        finally:
            connection.close()


def test_a_connection_answered_for_good_frees_its_slot_while_its_close_lingers(artifact):
    config = ServeConfig(artifact=artifact, decode_threads=1, warmup=False, max_upload_bytes=UPLOAD_LIMIT)
    with ServerThread(create_app(config, ClassificationService(config)), max_connections=1) as client, \
            socket.create_connection((client.base_url.host, client.base_url.port), timeout=TIMEOUT) as refused_upload:
        refused_upload.sendall(f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: {UPLOAD_LIMIT * 100}\r\n\r\n".encode())
        answer = b""
        while not answer.endswith(b"}"):
            answer += refused_upload.recv(65536) or pytest.fail(f"closed after {answer!r}")
        assert answer.startswith(b"HTTP/1.1 413"), answer
        # Still open on the client's side (the server lingers), yet no longer one of the --max-connections 1.
        assert client.get("/healthz", headers={"Connection": "close"}).status_code == 200


def test_a_client_that_never_reads_its_answers_loses_its_connection_after_the_read_timeout(artifact):
    """Requests pipelined by the thousand and no answer read: the send buffer fills, uvicorn waited on it without a
    deadline, and the connection held its --max-connections slot (every other client got 503) for as long as it lived."""
    config = ServeConfig(artifact=artifact, read_timeout_s=0.5, decode_threads=1, warmup=False)
    server = ServerThread(create_app(config, ClassificationService(config)), head_timeout_s=config.read_timeout_s, max_connections=1)
    with server as client, socket.socket() as reader_of_nothing:
        reader_of_nothing.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader_of_nothing.connect((client.base_url.host, client.base_url.port))
        reader_of_nothing.settimeout(TIMEOUT)
        server.wait_for_connections(1)  # admitted: the one slot is its
        with contextlib.suppress(OSError):  # the server may cut it before it has sent them all
            reader_of_nothing.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 20000)
        server.wait_for_connections(0)
        assert client.get("/healthz", headers={"Connection": "close"}).status_code == 200


def test_an_idle_connection_over_the_limit_is_closed_within_a_second_not_the_read_timeout(artifact):
    """Kept only to answer its request with a 503, it held an open file for the whole --read-timeout: a flood of idle
    connections ran the server out of files, and well-behaved clients got no answer at all."""
    from imagepiece.serve.http_protocol import OVER_LIMIT_HEAD_S

    config = ServeConfig(artifact=artifact, decode_threads=1, warmup=False)  # --read-timeout 30 s
    server = ServerThread(create_app(config, ClassificationService(config)), max_connections=1)
    with server as client, socket.create_connection((client.base_url.host, client.base_url.port), timeout=TIMEOUT):
        server.wait_for_connections(1)  # the admitted one, idle
        with socket.create_connection((client.base_url.host, client.base_url.port), timeout=TIMEOUT) as over:
            started = time.monotonic()
            answer = b""
            while chunk := over.recv(65536):  # ends when the server closes it
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408") and f"within {OVER_LIMIT_HEAD_S:g} s".encode() in answer, answer
        assert time.monotonic() - started < config.read_timeout_s / 2
        server.wait_for_connections(1)  # the admitted one keeps its full deadline


def test_connections_send_answers_without_waiting_for_the_clients_ack(artifact):
    """TCP_NODELAY on every connection, however its listening socket was made (asyncio sets it only for sockets made
    with proto IPPROTO_TCP; the CLI's and these tests' have proto 0): uvicorn writes a response's head and body
    apart, and the body waited ~40 ms for the client's delayed ACK on every reused connection."""
    config = ServeConfig(artifact=artifact, decode_threads=1, warmup=False)
    server = ServerThread(create_app(config, ClassificationService(config)))
    with server as client, socket.create_connection((client.base_url.host, client.base_url.port), timeout=TIMEOUT):
        server.wait_for_connections(1)
        [protocol] = server.server.server_state.connections
        assert protocol.transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_shutdown_answers_queued_and_decoding_requests_at_once_and_cancelled_ones_get_503(artifact):
    """At shutdown no image waits for its batch to fill any more (a queued request is answered, not left to wait out
    the delay and the grace period); a request still decoding then is answered when its decode ends within the grace
    period (it was once refused: the batcher closed as the shutdown began); one still open at its end gets a JSON 503."""
    config = ServeConfig(artifact=artifact, max_batch=64, max_delay_ms=10_000, decode_threads=2, warmup=False)
    service = ClassificationService(config)
    late_image = jpeg_bytes(seed=11)
    decoder = HeldDecoder(service, holds=lambda data: data == b"block")
    late_decoder = HeldDecoder(service, holds=lambda data: data == late_image)
    server = ServerThread(create_app(config, service), timeout_graceful_shutdown=2)
    with server as client:
        queued_thread, queued = post_in_background(client, jpeg_bytes(seed=8))
        wait_until(lambda: service.batcher.stats["queue_depth"] >= 1, "the first request never reached the queue", every_s=0.005)
        stuck_thread, stuck = post_in_background(client, b"block")
        late_thread, late = post_in_background(client, late_image)
        assert decoder.decoding.wait(TIMEOUT) and late_decoder.decoding.wait(TIMEOUT), "a request never reached the decoder"
        started = time.monotonic()
        server.server.should_exit = True
        queued_thread.join(TIMEOUT)
        late_decoder.release.set()  # its decode ends within the grace period, after the shutdown began
        for thread in (late_thread, stuck_thread):
            thread.join(TIMEOUT)
        waited = time.monotonic() - started
        decoder.release.set()
    queued, late, stuck = queued["response"], late["response"], stuck["response"]
    assert queued.status_code == 200, queued.text
    assert late.status_code == 200, late.text
    assert stuck.status_code == 503 and stuck.json()["error"]["code"] == "shutting_down"
    assert stuck.headers["retry-after"] == "1" and waited < 9  # not the 10 s delay


def test_uploads_refused_at_the_end_of_the_grace_period_are_never_decoded(artifact):
    """Their decodes used to stay queued: the process decoded every one of them, for nobody, before it could exit
    (20 s past a 2 s --shutdown-timeout)."""
    config = ServeConfig(artifact=artifact, decode_threads=1, warmup=False)
    service = ClassificationService(config)
    decoder = HeldDecoder(service, holds=lambda data: data == b"block")
    server = ServerThread(create_app(config, service), timeout_graceful_shutdown=1)
    with server as client:
        held_thread, held = post_in_background(client, b"block")
        assert decoder.decoding.wait(TIMEOUT), "the first upload never reached the decoder"
        waiting = [post_in_background(client, jpeg_bytes(seed=seed)) for seed in (12, 13, 14)]
        wait_until(lambda: client.get("/healthz").json()["decoding"] >= 4, "the uploads never waited for the decoder")
        server.server.should_exit = True
        for thread, _ in waiting:
            thread.join(TIMEOUT)
        decoder.release.set()
        held_thread.join(TIMEOUT)
    for _, answer in waiting:
        assert answer["response"].status_code == 503 and answer["response"].json()["error"]["code"] == "shutting_down"
    assert decoder.prepared == [b"block"], "a refused upload was decoded"


def test_a_client_that_hangs_up_while_its_image_waits_for_a_batch_is_not_counted_as_answered(artifact):
    config = ServeConfig(artifact=artifact, max_batch=64, max_delay_ms=10_000, decode_threads=1, warmup=False)
    service = ClassificationService(config)
    with ServerThread(create_app(config, service)) as client:
        data = jpeg_bytes(seed=15)
        with socket.create_connection((client.base_url.host, client.base_url.port), timeout=TIMEOUT) as hanging_up:
            hanging_up.sendall(f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
            wait_until(lambda: service.batcher.stats["queue_depth"] >= 1, "the image never reached the batcher's queue")
        # Well before its 10 s batch delay.
        wait_until(lambda: counted(client, "imagepiece_http_requests_total").get("499") == 1,
                   lambda: counted(client, "imagepiece_http_requests_total"))
        assert "200" not in counted(client, "imagepiece_http_requests_total")


def test_an_upload_whose_client_hangs_up_before_its_decode_is_never_decoded(artifact):
    config = ServeConfig(artifact=artifact, queue_capacity=8, decode_threads=1, warmup=False)
    service = ClassificationService(config)
    decoder = HeldDecoder(service)
    with ServerThread(create_app(config, service)) as client:
        waiting, first = post_in_background(client, jpeg_bytes(seed=9))
        assert decoder.decoding.wait(TIMEOUT), "the first upload never reached the decoder"
        gone = jpeg_bytes(seed=10)
        with socket.create_connection((client.base_url.host, client.base_url.port), timeout=TIMEOUT) as hanging_up:
            hanging_up.sendall(f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: {len(gone)}\r\n\r\n".encode() + gone)
            # Read, and waiting for the decode thread.
            wait_until(lambda: client.get("/healthz").json()["decoding"] >= 2, "the second upload never waited for the decoder")
        wait_until(lambda: client.get("/healthz").json()["decoding"] <= 1, "the hang-up was not noticed")
        decoder.release.set()
        waiting.join(TIMEOUT)
        metrics = client.get("/metrics").text
    assert first["response"].status_code == 200 and decoder.prepared == [jpeg_bytes(seed=9)]
    errors = {tuple(sample.labels.items()): sample.value for family in text_string_to_metric_families(metrics)
              for sample in family.samples if sample.name == "imagepiece_http_errors_total"}
    assert errors[(("code", "client_disconnected"),)] == 1
    statuses = {sample.labels["status"]: sample.value for family in text_string_to_metric_families(metrics)
                for sample in family.samples if sample.name == "imagepiece_http_requests_total"}
    assert statuses.get("499") == 1 and "400" not in statuses, statuses  # never answered: not a 400


def test_a_pixel_limit_below_the_warm_up_picture_still_serves(artifact):
    config = ServeConfig(artifact=artifact, max_pixels=1000, decode_threads=1)
    service = ClassificationService(config)  # warms up on a 256x256 picture
    service.close()


def test_headers_that_trickle_past_the_read_timeout_get_408_and_the_connection_closed(served, artifact):
    """A slowloris client (one header line, then nothing) and a silent one. A keep-alive connection idle
    between requests for longer than the deadline is unaffected (its idling is uvicorn's keep-alive timeout's)."""
    config = ServeConfig(artifact=artifact, read_timeout_s=0.5, decode_threads=1, warmup=False)
    with ServerThread(create_app(config, ClassificationService(config)), head_timeout_s=config.read_timeout_s) as client:
        host, port = client.base_url.host, client.base_url.port
        for first_bytes in (b"POST /v1/classify HTTP/1.1\r\nHost: x\r\n", b""):  # a head that never ends; nothing at all
            with socket.create_connection((host, port), timeout=TIMEOUT) as slow:
                started = time.monotonic()
                slow.sendall(first_bytes)
                answer = b""
                while chunk := slow.recv(65536):  # ends when the server closes the connection
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer and b"headers" in answer
            assert 0.4 < time.monotonic() - started < TIMEOUT
        for _ in range(2):  # one keep-alive connection, two requests further apart than the head deadline
            assert client.get("/healthz").status_code == 200
            time.sleep(0.7)
        assert counted(client, "imagepiece_http_requests_total") == {"408": 2}  # seen by an operator facing a slowloris
        assert counted(client, "imagepiece_http_errors_total") == {"request_timeout": 2}


@pytest.mark.parametrize("max_connections", [1, 2])
def test_answers_below_the_app_are_counted_json_errors_and_max_connections_lets_that_many_in(artifact, max_connections):
    """Malformed HTTP and a request over --max-connections: uvicorn answers these itself, in plain text (its 503
    without Retry-After), counted nowhere, and its limit let one connection fewer in, unless the protocol says otherwise."""
    config = ServeConfig(artifact=artifact, decode_threads=1, warmup=False)
    server = ServerThread(create_app(config, ClassificationService(config)), max_connections=max_connections)
    close = {"Connection": "close"}  # no connection kept open between the steps
    with server as client, contextlib.ExitStack() as idle_connections:
        address = (client.base_url.host, client.base_url.port)
        malformed_head = raw_exchange(client, b"GET /healthz HTTP/1.1\r\nHost: x\r\nbad header line\r\n\r\n")
        assert malformed_head.startswith(b"HTTP/1.1 400") and b'"code": "bad_request"' in malformed_head, malformed_head
        server.wait_for_connections(0)
        malformed_body = raw_exchange(client, b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                                              b"zz\r\n")
        assert malformed_body.startswith(b"HTTP/1.1 400") and b'"code": "bad_request"' in malformed_body, malformed_body
        admitted = [idle_connections.enter_context(socket.create_connection(address, timeout=TIMEOUT))
                    for _ in range(max_connections - 1)]
        server.wait_for_connections(max_connections - 1)
        assert client.get("/healthz", headers=close).status_code == 200  # the last one let in
        admitted.append(idle_connections.enter_context(socket.create_connection(address, timeout=TIMEOUT)))
        server.wait_for_connections(max_connections)
        over = client.get("/healthz", headers=close)
        assert over.status_code == 503 and over.headers["retry-after"] == "1", over.text
        assert over.json()["error"]["code"] == "overloaded"
        # A connection let in stays served while newer ones are refused, two pipelined requests alike.
        admitted[0].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 2)
        answers = b""
        while answers.count(b"HTTP/1.1 ") < 2 or not answers.endswith(b"}"):
            answers += admitted[0].recv(65536) or pytest.fail(f"closed after {answers!r}")
        assert answers.count(b"HTTP/1.1 200") == 2, answers
        idle_connections.close()
        server.wait_for_connections(0)
        statuses = counted(client, "imagepiece_http_requests_total")
        errors = counted(client, "imagepiece_http_errors_total")
    # The malformed body ended its request as a disconnect, already counted by the app (499): not twice.
    assert statuses["400"] == 1 and statuses["503"] == 1 and statuses["499"] == 1, statuses
    assert errors["bad_request"] == 1 and errors["overloaded"] == 1, errors


def test_uploads_in_progress_hold_a_bounded_total_and_none_outlasts_the_upload_timeout(artifact):
    config = ServeConfig(artifact=artifact, decode_threads=1, warmup=False, max_upload_bytes=1_000_000,
                         max_buffered_bytes=1_500_000, upload_timeout_s=1.0)
    with ServerThread(create_app(config, ClassificationService(config))) as client:
        host, port = client.base_url.host, client.base_url.port
        with socket.create_connection((host, port), timeout=TIMEOUT) as holding:  # 900 kB of a 1 MB upload, then silence
            holding.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 900_000)
            time.sleep(0.3)
            refused = client.post("/v1/classify", content=b"y" * 700_000)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
            assert "uploads in progress already hold" in refused.json()["error"]["message"]
            # Steady enough for --min-upload-rate, but past the whole-upload deadline: 408 within about a second.
            answer, started = b"", time.monotonic()
            with socket.create_connection((host, port), timeout=TIMEOUT) as steady:
                steady.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
                try:
                    for _ in range(50):
                        steady.sendall(b"z" * 2_000)
                        time.sleep(0.1)
                except OSError:  # the server answered and closed while the rest was still being sent
                    pass
                while chunk := steady.recv(65536):
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 408") and b"took longer than 1 s" in answer, answer
            assert time.monotonic() - started < 4
        deadline = time.monotonic() + TIMEOUT
        while (accepted := client.post("/v1/classify", content=b"y" * 700_000)).status_code == 503:  # the budget is back
            assert time.monotonic() < deadline, accepted.text
            time.sleep(0.05)
        assert accepted.status_code == 422, accepted.text  # taken and decoded: not an image


@pytest.mark.parametrize("args, message", [
    (["--max-buffered-mb", "20"], "--max-buffered-mb 20 cannot hold one upload of --max-upload-mb 20 and its multipart form"),
    (["--upload-timeout", "0"], "--upload-timeout must be a finite number of seconds > 0"),
    (["--max-upload-mb", "inf"], "--max-upload-mb must be a finite number > 0, got inf"),
    (["--host", ""], "--host is empty; give an address (0.0.0.0 or :: to listen on every interface)"),
    (["--max-upload-mb", "nan"], "--max-upload-mb must be a finite number > 0, got nan"),
    (["--max-upload-mb", "0"], "--max-upload-mb must be a finite number > 0, got 0.0"),
    (["--port", "70000"], "--port must be in [0, 65535]"),
    (["--topk", "0"], "--topk must be >= 1"),
    (["--max-upload-mb", "1e-9"], "--max-upload-mb 1e-09 is less than one byte"),
    (["--read-timeout", "0"], "--read-timeout must be a finite number of seconds > 0"),
    (["--shutdown-timeout", "nan"], "--shutdown-timeout must be a finite number of seconds > 0"),
    (["--max-connections", "0"], "--max-connections must be >= 1"),
    (["--min-upload-rate", "0"], "--min-upload-rate must be a finite number of KiB/s > 0"),
])
def test_bad_arguments_are_refused_before_anything_starts(args, message, capsys):
    from imagepiece.serve.cli import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--artifact", __file__, *args])  # any existing file: the arguments are refused first
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_topk_beyond_the_artifacts_classes_is_refused_at_start_in_one_line_named_as_invoked(artifact, monkeypatch, capsys):
    """Once, it served and silently answered the 1000 classes there are (while ?topk=5000 got 400); and errors after
    the arguments named the program imagepiece-serve however it was invoked."""
    from imagepiece.serve.cli import main

    monkeypatch.setattr(sys, "argv", ["serve.py", "--artifact", str(artifact), "--port", "0", "--topk", "5000"])
    monkeypatch.setattr(DrainingServer, "run", lambda *_, **__: pytest.fail("it started serving"))  # rather than hang
    assert main() == 2
    assert capsys.readouterr().err == f"serve.py: error: --topk 5000 is more than the 1000 classes of {artifact.name}\n"


def test_a_batcher_option_the_artifact_cannot_take_is_named_by_its_flag(artifact, monkeypatch, capsys, tmp_path):
    from imagepiece.serve.cli import main

    monkeypatch.setattr(sys, "argv", ["serve.py", "--artifact", str(artifact), "--port", "0", "--max-batch", "65"])
    monkeypatch.setattr(DrainingServer, "run", lambda *_, **__: pytest.fail("it started serving"))
    assert main() == 2
    assert capsys.readouterr().err == "serve.py: error: --max-batch must be in [1, 64] (the artifact's largest batch), got 65\n"
    corrupt = tmp_path / "max_batch" / "queue_capacity.so"  # other errors keep their names, paths too
    corrupt.parent.mkdir()
    corrupt.write_bytes(artifact.read_bytes()[:5000])
    monkeypatch.setattr(sys, "argv", ["serve.py", "--artifact", str(corrupt), "--port", "0"])
    assert main() == 2
    assert f"'{corrupt}' is truncated or corrupt" in capsys.readouterr().err


def test_the_open_file_limit_is_raised_to_the_hard_one_and_max_connections_must_fit(monkeypatch):
    """Past the limit (a soft 1,024 is common) accept() fails: no 503 for the connections over it, no answer at all."""
    from imagepiece.serve import cli

    limits = {"soft": 1024, "hard": 4096}
    monkeypatch.setattr(cli.resource, "getrlimit", lambda _: (limits["soft"], limits["hard"]))
    monkeypatch.setattr(cli.resource, "setrlimit", lambda _, pair: limits.update(soft=pair[0], hard=pair[1]))
    warnings = []
    assert cli.connection_limit(None, warnings.append) == cli.DEFAULT_MAX_CONNECTIONS and limits["soft"] == 4096
    assert cli.connection_limit(4000, warnings.append) == 4000 and not warnings
    limits.update(soft=1024, hard=1024)  # bash's `ulimit -n 1024` sets both
    fits = 1024 - cli.OTHER_DESCRIPTORS
    assert cli.connection_limit(None, warnings.append) == fits  # the default is lowered, and says so
    assert warnings == [f"serving at most {fits:,} connections at once, not 1,000: this process may open 1,024 files (ulimit -Hn)"]
    with pytest.raises(ValueError, match=f"--max-connections 1,000 needs {1000 + cli.OTHER_DESCRIPTORS:,} open files, and this "
                                         f"process may open at most 1,024 .*lower --max-connections to {fits}"):
        cli.connection_limit(1000, warnings.append)  # asked for: refused, not quietly lowered
    limits.update(soft=64, hard=64)  # no value fits: lowering is no advice ("lower --max-connections 1 to 1")
    with pytest.raises(ValueError, match=r"may open at most 64 \(ulimit -Hn\): raise the limit$"):
        cli.connection_limit(1, warnings.append)


def test_running_out_of_open_files_is_logged_once_not_per_connection(artifact, caplog):
    """asyncio logs each failed accept with its traceback, up to the listen backlog a second: megabytes of log."""
    from imagepiece.serve.draining_server import DrainingServer

    config = ServeConfig(artifact=artifact, decode_threads=1, warmup=False)
    server = DrainingServer(uvicorn_config(create_app(config, ClassificationService(config)), 30.0, None), None)
    loop = asyncio.new_event_loop()
    try:
        for _ in range(500):
            server.handle_loop_exception(loop, {"message": "socket.accept() out of system resource",
                                                "exception": OSError(24, "Too many open files")})
        server.handle_loop_exception(loop, {"message": "something else"})
    finally:
        loop.close()
    said = [record.getMessage() for record in caplog.records]
    assert len(said) == 2 and said[0].startswith("cannot accept connections: [Errno 24] Too many open files"), said
    assert said[1] == "something else"


def test_the_entry_point_without_its_extra_says_so_in_one_line():
    code = ("import sys; sys.modules['fastapi'] = None; from imagepiece.entry_points import serve; "
            "sys.argv = ['imagepiece-serve', '--artifact', 'x.so']; sys.exit(serve())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("imagepiece-serve: error: imagepiece.serve needs fastapi, which is not installed: "
                                     "pip install 'imagepiece[serve]'"), result.stderr


def test_a_port_in_use_fails_in_one_line_before_the_model_loads(capsys):
    from imagepiece.serve.cli import main

    with socket.create_server(("127.0.0.1", 0)) as taken:
        status = main(["--artifact", __file__, "--port", str(taken.getsockname()[1])])  # not an artifact: never read
    assert status == 2 and "cannot listen on 127.0.0.1:" in capsys.readouterr().err


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("::1", True), ("localhost", True), ("0.0.0.0", False),
                                            ("10.1.2.3", False), ("example.org", False)])
def test_a_host_beyond_loopback_is_told_apart(host, loopback):
    from imagepiece.serve.cli import is_loopback

    assert is_loopback(host) == loopback


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_serve_script_starts_answers_and_exits_0_once_drained_on_a_stop_signal(artifact, stop):
    # uvicorn raises the signal again after its shutdown: SIGTERM used to end the process by the signal (-15).
    with socket.socket() as probe:  # a free port (the script binds it itself)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "serve.py"), "--artifact", str(artifact), "--port", str(port),
                                "--no-access-log"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + TIMEOUT
        while True:
            assert process.poll() is None, process.communicate()[0]
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.2)
        response = httpx.post(f"{url}/v1/classify", content=jpeg_bytes(seed=5), timeout=TIMEOUT)
        assert response.status_code == 200 and len(response.json()["predictions"]) == 5
    finally:
        process.send_signal(stop)
        output = process.communicate(timeout=TIMEOUT)[0]
    assert process.returncode == 0, output
    assert f"on http://127.0.0.1:{port}" in output and "Finished server process" in output
