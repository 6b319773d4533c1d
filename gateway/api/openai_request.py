"""Checking a client's completion request and making the body that goes to vLLM.

The body passes through unchanged except for what the gateway must own: `model` (mapped to
an internal name), `cache_salt` (per tenant, so prefix-cache timing cannot leak prompts
across tenants) and `request_id`; plus a token cap where vLLM would otherwise generate up to
the context length, and `stream_options.include_usage` on streams (the token counters need
vLLM's usage; the proxy hides it from clients that did not ask).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass

from starlette.requests import Request

from gateway.api.json_body import json_body
from gateway.api.responses_request import PINNED_FIELDS, check_responses_body
from gateway.errors import InvalidRequest, ModelNotFound
from gateway.names import BASE_MODEL
from gateway.registry import AdapterEntry, AdapterRegistry
from gateway.tenancy.tenants import Tenant
from gateway.upstream.stream_events import RESPONSES_PATH

MAX_N = 8
GATEWAY_FIELDS = ("cache_salt", "request_id")
# The fields a prompt is in, per route; their JSON text is what a prompt's tokens are guessed
# from, at OpenAI's rule of thumb of about 4 characters a token (the guess is settled with
# vLLM's count when the answer ends).
PROMPT_FIELDS = ("messages", "prompt", "input", "instructions")
CHARS_PER_TOKEN = 4
# vLLM's output cap for a completion that gives none.
COMPLETIONS_DEFAULT_TOKENS = 16


@dataclass(frozen=True)
class Route:
    path: str
    token_fields: tuple[str, ...]
    # vLLM's completions default is 16 tokens; chat has no default (up to the context).
    unbounded_when_absent: bool
    # Chat and completion streams carry usage only when asked to (`stream_options`); the
    # Responses API always reports it, in its final event.
    usage_on_request: bool = True
    check: Callable[[dict], None] | None = None
    pinned: tuple[tuple[str, object], ...] = ()  # (field, value) pairs the gateway sets


CHAT = Route("/v1/chat/completions", ("max_completion_tokens", "max_tokens"), True)
COMPLETIONS = Route("/v1/completions", ("max_tokens",), False)
# vLLM's Responses API has no default output cap either.
RESPONSES = Route(RESPONSES_PATH, ("max_output_tokens",), True, usage_on_request=False,
                  check=check_responses_body, pinned=PINNED_FIELDS)


def read_body(request: Request) -> dict:
    """The request's JSON body (decoded within bounds by `json_body`): an object with a
    string `model` and a boolean `stream`, if any."""
    body = json_body(request)
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object", code="invalid_json")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise InvalidRequest("You must provide a model parameter (a string)", param="model",
                             code="missing_model")
    if body.get("stream") not in (None, True, False):
        # vLLM would read "true" as true; the gateway must agree on whether it relays a stream.
        raise InvalidRequest("'stream' must be a boolean", param="stream", code="invalid_type")
    return body


def resolve_model(registry: AdapterRegistry, tenant: Tenant, model: str) -> AdapterEntry | None:
    """The adapter `model` names (None for the base model); an adapter the tenant may not use
    answers exactly like one that does not exist."""
    if model == BASE_MODEL:
        return None
    entry = registry.get(model) if tenant.may_use(model) else None
    if entry is None:
        raise ModelNotFound(model)
    return entry


def check_limits(body: dict, tenant: Tenant, route: Route) -> None:
    for field in route.token_fields:
        value = _optional_int(body, field)
        if value is not None and value > tenant.max_tokens:
            raise InvalidRequest(f"'{field}' is {value}, above this API key's limit of "
                                 f"{tenant.max_tokens}", param=field, code="max_tokens_too_large")
    n = _optional_int(body, "n")
    if n is not None and n > MAX_N:
        raise InvalidRequest(f"'n' is {n}, above the limit of {MAX_N}", param="n",
                             code="n_too_large")
    if route.check is not None:
        route.check(body)


def upstream_body(body: dict, route: Route, tenant: Tenant, *, model: str, cache_salt: str,
                  request_id: str) -> dict:
    forwarded = {key: value for key, value in body.items() if key not in GATEWAY_FIELDS}
    forwarded.update(route.pinned, model=model, cache_salt=cache_salt, request_id=request_id)
    options = body.get("stream_options")
    asks_usage = route.usage_on_request and body.get("stream") is True
    if asks_usage and (options is None or isinstance(options, dict)):
        forwarded["stream_options"] = {**(options or {}), "include_usage": True}
    present = [field for field in route.token_fields if field in body]
    unbounded = all(body[field] is None for field in present) and (
        bool(present) or route.unbounded_when_absent)
    if unbounded:
        forwarded[route.token_fields[0]] = tenant.max_tokens
    return forwarded


def prompt_estimate(forwarded: dict) -> int:
    """A guess of the prompt's tokens from its text, before vLLM has counted them."""
    chars = sum(len(json.dumps(forwarded[field], ensure_ascii=False))
                for field in PROMPT_FIELDS if field in forwarded)
    return math.ceil(chars / CHARS_PER_TOKEN)


def output_cap(forwarded: dict, route: Route) -> int:
    """The most tokens the request can generate: its token cap (which `upstream_body` makes
    explicit where vLLM would have none) for each of its `n` choices."""
    caps = [forwarded[field] for field in route.token_fields
            if isinstance(forwarded.get(field), int)]
    cap = caps[0] if caps else COMPLETIONS_DEFAULT_TOKENS
    n = forwarded.get("n")
    return cap * (n if isinstance(n, int) and n > 0 else 1)


def hides_usage(body: dict, route: Route) -> bool:
    """Whether the proxy drops a stream's usage chunk: the gateway always asks for it (its
    token counters need it), so it is hidden from chat and completion clients that did not
    ask; a response's usage is part of the response itself."""
    options = body.get("stream_options")
    wants = isinstance(options, dict) and options.get("include_usage") is True
    return route.usage_on_request and not wants


def _optional_int(body: dict, field: str) -> int | None:
    value = body.get(field)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequest(f"'{field}' must be an integer", param=field, code="invalid_type")
    return value
