"""The gateway's own `/health`: 200 while a backend is up (and, with `[limits] fail =
"closed"`, the rate-limit counters are reachable), else 503; the counters' state is shown."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import JSONResponse

from gateway.accounting import Accounting
from gateway.upstream.pool import BackendPool


def health_router(pool: BackendPool, accounting: Accounting) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health() -> JSONResponse:
        limits = accounting.health()
        refusing = not limits["reachable"] and limits["fail"] == "closed"
        if pool.any_healthy and not refusing:
            return JSONResponse({"status": "ok", "limits": limits})
        return JSONResponse({"status": "unavailable", "limits": limits}, status_code=503)

    return router
