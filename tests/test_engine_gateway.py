"""The gateway in front of a real vLLM, through real clients (the `openai` SDK and httpx).

One gateway process for the session (`real_gateway`) over the session's vLLM (`engine`),
which also serves the demo adapters under their own names: a request sent both ways must get
the same tokens. vLLM's own metrics show whether a disconnect aborted the generation.
"""

from __future__ import annotations

import asyncio
import json
import shutil

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.engine import LOGPROB_TOLERANCE, unload_adapter
from tests.gateway_process import (
    ACME_KEY,
    ADMIN_KEY,
    GLOBEX_KEY,
    PROMPT,
    GatewayProcess,
    data_events,
    leave_stream_and_wait_for_abort,
)

pytestmark = pytest.mark.vllm
MODELS = ("base", "pirate", "caps-lora")  # the base model, a DoRA adapter, a LoRA adapter
MESSAGES = [{"role": "user", "content": "What is the sea?"}]
MAX_TOKENS = 8


def sdk(gateway: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=GLOBEX_KEY, max_retries=0,
                         timeout=300)


def async_sdk(gateway: GatewayProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=GLOBEX_KEY, max_retries=0,
                              timeout=300)


def check_answers(model: str, chat, chat_chunks: list, text, text_chunks: list) -> None:
    """Every answer names the client's model; a stream says what the whole answer says."""
    assert chat.model == text.model == model
    assert {chunk.model for chunk in chat_chunks + text_chunks} == {model}
    assert 0 < chat.usage.completion_tokens <= MAX_TOKENS
    content = chat.choices[0].message.content
    assert content and "".join(chunk.choices[0].delta.content or "" for chunk in chat_chunks
                               if chunk.choices) == content
    assert text.choices[0].text
    assert "".join(chunk.choices[0].text for chunk in text_chunks) == text.choices[0].text


@pytest.mark.parametrize("model", MODELS)
def test_sdk_chat_and_completions_streamed_and_not(real_gateway, model):
    chat_args = {"model": model, "messages": MESSAGES, "max_tokens": MAX_TOKENS, "temperature": 0}
    text_args = {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
    with sdk(real_gateway) as client:
        chat = client.chat.completions.create(**chat_args)
        chat_chunks = list(client.chat.completions.create(**chat_args, stream=True))
        text = client.completions.create(**text_args)
        text_chunks = list(client.completions.create(**text_args, stream=True))
    check_answers(model, chat, chat_chunks, text, text_chunks)


async def answer_texts(client: openai.AsyncOpenAI, model: str, *, stream: bool,
                       ) -> tuple[str, str]:
    """(chat answer, completion) of `model`, both requested at once, streamed or not."""
    chat_args = {"model": model, "messages": MESSAGES, "max_tokens": MAX_TOKENS,
                 "temperature": 0, "stream": stream}
    text_args = {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0,
                 "stream": stream}
    chat, text = await asyncio.gather(client.chat.completions.create(**chat_args),
                                      client.completions.create(**text_args))
    if not stream:
        assert chat.model == text.model == model
        return chat.choices[0].message.content, text.choices[0].text
    chat_chunks = [chunk async for chunk in chat]
    text_chunks = [chunk async for chunk in text]
    assert {chunk.model for chunk in chat_chunks + text_chunks} == {model}
    return ("".join(chunk.choices[0].delta.content or "" for chunk in chat_chunks
                    if chunk.choices),
            "".join(chunk.choices[0].text for chunk in text_chunks))


def test_async_sdk_with_every_kind_of_model_at_once(real_gateway):
    """Base, DoRA and LoRA requests in flight together, so vLLM batches them together: each
    must answer exactly as it does alone."""
    jobs = [(model, stream) for model in MODELS for stream in (False, True)]

    async def run() -> tuple[dict[str, tuple[str, str]], list[tuple[str, str]]]:
        async with async_sdk(real_gateway) as client:
            alone = {model: await answer_texts(client, model, stream=False) for model in MODELS}
            together = await asyncio.gather(*(answer_texts(client, model, stream=stream)
                                              for model, stream in jobs))
        return alone, together

    alone, together = asyncio.run(run())
    for (model, stream), texts in zip(jobs, together, strict=True):
        assert texts == alone[model], (model, stream)


@pytest.mark.parametrize("model", ["caps", "pirate"])
def test_dora_through_the_gateway_equals_vllm_serving_it_directly(real_gateway, engine, model):
    """The gateway loads its own compiled copy under an internal name; vLLM's `--lora-modules`
    copy of the same adapter must answer token for token alike."""
    text_body = {"prompt": "Tell me about the moon.", "max_tokens": 12, "temperature": 0,
                 "logprobs": 1, "return_token_ids": True}
    chat_body = {"messages": MESSAGES, "max_tokens": 12, "temperature": 0}
    with real_gateway.client(GLOBEX_KEY) as gateway, httpx.Client(base_url=engine.base_url,
                                                                  timeout=300) as direct:
        answers = {}
        for path, body in (("/v1/completions", text_body), ("/v1/chat/completions", chat_body)):
            through = gateway.post(path, json={**body, "model": model})
            assert through.status_code == 200, through.text
            straight = direct.post(path, json={**body, "model": model})
            assert straight.status_code == 200, straight.text
            answers[path] = through.json()["choices"][0], straight.json()["choices"][0]
        internal = admin_view(real_gateway)[model]["internal_name"]
        served = [card["id"] for card in direct.get("/v1/models").json()["data"]]
    assert internal != model and internal in served
    through, straight = answers["/v1/completions"]
    assert through["token_ids"] == straight["token_ids"] and through["text"] == straight["text"]
    gaps = [abs(a - b) for a, b in zip(through["logprobs"]["token_logprobs"],
                                       straight["logprobs"]["token_logprobs"], strict=True)]
    assert max(gaps) < LOGPROB_TOLERANCE
    through, straight = answers["/v1/chat/completions"]
    assert through["message"]["content"] == straight["message"]["content"]


def admin_view(gateway: GatewayProcess) -> dict[str, dict]:
    with gateway.client(ADMIN_KEY) as admin:
        listing = admin.get("/admin/adapters")
    assert listing.status_code == 200, listing.text
    return {adapter["name"]: adapter for adapter in listing.json()["data"]}


@pytest.mark.parametrize("stream", [False, True])
def test_an_adapter_unloaded_behind_the_gateways_back_is_loaded_again(real_gateway, engine,
                                                                      stream):
    """What another gateway replica sharing the vLLM does when an adapter is removed: the
    gateway still believes it loaded, vLLM answers 404, the gateway loads it and retries."""
    body = {"model": "pirate", "messages": MESSAGES, "max_tokens": MAX_TOKENS, "stream": stream}
    internal = admin_view(real_gateway)["pirate"]["internal_name"]
    with real_gateway.client(GLOBEX_KEY) as gateway:
        assert gateway.post("/v1/chat/completions", json=body).status_code == 200
        unloaded = unload_adapter(engine.base_url, internal)
        assert unloaded.status_code == 200, unloaded.text
        response = gateway.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    if stream:
        *chunks, done = data_events(response.text.splitlines())
        assert done == "[DONE]"
        assert "".join(json.loads(chunk)["choices"][0]["delta"].get("content") or ""
                       for chunk in chunks if json.loads(chunk)["choices"])
    else:
        assert response.json()["choices"][0]["message"]["content"]
    with httpx.Client(base_url=engine.base_url, timeout=60) as direct:
        served = [card["id"] for card in direct.get("/v1/models").json()["data"]]
    assert internal in served


def test_tenants_cannot_list_use_or_probe_each_others_adapters(real_gateway):
    internal = {name: adapter["internal_name"]
                for name, adapter in admin_view(real_gateway).items()}
    with real_gateway.client(ACME_KEY) as acme, real_gateway.client(GLOBEX_KEY) as globex:
        assert [card["id"] for card in acme.get("/v1/models").json()["data"]] == [
            "base", "caps", "pirate"]
        assert {"brief", "caps-lora"} <= {card["id"] for card in
                                          globex.get("/v1/models").json()["data"]}

        def refusal(request: httpx.Request, model: str) -> tuple[int, dict]:
            response = acme.send(request)
            return response.status_code, json.loads(response.text.replace(model, "MODEL"))

        def attempts(model: str) -> list[tuple[int, dict]]:
            chat = {"model": model, "messages": MESSAGES, "max_tokens": 4}
            text = {"model": model, "prompt": PROMPT, "max_tokens": 4}
            requests = [acme.build_request("GET", f"/v1/models/{model}"),
                        acme.build_request("POST", "/v1/chat/completions", json=chat),
                        acme.build_request("POST", "/v1/chat/completions",
                                           json={**chat, "stream": True}),
                        acme.build_request("POST", "/v1/completions", json=text)]
            return [refusal(request, model) for request in requests]

        missing = attempts("no-such-adapter")
        assert {status for status, _ in missing} == {404}
        for model in ("caps-lora", "brief", internal["caps-lora"], internal["caps"]):
            assert attempts(model) == missing, model
        allowed = globex.post("/v1/completions", json={"model": "caps-lora", "prompt": PROMPT,
                                                       "max_tokens": 4})
    assert allowed.status_code == 200, allowed.text


def test_admin_adds_and_removes_an_adapter_while_another_request_streams(
        real_gateway, demo_adapters, gateway_root):
    source = shutil.copytree(demo_adapters / "pirate", gateway_root / "pirate-copy")
    body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    with real_gateway.client(ADMIN_KEY) as admin, real_gateway.client(GLOBEX_KEY) as globex:
        added = admin.post("/admin/adapters", json={"name": "pirate2", "path": str(source)})
        assert added.status_code == 201, added.text
        assert added.json()["is_dora"]
        stream_body = {**body, "model": "pirate2", "stream": True}
        with globex.stream("POST", "/v1/completions", json=stream_body) as stream:
            assert stream.status_code == 200
            events = data_events(stream.iter_lines())
            first = next(events)
            removed = admin.delete("/admin/adapters/pirate2")
            assert removed.status_code == 204, removed.text
            events = [first, *events]
        gone = globex.post("/v1/completions", json={**body, "model": "pirate2"})
        original = globex.post("/v1/completions", json={**body, "model": "pirate"})
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert not any("error" in chunk for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    assert original.status_code == 200, original.text
    streamed = "".join(chunk["choices"][0]["text"] for chunk in chunks)
    assert streamed == original.json()["choices"][0]["text"]


def test_a_client_that_disconnects_aborts_its_generation_in_vllm(real_gateway, engine):
    body = {"model": "caps", "prompt": PROMPT, "max_tokens": 1000, "ignore_eos": True,
            "stream": True}
    leave_stream_and_wait_for_abort(real_gateway, engine.base_url, "/v1/completions", body,
                                    events=3)


def scraped(gateway: GatewayProcess, name: str, **labels: str) -> float:
    """One sample of the gateway's `/metrics` (0 if the series does not exist yet)."""
    text = httpx.get(gateway.url + "/metrics", timeout=30).text
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == name and set(labels.items()) <= set(sample.labels.items()))


def test_metrics_count_vllms_tokens_and_usage_reaches_only_clients_that_ask(real_gateway):
    labels = {"tenant": "globex", "adapter": "pirate", "adapter_type": "dora"}
    tokens_before = scraped(real_gateway, "dora_gateway_completion_tokens_total", **labels)
    ttft_before = scraped(real_gateway, "dora_gateway_time_to_first_token_seconds_count",
                          **labels)
    request = {"model": "pirate", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0,
               "stream": True}
    hidden = list(sdk(real_gateway).completions.create(**request))
    shown = list(sdk(real_gateway).completions.create(
        **request, stream_options={"include_usage": True}))
    assert all(chunk.usage is None for chunk in hidden)
    usage = shown[-1].usage
    assert shown[-1].choices == [] and usage.completion_tokens > 0
    # Greedy and the same prompt: both requests generated the same tokens.
    tokens = scraped(real_gateway, "dora_gateway_completion_tokens_total", **labels)
    assert tokens - tokens_before == 2 * usage.completion_tokens
    assert scraped(real_gateway, "dora_gateway_time_to_first_token_seconds_count",
                   **labels) - ttft_before == 2
