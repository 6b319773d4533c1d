"""Draining: the requests in flight, and a gate that refuses new ones once the gateway stops.

While it drains, a new request (`/health` too, so load balancers and readiness probes take
the gateway out of rotation) gets 503 `shutting_down` with `Retry-After` and
`Connection: close`; requests already in flight, streams included, run to their end.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import ShuttingDown, error_response


class ShutdownGate:
    def __init__(self) -> None:
        self.in_flight = 0
        self.closed = False

    @property
    def idle(self) -> bool:
        return self.in_flight == 0

    def close(self) -> None:
        self.closed = True


class ShutdownGateMiddleware:
    """Counts each HTTP request until its answer is sent in full (a stream's last byte)."""

    def __init__(self, app: ASGIApp, gate: ShutdownGate) -> None:
        self.app = app
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.gate.closed:
            refusal = error_response(ShuttingDown())
            refusal.headers["Connection"] = "close"
            await refusal(scope, receive, send)
            return
        self.gate.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.gate.in_flight -= 1
