"""Loading compiled adapters into vLLM backends once each, and unloading them.

vLLM keeps runtime-loaded adapters by name (`/v1/load_lora_adapter`), so the gateway tracks
which backend has which internal name (`Backend.adapters`, which routing reads too), loads on
first use (or eagerly), and forgets a backend's adapters when it goes down or leaves: a
restarted vLLM has none of them.

A load that a healthy backend refuses (vLLM answers 500 to every failed load, so health tells
a refusal from a dying engine) is the adapter's fault: it is remembered with the engine's
reason, and requests for it get that reason (a 400) without asking the engine again, until
the backend restarts (it may come back with other settings) or the adapter is removed. A
backend that could not fetch the adapter from the object store did not refuse it: that load
fails (a 502) and the next request tries again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from adapters.plugin_env import FETCH_FAILED
from gateway.errors import AdapterUnavailable, BackendUnreachable, GatewayError, StoreFailed
from gateway.upstream.pool import Backend, BackendPool
from gateway.upstream.vllm_api import LOAD_ADAPTER_PATH, UNLOAD_ADAPTER_PATH

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Refusal:
    backend: str
    reason: str

    def error(self) -> AdapterUnavailable:
        return AdapterUnavailable(f"The model backend refused to load the adapter: "
                                  f"{self.reason}")


class LoraLoader:
    """`on_loaded(internal_name, seconds)` is told of every load a backend made (not of one
    it answered it already had), `on_refused(internal_name, refusal)` of every load a backend
    refused."""

    def __init__(self, pool: BackendPool,
                 on_loaded: Callable[[str, float], None] = lambda name, seconds: None,
                 on_refused: Callable[[str, Refusal], None] = lambda name, refusal: None,
                 ) -> None:
        self._pool = pool
        self._on_loaded = on_loaded
        self._on_refused = on_refused
        self._refused: dict[str, Refusal] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        pool.on_down(self.forget_backend)

    def loaded_on(self, internal_name: str) -> list[str]:
        return sorted(backend.url for backend in self._pool.backends
                      if internal_name in backend.adapters)

    def refusal(self, internal_name: str) -> Refusal | None:
        return self._refused.get(internal_name)

    def forget_backend(self, url: str) -> None:
        backend = self._pool.get(url)
        if backend is not None:
            backend.adapters.clear()
        for name in [name for name, refusal in self._refused.items() if refusal.backend == url]:
            del self._refused[name]

    async def ensure_loaded(self, internal_name: str, location: str, backend: Backend,
                            still_wanted: Callable[[], bool]) -> bool:
        """Load on `backend` unless already there; False (and nothing loaded) if the adapter
        was removed meanwhile, so a removal never races a load into a leaked slot.
        `AdapterUnavailable` if any backend refused it, so it is served everywhere or nowhere."""
        if internal_name in self._refused:
            raise self._refused[internal_name].error()
        if internal_name in backend.adapters:
            return True
        async with self._lock(internal_name, backend.url):
            if internal_name in backend.adapters:
                return True
            if internal_name in self._refused:
                raise self._refused[internal_name].error()
            if not still_wanted():
                return False
            started = time.perf_counter()
            response = await self._pool.post(backend, LOAD_ADAPTER_PATH, {
                "lora_name": internal_name, "lora_path": location})
            if response.status_code == 200:
                self._on_loaded(internal_name, time.perf_counter() - started)
            elif not _already_loaded(response):
                raise await self._refused_by(backend, internal_name, _message(response))
            backend.adapters.add(internal_name)
            return True

    async def unload_everywhere(self, internal_name: str) -> None:
        """Free the adapter's slot on every backend that has (or is loading) it."""
        urls = sorted(url for name, url in self._locks if name == internal_name)
        for url in urls:
            async with self._locks[(internal_name, url)]:
                backend = self._pool.get(url)
                if backend is not None and internal_name in backend.adapters:
                    await self._unload(internal_name, backend)
            del self._locks[(internal_name, url)]
        for backend in self._pool.backends:
            backend.adapters.discard(internal_name)
        self._refused.pop(internal_name, None)

    async def _refused_by(self, backend: Backend, internal_name: str,
                          reason: str) -> GatewayError:
        """The error for a failed load: a refusal if the backend is still healthy, else the
        backend is down (and another one may be tried)."""
        if not await self._pool.check(backend):
            return BackendUnreachable()
        if FETCH_FAILED in reason:
            log.warning("%s could not fetch %s: %s", backend.url, internal_name, reason)
            return StoreFailed(f"The model backend could not load the adapter: {reason}")
        refusal = Refusal(backend.url, reason)
        self._refused[internal_name] = refusal
        log.warning("%s refused to load %s: %s", backend.url, internal_name, reason)
        self._on_refused(internal_name, refusal)
        return refusal.error()

    async def _unload(self, internal_name: str, backend: Backend) -> None:
        """Best effort: a backend that is down has lost its adapters anyway."""
        try:
            response = await self._pool.post(backend, UNLOAD_ADAPTER_PATH,
                                             {"lora_name": internal_name})
        except GatewayError as exc:
            log.warning("unloading %s from %s failed: %s", internal_name, backend.url, exc)
            return
        if response.status_code != 200:
            log.warning("unloading %s from %s: %s", internal_name, backend.url,
                        _message(response))

    def _lock(self, internal_name: str, url: str) -> asyncio.Lock:
        return self._locks.setdefault((internal_name, url), asyncio.Lock())


def _already_loaded(response: httpx.Response) -> bool:
    """vLLM answers 400 to a second load of a name; names carry the content hash, so the
    adapter it has is the one we want (e.g. loaded before a gateway restart)."""
    return response.status_code == 400 and "already been loaded" in response.text


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text[:500]}"
