"""`/metrics` (Prometheus text format) and the live `/dashboard` with its JSON feed.

Both are read-only views of the gateway's telemetry, behind the same access rule
(`[metrics] access`): loopback clients need no key by default, others a metrics or admin key.
The dashboard is a static page (no CDN, nothing fetched from outside) that polls
`/dashboard/data`; the page itself holds no data, so it is served to anyone.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from importlib import resources

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.errors import NotFound
from gateway.telemetry.hub import Telemetry
from gateway.tenancy.access import Access

ASSETS = resources.files("gateway.telemetry") / "dashboard"
ASSET_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8"}


def observability_router(access: Access, telemetry: Telemetry,
                         tenants: Callable[[], Awaitable[list[dict]]]) -> APIRouter:
    """`tenants`: each tenant's use against its limits, for the dashboard."""
    router = APIRouter()

    @router.get("/metrics")
    async def metrics(request: Request) -> Response:
        access.metrics_reader(request)
        return Response(generate_latest(telemetry.metrics.registry),
                        media_type=CONTENT_TYPE_LATEST)

    @router.get("/dashboard")
    async def dashboard() -> Response:
        return _asset("index.html")

    @router.get("/dashboard/assets/{name}")
    async def dashboard_asset(name: str) -> Response:
        return _asset(name)

    @router.get("/dashboard/data")
    async def dashboard_data(request: Request) -> JSONResponse:
        access.metrics_reader(request)
        return JSONResponse({**telemetry.window.summary(),
                             "engine": telemetry.engine_cost.summary(),
                             "tenants": await tenants(),
                             "generated_at": time.time()},
                            headers={"Cache-Control": "no-store"})

    return router


def _asset(name: str) -> Response:
    """A file of the dashboard package by exact name (no paths: nothing else is reachable)."""
    suffix = name[name.rfind("."):] if "." in name else ""
    asset = ASSETS / name
    if "/" in name or suffix not in ASSET_TYPES or not asset.is_file():
        raise NotFound(f"No dashboard file named '{name}'", code="not_found")
    return Response(asset.read_bytes(), media_type=ASSET_TYPES[suffix],
                    headers={"Cache-Control": "no-cache"})
