"""What the relay reads in vLLM's answers, in both of its formats.

- Chat and text completions: `data:` chunks with `choices`, `model` and `usage` at the top;
  a stream ends with `data: [DONE]`.
- The Responses API: typed events (`event: response.output_text.delta` then its `data:`);
  the response object (with `model` and `usage`) sits at the top of a plain answer and under
  `response` in the lifecycle events; a stream ends with its terminal event, no `[DONE]`.
"""

from __future__ import annotations

import json

RESPONSES_PATH = "/v1/responses"
DONE = "[DONE]"
TERMINAL_RESPONSE_EVENTS = frozenset(
    {"response.completed", "response.incomplete", "response.failed"})


def ends_stream(payload: str, event: object) -> bool:
    """Whether `payload` (parsed: `event`) is the last of a complete stream."""
    if payload == DONE:
        return True
    return isinstance(event, dict) and event.get("type") in TERMINAL_RESPONSE_EVENTS


def usage_of(answer: dict) -> dict | None:
    """Token counts as `prompt_tokens`/`completion_tokens`, from a chunk, a plain answer or a
    Responses event (whose `input_tokens`/`output_tokens` are the same counts)."""
    usage = answer.get("usage")
    response = answer.get("response")
    if usage is None and isinstance(response, dict):
        usage = response.get("usage")
    if not isinstance(usage, dict):
        return None
    if "input_tokens" in usage:
        return {"prompt_tokens": usage.get("input_tokens"),
                "completion_tokens": usage.get("output_tokens")}
    return usage


def rename_model(answer: dict, name: str) -> None:
    """Show `name` as the model wherever the answer names one."""
    if "model" in answer:
        answer["model"] = name
    response = answer.get("response")
    if isinstance(response, dict) and "model" in response:
        response["model"] = name


def failure_lines(error: dict, responses_api: bool) -> str:
    """The SSE lines that end a broken stream with `error` (OpenAI's error object): an
    `error` event for the Responses API, an error chunk and `[DONE]` for completions."""
    if responses_api:
        event = {"type": "error", "code": error.get("code"), "message": error.get("message"),
                 "param": error.get("param")}
        return f"\nevent: error\ndata: {dumps(event)}\n\n"
    return f"\ndata: {dumps({'error': error})}\n\ndata: {DONE}\n\n"


def dumps(data: object) -> str:
    """Compact JSON, as vLLM writes it; non-ASCII text kept as it is."""
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))
