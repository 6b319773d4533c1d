"""Sending a completion request to a backend, and relaying a plain answer.

The backend is the one routing puts first; the next is tried while one fails before it
answered. Only `model` is rewritten on the way back (the internal name becomes the client's
name again; error messages are scrubbed of it too); vLLM's errors are translated into the
gateway's. A non-streaming request whose client disconnects is cancelled, which makes vLLM
abort the generation; a stream is handed to `stream_relay` once vLLM has answered 200.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable
from typing import TypeVar

import httpx
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive

from gateway.errors import BackendError, BackendUnavailable, BackendUnreachable, ShuttingDown
from gateway.telemetry.records import CLIENT_CLOSED_REQUEST
from gateway.tenancy.limits import Lease
from gateway.upstream import engine_errors, stream_events
from gateway.upstream.pool import Backend, BackendPool, Visit
from gateway.upstream.stream_relay import UpstreamStream
from gateway.upstream.target import Target, UpstreamWait

T = TypeVar("T")

log = logging.getLogger(__name__)


async def forward(request: Request, target: Target, pool: BackendPool, lease: Lease,
                  upstream_wait: UpstreamWait) -> Response:
    """Relay `target` to a backend; `lease` is released, and the request stops counting in
    the backend's load, when the answer is complete. Each wait for vLLM (the answer, then
    each line of a stream) runs in an `upstream_wait` scope; cut, it answers `ShuttingDown`."""
    stream = target.body.get("stream") is True
    handed_off = False
    visit: Visit | None = None
    try:
        with target.meter.failures():
            with upstream_wait() as wait:
                opened = await _unless_disconnected(request, _open(target, pool, stream))
            if wait.cancelled_caught:
                raise ShuttingDown()
        if opened is None:
            target.meter.finish(CLIENT_CLOSED_REQUEST)
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        visit, upstream = opened
        if stream and upstream.status_code == 200:
            handed_off = True
            return UpstreamStream(upstream, target, lease, visit,
                                  lambda: pool.mark_down(visit.backend), upstream_wait)
        with target.meter.failures():
            if stream:
                await _read_whole(upstream)
            return _relay(upstream, target)
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
    """Send to the backend routing puts first, trying the next while one fails before it
    answered: unreachable, closing the connection without an answer, or failing while the
    adapter is loaded there."""
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
    """vLLM's answer, or None if `backend` gave none (the pool has marked it down): it could
    not be connected to, closed the connection first, or failed while the adapter was loaded
    there.
    An adapter that vLLM lost behind the gateway's back is loaded again, and the request
    sent again, once."""
    response = await _send_once(target, pool, backend, stream)
    if response is not None and await _adapter_lost(response, target):
        log.info("request %s: %s no longer has %s; loading it again", target.request_id,
                 backend.url, target.upstream_model)
        backend.adapters.discard(target.upstream_model)
        response = await _send_once(target, pool, backend, stream)
    return response


async def _adapter_lost(response: httpx.Response, target: Target) -> bool:
    """Whether vLLM answered that an adapter the gateway loaded there does not exist.

    Gateway replicas sharing a vLLM each keep their own record of what they loaded there, so
    one cannot see another unload it (an adapter removed and re-added with the same content
    keeps its name). Such a 404 comes before any stream starts; it is read to tell. The
    gateway's record may already say "not loaded": another request found the loss first and
    is loading the adapter again, which this one then waits for."""
    if target.adapter is None or response.status_code != 404:
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
        log.warning("request %s: %s gave no answer; trying another replica",
                    target.request_id, backend.url)
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


def _relay(upstream: httpx.Response, target: Target) -> Response:
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
    return Response(stream_events.dumps(data), status_code=upstream.status_code,
                    headers=headers, media_type="application/json")


def _relay_error(upstream: httpx.Response, target: Target) -> Response:
    target.meter.upstream_finished()
    status, body = engine_errors.translate(upstream.status_code, target.scrub(upstream.text))
    target.meter.finish(status)
    if status >= 500:
        log.warning("request %s: the backend answered %d: %s", target.request_id,
                    upstream.status_code, body["error"]["message"])
    return Response(stream_events.dumps(body), status_code=status,
                    media_type="application/json", headers={"X-Request-Id": target.request_id})
