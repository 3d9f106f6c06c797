"""uvicorn's Server, with the batcher drained as soon as a graceful shutdown begins.

uvicorn's shutdown waits up to `timeout_graceful_shutdown` for open requests, cancels the rest, and only
then runs the app's lifespan shutdown, where the batcher would be closed. A request waiting in the
batcher's queue for its batch to fill (up to --max-delay-ms) would wait out the whole grace period and
then be cancelled unanswered. Closing the batcher first (drain: every queued image runs now, new submits
are refused with 503) lets those requests finish within the grace period.
"""
from __future__ import annotations

import asyncio
import socket
from typing import List, Optional

import uvicorn

from .service import ClassificationService


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: ClassificationService) -> None:
        super().__init__(config)
        self.service = service

    async def shutdown(self, sockets: Optional[List[socket.socket]] = None) -> None:
        # close() blocks until the queued batches have run: in a thread, beside uvicorn's wait for the requests.
        drained = asyncio.get_running_loop().run_in_executor(None, self.service.close)
        await super().shutdown(sockets)
        await drained
