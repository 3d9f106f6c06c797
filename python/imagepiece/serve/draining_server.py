"""uvicorn's Server, with the batcher expedited as soon as a graceful shutdown begins.

uvicorn's shutdown waits up to `timeout_graceful_shutdown` for open requests, cancels the rest, and only
then runs the app's lifespan shutdown, where the batcher is closed. A request waiting in the batcher's
queue for its batch to fill (up to --max-delay-ms) would wait out the whole grace period and then be
cancelled unanswered. Expediting the batcher instead (what is queued runs now, each later image as it
arrives) answers those at once, and requests still being uploaded or decoded when the shutdown began
are answered too, within the grace period: the batcher keeps accepting until the lifespan closes it.

Out of open files (a burst of connections past the process's limit), asyncio logs an error with its traceback
for each connection it fails to accept, up to the listen backlog (2,048) a second: megabytes of log a second,
which could fill a disk. Here that is one line at most every `ACCEPT_FAILURE_LOG_S`.
"""
from __future__ import annotations

import asyncio
import logging
import resource
import socket
import time
from typing import List, Optional

import uvicorn

from .service import ClassificationService

ACCEPT_FAILURE_LOG_S = 10.0
log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: ClassificationService) -> None:
        super().__init__(config)
        self.service = service
        self._accept_failure_logged_at = -ACCEPT_FAILURE_LOG_S

    async def startup(self, sockets: Optional[List[socket.socket]] = None) -> None:
        asyncio.get_running_loop().set_exception_handler(self.handle_loop_exception)
        await super().startup(sockets)

    def handle_loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        if context.get("message") != "socket.accept() out of system resource":
            loop.default_exception_handler(context)
            return
        now = time.monotonic()
        if now - self._accept_failure_logged_at >= ACCEPT_FAILURE_LOG_S:
            self._accept_failure_logged_at = now
            log.error("cannot accept connections: %s (this process may open %s files; ulimit -n): they wait in the listen "
                      "queue until others close", context.get("exception"), f"{resource.getrlimit(resource.RLIMIT_NOFILE)[0]:,}")

    async def shutdown(self, sockets: Optional[List[socket.socket]] = None) -> None:
        self.service.expedite()
        await super().shutdown(sockets)
