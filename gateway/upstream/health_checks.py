"""Keeping the routing table current, and loading every adapter onto a backend eagerly.

Each round re-resolves the DNS names among the backends (replicas join and leave), checks
every replica's health and reads the load vLLM reports. A backend found down forgets its
adapters (the pool tells the adapter loader); when it is back, or has just joined, and
loading is eager, its adapters are loaded at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Protocol

from gateway.errors import GatewayError
from gateway.upstream.pool import Backend, BackendPool

HEALTH_INTERVAL_S = 5.0

log = logging.getLogger(__name__)


class AdapterSet(Protocol):
    """The adapters to load eagerly (the registry)."""

    async def load_all(self, backend: Backend) -> None: ...


async def refresh(pool: BackendPool, adapters: AdapterSet, *, eager: bool) -> None:
    """One round; with `eager`, load every adapter on backends that came back or joined."""
    await pool.discover()
    was_down = {backend.url for backend in pool.backends if not backend.healthy}
    await pool.check_health()
    if eager:
        await load_eagerly(adapters, [backend for backend in pool.backends
                                      if backend.healthy and backend.url in was_down])


async def load_eagerly(adapters: AdapterSet, backends: Sequence[Backend]) -> None:
    """Every adapter onto `backends` now; a failure is logged, and first use retries it."""
    for backend in backends:
        try:
            await adapters.load_all(backend)
        except GatewayError as exc:
            log.warning("eager loading on %s failed: %s", backend.url, exc)


async def watch(pool: BackendPool, adapters: AdapterSet, *, eager: bool,
                interval_s: float = HEALTH_INTERVAL_S) -> None:
    """Health rounds until cancelled; one failing round must not end the watching."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await refresh(pool, adapters, eager=eager)
        except Exception:
            log.exception("backend health check failed")
