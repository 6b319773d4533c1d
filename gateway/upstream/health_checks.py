"""Keeping backend health current, and the gateway's own `/health`.

A backend found down is forgotten by the registry (through the pool's down listeners); when
it is back and loading is eager, its adapters are loaded again at once.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter
from starlette.responses import JSONResponse

from gateway.errors import GatewayError
from gateway.registry import AdapterRegistry
from gateway.upstream.pool import Backend, BackendPool

HEALTH_INTERVAL_S = 5.0

log = logging.getLogger(__name__)


def health_router(pool: BackendPool) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health() -> JSONResponse:
        if pool.any_healthy:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable"}, status_code=503)

    return router


async def refresh(pool: BackendPool, registry: AdapterRegistry, *, eager: bool) -> None:
    """One health round; with `eager`, reload every adapter on backends that came back."""
    was_down = {backend.url for backend in pool.backends if not backend.healthy}
    await pool.check_health()
    if eager:
        await load_eagerly(registry, [backend for backend in pool.backends
                                      if backend.healthy and backend.url in was_down])


async def load_eagerly(registry: AdapterRegistry, backends: list[Backend]) -> None:
    """Every adapter onto `backends` now; a failure is logged, and first use retries it."""
    for backend in backends:
        try:
            await registry.load_all(backend)
        except GatewayError as exc:
            log.warning("eager loading on %s failed: %s", backend.url, exc)


async def watch(pool: BackendPool, registry: AdapterRegistry, *, eager: bool,
                interval_s: float = HEALTH_INTERVAL_S) -> None:
    """Health rounds until cancelled; one failing round must not end the watching."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await refresh(pool, registry, eager=eager)
        except Exception:
            log.exception("backend health check failed")
