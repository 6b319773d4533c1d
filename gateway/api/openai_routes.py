"""The OpenAI-compatible routes: the only `/v1` paths reachable through the gateway.

vLLM's other routes (`/v1/load_lora_adapter`, `/tokenize`, ...) are never forwarded.
"""

from __future__ import annotations

import functools
import time

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.api import request_ids
from gateway.api.openai_request import (
    CHAT,
    COMPLETIONS,
    RESPONSES,
    Route,
    check_limits,
    hides_usage,
    output_cap,
    prompt_estimate,
    read_body,
    resolve_model,
    upstream_body,
)
from gateway.errors import GatewayError, ModelNotFound
from gateway.names import BASE_MODEL
from gateway.quota.guard import Quota
from gateway.registry import AdapterRegistry
from gateway.telemetry.hub import Telemetry
from gateway.tenancy.access import Access
from gateway.tenancy.tenants import Tenant
from gateway.upstream.pool import BackendPool
from gateway.upstream.proxy import forward
from gateway.upstream.target import Target, UpstreamWait
from gateway.upstream.vllm_api import SERVED_BASE_MODEL

OWNER = "dora-gateway"


def openai_router(access: Access, quota: Quota, registry: AdapterRegistry, pool: BackendPool,
                  telemetry: Telemetry, upstream_wait: UpstreamWait) -> APIRouter:
    """`upstream_wait`: the scope each wait for vLLM runs in (the shutdown gate's, which cuts
    what still waits when the grace period ends)."""
    router = APIRouter()
    started = int(time.time())

    async def complete(request: Request, route: Route) -> Response:
        tenant = access.tenant(request)
        body = read_body(request)
        entry = resolve_model(registry, tenant, body["model"])
        meter = telemetry.meter(tenant.name, entry)
        request_id = request_ids.request_id(request)
        model = entry.internal_name if entry else SERVED_BASE_MODEL
        with meter.failures():
            check_limits(body, tenant, route)
            forwarded = upstream_body(body, route, tenant, model=model,
                                      cache_salt=access.cache_salt(tenant),
                                      request_id=request_id)
            charge = await quota.admit(tenant.name, prompt_estimate=prompt_estimate(forwarded),
                                       output_cap=output_cap(forwarded, route))
            try:
                lease = access.admit(tenant)
            except BaseException:
                quota.refund(charge)
                raise
        meter.on_finish(functools.partial(quota.settle, charge))
        target = Target(path=route.path, body=forwarded, client_model=body["model"],
                        upstream_model=model, request_id=request_id, meter=meter,
                        prepare=None if entry is None else functools.partial(
                            registry.ensure_loaded, entry),
                        hide_usage=hides_usage(body, route))
        try:
            response = await forward(request, target, pool, lease, upstream_wait)
        except GatewayError as exc:
            exc.headers = {**charge.headers, **exc.headers}
            raise
        response.headers.update(charge.headers)
        return response

    @router.post(CHAT.path)
    async def chat_completions(request: Request) -> Response:
        return await complete(request, CHAT)

    @router.post(COMPLETIONS.path)
    async def completions(request: Request) -> Response:
        return await complete(request, COMPLETIONS)

    @router.post(RESPONSES.path)
    async def responses(request: Request) -> Response:
        return await complete(request, RESPONSES)

    def model_card(name: str, created: int) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": OWNER}

    def visible_models(tenant: Tenant) -> dict[str, dict]:
        """`base` and the adapters `tenant` may use, less those a backend refused to load."""
        cards = {BASE_MODEL: model_card(BASE_MODEL, started)}
        for entry in registry.entries():
            if tenant.may_use(entry.name) and registry.refusal(entry) is None:
                cards[entry.name] = model_card(entry.name, entry.created)
        return cards

    @router.get("/v1/models")
    async def list_models(request: Request) -> JSONResponse:
        cards = visible_models(access.tenant(request))
        return JSONResponse({"object": "list", "data": list(cards.values())})

    @router.get("/v1/models/{model}")
    async def retrieve_model(model: str, request: Request) -> JSONResponse:
        card = visible_models(access.tenant(request)).get(model)
        if card is None:
            raise ModelNotFound(model)
        return JSONResponse(card)

    return router
