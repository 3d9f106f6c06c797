"""uvicorn's Server, with the batcher expedited as soon as a graceful shutdown begins.

uvicorn's shutdown waits up to `timeout_graceful_shutdown` for open requests, cancels the rest, and only
then runs the app's lifespan shutdown, where the batcher is closed. A request waiting in the batcher's
queue for its batch to fill (up to --max-delay-ms) would wait out the whole grace period and then be
cancelled unanswered. Expediting the batcher instead (what is queued runs now, each later image as it
arrives) answers those at once, and requests still being uploaded or decoded when the shutdown began
are answered too, within the grace period: the batcher keeps accepting until the lifespan closes it.
"""
from __future__ import annotations

import socket
from typing import List, Optional

import uvicorn

from .service import ClassificationService


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: ClassificationService) -> None:
        super().__init__(config)
        self.service = service

    async def shutdown(self, sockets: Optional[List[socket.socket]] = None) -> None:
        self.service.expedite()
        await super().shutdown(sockets)
