"""Relaying a stream: vLLM's SSE lines as they arrive, with `model` rewritten, errors in the
gateway's dialect, and `usage` (which the gateway always asks vLLM for) dropped again for
clients that did not ask for it.

However a stream ends on the client side, the upstream response is closed, which makes vLLM
abort the generation. A stream that breaks, or that a stopping gateway cuts, ends with an
error event, so clients see why it stopped. The request's meter sees each generated-text
chunk relayed, vLLM's token counts and how the stream ended.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable

import anyio
import httpx
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway.errors import BackendError, BackendTimeout, GatewayError, ShuttingDown
from gateway.telemetry.latency import carries_generated_text
from gateway.telemetry.meter import RequestMeter
from gateway.telemetry.records import CLIENT_CLOSED_REQUEST
from gateway.tenancy.limits import Lease
from gateway.upstream import engine_errors, stream_events
from gateway.upstream.pool import Visit
from gateway.upstream.target import Target, UpstreamWait

log = logging.getLogger(__name__)


class UpstreamStream(StreamingResponse):
    """An SSE relay that owns the upstream response and the tenant's concurrency lease."""

    def __init__(self, upstream: httpx.Response, target: Target, lease: Lease, visit: Visit,
                 on_backend_failure: Callable[[], None], upstream_wait: UpstreamWait) -> None:
        self._events = _relay_events(upstream, target, on_backend_failure, lease.release,
                                     upstream_wait)
        super().__init__(self._events, media_type="text/event-stream",
                         headers={"X-Request-Id": target.request_id, "Cache-Control": "no-cache"})
        self._upstream = upstream
        self._lease = lease
        self._visit = visit
        self._target = target

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._events.aclose()
                await self._upstream.aclose()
            self._lease.release()
            self._visit.end()
            self._target.meter.finish(CLIENT_CLOSED_REQUEST)


async def _relay_events(upstream: httpx.Response, target: Target,
                        on_backend_failure: Callable[[], None],
                        on_finished: Callable[[], None],
                        upstream_wait: UpstreamWait) -> AsyncIterator[str]:
    """vLLM's SSE lines with `model` rewritten; a broken or cut upstream ends the stream with
    an error event, so clients see why it stopped. `on_finished` runs before the last event is
    relayed: a client may start its next request as soon as it has that event, while vLLM
    and the server are still closing this one."""
    finished = False
    error: GatewayError = BackendError("The model backend closed the stream before it finished")
    dropped = False
    lines = upstream.aiter_lines()
    try:
        while True:
            with upstream_wait() as wait:
                line = await anext(lines, None)
            if wait.cancelled_caught:
                error = ShuttingDown()
                break
            if line is None:
                break
            if line.startswith("data:"):
                payload = line[len("data:"):].strip()
                chunk = _parse(payload)
                line = _rewrite_chunk(payload, chunk, target)
                finished = stream_events.ends_stream(payload, chunk)
                if finished:  # complete, even if the client leaves before the stream closes
                    target.meter.upstream_finished()
                    target.meter.finish(200)
                    on_finished()
            elif dropped and not line:
                line = None  # the blank line that ended a dropped event
            dropped = line is None
            if line is not None:
                yield line + "\n"
    except httpx.TimeoutException:
        error = BackendTimeout("The model backend timed out during the stream")
    except httpx.TransportError as exc:
        log.warning("stream %s broke: %r", target.request_id, exc)
        error = BackendError("The model backend failed during the stream")
        on_backend_failure()
    if finished:
        return
    target.meter.upstream_finished()
    target.meter.finish(error.status)
    yield stream_events.failure_lines(error.body()["error"],
                                      target.path == stream_events.RESPONSES_PATH)


def _parse(payload: str) -> object:
    try:
        return json.loads(payload)
    except ValueError:
        return None


def _rewrite_chunk(payload: str, chunk: object, target: Target) -> str | None:
    """The SSE line to relay for one chunk (`payload`, parsed: `chunk`), or None to drop it
    (a usage-only chunk for a client that did not ask for usage)."""
    if not isinstance(chunk, dict):
        return "data: " + payload
    _meter_chunk(chunk, target.meter)
    if target.hide_usage and "usage" in chunk:
        if not chunk.get("choices"):
            return None
        del chunk["usage"]
    if "error" in chunk:
        return "data: " + stream_events.dumps(engine_errors.translate_event(
            json.loads(target.scrub(payload))["error"]))
    stream_events.rename_model(chunk, target.client_model)
    return "data: " + stream_events.dumps(chunk)


def _meter_chunk(chunk: dict, meter: RequestMeter) -> None:
    usage = stream_events.usage_of(chunk)
    if usage:
        meter.usage(usage)
    if carries_generated_text(chunk):
        meter.text_relayed()
