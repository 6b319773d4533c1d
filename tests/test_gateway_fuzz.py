"""Property-based fuzzing of `/v1` and `/admin` against the gateway's own OpenAPI schema.

schemathesis generates requests from `gateway.api.openapi` (valid ones and ones that break
the schema) and sends them to the real app over a fake vLLM, with a tenant's key on `/v1`
and the admin key on `/admin`; every answer must be no 5xx, a status the schema lists, a
body that matches it, an error in OpenAI's shape with an `X-Request-Id`. The fake does not
validate vLLM's own fields (what vLLM refuses is covered against a real one), so checks that
a schema-breaking input is refused are left out here. Bounded in examples (`FUZZ_EXAMPLES`,
more by env) and time. Every input that ever failed is replayed below as a regression case.
"""

from __future__ import annotations

import asyncio
import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.api.openapi import openapi_schema
from gateway.errors import ERROR_TYPES
from tests.gateway_fakes import ADMIN_KEY, GLOBEX_KEY, make_gateway

FUZZ_EXAMPLES = int(os.environ.get("DORA_GATEWAY_FUZZ_EXAMPLES", "150"))
SERVED_MODELS = ("base", "caps", "pirate", "plain")
DEEP = b"[" * 1500 + b"]" * 1500
# (method, path, admin?, body): hostile inputs replayed on every run; the first two got a
# 500 before bodies were decoded within bounds. Add here whatever the fuzzing ever finds.
REGRESSIONS = [
    ("POST", "/v1/chat/completions", False,
     b'{"model": "base", "messages": [{"role": "user", "content": "a\\ud800b"}]}'),
    ("POST", "/v1/chat/completions", False, b'{"model": "base", "messages": ' + DEEP + b"}"),
    ("POST", "/v1/completions", False, b'{"model": "base", "prompt": "x", "seed": 1e400}'),
    ("POST", "/admin/adapters", True, b'{"name": "a\\udfff", "path": "caps"}'),
    ("POST", "/admin/adapters", True, DEEP),
]


@pytest.fixture(scope="module")
def fuzzed_app(tmp_path_factory, llama_base, demo, store_dir):
    directory = tmp_path_factory.mktemp("fuzz")
    gateway = asyncio.run(make_gateway(directory, llama_base, demo, store_dir))
    yield gateway.app
    asyncio.run(gateway.pool.aclose())


@schemathesis.check
def openai_error_shape(ctx, response, case) -> None:
    """Every answer carries a request id; every error is OpenAI's shape."""
    assert response.headers.get("x-request-id"), "no X-Request-Id"
    if response.status_code < 400:
        return
    error = response.json()["error"]
    assert error["type"] in ERROR_TYPES and error["message"], error
    assert error["code"] is None or isinstance(error["code"], str), error


fuzzed = schemathesis.openapi.from_dict(openapi_schema())


@fuzzed.hook
def flatmap_body(context, body):
    """Any name is a valid `model` to the schema, but a random one is unknown (404): most
    bodies name a model the fake serves, so the checks behind the name are reached."""
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return st.just(body)
    return st.sampled_from([*SERVED_MODELS, body["model"]]).map(
        lambda model: {**body, "model": model})


def key_for(path: str) -> str:
    return ADMIN_KEY if path.startswith("/admin") else GLOBEX_KEY


@fuzzed.parametrize()
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_fuzzed_requests_get_no_5xx_and_match_the_schema(case, fuzzed_app):
    response = case.call(app=fuzzed_app,
                         headers={"Authorization": f"Bearer {key_for(case.path)}"})
    case.validate_response(response, checks=[
        not_a_server_error, status_code_conformance, content_type_conformance,
        response_schema_conformance, openai_error_shape])


def test_the_schema_names_exactly_the_apps_routes(fuzzed_app):
    routes = {(method, route.path) for route in fuzzed_app.routes
              if route.path.startswith(("/v1", "/admin")) for method in route.methods}
    described = {(method.upper(), path) for path, operations in openapi_schema()["paths"].items()
                 for method in operations}
    assert described == routes


@pytest.mark.parametrize(("method", "path", "admin", "content"), REGRESSIONS)
def test_inputs_that_once_failed(fuzzed_app, method, path, admin, content):
    transport = httpx.ASGITransport(app=fuzzed_app)

    async def send() -> httpx.Response:
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            return await client.request(method, path, content=content, headers={
                "Authorization": f"Bearer {ADMIN_KEY if admin else GLOBEX_KEY}"})

    response = asyncio.run(send())
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_json"
