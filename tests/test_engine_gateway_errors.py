"""Errors through the real gateway in front of a real vLLM: what vLLM refuses reaches clients
in OpenAI's shape (its message kept, without pydantic's reprs), as an answer or, for what it
refuses once a stream has started, as the stream's error event; and what broke the gateway
before is a 400 that never reaches vLLM."""

from __future__ import annotations

import json

import httpx
import pytest

from gateway.errors import ERROR_TYPES
from tests.gateway_process import GLOBEX_KEY, PROMPT

pytestmark = pytest.mark.vllm
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Hi"}]
# Traces of vLLM's and pydantic's own dialect that must not reach clients.
FOREIGN = ("{'type'", "validation error", "input_value", "errors.pydantic.dev",
           "Valid aliases", "BadRequestError", "(parameter=")


def refusal(response: httpx.Response) -> dict:
    """The error of a refused request: a 400's body, or, for what vLLM refuses only once it
    has started a stream, the stream's error event (then `[DONE]`)."""
    if response.status_code == 400:
        return response.json()["error"]
    assert response.status_code == 200, response.text
    events = [line[len("data: "):] for line in response.text.splitlines()
              if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events
    return json.loads(events[-2])["error"]


@pytest.mark.parametrize(("path", "fields", "param", "words"), [
    (CHAT, {"n": 0}, None, "n must be at least 1"),
    (CHAT, {"max_tokens": 0}, "max_tokens", "max_tokens must be at least 1"),
    (CHAT, {"tools": [{"type": "x"}]}, "tools.0.type", "Input should be 'function'"),
    (CHAT, {"response_format": {"type": "bogus"}}, "response_format.type", "Input should be"),
    (CHAT, {"temperature": -1}, "temperature", "temperature must be non-negative"),
    (CHAT, {"logit_bias": {"99999999": 5}}, "logit_bias", "out-of-vocab"),
    ("/v1/completions", {"prompt": [99999999]}, None, "out of vocabulary"),
    ("/v1/completions", {"prompt": PROMPT, "stop": 5}, "stop", "Input should be a valid"),
    ("/v1/completions", {"prompt": PROMPT, "logprobs": 100}, "logprobs", "greater than"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_what_vllm_refuses_is_a_400_in_openai_shape(real_gateway, path, fields, param, words,
                                                     stream):
    body = {"model": "base", "max_tokens": 4, "stream": stream, **fields}
    if path == CHAT:
        body["messages"] = MESSAGES
    with real_gateway.client(GLOBEX_KEY) as client:
        response = client.post(path, json=body)
    error = refusal(response)
    assert error["type"] == "invalid_request_error" and error["code"] is None
    assert error["param"] == param
    assert words in error["message"]
    assert not [trace for trace in FOREIGN if trace in error["message"]], error["message"]


@pytest.mark.parametrize("content", [
    b'{"model": "base", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
    b'{"model": "base", "messages": ' + b"[" * 20000 + b"]" * 20000 + b"}",
    b'{"model": "base", "messages": [{"role": "user", "content": "hi"}], "seed": 1e400}',
])
def test_what_broke_the_gateway_before_is_a_400(real_gateway, content):
    with real_gateway.client(GLOBEX_KEY) as client:
        response = client.post(CHAT, content=content,
                               headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] in ERROR_TYPES and error["code"] == "invalid_json"
    assert response.headers["x-request-id"]

