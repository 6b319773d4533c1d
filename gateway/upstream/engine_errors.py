"""vLLM's errors, in the gateway's one dialect (OpenAI's shape, `gateway.errors`).

vLLM answers `{"error": {"message", "type": "BadRequestError" or "Bad Request", "param",
"code": 400}}`: a type of its own, an integer code, and for a request its pydantic model
refused, the validation errors' reprs as the message (`2 validation errors:\\n  {'type': ...,
'loc': 'body.n', 'msg': ..., 'input': ...}`). Clients that switch on `type` or `code` would see
two dialects, so every error that comes from a backend, as an answer or as an event inside a
stream, passes through `translate`: the type from the status, the code a string or null,
`param` without vLLM's `body.` prefix, and the message kept but cleaned of pydantic internals
and of the model names a backend serves (those are internal names).
"""

from __future__ import annotations

import ast
import json
import re

from gateway.errors import BackendError, error_body, error_type_for

# vLLM's answer for a feature it does not implement: the request asked for it, not a fault.
NOT_IMPLEMENTED = 501
_VALIDATION_HEADER = re.compile(r"^\d+ validation errors?(?: for \w+)?:?$")
_PARAMETER_SUFFIX = re.compile(r"\s*\(parameter=([\w.]+)(?:, value=.*)?\)$", re.DOTALL)
_ALIASES = re.compile(r"\s*Valid aliases: .*$", re.DOTALL)
_PYDANTIC_DETAILS = re.compile(r"\s*\[type=\w+(?:, [^\]]*)?\]")
_PYDANTIC_LINK = re.compile(r"\s*For further information visit \S+")


def translate(status: int, text: str) -> tuple[int, dict]:
    """The status and OpenAI error body to answer for a backend's error answer `text`."""
    fields = _error_fields(text)
    message, param = clean_message(str(fields.get("message") or "").strip())
    param = _clean_param(fields.get("param")) or param
    if status == NOT_IMPLEMENTED:
        status = 400
    code = fields.get("code") if isinstance(fields.get("code"), str) else None
    if status >= 500:
        code = BackendError.code
    message = message or f"The model backend answered {status}"
    return status, error_body(message, error_type_for(status), code=code, param=param)


def translate_event(error: object) -> dict:
    """The error event of a stream (`{"error": ...}` inside a `data:` line), translated."""
    fields = error if isinstance(error, dict) else {"message": str(error)}
    code = fields.get("code")
    status = code if isinstance(code, int) and 400 <= code < 600 else BackendError.status
    return translate(status, json.dumps({"error": fields}))[1]


def clean_message(message: str) -> tuple[str, str | None]:
    """vLLM's message without pydantic's reprs, links and its own suffixes, and the request
    field it names, if any."""
    lines = message.splitlines()
    if lines and _VALIDATION_HEADER.match(lines[0].strip()):
        return _validation_problems(lines[1:])
    match = _PARAMETER_SUFFIX.search(message)
    param = match.group(1) if match else None
    message = _ALIASES.sub("", _PARAMETER_SUFFIX.sub("", message))
    return message, param


def _validation_problems(lines: list[str]) -> tuple[str, str | None]:
    """`loc: msg` for each problem of a pydantic error listing (vLLM's reprs or pydantic's own
    text), once each, and the first problem's location."""
    problems: list[str] = []
    params: list[str] = []
    pending_location = None
    for line in lines:
        stripped = _PYDANTIC_LINK.sub("", line).strip()
        if not stripped:
            continue
        if stripped.startswith("{"):
            location, text = _repr_problem(stripped)
        elif line.startswith("  ") and pending_location is not None:
            location, text = pending_location, _PYDANTIC_DETAILS.sub("", stripped)
        else:
            pending_location = stripped  # pydantic's text: a location line, then its message
            continue
        location = _clean_param(location)
        problem = f"{location}: {text}" if location else text
        if problem not in problems:
            problems.append(problem)
            params.append(location)
    return "; ".join(problems) or "The request is invalid", next(filter(None, params), None)


def _repr_problem(text: str) -> tuple[str | None, str]:
    try:
        problem = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None, text
    if not isinstance(problem, dict):
        return None, text
    location = problem.get("loc")
    if isinstance(location, (list, tuple)):
        location = ".".join(str(part) for part in location)
    return (str(location) if location is not None else None), str(problem.get("msg", text))


def _clean_param(param: object) -> str | None:
    if not isinstance(param, str) or not param:
        return None
    return param.removeprefix("body.") if param != "body" else None


def _error_fields(text: str) -> dict:
    """The error's fields from any shape vLLM answers in: `{"error": {...}}`, the older
    `{"object": "error", "message": ...}`, FastAPI's `{"detail": ...}` or plain text."""
    try:
        data = json.loads(text)
    except ValueError:
        return {"message": text}
    if not isinstance(data, dict):
        return {"message": text}
    if isinstance(data.get("error"), dict):
        return data["error"]
    if "message" in data:
        return data
    if "detail" in data:
        return {"message": str(data["detail"])}
    return {"message": text}
