"""The `/v1` routes against a fake vLLM: auth, tenant isolation, limits, error shapes, the
forwarded body, and streaming."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging

import httpx
import pytest

from tests.gateway_fakes import (
    ACME_KEY,
    ADMIN_KEY,
    GLOBEX_KEY,
    STREAM_CHUNKS,
    STREAM_TEXT,
    FakeVllm,
    make_gateway,
    wait_until,
)
from tests.test_gateway_metrics import scrape, series

pytestmark = pytest.mark.anyio
CHAT = "/v1/chat/completions"
LOAD = "/v1/load_lora_adapter"
MESSAGES = [{"role": "user", "content": "Hi"}]


def assert_openai_error(response: httpx.Response, status: int, type_: str,
                        code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["type"] == type_ and error["message"]
    if code is not None:
        assert error["code"] == code
    return error


async def chat(gateway, key=ACME_KEY, **body) -> httpx.Response:
    async with gateway.client(key) as client:
        return await client.post(CHAT, json={"messages": MESSAGES, **body})


@pytest.mark.parametrize("key", [None, "sk-wrong-0123456789abcdef", ADMIN_KEY])
async def test_missing_wrong_or_admin_key_is_401(gateway, key):
    for method, path in (("POST", CHAT), ("POST", "/v1/completions"), ("GET", "/v1/models")):
        async with gateway.client(key) as client:
            response = await client.request(method, path, json={"model": "base"})
        assert_openai_error(response, 401, "authentication_error", "invalid_api_key")
    assert gateway.vllm.requests == []


async def test_models_lists_only_what_the_tenant_may_use(gateway):
    async with gateway.client(ACME_KEY) as client:
        listed = (await client.get("/v1/models")).json()
        assert (await client.get("/v1/models/caps")).json()["id"] == "caps"
        forbidden = await client.get("/v1/models/pirate")
        missing = await client.get("/v1/models/nope")
    assert listed["object"] == "list"
    assert [model["id"] for model in listed["data"]] == ["base", "caps", "plain"]
    assert all(model["object"] == "model" for model in listed["data"])
    assert forbidden.json() == json.loads(missing.text.replace("nope", "pirate"))
    async with gateway.client(GLOBEX_KEY) as client:
        listed = (await client.get("/v1/models")).json()
    assert [model["id"] for model in listed["data"]] == ["base", "caps", "pirate", "plain"]


async def test_a_forbidden_adapter_answers_exactly_like_a_missing_one(gateway):
    forbidden = await chat(gateway, model="pirate")
    missing = await chat(gateway, model="parrot")
    error = assert_openai_error(forbidden, 404, "invalid_request_error", "model_not_found")
    assert error["message"] == "The model 'pirate' does not exist"
    assert error["param"] == "model"
    assert missing.status_code == 404
    assert forbidden.json() == json.loads(missing.text.replace("parrot", "pirate"))
    assert gateway.vllm.requests == []


async def test_the_forwarded_body(gateway):
    body = {"model": "caps", "messages": MESSAGES, "temperature": 0.3, "max_tokens": 10,
            "cache_salt": "client-salt", "request_id": "client-id", "vllm_extra": [1, {"a": 2}]}
    async with gateway.client(ACME_KEY) as client:
        response = await client.post(CHAT, json=body)
    assert response.status_code == 200, response.text
    caps = gateway.registry.get("caps")
    load, request = gateway.vllm.requests
    assert load.path == LOAD
    assert request.path == CHAT
    forwarded = request.body
    expected_salt = hashlib.sha256(b"test-secret\0acme").hexdigest()
    request_id = request.headers["x-request-id"]
    assert forwarded == {**body, "model": caps.internal_name, "cache_salt": expected_salt,
                         "request_id": request_id}
    assert len(request_id) == 32 and request_id != "client-id"
    assert "authorization" not in request.headers
    answer = response.json()
    assert answer["model"] == "caps"
    assert answer["id"] == f"chatcmpl-{request_id}"
    assert response.headers["x-request-id"] == request_id


async def test_base_model_and_text_completions(gateway):
    async with gateway.client(GLOBEX_KEY) as client:
        response = await client.post("/v1/completions",
                                     json={"model": "base", "prompt": "Hi", "max_tokens": None})
    assert response.status_code == 200 and response.json()["model"] == "base"
    (request,) = gateway.vllm.requests
    assert request.path == "/v1/completions"
    assert request.body["model"] == "base"
    assert request.body["max_tokens"] == 1024
    assert request.body["cache_salt"] == hashlib.sha256(b"test-secret\0globex").hexdigest()


async def test_an_unbounded_chat_gets_the_tenant_cap(gateway):
    assert (await chat(gateway, model="base")).status_code == 200
    assert (await chat(gateway, model="base", max_tokens=5)).status_code == 200
    first, second = gateway.vllm.received(CHAT)
    assert first["max_completion_tokens"] == 64
    assert "max_completion_tokens" not in second and second["max_tokens"] == 5


async def test_lazy_loading_happens_once(gateway):
    for _ in range(3):
        assert (await chat(gateway, model="caps")).status_code == 200
    assert len(gateway.vllm.received(LOAD)) == 1
    assert (await chat(gateway, model="base")).status_code == 200
    assert len(gateway.vllm.received(LOAD)) == 1


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"max_tokens": 65}, "max_tokens", "max_tokens_too_large"),
    ({"max_completion_tokens": 1000}, "max_completion_tokens", "max_tokens_too_large"),
    ({"max_tokens": "10"}, "max_tokens", "invalid_type"),
    ({"max_tokens": True}, "max_tokens", "invalid_type"),
    ({"n": 9}, "n", "n_too_large"),
    ({"n": 2.0}, "n", "invalid_type"),
])
async def test_caps_are_400(gateway, body, param, code):
    error = assert_openai_error(await chat(gateway, model="base", **body), 400,
                                "invalid_request_error", code)
    assert error["param"] == param
    assert gateway.vllm.requests == []


@pytest.mark.parametrize(("content", "code"), [
    (b"{not json", "invalid_json"), (b"[1, 2]", "invalid_json"), (b'{"x": NaN}', "invalid_json"),
    (b'{"messages": []}', "missing_model"), (b'{"model": 7}', "missing_model"),
    (b'{"model": "base", "stream": "true"}', "invalid_type"),
])
async def test_malformed_bodies_are_400(gateway, content, code):
    async with gateway.client(ACME_KEY) as client:
        response = await client.post(CHAT, content=content,
                                     headers={"Content-Type": "application/json"})
    assert_openai_error(response, 400, "invalid_request_error", code)


async def test_a_body_over_the_limit_is_413_even_without_content_length(gateway):
    big = {"model": "base", "messages": [{"role": "user", "content": "x" * 5000}]}

    async def chunks():
        data = json.dumps(big).encode()
        for start in range(0, len(data), 1000):
            yield data[start:start + 1000]

    async with gateway.client(ACME_KEY) as client:
        declared = await client.post(CHAT, json=big)
        chunked = await client.post(CHAT, content=chunks(),
                                    headers={"Content-Type": "application/json"})
    assert_openai_error(declared, 413, "invalid_request_error", "request_too_large")
    assert "content-length" not in chunked.request.headers
    assert_openai_error(chunked, 413, "invalid_request_error", "request_too_large")
    assert gateway.vllm.requests == []


async def test_over_the_concurrency_limit_is_429_with_retry_after(gateway, vllm):
    vllm.hang_streams = True
    stream_body = {"model": "base", "messages": MESSAGES, "stream": True}
    app = gateway.app
    disconnect = asyncio.Event()
    streams = [asyncio.create_task(call_asgi(app, stream_body, ACME_KEY, disconnect, []))
               for _ in range(2)]
    await wait_until(lambda: len(vllm.streams) == 2)
    refused = await chat(gateway, model="base")
    error = assert_openai_error(refused, 429, "rate_limit_error", "rate_limit_exceeded")
    assert "limit 2" in error["message"]
    assert refused.headers["retry-after"] == "1"
    assert (await chat(gateway, GLOBEX_KEY, model="base")).status_code == 200
    disconnect.set()
    await asyncio.gather(*streams)
    assert all(stream.closed for stream in vllm.streams)
    assert (await chat(gateway, model="base")).status_code == 200


async def test_a_stream_frees_its_slot_once_its_last_event_is_sent(gateway, vllm):
    """A client that keeps within its limit, starting a request as soon as one got `[DONE]`,
    is never refused, even while the backend is still closing the finished responses."""
    vllm.linger_streams = asyncio.Event()
    stream_body = {"model": "base", "messages": MESSAGES, "stream": True}
    sent: list[list[dict]] = [[], []]
    streams = [asyncio.create_task(call_asgi(gateway.app, stream_body, ACME_KEY,
                                             asyncio.Event(), sent[i])) for i in range(2)]

    def finished(messages: list[dict]) -> bool:
        return b"[DONE]" in b"".join(message.get("body", b"") for message in messages)

    await wait_until(lambda: all(finished(messages) for messages in sent))
    assert not any(stream.done() for stream in streams)  # both responses still open
    assert (await chat(gateway, model="base")).status_code == 200
    vllm.linger_streams.set()
    await asyncio.gather(*streams)


async def test_client_disconnect_cancels_a_non_streaming_request(gateway, vllm):
    """Twice, as many times as acme's concurrency limit: a leaked slot would make it 429."""
    vllm.hang_completions = True
    for attempt in (1, 2):
        disconnect = asyncio.Event()
        task = asyncio.create_task(call_asgi(
            gateway.app, {"model": "base", "messages": MESSAGES}, ACME_KEY, disconnect, []))
        await wait_until(lambda count=attempt: len(vllm.received(CHAT)) == count)
        disconnect.set()
        await asyncio.wait_for(task, 5)
        assert vllm.cancelled == attempt
    assert gateway.pool.any_healthy
    assert (await chat(gateway, model="base", stream=True)).status_code == 200


async def call_asgi(app, body: dict, key: str, disconnect: asyncio.Event,
                    sent: list[dict]) -> None:
    """Drive the ASGI app like a server would, with a client that leaves when told to."""
    content = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
             "http_version": "1.1", "method": "POST", "scheme": "http", "path": CHAT,
             "raw_path": CHAT.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"gateway"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(content)).encode()),
                         (b"authorization", f"Bearer {key}".encode())],
             "client": ("127.0.0.1", 1), "server": ("gateway", 80)}
    messages = [{"type": "http.request", "body": content, "more_body": False}]

    async def receive():
        if messages:
            return messages.pop(0)
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)


async def test_client_disconnect_closes_the_upstream_stream(gateway, vllm):
    vllm.hang_streams = True
    disconnect = asyncio.Event()
    sent: list[dict] = []
    task = asyncio.create_task(call_asgi(
        gateway.app, {"model": "caps", "messages": MESSAGES, "stream": True}, ACME_KEY,
        disconnect, sent))
    await wait_until(lambda: any(b"data:" in message.get("body", b"") for message in sent))
    (stream,) = vllm.streams
    assert not stream.closed
    disconnect.set()
    await asyncio.wait_for(task, 5)
    assert stream.closed
    assert sent[0]["status"] == 200 and b"[DONE]" not in b"".join(
        message.get("body", b"") for message in sent)


async def test_a_stream_cut_by_a_stopping_gateway_ends_with_a_shutting_down_event(
        gateway, vllm):
    """What the drain does to the streams that outlast its grace period."""
    vllm.hang_streams = True
    sent: list[dict] = []
    task = asyncio.create_task(call_asgi(
        gateway.app, {"model": "caps", "messages": MESSAGES, "stream": True}, ACME_KEY,
        asyncio.Event(), sent))
    await wait_until(lambda: any(b"data:" in message.get("body", b"") for message in sent))
    gateway.app.state.shutdown_gate.cut_waits()
    await asyncio.wait_for(task, 5)
    (stream,) = vllm.streams
    events = [line[len("data: "):] for line in
              b"".join(message.get("body", b"") for message in sent).decode().splitlines()
              if line.startswith("data: ")]
    assert stream.closed
    assert events[-1] == "[DONE]" and "choices" in json.loads(events[0])
    error = json.loads(events[-2])["error"]
    assert error["code"] == "shutting_down" and error["type"] == "server_error"


async def test_a_plain_request_cut_by_a_stopping_gateway_is_answered_503_shutting_down(
        gateway, vllm):
    """What the drain does to a request still waiting for vLLM's answer when its grace
    period ends: vLLM's generation is cancelled and the client told to retry."""
    vllm.hang_completions = True
    sent: list[dict] = []
    task = asyncio.create_task(call_asgi(
        gateway.app, {"model": "caps", "messages": MESSAGES}, ACME_KEY, asyncio.Event(), sent))
    await wait_until(lambda: vllm.received(CHAT))
    gateway.app.state.shutdown_gate.cut_waits()
    await asyncio.wait_for(task, 5)
    start, *body = sent
    headers = dict(start["headers"])
    error = json.loads(b"".join(message.get("body", b"") for message in body))["error"]
    assert vllm.cancelled == 1
    assert start["status"] == 503 and headers[b"retry-after"]
    assert error["code"] == "shutting_down" and error["type"] == "server_error"


async def test_streaming_rewrites_model_and_passes_events_through(gateway):
    async with gateway.client(ACME_KEY) as client:
        response = await client.post(CHAT, json={"model": "caps", "messages": MESSAGES,
                                                 "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.text.split("\n") if line]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in events[:-1]]
    assert [chunk["model"] for chunk in chunks] == ["caps"] * STREAM_CHUNKS
    assert "".join(chunk["choices"][0]["delta"]["content"] for chunk in chunks) == "".join(
        STREAM_TEXT)
    assert gateway.registry.get("caps").internal_name not in response.text
    assert response.text.count("\n\n") == STREAM_CHUNKS + 1


@pytest.mark.parametrize(("failure", "code", "message", "marked_down"), [
    (httpx.ReadError("connection reset"), "backend_error", "failed during the stream", True),
    (httpx.ReadTimeout("timed out"), "backend_timeout", "timed out during the stream", False),
])
async def test_an_upstream_failure_mid_stream_ends_with_an_error_event_then_done(
        gateway, vllm, failure, code, message, marked_down):
    """A replica that timed out may just be slow: it stays in the rotation."""
    vllm.stream_error = failure
    async with gateway.client(ACME_KEY) as client:
        response = await client.post(CHAT, json={"model": "base", "messages": MESSAGES,
                                                 "stream": True})
    assert response.status_code == 200
    events = [line for line in response.text.split("\n") if line]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][len("data: "):])["error"]
    assert error["type"] == "server_error" and error["code"] == code
    assert message in error["message"]
    assert len(events) == STREAM_CHUNKS + 2
    assert gateway.pool.any_healthy is not marked_down


async def test_an_upstream_error_on_a_stream_request_is_relayed_as_json(gateway, vllm):
    """A lost adapter is loaded again and the request sent again once, no more: a 404 that
    outlives the reload reaches the client, scrubbed of the internal name."""
    caps = gateway.registry.get("caps")
    assert (await chat(gateway, model="caps")).status_code == 200
    vllm.refusal = (404, {"error": {"message": f"The model `{caps.internal_name}` does not "
                                               f"exist.", "type": "NotFoundError",
                                    "param": "model", "code": 404}})
    response = await chat(gateway, model="caps", stream=True)
    error = response.json()["error"]
    assert response.status_code == 404
    assert error["message"] == "The model `caps` does not exist."
    assert caps.internal_name not in response.text
    assert len(vllm.received(CHAT)) == 3
    assert len(vllm.received(LOAD)) == 2


@pytest.mark.parametrize("stream", [False, True])
async def test_an_adapter_vllm_lost_is_loaded_again_and_the_request_retried(gateway, vllm,
                                                                           stream):
    """Another gateway replica sharing the vLLM unloaded the adapter (removed and re-added
    with the same content keeps its name): this replica's record still says loaded."""
    caps = gateway.registry.get("caps")
    assert (await chat(gateway, model="caps")).status_code == 200
    vllm.loaded.pop(caps.internal_name)
    response = await chat(gateway, model="caps", stream=stream)
    assert response.status_code == 200, response.text
    assert generated_text(response, stream) == "".join(STREAM_TEXT)
    assert len(vllm.received(LOAD)) == 2 and caps.internal_name in vllm.loaded
    assert len(vllm.received(CHAT)) == 3
    samples = await scrape(gateway)
    assert series(samples, "dora_gateway_requests_total", adapter="caps", status="200") == 2
    assert series(samples, "dora_gateway_requests_in_flight", tenant="acme") == 0
    backend = gateway.pool.get(vllm.url)
    assert (backend.in_flight, dict(backend.active)) == (0, {})


@pytest.mark.parametrize("reloaded_first", [False, True])
async def test_requests_that_find_the_adapter_lost_together_are_all_served(gateway, vllm,
                                                                           reloaded_first,
                                                                           caplog):
    """Two requests were in vLLM when it lost the adapter. The first 404 starts a reload; the
    second comes while it runs (the gateway's record then says "not loaded") or after it
    (the record says loaded again). Both are served; only the load vLLM made is counted."""
    caplog.set_level(logging.INFO, logger="gateway.upstream.proxy")

    def losses_seen() -> int:
        return sum("no longer has" in record.getMessage() for record in caplog.records)

    caps = gateway.registry.get("caps")
    assert (await chat(gateway, model="caps")).status_code == 200
    vllm.loaded.pop(caps.internal_name)
    vllm.answer_gate, vllm.load_gate = asyncio.Semaphore(0), asyncio.Event()
    first, second = (asyncio.create_task(chat(gateway, model="caps")) for _ in range(2))
    await wait_until(lambda: len(vllm.received(CHAT)) == 3)
    vllm.answer_gate.release()  # the first 404: the gateway loads caps again
    await wait_until(lambda: len(vllm.received(LOAD)) == 2)
    if reloaded_first:
        vllm.load_gate.set()
        await wait_until(lambda: len(vllm.received(CHAT)) == 4)  # the first one sent again
    vllm.answer_gate.release()  # the second 404
    await wait_until(lambda: losses_seen() == 2)  # judged lost (during the reload, unless
    vllm.load_gate.set()                          # reloaded_first)
    for _ in range(2):
        vllm.answer_gate.release()
    responses = await asyncio.gather(first, second)
    assert [response.status_code for response in responses] == [200, 200], responses[1].text
    samples = await scrape(gateway)
    assert series(samples, "dora_gateway_adapter_load_seconds_count", adapter_type="dora") == 2


def generated_text(response: httpx.Response, stream: bool) -> str:
    if not stream:
        return response.json()["choices"][0]["message"]["content"]
    events = [line[len("data: "):] for line in response.text.split("\n") if line]
    assert events[-1] == "[DONE]"
    return "".join(json.loads(event)["choices"][0]["delta"]["content"]
                   for event in events[:-1])


async def test_no_healthy_backend_is_503(gateway, vllm):
    vllm.down = True
    response = await chat(gateway, model="base")
    assert_openai_error(response, 503, "server_error", "backend_unavailable")
    assert response.headers["retry-after"] == "1"
    async with gateway.client() as client:
        assert (await client.get("/health")).status_code == 503
        await gateway.pool.check_health()
        assert (await client.get("/health")).status_code == 503
        vllm.down = False
        await gateway.pool.check_health()
        assert (await client.get("/health")).json()["status"] == "ok"
    assert (await chat(gateway, model="base")).status_code == 200


async def test_requests_go_round_robin_and_skip_an_unreachable_backend(tmp_path, llama_base, demo,
                                                                      store_dir):
    first, second = FakeVllm("http://vllm-a:8000"), FakeVllm("http://vllm-b:8000")
    gateway = await make_gateway(tmp_path, llama_base, demo, store_dir, first, second,
                                 routing='[routing]\npolicy = "round-robin"')
    for _ in range(4):
        assert (await chat(gateway, model="caps")).status_code == 200
    assert len(first.received(CHAT)) == len(second.received(CHAT)) == 2
    assert len(first.received(LOAD)) == len(second.received(LOAD)) == 1
    first.down = True
    for _ in range(2):
        assert (await chat(gateway, model="caps")).status_code == 200
    assert len(second.received(CHAT)) == 4
    assert [backend.healthy for backend in gateway.pool.backends] == [False, True]
    await gateway.pool.aclose()


@pytest.mark.parametrize(("method", "path", "status"), [
    ("POST", "/v1/load_lora_adapter", 404), ("POST", "/v1/unload_lora_adapter", 404),
    ("POST", "/tokenize", 404), ("GET", "/v1/embeddings", 404), ("GET", "/docs", 404),
    ("GET", "/openapi.json", 404), ("POST", "/pooling", 404), ("GET", CHAT, 405),
    ("DELETE", "/v1/models", 405),
])
async def test_no_other_route_is_reachable(gateway, method, path, status):
    async with gateway.client(GLOBEX_KEY) as client:
        response = await client.request(method, path)
    error = assert_openai_error(response, status, "invalid_request_error")
    if status == 404:
        assert error["message"] == f"Invalid URL ({method} {path})"
    assert gateway.vllm.requests == []
