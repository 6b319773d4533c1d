"""The admin API of tenants' limits and usage.

`GET /admin/tenants` shows each tenant's limits, where they come from and what is left of
them; `PUT`/`DELETE /admin/tenants/{name}/limits` set limits that replace the config's (kept
in the registry's database, so every replica and every restart holds them) or go back to the
config's; `GET /admin/usage` reads the usage ledger as JSON or CSV.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import APIRouter
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.api.json_body import json_body
from gateway.errors import InvalidRequest, NotFound
from gateway.quota.book import LimitsBook
from gateway.quota.guard import Quota
from gateway.quota.policy import MAX_LIMIT, BudgetPeriod, TenantLimits, period_bounds
from gateway.tenancy.access import Access
from gateway.tenancy.tenants import Tenant
from gateway.usage.ledger import HOUR_S, UsageLedger, group_fields
from gateway.usage.report import hour_iso, parse_time, usage_csv

DEFAULT_GROUP_BY = ("tenant", "adapter")
Limit = Annotated[int, Field(ge=1, le=MAX_LIMIT)]
# Times the usage query takes: from 1970 to the end of year 9999, as Unix seconds.
LATEST_TIME = 253402300799


class LimitsBody(BaseModel):
    """A tenant's limits as an admin sets them: an absent or null limit is no limit."""

    model_config = ConfigDict(extra="forbid")

    requests_per_minute: Limit | None = None
    tokens_per_minute: Limit | None = None
    token_budget: Limit | None = None
    budget_period: Literal["day", "month"] = "day"

    def limits(self) -> TenantLimits:
        return TenantLimits(self.requests_per_minute, self.tokens_per_minute,
                            self.token_budget, BudgetPeriod(self.budget_period))


def limit_router(access: Access, tenants: Mapping[str, Tenant], book: LimitsBook,
                 quota: Quota, ledger: UsageLedger) -> APIRouter:
    router = APIRouter()

    def tenant_named(name: str) -> Tenant:
        tenant = tenants.get(name)
        if tenant is None:
            raise NotFound(f"No tenant named '{name}'", param="name", code="tenant_not_found")
        return tenant

    async def describe(tenant: Tenant) -> dict:
        limits = book.limits(tenant.name)
        set_by_admin = book.set_by_admin(tenant.name)
        return {"name": tenant.name, "max_concurrency": tenant.max_concurrency,
                "max_tokens": tenant.max_tokens,
                "in_flight": access.in_flight().get(tenant.name, 0),
                "limits": limits_json(limits),
                "limits_set_by": set_by_admin and set_by_admin.updated_by,
                "limits_set_at": set_by_admin and set_by_admin.updated_at,
                "standing": await quota.standing(tenant.name)}

    @router.get("/admin/tenants")
    async def list_tenants(request: Request) -> JSONResponse:
        access.admin(request)
        described = [await describe(tenants[name]) for name in sorted(tenants)]
        return JSONResponse({"object": "list", "data": described})

    @router.put("/admin/tenants/{name}/limits")
    async def set_limits(name: str, request: Request) -> JSONResponse:
        admin = access.admin(request)
        tenant = tenant_named(name)
        try:
            body = LimitsBody.model_validate(json_body(request))
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_url=False)) from exc
        await book.put(name, body.limits(), updated_by=admin)
        return JSONResponse(await describe(tenant))

    @router.delete("/admin/tenants/{name}/limits")
    async def reset_limits(name: str, request: Request) -> Response:
        access.admin(request)
        tenant_named(name)
        await book.delete(name)
        return Response(status_code=204)

    @router.get("/admin/usage")
    async def usage(request: Request) -> Response:
        access.admin(request)
        query = UsageQuery.parse(request.query_params, time.time())
        await asyncio.to_thread(ledger.flush)  # this gateway's latest, not a second late
        rows = await asyncio.to_thread(ledger.query, tenant=query.tenant, start=query.start,
                                       end=query.end, group_by=query.group_by)
        if query.csv:
            return Response(usage_csv(rows, query.group_by), media_type="text/csv")
        for row in rows:
            if "hour" in row:
                row["hour"] = hour_iso(row["hour"])
        return JSONResponse({"object": "list", "from": hour_iso(query.start),
                             "to": hour_iso(query.end), "group_by": list(query.group_by),
                             "data": rows})

    return router


def limits_json(limits: TenantLimits) -> dict:
    return {"requests_per_minute": limits.requests_per_minute,
            "tokens_per_minute": limits.tokens_per_minute,
            "token_budget": limits.token_budget,
            "budget_period": str(limits.budget_period)}


@dataclass(frozen=True)
class UsageQuery:
    """`tenant`, `from` and `to` (Unix seconds or ISO 8601; default: this UTC month up to
    now), `group_by` (comma-separated tenant, adapter, hour) and `format` (json or csv)."""

    tenant: str | None
    start: int
    end: int
    group_by: tuple[str, ...]
    csv: bool

    @classmethod
    def parse(cls, params: Mapping[str, str], now: float) -> UsageQuery:
        month_start, _ = period_bounds(BudgetPeriod.MONTH, now)
        next_hour = (int(now) // HOUR_S + 1) * HOUR_S
        group_by = tuple(part.strip() for part in params.get("group_by", "").split(",")
                         if part.strip()) or DEFAULT_GROUP_BY
        form = params.get("format", "json")
        if form not in ("json", "csv"):
            raise InvalidRequest(f"format {form!r} is not json or csv", param="format")
        try:
            start = parse_time(params["from"]) if "from" in params else month_start
            end = parse_time(params["to"]) if "to" in params else next_hour
            group_by = group_fields(group_by)
        except ValueError as exc:
            raise InvalidRequest(str(exc), code="invalid_query") from exc
        if not (0 <= start <= LATEST_TIME and 0 <= end <= LATEST_TIME):
            raise InvalidRequest("'from' and 'to' must be between 1970 and 9999",
                                 code="invalid_query")
        return cls(params.get("tenant") or None, start, end, group_by, form == "csv")
