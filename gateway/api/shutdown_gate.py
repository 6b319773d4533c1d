"""Draining: the requests in flight, and a gate that refuses new ones once the gateway stops.

While it drains, a new request (`/health` too, so load balancers and readiness probes take
the gateway out of rotation) gets 503 `shutting_down` with `Retry-After` and
`Connection: close`; requests already in flight, streams included, run to their end. What
still waits for vLLM when the grace period ends is cut (`cut_waits`): a stream ends with a
`shutting_down` error event, as a stream whose backend fails ends with its own, and a
request still waiting for its answer is answered 503 `shutting_down`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import anyio
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import ShuttingDown, error_response


class ShutdownGate:
    def __init__(self) -> None:
        self.in_flight = 0
        self.closed = False
        self._cutting = False
        self._waits: set[anyio.CancelScope] = set()

    @property
    def idle(self) -> bool:
        return self.in_flight == 0

    def close(self) -> None:
        self.closed = True

    def cut_waits(self) -> None:
        """The grace period is over: every wait for vLLM (an answer, a stream's next chunk)
        ends now."""
        self._cutting = True
        for wait in self._waits:
            wait.cancel()

    @contextmanager
    def cuttable(self) -> Iterator[anyio.CancelScope]:
        """A scope around one wait for vLLM, which `cut_waits` cancels (`cancelled_caught`
        then tells). It must not span a `yield` of a stream: the cancellation would reach
        whoever consumes it."""
        with anyio.CancelScope() as wait:
            if self._cutting:
                wait.cancel()
            self._waits.add(wait)
            try:
                yield wait
            finally:
                self._waits.discard(wait)


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
