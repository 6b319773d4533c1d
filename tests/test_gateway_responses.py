"""`POST /v1/responses` against the fake vLLM: what the gateway forwards and refuses, how it
relays the typed stream events, and what its metrics see of them. The same route against a
real vLLM, through the `openai` SDK, is in `test_engine_gateway_responses.py`."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.gateway_fakes import ACME_KEY, GLOBEX_KEY, STREAM_TEXT, USAGE
from tests.test_gateway_metrics import scrape, series
from tests.test_gateway_openai import assert_openai_error

pytestmark = pytest.mark.anyio
RESPONSES = "/v1/responses"


async def respond(gateway, key: str = ACME_KEY, **body) -> httpx.Response:
    async with gateway.client(key) as client:
        return await client.post(RESPONSES, json={"input": "Hi", **body})


def sse_events(text: str) -> list[tuple[str, dict]]:
    """(event name, data) of each event of an SSE body."""
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((fields.get("event", ""), json.loads(fields["data"])))
    return events


async def test_the_gateway_owns_model_salt_id_store_and_the_token_cap(gateway, vllm):
    response = await respond(gateway, model="caps", cache_salt="mine", request_id="mine")
    assert response.status_code == 200, response.text
    forwarded = vllm.received(RESPONSES)[-1]
    internal = next(name for name in vllm.loaded if name.startswith("caps--"))
    assert forwarded["model"] == internal and forwarded["store"] is False
    assert forwarded["cache_salt"] not in (None, "mine")
    assert forwarded["request_id"] == response.headers["x-request-id"] != "mine"
    assert forwarded["max_output_tokens"] == 64  # acme's max_tokens
    answer = response.json()
    assert answer["model"] == "caps" and internal not in response.text


@pytest.mark.parametrize(("field", "value"), [
    ("previous_response_id", "resp_1"), ("conversation", {"id": "conv_1"}),
    ("prompt", {"id": "pmpt_1"}), ("background", True), ("store", True)])
async def test_stateful_fields_are_refused_before_reaching_vllm(gateway, vllm, field, value):
    error = assert_openai_error(await respond(gateway, model="caps", **{field: value}), 400,
                                "invalid_request_error", "unsupported_parameter")
    assert error["param"] == field
    assert vllm.received(RESPONSES) == []


async def test_limits_and_adapter_access_apply(gateway, vllm):
    too_long = await respond(gateway, model="caps", max_output_tokens=65)
    assert assert_openai_error(too_long, 400, "invalid_request_error",
                               "max_tokens_too_large")["param"] == "max_output_tokens"
    foreign = await respond(gateway, model="pirate")
    assert_openai_error(foreign, 404, "invalid_request_error", "model_not_found")
    assert vllm.received(RESPONSES) == []


async def test_a_stream_names_the_clients_model_and_is_timed_and_counted(gateway):
    response = await respond(gateway, GLOBEX_KEY, model="plain", stream=True)
    assert response.status_code == 200, response.text
    events = sse_events(response.text)
    assert [name for name, _ in events] == [data["type"] for _, data in events]
    assert events[-1][0] == "response.completed"
    assert {data["response"]["model"] for _, data in events if "response" in data} == {"plain"}
    assert "".join(data.get("delta", "") for _, data in events) == "".join(STREAM_TEXT)
    samples = await scrape(gateway)
    labels = {"tenant": "globex", "adapter": "plain", "adapter_type": "lora"}
    assert series(samples, "dora_gateway_requests_total", status="200", **labels) == 1
    assert series(samples, "dora_gateway_time_to_first_token_seconds_count", **labels) == 1
    assert series(samples, "dora_gateway_completion_tokens_total", **labels) == len(STREAM_TEXT)
    assert series(samples, "dora_gateway_prompt_tokens_total", **labels) == USAGE["prompt_tokens"]


async def test_a_broken_stream_ends_with_an_error_event_the_sdk_reads(gateway, vllm):
    vllm.stream_error = httpx.RemoteProtocolError("peer closed connection")
    transport = httpx.ASGITransport(app=gateway.app)
    client = openai.AsyncOpenAI(api_key=ACME_KEY, base_url="http://gateway/v1", max_retries=0,
                                http_client=httpx.AsyncClient(transport=transport))
    stream = await client.responses.create(model="caps", input="Hi", stream=True)
    events = [event async for event in stream]
    assert [event.type for event in events][-1] == "error"
    assert events[-1].code == "backend_error" and "failed during the stream" in events[-1].message
    samples = await scrape(gateway)
    labels = {"tenant": "acme", "adapter": "caps", "adapter_type": "dora"}
    assert series(samples, "dora_gateway_requests_total", status="502", **labels) == 1
