"""The gateway's ASGI app: OpenAI routes, the admin API, `/health`, `/metrics` and
`/dashboard`, nothing else.

FastAPI's docs and schema routes are off, and no route forwards to vLLM other than the two
completion routes, so none of vLLM's own routes is reachable through the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from gateway.accounting import Accounting
from gateway.api.admin_routes import admin_router, is_upload_path
from gateway.api.body_limit import BodyLimitMiddleware
from gateway.api.error_handlers import install_error_handlers
from gateway.api.health_route import health_router
from gateway.api.json_body import JsonBodyMiddleware
from gateway.api.limit_routes import limit_router
from gateway.api.observability_routes import observability_router
from gateway.api.openai_routes import openai_router
from gateway.api.request_ids import RequestIdMiddleware
from gateway.api.shutdown_gate import ShutdownGate, ShutdownGateMiddleware
from gateway.api.slow_clients import WriteTimeoutMiddleware
from gateway.config import GatewayConfig
from gateway.errors import RegistryUnavailable
from gateway.registry import AdapterRegistry
from gateway.registry.sync import follow
from gateway.telemetry.hub import Telemetry
from gateway.tenancy.access import Access
from gateway.upstream.health_checks import load_eagerly, watch
from gateway.upstream.pool import BackendPool


def create_app(config: GatewayConfig, registry: AdapterRegistry, backends: BackendPool) -> FastAPI:
    """The app over an already-filled registry; the caller owns (and closes) `backends`."""
    eager = config.adapters.eager

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await backends.discover()
        await backends.check_health()
        if eager:
            await load_eagerly(registry, backends.healthy())
        await _refresh_limits(accounting)
        tasks = [asyncio.create_task(watch(backends, registry, eager=eager)),
                 asyncio.create_task(follow(registry)),
                 asyncio.create_task(accounting.run())]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
            await accounting.aclose()

    app = FastAPI(title="dora-gateway", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    access = Access(config.tenants, admin_keys=config.admin_key_digests,
                    metrics_keys=config.metrics.key_digests, metrics_access=config.metrics.access,
                    cache_salt_secret=config.server.cache_salt_secret)
    telemetry = Telemetry(config.metrics.window_seconds)
    telemetry.watch(access.in_flight, backends.health, registry.entries)
    accounting = Accounting.build(config.limits, config.tenants, registry.database, telemetry)
    backends.on_metrics(telemetry.engine_metrics_read)
    registry.add_observer(telemetry)
    app.state.shutdown_gate = ShutdownGate()
    app.state.accounting = accounting
    app.include_router(openai_router(access, accounting.quota, registry, backends, telemetry,
                                     app.state.shutdown_gate.cuttable))
    app.include_router(admin_router(access, registry, backends, eager=eager,
                                    max_source_bytes=config.adapters.max_upload_bytes))
    app.include_router(limit_router(access, {tenant.name: tenant for tenant in config.tenants},
                                    accounting.book, accounting.quota, accounting.ledger))
    app.include_router(health_router(backends, accounting))
    app.include_router(observability_router(access, telemetry, lambda: accounting.tenants_view(
        config.tenants, access.in_flight())))
    install_error_handlers(app)

    def body_limit(path: str) -> int:
        if is_upload_path(path):
            return config.adapters.max_upload_bytes
        return config.server.max_body_bytes

    # Outermost last: every answer has an id, a stopping gateway refuses before reading.
    app.add_middleware(WriteTimeoutMiddleware,
                       timeout_s=config.server.stream_write_timeout_seconds)
    app.add_middleware(JsonBodyMiddleware)
    app.add_middleware(BodyLimitMiddleware, limit_for=body_limit)
    app.add_middleware(ShutdownGateMiddleware, gate=app.state.shutdown_gate)
    app.add_middleware(RequestIdMiddleware)
    return app


async def _refresh_limits(accounting: Accounting) -> None:
    """Admin-set limits in force from the first request (the database was reached at start;
    if it has just gone, the config's hold until it is back)."""
    with contextlib.suppress(RegistryUnavailable):
        await accounting.book.refresh()
