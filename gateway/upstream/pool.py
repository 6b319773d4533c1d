"""The vLLM servers behind the gateway: their health, round-robin choice, and requests to them.

One `httpx.AsyncClient` serves every backend; it is injectable so tests (and a later
in-process engine) can put any transport underneath. A backend that fails a connection is
marked down at once, and listeners are told, because whatever it had loaded (LoRA adapters)
may be gone when it comes back; the periodic health check marks it up again.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx

from gateway.errors import BackendTimeout, BackendUnavailable, BackendUnreachable
from gateway.upstream.vllm_api import HEALTH_PATH

HEALTH_TIMEOUT_S = 5.0
# Non-streaming generations on CPU can take minutes; a stream's read timeout is per chunk.
CLIENT_TIMEOUT = httpx.Timeout(connect=5.0, read=600.0, write=60.0, pool=60.0)

log = logging.getLogger(__name__)


@dataclass
class Backend:
    url: str
    healthy: bool = True


class BackendPool:
    def __init__(self, urls: Sequence[str], client: httpx.AsyncClient | None = None) -> None:
        self.backends = tuple(Backend(url.rstrip("/")) for url in urls)
        self.client = client or httpx.AsyncClient(timeout=CLIENT_TIMEOUT)
        self._turn = 0
        self._down_listeners: list[Callable[[str], None]] = []

    def on_down(self, listener: Callable[[str], None]) -> None:
        """Call `listener(url)` whenever a backend goes from healthy to down."""
        self._down_listeners.append(listener)

    @property
    def any_healthy(self) -> bool:
        return any(backend.healthy for backend in self.backends)

    def health(self) -> dict[str, bool]:
        """Whether each backend is up, by URL."""
        return {backend.url: backend.healthy for backend in self.backends}

    def healthy(self) -> list[Backend]:
        return [backend for backend in self.backends if backend.healthy]

    def candidates(self) -> list[Backend]:
        """The healthy backends, starting at the next one in round-robin order."""
        healthy = self.healthy()
        if not healthy:
            raise BackendUnavailable()
        start = self._turn % len(healthy)
        self._turn += 1
        return healthy[start:] + healthy[:start]

    def by_url(self, url: str) -> Backend:
        return next(backend for backend in self.backends if backend.url == url)

    def mark_down(self, backend: Backend) -> None:
        if backend.healthy:
            log.warning("backend %s is down", backend.url)
            backend.healthy = False
            for listener in self._down_listeners:
                listener(backend.url)

    async def check_health(self) -> None:
        await asyncio.gather(*(self.check(backend) for backend in self.backends))

    async def check(self, backend: Backend) -> bool:
        """Ask `backend` for its health and mark it up or down by the answer."""
        try:
            response = await self.client.get(backend.url + HEALTH_PATH, timeout=HEALTH_TIMEOUT_S)
            healthy = response.status_code == 200
        except httpx.HTTPError:
            healthy = False
        if healthy:
            backend.healthy = True
        else:
            self.mark_down(backend)
        return healthy

    async def post(self, backend: Backend, path: str, payload: dict,
                   headers: dict[str, str] | None = None) -> httpx.Response:
        """POST JSON and read the whole answer."""
        return await self.send(backend, path, payload, headers, stream=False)

    async def send(self, backend: Backend, path: str, payload: dict,
                   headers: dict[str, str] | None = None, *, stream: bool) -> httpx.Response:
        """POST JSON; with `stream`, the caller reads the body and must close the response.

        Transport failures become gateway errors: `BackendUnreachable` (never sent, another
        backend may be tried), `BackendTimeout`, or `BackendUnavailable`.
        """
        content = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        request = self.client.build_request(
            "POST", backend.url + path, content=content,
            headers={"Content-Type": "application/json", **(headers or {})})
        try:
            return await self.client.send(request, stream=stream)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            self.mark_down(backend)
            raise BackendUnreachable() from exc
        except httpx.TimeoutException as exc:
            raise BackendTimeout("The model backend timed out") from exc
        except httpx.TransportError as exc:
            self.mark_down(backend)
            raise BackendUnavailable("The model backend failed; retry shortly") from exc

    async def aclose(self) -> None:
        await self.client.aclose()
