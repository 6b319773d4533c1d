"""A request's JSON body, read once and decoded within bounds before any route sees it.

Python's `json` module recurses once per nesting level (a deeply nested body is a
`RecursionError`), reads escapes into lone UTF-16 surrogates (text no encoder can write out
again, so forwarding it failed), and takes NaN, Infinity and numbers of any size (`1e999` is
`inf`). Here a body must be UTF-8, at most `MAX_DEPTH` levels deep, free of lone surrogates,
with finite numbers and integers within 64 bits; anything else is a 400 `invalid_json`.

`JsonBodyMiddleware` decodes every non-multipart body once (the body limit stays outside it)
and keeps the value, or the problem, on the request's scope without answering: routes take it
with `json_body(request)` after they authenticate, so a caller without a key still learns
nothing but 401. A route that parses the body its own way and trips over a body found bad here
is answered this 400 by the crash handler (`body_problem`), never a 500.
"""

from __future__ import annotations

import itertools
import json
import re

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import BodyTooLarge, InvalidRequest, error_response

MAX_DEPTH = 64
INT_RANGE = range(-(2**63), 2**63)
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_VALUE = "json_body"
_PROBLEM = "json_body_problem"
# A JSON string literal (the unrolled form runs in linear time), and everything but brackets.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


class InvalidJson(InvalidRequest):
    code = "invalid_json"


def decode_json(raw: bytes) -> object:
    """The JSON value of `raw`, or `InvalidJson` saying what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidJson(f"The request body is not valid UTF-8 (at byte {exc.start})") from exc
    if nesting_depth(text) > MAX_DEPTH:
        raise InvalidJson(f"The JSON body is nested more than {MAX_DEPTH} levels deep")
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_int=_bounded_int,
                           parse_float=_finite_float)
    except ValueError as exc:
        raise InvalidJson(f"We could not parse the JSON body of your request: {exc}") from exc
    if "\\u" in text:
        _refuse_lone_surrogates(value)
    return value


def nesting_depth(text: str) -> int:
    """How deep the brackets of JSON `text` nest, counted without recursion (outside
    strings; exact for valid JSON, and any figure for invalid JSON fails to parse anyway)."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(itertools.accumulate(map(_STEP.__getitem__, brackets)), default=0)


def json_body(request: Request) -> object:
    """The request's decoded JSON body; `InvalidJson` if it had none or a bad one."""
    state = request.scope.get("state", {})
    problem = state.get(_PROBLEM)
    if problem is not None:
        raise problem
    if _VALUE not in state:
        raise InvalidJson("The request has no JSON body")
    return state[_VALUE]


def body_problem(request: Request) -> InvalidJson | None:
    """What was wrong with the request's body, if the middleware found it bad."""
    return request.scope.get("state", {}).get(_PROBLEM)


class JsonBodyMiddleware:
    """Reads and decodes each request body that may hold JSON (not multipart uploads), then
    hands the route the same bytes again and the client's later messages (a disconnect)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _may_hold_json(scope):
            await self.app(scope, receive, send)
            return
        try:
            raw = await _read_body(receive)
        except BodyTooLarge as exc:
            await error_response(exc)(scope, receive, send)
            return
        if raw is None:
            return  # the client left before it finished sending: no one to answer
        state = scope.setdefault("state", {})
        if raw:
            try:
                state[_VALUE] = decode_json(raw)
            except InvalidJson as exc:
                state[_PROBLEM] = exc
        await self.app(scope, _replay(raw, receive), send)


def _may_hold_json(scope: Scope) -> bool:
    content_type = dict(scope["headers"]).get(b"content-type", b"")
    return scope["method"] in BODY_METHODS and not content_type.startswith(b"multipart/")


async def _read_body(receive: Receive) -> bytes | None:
    """The whole body, or None if the client disconnected first."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(raw: bytes, receive: Receive) -> Receive:
    replayed = False

    async def replaying_receive() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": raw, "more_body": False}

    return replaying_receive


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _bounded_int(digits: str) -> int:
    value = int(digits) if len(digits) <= 20 else None  # int64 has 19 digits and a sign
    if value is None or value not in INT_RANGE:
        raise ValueError(f"the integer {digits[:24]}{'...' if len(digits) > 24 else ''} is "
                         f"outside the 64-bit range")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"the number {text[:24]}{'...' if len(text) > 24 else ''} is too large")
    return value


def _refuse_lone_surrogates(value: object) -> None:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidJson("The JSON body holds a lone UTF-16 surrogate escape (such as "
                          "\\ud800 without its pair), which is not text") from exc
