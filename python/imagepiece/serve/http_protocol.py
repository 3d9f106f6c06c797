"""uvicorn's HTTP/1.1 protocol with a deadline for each request head (request line and headers).

uvicorn closes idle keep-alive connections, and the app times out a stalled body (`read_timeout_s`),
but a client that opens a connection and sends nothing, or trickles its head a byte at a time
(slowloris), keeps its connection, and with it one of `--max-connections` slots, forever: a thousand
such clients and every real request gets 503. Here a head that is not complete within `read_timeout_s`
gets 408 and the connection is closed. A request whose head has arrived is never cut: its body and its
inference are the app's business.

--max-connections is enforced here too, not by uvicorn's `limit_concurrency`: uvicorn counts the asking
connection among those already open (so N let only N-1 in), refuses every request while too many are open
(the established keep-alive clients' too, whoever came last), and answers with an app of its own, in plain
text and without Retry-After. Here a connection is let in or not when it opens: the first N open at a time
are served for as long as they stay, a connection beyond them gets a 503 for its request and is closed (the
rest of its upload unread, as for a 413). These refusals below the app, and those to malformed HTTP (400) and to a slow head
(408), come in the API's JSON error shape and are counted in the server's metrics as the app counts its own.

Two more things a plain uvicorn protocol gets wrong for this server:
- Nagle's algorithm. asyncio turns it off only for sockets made with proto IPPROTO_TCP, and `socket.create_server`
  (the CLI's) and `socket.socket()` make them with proto 0. uvicorn writes a response's head and body separately, so
  on a reused connection the body waited for the client's delayed ACK: ~40 ms added to every request after the first.
- Closing on a client still sending (a 413, a 503 over the connection limit) with its upload unread makes the
  kernel reset the connection, and a client that sends its whole body before reading (urllib, http.client) gets
  ECONNRESET, never the JSON answer. Such a close lingers, as nginx's does: the answer is sent and the sending side
  shut, what still arrives is read and dropped, and the connection is closed when the client closes it or after
  `LINGER_S`.
"""
from __future__ import annotations

import asyncio
import json
import socket
from typing import Optional

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .metrics import ServerMetrics


def _error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


def raw_error_response(status: str, code: str, message: str) -> bytes:
    """A raw response (`status`: "408 Request Timeout") with the API's JSON error shape, written below h11, which
    sends nothing for a request it has not seen (or could not parse); the connection is closed after it."""
    body = _error_body(code, message)
    return (b"HTTP/1.1 " + status.encode() + b"\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def request_timeout_response(seconds: float) -> bytes:
    return raw_error_response("408 Request Timeout", "request_timeout",
                              f"the request line and headers did not arrive within {seconds:g} s")


async def _over_connection_limit(send) -> None:
    body = _error_body("overloaded", "the server has as many open connections as --max-connections allows; retry later")
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"retry-after", b"1"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


LINGER_S = 1.0  # at most this long a close waits for a client still sending (a LAN client sends 20 MiB in far less)
# A connection over --max-connections is kept only to answer its request with a 503: one that sends none in this long is
# closed, rather than holding an open file for the full --read-timeout (a flood of idle connections ran the server out).
OVER_LIMIT_HEAD_S = 1.0


class LingeringClose:
    """The protocol's transport, whose close() lingers while the client may still be sending (see the module
    docstring); everything else is the transport's own."""

    def __init__(self, transport: asyncio.Transport, protocol: "HeadDeadlineProtocol") -> None:
        self._transport, self._protocol = transport, protocol
        self.lingering: Optional[asyncio.TimerHandle] = None

    def __getattr__(self, name):
        return getattr(self._transport, name)

    def close(self) -> None:
        if self.lingering is not None or self._transport.is_closing():
            return
        if not self._protocol.client_may_be_sending():
            self._transport.close()
            return
        self._transport.write_eof()  # after the answer, once it is written
        self._transport.resume_reading()  # uvicorn pauses reading a body the app does not take
        self.lingering = self._protocol.loop.call_later(LINGER_S, self._transport.close)
        self._protocol.admitted_connections.discard(self._protocol)  # answered for good: its slot is free now

    def is_closing(self) -> bool:
        return self.lingering is not None or self._transport.is_closing()


class HeadDeadlineProtocol(H11Protocol):
    """The deadline starts when the connection opens, and on a keep-alive connection when the next
    request's first bytes arrive (an idle keep-alive connection is uvicorn's `timeout_keep_alive`'s)."""

    # Set per server by `uvicorn_config`.
    head_timeout_s = 30.0
    max_connections: Optional[int] = None
    admitted_connections: set = set()  # those let in and still open, at most max_connections (a set per server)
    metrics: Optional[ServerMetrics] = None
    _deadline: Optional[asyncio.TimerHandle] = None
    _write_deadline: Optional[asyncio.TimerHandle] = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.served_app, self.app = self.app, self._admit  # uvicorn runs `self.app` for each request

    async def _admit(self, scope, receive, send) -> None:
        """The app, for a connection let in when it opened; else a JSON 503 (and the connection closes)."""
        if self in self.admitted_connections or self.max_connections is None:
            await self.served_app(scope, receive, send)
        else:
            self._count_refusal(503, "overloaded")
            await _over_connection_limit(send)

    def connection_made(self, transport: asyncio.Transport) -> None:
        connection = transport.get_extra_info("socket")
        if connection is not None and connection.family in (socket.AF_INET, socket.AF_INET6):
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)
        self.transport = LingeringClose(transport, self)  # uvicorn's request cycles take it from here
        if self.max_connections is not None and len(self.admitted_connections) < self.max_connections:
            self.admitted_connections.add(self)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.transport.lingering is not None:  # the rest of an upload that was answered already: dropped
            return
        if self._deadline is None and self._waiting_for_head():
            self._arm()
        super().data_received(data)

    def on_response_complete(self) -> None:
        self._disarm()
        super().on_response_complete()

    def eof_received(self) -> Optional[bool]:
        if self.transport.lingering is not None:  # the client has sent all and read the answer: done
            self.transport.lingering.cancel()
            return False  # the transport closes itself
        return super().eof_received()

    def pause_writing(self) -> None:
        super().pause_writing()
        # A client that stops reading (requests pipelined, answers never read) would hold its slot for ever: uvicorn
        # waits for the send buffer to drain without a deadline, and h11 reads no further request to arm one.
        self._write_deadline = self.loop.call_later(self.head_timeout_s, self._write_overdue)

    def resume_writing(self) -> None:
        if self._write_deadline is not None:
            self._write_deadline.cancel()
            self._write_deadline = None
        super().resume_writing()

    def _write_overdue(self) -> None:
        self._write_deadline = None
        self.transport.abort()  # nothing more can reach this client; connection_lost frees its slot

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self.transport.lingering is not None:
            self.transport.lingering.cancel()
        if self._write_deadline is not None:
            self._write_deadline.cancel()
        self._disarm()
        self.admitted_connections.discard(self)
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes h11 cannot parse as HTTP (a bad request line or chunk size), in JSON."""
        self._disarm()
        # Malformed framing in the body of a request the app is serving ends that request as a disconnect, which the
        # app counts (499): counting the 400 too would count one request twice.
        if self._waiting_for_head():
            self._count_refusal(400, "bad_request")
        self.transport.write(raw_error_response("400 Bad Request", "bad_request", f"malformed HTTP request: {msg}"))
        self.transport.close()

    def client_may_be_sending(self) -> bool:
        """Whether the request being answered still has body on its way (h11 has not seen its end)."""
        return self.conn.their_state is h11.SEND_BODY

    def _waiting_for_head(self) -> bool:
        # No request yet, or the last one answered: a request in progress (its body, its inference) is the app's.
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self._head_timeout_s(), self._head_overdue)

    def _head_timeout_s(self) -> float:
        admitted = self.max_connections is None or self in self.admitted_connections
        return self.head_timeout_s if admitted else min(self.head_timeout_s, OVER_LIMIT_HEAD_S)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_overdue(self) -> None:
        self._deadline = None
        if self._waiting_for_head() and not self.transport.is_closing():
            self._count_refusal(408, "request_timeout")
            self.transport.write(request_timeout_response(self._head_timeout_s()))
            self.transport.close()

    def _count_refusal(self, status: int, code: str) -> None:
        if self.metrics is not None:
            self.metrics.count(status, code)


def uvicorn_config(app, head_timeout_s: float, metrics: Optional[ServerMetrics], max_connections: Optional[int] = None,
                   **options) -> uvicorn.Config:
    """uvicorn's Config for `app` on h11 with `HeadDeadlineProtocol`, which counts its own answers in `metrics` (the
    app's: `app.state.metrics`) and serves at most `max_connections` connections at a time (None: no limit);
    `options` go to uvicorn.Config."""
    protocol = type("HeadDeadlineProtocol", (HeadDeadlineProtocol,),
                    {"head_timeout_s": head_timeout_s, "max_connections": max_connections, "admitted_connections": set(),
                     "metrics": metrics})
    return uvicorn.Config(app, http=protocol, **options)
