"""Hostile and broken input against a fake vLLM: every body a client can send gets a 4xx in
OpenAI's shape, never a 5xx; vLLM's own errors reach clients in the same dialect, in plain
answers and inside streams; a client that stops reading cannot hold its slot; a stopping
gateway refuses new requests while the ones in flight finish."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse

from gateway.api.slow_clients import WriteTimeoutMiddleware
from gateway.errors import ERROR_TYPES
from tests.gateway_fakes import ACME_KEY, ADMIN_KEY, GLOBEX_KEY, wait_until
from tests.test_gateway_openai import call_asgi

pytestmark = pytest.mark.anyio
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Hi"}]
# What vLLM 0.32 answered (as captured from a real server) to bad requests it was sent.
VLLM_VALIDATION = {"error": {
    "message": "2 validation errors:\n  {'type': 'literal_error', 'loc': 'body.tools.0.type', "
               "'msg': \"Input should be 'function'\", 'input': 'x', 'ctx': {'expected': "
               "\"'function'\"}}\n  {'type': 'missing', 'loc': 'body.tools.0.function', "
               "'msg': 'Field required', 'input': '<dict of 1 items>'}",
    "type": "Bad Request", "param": "body.tools.0.type", "code": 400}}
VLLM_PARAMETER = {"error": {
    "message": "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)",
    "type": "BadRequestError", "param": "max_tokens", "code": 400}}


def assert_error_shape(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["type"] in ERROR_TYPES and error["message"]
    assert error["code"] is None or isinstance(error["code"], str)
    if code is not None:
        assert error["code"] == code
    return error


async def post_raw(gateway, content: bytes, key: str = ACME_KEY, path: str = CHAT,
                   ) -> httpx.Response:
    async with gateway.client(key) as client:
        return await client.post(path, content=content,
                                 headers={"Content-Type": "application/json"})


@pytest.mark.parametrize(("content", "words"), [
    (b'{"model": "base", "messages": ' + b"[" * 2000 + b"]" * 2000 + b"}", "nested"),
    (b'{"model": "base", "messages": [{"role": "user", "content": "a\\ud800b"}]}', "surrogate"),
    (b'{"model": "base", "messages": [{"role": "user", "content": "a\xff\xfeb"}]}', "UTF-8"),
    (b'\xef\xbb\xbf{"model": "base"}', "BOM"),
    (b'{"model": "base", "max_tokens": 1' + b"0" * 4000 + b"}", "64-bit"),
    (b'{"model": "base", "seed": 18446744073709551616}', "64-bit"),
    (b'{"model": "base", "temperature": 1e999}', "too large"),
    (b'{"model": "base", "temperature": -Infinity}', "Infinity"),
])
async def test_hostile_bodies_are_400_and_never_reach_vllm(gateway, content, words):
    error = assert_error_shape(await post_raw(gateway, content), 400, "invalid_json")
    assert words in error["message"]
    assert gateway.vllm.requests == []


async def test_a_deep_but_allowed_body_and_a_surrogate_pair_pass(gateway):
    nested = {"model": "base", "messages": MESSAGES, "extra": json.loads("[" * 60 + "]" * 60)}
    emoji = {"model": "base", "messages": [{"role": "user", "content": "\U0001f600"}]}
    for body in (nested, emoji):
        response = await post_raw(gateway, json.dumps(body).encode())
        assert response.status_code == 200, response.text
    assert gateway.vllm.received(CHAT)[1]["messages"][0]["content"] == "\U0001f600"


async def test_bad_bodies_still_need_a_key_first(gateway):
    deep = b"[" * 4000
    for path in (CHAT, "/admin/adapters"):
        response = await post_raw(gateway, deep, key="sk-wrong-0123456789abcdef", path=path)
        assert_error_shape(response, 401, "invalid_api_key")


async def test_admin_bodies_are_decoded_the_same_way(gateway):
    deep = b'{"name": "x", "path": ' + b"[" * 100 + b"]" * 100 + b"}"
    error = assert_error_shape(await post_raw(gateway, deep, ADMIN_KEY, "/admin/adapters"),
                               400, "invalid_json")
    assert "nested" in error["message"]
    surrogate = b'{"name": "x\\udc00", "path": "caps"}'
    assert_error_shape(await post_raw(gateway, surrogate, ADMIN_KEY, "/admin/adapters"), 400,
                       "invalid_json")
    assert gateway.registry.get("x") is None


async def test_every_answer_carries_a_request_id(gateway):
    async with gateway.client(ACME_KEY) as client:
        refused = await client.post(CHAT, content=b"{oops")
        missing = await client.get("/v1/nothing-here")
        served = await client.post(CHAT, json={"model": "base", "messages": MESSAGES})
    ids = [response.headers["x-request-id"] for response in (refused, missing, served)]
    assert all(len(value) == 32 for value in ids) and len(set(ids)) == 3
    assert gateway.vllm.requests[0].headers["x-request-id"] == ids[2]


@pytest.mark.parametrize(("refusal", "status", "param", "message"), [
    ((400, VLLM_VALIDATION), 400, "tools.0.type",
     "tools.0.type: Input should be 'function'; tools.0.function: Field required"),
    ((400, VLLM_PARAMETER), 400, "max_tokens", "max_tokens must be at least 1, got 0."),
    ((404, {"error": {"message": "The model `caps--0123` does not exist. Valid aliases: base, "
                                 "pirate--4567.", "type": "NotFoundError", "param": "model",
                      "code": 404}}), 404, "model", "The model `caps--0123` does not exist."),
    ((501, {"error": {"message": "best_of is not supported", "type": "NotImplementedError",
                      "param": None, "code": 501}}), 400, None, "best_of is not supported"),
    ((422, {"detail": "Unprocessable"}), 422, None, "Unprocessable"),
])
async def test_vllm_refusals_are_translated(gateway, vllm, refusal, status, param, message):
    vllm.refusal = refusal
    async with gateway.client(GLOBEX_KEY) as client:
        response = await client.post(CHAT, json={"model": "base", "messages": MESSAGES})
    error = assert_error_shape(response, status)
    assert (error["message"], error["param"], error["code"]) == (message, param, None)
    assert error["type"] == "invalid_request_error"


async def test_a_vllm_failure_is_a_server_error(gateway, vllm):
    vllm.refusal = (500, {"error": {"message": "EngineCore encountered an issue",
                                    "type": "InternalServerError", "param": None, "code": 500}})
    async with gateway.client(GLOBEX_KEY) as client:
        response = await client.post(CHAT, json={"model": "base", "messages": MESSAGES})
    error = assert_error_shape(response, 500, "backend_error")
    assert error["type"] == "server_error"
    assert error["message"] == "EngineCore encountered an issue"


async def test_an_error_inside_a_stream_is_translated(gateway, vllm):
    vllm.stream_event = {"error": {
        "message": "1 validation error for SamplingParams\nstop\n  Input should be a valid list "
                   "[type=list_type, input_value=5, input_type=int]\n    For further "
                   "information visit https://errors.pydantic.dev/2/v",
        "type": "BadRequestError", "param": None, "code": 400}}
    async with gateway.client(GLOBEX_KEY) as client:
        response = await client.post(CHAT, json={"model": "base", "messages": MESSAGES,
                                                 "stream": True})
    events = [line[len("data: "):] for line in response.text.splitlines()
              if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error == {"message": "stop: Input should be a valid list",
                     "type": "invalid_request_error", "param": "stop", "code": None}


async def test_a_client_that_never_reads_is_dropped_and_frees_its_slot(gateway, vllm):
    """Its stream's upstream is closed (vLLM aborts) and acme's slot comes back."""
    vllm.hang_streams = True
    bounded = WriteTimeoutMiddleware(gateway.app, timeout_s=0.2)
    wrote = asyncio.Event()

    async def never_reading_client(scope, receive, send) -> None:
        async def stuck_send(message: dict) -> None:
            if message["type"] == "http.response.body":
                wrote.set()
                await asyncio.Event().wait()  # the socket's buffers are full
            await send(message)

        await bounded(scope, receive, stuck_send)

    body = {"model": "base", "messages": MESSAGES, "stream": True}
    await asyncio.wait_for(call_asgi(never_reading_client, body, ACME_KEY, asyncio.Event(), []),
                           timeout=30)
    assert wrote.is_set()
    assert [stream.closed for stream in vllm.streams] == [True]
    async with gateway.client(ACME_KEY) as client:
        for _ in range(2):  # acme's whole limit is free again
            response = await client.post(CHAT, json={"model": "base", "messages": MESSAGES})
            assert response.status_code == 200


async def test_a_closed_gate_refuses_new_requests_but_not_those_in_flight(gateway, vllm):
    vllm.hang_streams = True
    gate = gateway.app.state.shutdown_gate
    disconnect, sent = asyncio.Event(), []
    body = {"model": "base", "messages": MESSAGES, "stream": True}
    streaming = asyncio.create_task(call_asgi(gateway.app, body, GLOBEX_KEY, disconnect, sent))
    await wait_until(lambda: any(b"data:" in message.get("body", b"") for message in sent))
    gate.close()
    async with gateway.client(GLOBEX_KEY) as client:
        refused = await client.post(CHAT, json={"model": "base", "messages": MESSAGES})
        health = await client.get("/health")
    assert gate.in_flight == 1 and not streaming.done()
    error = assert_error_shape(refused, 503, "shutting_down")
    assert error["type"] == "server_error"
    assert refused.headers["retry-after"] and refused.headers["connection"] == "close"
    assert health.status_code == 503
    disconnect.set()
    await asyncio.wait_for(streaming, 10)
    assert gate.idle


async def test_a_route_that_parses_a_bad_body_itself_still_answers_400(gateway):
    """A new route that reads the raw body its own way and trips over a body the decoder
    refused gets the decoder's 400 from the crash handler, not a 500."""
    async def raw_json(request: Request) -> JSONResponse:
        return JSONResponse({"items": len(json.loads(await request.body()))})

    gateway.app.add_api_route("/v1/raw", raw_json, methods=["POST"])
    transport = httpx.ASGITransport(app=gateway.app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        deep = await client.post("/v1/raw", content=b"[" * 2000 + b"]" * 2000)
        fine = await client.post("/v1/raw", content=b"[[1]]")
    assert "nested" in assert_error_shape(deep, 400, "invalid_json")["message"]
    assert fine.status_code == 200
