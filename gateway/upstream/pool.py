"""The vLLM replicas behind the gateway: the routing table, their health and load, and
requests to them.

Each replica is addressed on its own, by URL: static URLs, and DNS names
(`dns+http://NAME:PORT`, `upstream.discovery`) that stand for every address they resolve to,
re-resolved by `discover`. A replica that joins is health-checked before it takes requests;
one that leaves is dropped from the table at once (requests already on it finish). One
`httpx.AsyncClient` serves every replica; it is injectable so tests can put any transport
underneath. A replica that fails a connection is marked down at once, and listeners are told,
because whatever it had loaded (LoRA adapters) may be gone when it comes back; the periodic
health check marks it up again. Which healthy replica a request goes to is the routing
policy's choice (`upstream.routing`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx

from gateway.errors import (
    BackendDropped,
    BackendTimeout,
    BackendUnavailable,
    BackendUnreachable,
)
from gateway.upstream.discovery import Discovery, DnsName, Resolver, system_resolver
from gateway.upstream.routing import RoutingPolicy
from gateway.upstream.vllm_api import HEALTH_PATH, METRICS_PATH, requests_held

HEALTH_TIMEOUT_S = 5.0
# Non-streaming generations on CPU can take minutes; a stream's read timeout is per chunk.
CLIENT_TIMEOUT = httpx.Timeout(connect=5.0, read=600.0, write=60.0, pool=60.0)
# httpx's default limits, except that a connection idle for 2 s is not reused: vLLM closes
# one idle for 5 s (VLLM_HTTP_TIMEOUT_KEEP_ALIVE), and httpx would reuse it for up to 5 s. A
# request sent on a connection at the moment vLLM closes it fails without an answer, and
# would mark a healthy replica down.
CLIENT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20,
                             keepalive_expiry=2.0)

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Backend:
    """One replica. `adapters`: the internal names the gateway loaded there; `active`: the
    adapters with this gateway's requests in flight there, and how many; `foreign_load`: the
    requests vLLM held beyond this gateway's own at its last metrics reading (another
    gateway's, say)."""

    url: str
    healthy: bool = True
    adapters: set[str] = field(default_factory=set)
    in_flight: int = 0
    active: Counter[str] = field(default_factory=Counter)
    foreign_load: int = 0

    @property
    def load(self) -> int:
        return self.in_flight + self.foreign_load


class Visit:
    """One request on one replica, counted in the replica's load until `end`."""

    def __init__(self, backend: Backend, adapter: str | None) -> None:
        self.backend = backend
        self._adapter = adapter
        self._ended = False
        backend.in_flight += 1
        if adapter is not None:
            backend.active[adapter] += 1

    def end(self) -> None:
        if self._ended:
            return
        self._ended = True
        self.backend.in_flight -= 1
        if self._adapter is not None:
            self.backend.active[self._adapter] -= 1
            if self.backend.active[self._adapter] <= 0:
                del self.backend.active[self._adapter]


class BackendPool:
    """`backends`: http(s) URLs and `dns+http(s)://NAME:PORT` names (resolved by
    `resolver`)."""

    def __init__(self, backends: Sequence[str] = (), client: httpx.AsyncClient | None = None,
                 *, routing: RoutingPolicy | None = None,
                 resolver: Resolver = system_resolver) -> None:
        parsed = [(spec, DnsName.parse(spec)) for spec in backends]
        names = [name for _, name in parsed if name is not None]
        self._static = [spec.rstrip("/") for spec, name in parsed if name is None]
        self._table = {url: Backend(url) for url in self._static}
        self._discovery = Discovery(names, resolver) if names else None
        self.routing = routing or RoutingPolicy()
        self.client = client or httpx.AsyncClient(timeout=CLIENT_TIMEOUT, limits=CLIENT_LIMITS)
        self._turn = 0
        self._down_listeners: list[Callable[[str], None]] = []
        self._metrics_readers: list[Callable[[str, str], None]] = []

    @property
    def backends(self) -> tuple[Backend, ...]:
        """The routing table now."""
        return tuple(self._table.values())

    def on_down(self, listener: Callable[[str], None]) -> None:
        """Call `listener(url)` whenever a replica goes from healthy to down, or leaves."""
        self._down_listeners.append(listener)

    def on_metrics(self, reader: Callable[[str, str], None]) -> None:
        """Call `reader(url, text)` with every `/metrics` text read from a replica."""
        self._metrics_readers.append(reader)

    @property
    def any_healthy(self) -> bool:
        return any(backend.healthy for backend in self._table.values())

    def health(self) -> dict[str, bool]:
        """Whether each replica is up, by URL."""
        return {backend.url: backend.healthy for backend in self._table.values()}

    def healthy(self) -> list[Backend]:
        return [backend for backend in self._table.values() if backend.healthy]

    def candidates(self, adapter: str | None = None) -> list[Backend]:
        """The healthy replicas for a request (for `adapter`, an internal name, or the base
        model), in the routing policy's order: the first is tried, then the others."""
        healthy = self.healthy()
        if not healthy:
            raise BackendUnavailable()
        order = self.routing.order(healthy, adapter, self._turn)
        self._turn += 1
        return order

    def get(self, url: str) -> Backend | None:
        return self._table.get(url)

    def by_url(self, url: str) -> Backend:
        return self._table[url]

    def mark_down(self, backend: Backend) -> None:
        if backend.healthy:
            log.warning("backend %s is down", backend.url)
            backend.healthy = False
            self._tell_down(backend.url)

    async def discover(self) -> None:
        """Re-resolve the DNS names: replicas that joined enter the table down (the next
        health check lets them in), replicas that left are dropped from it."""
        if self._discovery is None:
            return
        wanted = set(self._static) | await self._discovery.urls()
        for url in sorted(wanted - set(self._table)):
            log.info("replica %s joined", url)
            self._table[url] = Backend(url, healthy=False)
        for url in sorted(set(self._table) - wanted):
            log.info("replica %s left", url)
            backend = self._table.pop(url)
            backend.healthy = False
            self._tell_down(url)

    async def check_health(self) -> None:
        """Health of every replica, and the load vLLM reports on those that are up."""
        await asyncio.gather(*(self._check_and_read_load(backend)
                               for backend in self._table.values()))

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

    async def _check_and_read_load(self, backend: Backend) -> None:
        if await self.check(backend):
            await self.read_load(backend)

    async def read_load(self, backend: Backend) -> None:
        """Note the requests vLLM holds beyond this gateway's own in flight there; a replica
        whose metrics cannot be read counts its own requests only."""
        own = backend.in_flight
        try:
            response = await self.client.get(backend.url + METRICS_PATH,
                                              timeout=HEALTH_TIMEOUT_S)
            held = requests_held(response.text) if response.status_code == 200 else own
        except (httpx.HTTPError, ValueError, IndexError):
            held = own
        else:
            if response.status_code == 200:
                for reader in self._metrics_readers:
                    reader(backend.url, response.text)
        backend.foreign_load = max(0, held - own)

    async def post(self, backend: Backend, path: str, payload: dict,
                   headers: dict[str, str] | None = None) -> httpx.Response:
        """POST JSON and read the whole answer."""
        return await self.send(backend, path, payload, headers, stream=False)

    async def send(self, backend: Backend, path: str, payload: dict,
                   headers: dict[str, str] | None = None, *, stream: bool) -> httpx.Response:
        """POST JSON; with `stream`, the caller reads the body and must close the response.

        Transport failures become gateway errors: `BackendUnreachable` (never sent) or its
        `BackendDropped` (the connection closed before an answer), after which another
        replica may be tried, or `BackendTimeout`.
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
            raise BackendDropped("The model backend failed; retry shortly") from exc

    def _tell_down(self, url: str) -> None:
        for listener in self._down_listeners:
            listener(url)

    async def aclose(self) -> None:
        await self.client.aclose()
