"""`POST /v1/responses` through the gateway to a real vLLM, with the official `openai` SDK.

The session's gateway (`real_gateway`) over the session's vLLM (`engine`). Greedy answers
through the Responses API must be the tokens chat completions give for the same question:
both apply the model's chat template to one user message.
"""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.gateway_process import (
    ACME_KEY,
    GLOBEX_KEY,
    GatewayProcess,
    leave_stream_and_wait_for_abort,
)
from tests.test_engine_gateway import scraped

pytestmark = pytest.mark.vllm
MODELS = ("base", "pirate", "caps-lora")  # the base model, a DoRA adapter, a LoRA adapter
QUESTION = "What is the sea?"
MAX_TOKENS = 8
ENDS = {"response.completed", "response.incomplete"}  # incomplete: cut at max_output_tokens


def sdk(gateway: GatewayProcess, key: str = GLOBEX_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=300)


def async_sdk(gateway: GatewayProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=GLOBEX_KEY, max_retries=0,
                              timeout=300)


def chat_answer(gateway: GatewayProcess, model: str) -> str:
    answer = sdk(gateway).chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=MAX_TOKENS,
        temperature=0)
    return answer.choices[0].message.content


def streamed_text(events: list) -> str:
    return "".join(event.delta for event in events if event.type == "response.output_text.delta")


def check_stream(events: list, model: str) -> None:
    """Typed events from `response.created` to the final one, each naming `model`."""
    assert events[0].type == "response.created" and events[-1].type in ENDS
    assert {event.response.model for event in events if hasattr(event, "response")} == {model}
    assert streamed_text(events) == events[-1].response.output_text


@pytest.mark.parametrize("model", MODELS)
def test_sdk_responses_streamed_and_not_answer_as_chat_does(real_gateway, model):
    client = sdk(real_gateway)
    request = {"model": model, "input": QUESTION, "max_output_tokens": MAX_TOKENS,
               "temperature": 0}
    answer = client.responses.create(**request)
    events = list(client.responses.create(**request, stream=True))
    assert answer.model == model and answer.status in ("completed", "incomplete")
    assert 0 < answer.usage.output_tokens <= MAX_TOKENS
    assert answer.output_text == chat_answer(real_gateway, model)
    check_stream(events, model)
    assert streamed_text(events) == answer.output_text


def test_async_sdk_responses_for_every_kind_of_model_at_once(real_gateway):
    client = async_sdk(real_gateway)

    async def both(model: str) -> tuple[str, list]:
        request = {"model": model, "input": QUESTION, "max_output_tokens": MAX_TOKENS,
                   "temperature": 0}
        answer = await client.responses.create(**request)
        stream = await client.responses.create(**request, stream=True)
        return answer, [event async for event in stream]

    async def all_models() -> list[tuple[str, list]]:
        return await asyncio.gather(*(both(model) for model in MODELS))

    for model, (answer, events) in zip(MODELS, asyncio.run(all_models()), strict=True):
        assert answer.model == model
        check_stream(events, model)
        assert streamed_text(events) == answer.output_text == chat_answer(real_gateway, model)


def test_stateful_requests_are_refused_before_reaching_vllm(real_gateway):
    client = sdk(real_gateway)
    request = {"model": "pirate", "input": QUESTION, "max_output_tokens": MAX_TOKENS}
    for field, value in (("previous_response_id", "resp_123"), ("store", True),
                         ("background", True), ("conversation", "conv_123")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.responses.create(**request, **{field: value})
        assert (refused.value.param, refused.value.code) == (field, "unsupported_parameter")
    with pytest.raises(openai.BadRequestError) as too_long:
        client.responses.create(**{**request, "max_output_tokens": 1_000_000})
    assert too_long.value.param == "max_output_tokens"
    assert client.responses.create(**request, store=False).model == "pirate"


def test_tenants_only_reach_their_own_adapters(real_gateway):
    request = {"input": QUESTION, "max_output_tokens": MAX_TOKENS}
    acme = sdk(real_gateway, ACME_KEY)
    for model in ("caps-lora", "no-such-adapter"):
        with pytest.raises(openai.NotFoundError) as missing:
            acme.responses.create(model=model, **request)
        assert missing.value.code == "model_not_found"
    assert acme.responses.create(model="caps", **request).model == "caps"


def test_metrics_time_the_stream_events_and_count_its_tokens(real_gateway):
    labels = {"tenant": "globex", "adapter": "caps-lora", "adapter_type": "lora"}
    tokens_before = scraped(real_gateway, "dora_gateway_completion_tokens_total", **labels)
    ttft_before = scraped(real_gateway, "dora_gateway_time_to_first_token_seconds_count",
                          **labels)
    events = list(sdk(real_gateway).responses.create(
        model="caps-lora", input=QUESTION, max_output_tokens=MAX_TOKENS, stream=True))
    usage = events[-1].response.usage
    assert scraped(real_gateway, "dora_gateway_completion_tokens_total",
                   **labels) - tokens_before == usage.output_tokens > 0
    assert scraped(real_gateway, "dora_gateway_time_to_first_token_seconds_count",
                   **labels) - ttft_before == 1


def test_a_client_that_leaves_a_response_stream_aborts_it_in_vllm(real_gateway, engine):
    body = {"model": "caps", "input": QUESTION, "max_output_tokens": 1000, "ignore_eos": True,
            "stream": True}
    leave_stream_and_wait_for_abort(real_gateway, engine.base_url, "/v1/responses", body,
                                    events=6)
