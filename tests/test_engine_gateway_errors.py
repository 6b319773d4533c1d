"""Errors through the real gateway in front of a real vLLM: what vLLM refuses reaches clients
in OpenAI's shape (its message kept, without pydantic's reprs), as an answer or, for what it
refuses once a stream has started, as the stream's error event; and what broke the gateway
before is a 400 that never reaches vLLM."""

from __future__ import annotations

import json
import os

import httpx
import pytest
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.errors import ERROR_TYPES
from tests.gateway_process import GLOBEX_KEY, PROMPT
from tests.test_gateway_fuzz import fuzzed, openai_error_shape

pytestmark = pytest.mark.vllm
CHAT = "/v1/chat/completions"
REAL_FUZZ_EXAMPLES = int(os.environ.get("DORA_GATEWAY_REAL_FUZZ_EXAMPLES", "10"))
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



real_fuzzed = fuzzed.include(path_regex="^/v1/(chat/completions|completions|responses)$")


@real_fuzzed.hook
def map_body(context, body):
    """Short generations: a real CPU engine would take minutes at the tenant's token cap."""
    if isinstance(body, dict):
        for field in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
            value = body.get(field)
            if value is None or (isinstance(value, int) and not isinstance(value, bool)):
                body[field] = 4 if value is None else min(value, 4)
    return body


@real_fuzzed.parametrize()
@settings(max_examples=REAL_FUZZ_EXAMPLES, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_fuzzed_generations_against_a_real_vllm_get_no_5xx(case, real_gateway):
    response = case.call(base_url=real_gateway.url,
                         headers={"Authorization": f"Bearer {GLOBEX_KEY}"}, timeout=300)
    case.validate_response(response, checks=[
        not_a_server_error, status_code_conformance, content_type_conformance,
        response_schema_conformance, openai_error_shape])
