"""A completion on its way through the gateway: where it goes, how its answer comes back,
and the scope each wait for vLLM runs in."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import anyio

from gateway.telemetry.meter import RequestMeter
from gateway.upstream.pool import Backend

# A scope around one wait for vLLM (an answer, a stream's next line), cancelled when a
# stopping gateway cuts what still waits (`ShutdownGate.cuttable`).
UpstreamWait = Callable[[], AbstractContextManager[anyio.CancelScope]]


@dataclass(frozen=True)
class Target:
    """Where a completion goes and how its answer comes back.

    `upstream_model` is the name the backend knows the model by (an adapter's internal name,
    or the served base model), `client_model` the one the client sent; `prepare` runs on the
    chosen backend before the request is sent (loading the adapter there)."""

    path: str
    body: dict
    client_model: str
    upstream_model: str
    request_id: str
    meter: RequestMeter
    prepare: Callable[[Backend], Awaitable[None]] | None = None
    hide_usage: bool = False

    @property
    def adapter(self) -> str | None:
        """The adapter's internal name, which routing places by; None for the base model."""
        return None if self.prepare is None else self.upstream_model

    def scrub(self, text: str) -> str:
        return text.replace(self.upstream_model, self.client_model)
