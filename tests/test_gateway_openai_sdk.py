"""The gateway through the official `openai` SDK (an independent client), against the fake
vLLM: what real clients see of models, streams and errors."""

from __future__ import annotations

import httpx
import httpx2
import openai
import pytest

from tests.gateway_fakes import (
    ACME_KEY,
    STREAM_CHUNKS,
    STREAM_TEXT,
    make_gateway,
)

pytestmark = pytest.mark.anyio
MESSAGES = [{"role": "user", "content": "Hi"}]


@pytest.fixture
async def gateway(tmp_path, llama_base, demo, vllm):
    gateway = await make_gateway(tmp_path, llama_base, demo, tmp_path / "store", vllm)
    yield gateway
    await gateway.pool.aclose()


def sdk(gateway, key: str = ACME_KEY) -> openai.AsyncOpenAI:
    transport = httpx2.ASGITransport(app=gateway.app)
    return openai.AsyncOpenAI(api_key=key, base_url="http://gateway/v1", max_retries=0,
                              http_client=httpx2.AsyncClient(transport=transport))


async def test_completion_and_models(gateway):
    client = sdk(gateway)
    answer = await client.chat.completions.create(model="caps", messages=MESSAGES, max_tokens=8)
    assert answer.model == "caps" and answer.choices[0].message.content == "Hello there"
    text = await client.completions.create(model="plain", prompt="Hi", max_tokens=8)
    assert text.model == "plain" and text.choices[0].text == "Hello there"
    assert [model.id async for model in client.models.list()] == ["base", "caps", "plain"]
    assert (await client.models.retrieve("caps")).id == "caps"


async def test_stream(gateway):
    stream = await sdk(gateway).chat.completions.create(model="caps", messages=MESSAGES,
                                                        stream=True)
    chunks = [chunk async for chunk in stream]
    assert {chunk.model for chunk in chunks} == {"caps"}
    assert "".join(chunk.choices[0].delta.content for chunk in chunks) == "".join(STREAM_TEXT)


async def test_a_broken_stream_raises_in_the_client(gateway, vllm):
    vllm.stream_error = httpx.RemoteProtocolError("peer closed connection")
    stream = await sdk(gateway).chat.completions.create(model="base", messages=MESSAGES,
                                                        stream=True)
    received = []
    with pytest.raises(openai.APIError, match="failed during the stream"):
        async for chunk in stream:
            received.append(chunk)
    assert len(received) == STREAM_CHUNKS


async def test_errors_map_to_the_sdk_exceptions(gateway):
    client = sdk(gateway)
    with pytest.raises(openai.NotFoundError) as missing:
        await client.chat.completions.create(model="pirate", messages=MESSAGES)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("pirate")
    with pytest.raises(openai.BadRequestError) as too_long:
        await client.chat.completions.create(model="base", messages=MESSAGES, max_tokens=10_000)
    assert too_long.value.param == "max_tokens"
    with pytest.raises(openai.AuthenticationError):
        await sdk(gateway, "sk-wrong-0123456789abcdef").models.list()
