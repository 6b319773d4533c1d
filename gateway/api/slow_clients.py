"""A bound on how long one write to a client may wait, so a client that reads a stream very
slowly, or never, cannot hold a tenant's slot and the engine's capacity for ever.

uvicorn keeps at most its transport's high-water mark (64 KiB) of unsent output per
connection; past it, a write waits until the client reads. A write still waiting after
`timeout_s` ends the response: the stream's relay closes its upstream response (so vLLM
aborts the generation) and releases the tenant's slot, the meter counts it as closed by
the client (499), and uvicorn closes the connection.
"""

from __future__ import annotations

import asyncio
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.api.request_ids import scope_request_id

log = logging.getLogger(__name__)


class ClientTooSlow(Exception):
    """Deliberately not an `OSError`: Starlette reads those as a disconnect and hides them."""


class WriteTimeoutMiddleware:
    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def bounded_send(message: Message) -> None:
            try:
                await asyncio.wait_for(send(message), self.timeout_s)
            except TimeoutError as exc:
                raise ClientTooSlow() from exc

        try:
            await self.app(scope, receive, bounded_send)
        except ClientTooSlow:
            log.warning("request %s: the client read nothing for %.0fs; its answer was "
                        "abandoned", scope_request_id(scope), self.timeout_s)
