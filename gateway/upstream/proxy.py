"""Sending a completion request to a backend and relaying the answer, streamed or not.

Only `model` is rewritten on the way back (the internal name becomes the client's name
again; error messages are scrubbed of it too), and a stream's `usage`, which the gateway
always asks vLLM for, is dropped again for clients that did not ask for it. Streams are
relayed line by line as they arrive; however a stream ends on the client side, the upstream
response is closed, which makes vLLM abort the generation. A non-streaming request whose
client disconnects is cancelled for the same reason. The request's meter sees each
generated-text chunk relayed, vLLM's token counts and how the request ended.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio
import httpx
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway.errors import BackendError, BackendUnavailable, BackendUnreachable, error_body
from gateway.telemetry.latency import carries_generated_text
from gateway.telemetry.meter import RequestMeter
from gateway.tenancy.limits import Lease
from gateway.upstream import engine_errors, stream_events
from gateway.upstream.pool import Backend, BackendPool, Visit

CLIENT_CLOSED_REQUEST = 499
GATEWAY_TIMEOUT = 504
T = TypeVar("T")

log = logging.getLogger(__name__)


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


async def forward(request: Request, target: Target, pool: BackendPool, lease: Lease) -> Response:
    """Relay `target` to a backend; `lease` is released, and the request stops counting in
    the backend's load, when the answer is complete."""
    stream = target.body.get("stream") is True
    handed_off = False
    visit: Visit | None = None
    try:
        with target.meter.failures():
            opened = await _unless_disconnected(request, _open(target, pool, stream))
        if opened is None:
            target.meter.finish(CLIENT_CLOSED_REQUEST)
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        visit, upstream = opened
        if stream and upstream.status_code == 200:
            handed_off = True
            return UpstreamStream(upstream, target, lease, visit,
                                  lambda: pool.mark_down(visit.backend))
        with target.meter.failures():
            if stream:
                await _read_whole(upstream)
            return relay(upstream, target)
    finally:
        if not handed_off:
            lease.release()
            if visit is not None:
                visit.end()


async def _read_whole(upstream: httpx.Response) -> None:
    """The body of a streamed request that vLLM refused (a JSON error, not a stream)."""
    try:
        await upstream.aread()
    except httpx.HTTPError as exc:
        raise BackendError("The model backend failed while answering") from exc
    finally:
        await upstream.aclose()


async def _open(target: Target, pool: BackendPool, stream: bool,
                ) -> tuple[Visit, httpx.Response]:
    """Send to the backend routing puts first, trying the next while one fails before the
    request reached it: unreachable, or failing while the adapter is loaded there."""
    for backend in pool.candidates(target.adapter):
        visit = Visit(backend, target.adapter)
        try:
            response = await _send(target, pool, backend, stream)
        except BaseException:
            visit.end()
            raise
        if response is not None:
            return visit, response
        visit.end()
    raise BackendUnavailable()


async def _send(target: Target, pool: BackendPool, backend: Backend,
                stream: bool) -> httpx.Response | None:
    """vLLM's answer, or None if the request did not reach `backend` (the pool has marked it
    down): it could not be connected to, or it failed while the adapter was loaded there.
    An adapter that vLLM lost behind the gateway's back is loaded again, and the request
    sent again, once."""
    response = await _send_once(target, pool, backend, stream)
    if response is not None and await _adapter_lost(response, target, backend):
        log.info("request %s: %s no longer has %s; loading it again", target.request_id,
                 backend.url, target.upstream_model)
        backend.adapters.discard(target.upstream_model)
        response = await _send_once(target, pool, backend, stream)
    return response


async def _adapter_lost(response: httpx.Response, target: Target, backend: Backend) -> bool:
    """Whether vLLM answered that an adapter the gateway loaded on `backend` does not exist.

    Gateway replicas sharing a vLLM each keep their own record of what they loaded there, so
    one cannot see another unload it (an adapter removed and re-added with the same content
    keeps its name). Such a 404 comes before any stream starts; it is read to tell."""
    if (target.adapter is None or response.status_code != 404
            or target.adapter not in backend.adapters):
        return False
    await _read_whole(response)
    return f"The model `{target.upstream_model}` does not exist" in response.text


async def _send_once(target: Target, pool: BackendPool, backend: Backend,
                     stream: bool) -> httpx.Response | None:
    try:
        if target.prepare is not None:
            await target.prepare(backend)
    except BackendUnavailable:
        return None
    target.meter.upstream_started()
    try:
        return await pool.send(backend, target.path, target.body,
                               {"X-Request-Id": target.request_id}, stream=stream)
    except BackendUnreachable:
        return None


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """`work`'s result, or None (with `work` cancelled) if the client goes away first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
    return None if task.cancelled() else task.result()


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def relay(upstream: httpx.Response, target: Target) -> Response:
    """vLLM's answer with its status; `model` rewritten, errors in the gateway's dialect."""
    if upstream.status_code >= 400:
        return _relay_error(upstream, target)
    target.meter.upstream_finished()
    text = upstream.text
    headers = {"X-Request-Id": target.request_id}
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        target.meter.usage(stream_events.usage_of(data))
    target.meter.finish(upstream.status_code)
    if data is None:
        return Response(text, status_code=upstream.status_code, headers=headers,
                        media_type=upstream.headers.get("content-type"))
    if isinstance(data, dict):
        stream_events.rename_model(data, target.client_model)
    return Response(_dumps(data), status_code=upstream.status_code, headers=headers,
                    media_type="application/json")


def _relay_error(upstream: httpx.Response, target: Target) -> Response:
    target.meter.upstream_finished()
    status, body = engine_errors.translate(upstream.status_code, target.scrub(upstream.text))
    target.meter.finish(status)
    if status >= 500:
        log.warning("request %s: the backend answered %d: %s", target.request_id,
                    upstream.status_code, body["error"]["message"])
    return Response(_dumps(body), status_code=status, media_type="application/json",
                    headers={"X-Request-Id": target.request_id})


class UpstreamStream(StreamingResponse):
    """An SSE relay that owns the upstream response and the tenant's concurrency lease."""

    def __init__(self, upstream: httpx.Response, target: Target, lease: Lease, visit: Visit,
                 on_backend_failure: Callable[[], None]) -> None:
        self._events = _relay_events(upstream, target, on_backend_failure)
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
                        on_backend_failure: Callable[[], None]) -> AsyncIterator[str]:
    """vLLM's SSE lines with `model` rewritten; a broken upstream ends the stream with an
    error event, so clients see why it stopped."""
    finished = False
    failure, status = "The model backend closed the stream before it finished", BackendError.status
    dropped = False
    try:
        async for line in upstream.aiter_lines():
            if line.startswith("data:"):
                payload = line[len("data:"):].strip()
                chunk = _parse(payload)
                line = _rewrite_chunk(payload, chunk, target)
                finished = stream_events.ends_stream(payload, chunk)
                if finished:  # complete, even if the client leaves before the stream closes
                    target.meter.upstream_finished()
                    target.meter.finish(200)
            elif dropped and not line:
                line = None  # the blank line that ended a dropped event
            dropped = line is None
            if line is not None:
                yield line + "\n"
    except httpx.TimeoutException:
        failure, status = "The model backend timed out during the stream", GATEWAY_TIMEOUT
    except httpx.TransportError as exc:
        log.warning("stream %s broke: %r", target.request_id, exc)
        failure = "The model backend failed during the stream"
        on_backend_failure()
    if finished:
        return
    target.meter.upstream_finished()
    target.meter.finish(status)
    error = error_body(failure, BackendError.error_type, code=BackendError.code)["error"]
    yield stream_events.failure_lines(error, target.path == stream_events.RESPONSES_PATH)


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
        return "data: " + _dumps(engine_errors.translate_event(
            json.loads(target.scrub(payload))["error"]))
    stream_events.rename_model(chunk, target.client_model)
    return "data: " + _dumps(chunk)


def _meter_chunk(chunk: dict, meter: RequestMeter) -> None:
    usage = stream_events.usage_of(chunk)
    if usage:
        meter.usage(usage)
    if carries_generated_text(chunk):
        meter.text_relayed()


def _dumps(data: object) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))
