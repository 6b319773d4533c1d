"""Loading compiled adapters into vLLM backends once each, and unloading them.

vLLM keeps runtime-loaded adapters by name (`/v1/load_lora_adapter`), so the gateway tracks
which backend has which internal name, loads on first use (or eagerly), and forgets a
backend's adapters when it goes down: a restarted vLLM has none of them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from gateway.backend import Backend, BackendPool
from gateway.errors import BackendError, GatewayError

LOAD_PATH = "/v1/load_lora_adapter"
UNLOAD_PATH = "/v1/unload_lora_adapter"

log = logging.getLogger(__name__)


class LoraLoader:
    """`on_loaded(internal_name, seconds)` is told of every load that reached a backend."""

    def __init__(self, pool: BackendPool,
                 on_loaded: Callable[[str, float], None] = lambda name, seconds: None) -> None:
        self._pool = pool
        self._on_loaded = on_loaded
        self._loaded: dict[str, set[str]] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        pool.on_down(self.forget_backend)

    def loaded_on(self, internal_name: str) -> list[str]:
        return sorted(self._loaded.get(internal_name, ()))

    def is_loaded(self, internal_name: str, url: str) -> bool:
        return url in self._loaded.get(internal_name, ())

    def forget_backend(self, url: str) -> None:
        for urls in self._loaded.values():
            urls.discard(url)

    async def ensure_loaded(self, internal_name: str, compiled_path: Path, backend: Backend,
                            still_wanted: Callable[[], bool]) -> bool:
        """Load on `backend` unless already there; False (and nothing loaded) if the adapter
        was removed meanwhile, so a removal never races a load into a leaked slot."""
        if self.is_loaded(internal_name, backend.url):
            return True
        async with self._lock(internal_name, backend.url):
            if self.is_loaded(internal_name, backend.url):
                return True
            if not still_wanted():
                return False
            started = time.perf_counter()
            response = await self._pool.post(
                backend, LOAD_PATH, {"lora_name": internal_name, "lora_path": str(compiled_path)})
            if response.status_code != 200 and not _already_loaded(response):
                raise BackendError(f"The model backend could not load the adapter: "
                                   f"{_message(response)}")
            self._on_loaded(internal_name, time.perf_counter() - started)
            self._loaded.setdefault(internal_name, set()).add(backend.url)
            return True

    async def unload_everywhere(self, internal_name: str) -> None:
        """Free the adapter's slot on every backend that has (or is loading) it."""
        urls = sorted(url for name, url in self._locks if name == internal_name)
        for url in urls:
            async with self._locks[(internal_name, url)]:
                if self.is_loaded(internal_name, url):
                    await self._unload(internal_name, self._pool.by_url(url))
            del self._locks[(internal_name, url)]
        self._loaded.pop(internal_name, None)

    async def _unload(self, internal_name: str, backend: Backend) -> None:
        """Best effort: a backend that is down has lost its adapters anyway."""
        try:
            response = await self._pool.post(backend, UNLOAD_PATH, {"lora_name": internal_name})
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
