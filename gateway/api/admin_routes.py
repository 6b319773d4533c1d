"""The admin API: list, add (from a path under a root, a URL, or by upload) and remove
adapters.

Every route authenticates before it reads the body, so callers without an admin key learn
nothing about the API beyond a 401.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil

from fastapi import APIRouter
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from adapters.errors import SourceError
from gateway.api.json_body import json_body
from gateway.api.uploads import MAX_PARTS, store_upload, upload_parts
from gateway.errors import Conflict, InvalidAdapter, source_error
from gateway.registry import AdapterEntry, AdapterRegistry, Origin, check_name
from gateway.registry.sources import fetched
from gateway.tenancy.access import Access
from gateway.upstream.pool import Backend, BackendPool

ADAPTERS_PATH = "/admin/adapters"


def is_upload_path(path: str) -> bool:
    return path.startswith(ADAPTERS_PATH + "/") and path.endswith("/upload")


class AddAdapter(BaseModel):
    """`path` (under a configured root) or `source` (an `s3://` or `hf://` URL)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    path: str | None = None
    source: str | None = None

    @model_validator(mode="after")
    def one_origin(self) -> AddAdapter:
        if (self.path is None) == (self.source is None):
            raise ValueError("give exactly one of 'path' and 'source'")
        return self


def admin_router(access: Access, registry: AdapterRegistry, pool: BackendPool, *,
                 eager: bool, max_source_bytes: int) -> APIRouter:
    """`max_source_bytes` bounds an adapter fetched from a URL, as uploads are bounded."""
    router = APIRouter()

    def load_on() -> list[Backend]:
        """With eager loading, a new adapter must also load on every healthy backend."""
        return pool.healthy() if eager else []

    def describe(entry: AdapterEntry) -> dict:
        refusal = registry.refusal(entry)
        return {"name": entry.name, "is_dora": entry.is_dora, "hash": entry.content_hash,
                "internal_name": entry.internal_name, "source": entry.source,
                "artifact": entry.location,
                "compile_seconds": entry.compile_seconds, "created": entry.created,
                "origin": entry.origin.value, "added_by": entry.added_by,
                "fetched_from": entry.fetched_from and json.loads(entry.fetched_from),
                "loaded_backends": registry.loaded_on(entry), "servable": refusal is None,
                "refused_by": refusal and {"backend": refusal.backend,
                                           "reason": refusal.reason}}

    @router.get(ADAPTERS_PATH)
    async def list_adapters(request: Request) -> JSONResponse:
        access.admin(request)
        return JSONResponse({"object": "list",
                             "data": [describe(entry) for entry in registry.entries()]})

    @router.post(ADAPTERS_PATH)
    async def add_adapter(request: Request) -> JSONResponse:
        admin = access.admin(request)
        try:
            spec = AddAdapter.model_validate(json_body(request))
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_url=False)) from exc
        if spec.source is not None:
            entry = await add_from_source(spec.name, spec.source, admin)
        else:
            entry = await registry.add(spec.name, spec.path, added_by=admin, load_on=load_on())
        return JSONResponse(describe(entry), status_code=201)

    async def add_from_source(name: str, url: str, admin: str) -> AdapterEntry:
        """Fetch (after the cheap checks), register, then let the fetched files go."""
        check_name(name)
        if await registry.is_taken(name):
            raise Conflict(f"An adapter named '{name}' already exists", param="name",
                           code="adapter_exists")
        with contextlib.ExitStack() as stack:
            try:
                adapter = await asyncio.to_thread(stack.enter_context,
                                                  fetched(url, max_source_bytes))
            except SourceError as exc:
                raise source_error(exc, param="source") from exc
            return await registry.add_fetched(name, adapter, added_by=admin,
                                              load_on=load_on())

    @router.post(ADAPTERS_PATH + "/{name}/upload")
    async def upload_adapter(name: str, request: Request) -> JSONResponse:
        """The files are stored before the adapter is registered: other gateways and the
        backends never see a registered adapter whose files are incomplete."""
        admin = access.admin(request)
        check_name(name)
        if await registry.is_taken(name):
            raise Conflict(f"An adapter named '{name}' already exists", code="adapter_exists")
        async with request.form(max_files=MAX_PARTS, max_fields=MAX_PARTS) as form:
            stored = await store_upload(upload_parts(form), registry.uploads)
        try:
            entry = await registry.add(name, stored.path, added_by=admin, origin=Origin.UPLOAD,
                                       load_on=load_on())
        except InvalidAdapter:
            if stored.created:  # files no one can register: nothing else refers to them
                shutil.rmtree(stored.path, ignore_errors=True)
            raise
        return JSONResponse(describe(entry), status_code=201)

    @router.delete(ADAPTERS_PATH + "/{name}")
    async def remove_adapter(name: str, request: Request) -> Response:
        admin = access.admin(request)
        await registry.remove(name, removed_by=admin)
        return Response(status_code=204)

    return router
