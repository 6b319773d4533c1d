"""The gateway's OpenAPI description of `/v1` and `/admin`: what clients may send and what
every answer, errors included, looks like.

The routes read their bodies themselves (vLLM's request bodies pass through, so the gateway
does not model them field by field), so FastAPI cannot derive this; it is written here, and
the tests check that it names exactly the app's routes and fuzz the app against it. Request
bodies list the fields the gateway itself reads or bounds and allow any others (they go to
vLLM); `model` is the base model or an adapter's name; every error is `Error`, OpenAI's shape.
"""

from __future__ import annotations

from gateway.errors import ERROR_TYPES
from gateway.names import BASE_MODEL, NAME_PATTERN
from gateway.quota.policy import MAX_LIMIT, BudgetPeriod
from gateway.registry.entries import Origin

JSON = "application/json"
INT64 = {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1}


def openapi_schema() -> dict:
    return {
        "openapi": "3.1.0",
        "info": {"title": "dora-gateway", "version": "1"},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
                       "schemas": _schemas()},
        "security": [{"bearer": []}],
        "paths": {
            "/v1/chat/completions": {"post": _completion("ChatRequest", "ChatCompletion")},
            "/v1/completions": {"post": _completion("CompletionRequest", "Completion")},
            "/v1/responses": {"post": _completion("ResponsesRequest", "Response",
                                                  event="ResponseEvent")},
            "/v1/models": {"get": _operation(200, _ref("ModelList"), errors=(401,))},
            "/v1/models/{model}": {"get": _operation(
                200, _ref("Model"), errors=(401, 404), parameters=[_path_parameter("model")])},
            "/admin/adapters": {
                "get": _operation(200, _ref("AdapterList"), errors=(401,)),
                "post": _operation(201, _ref("Adapter"), body=_ref("AddAdapter"),
                                   errors=(400, 401, 409, 413, 503)),
            },
            "/admin/adapters/{name}": {"delete": _operation(
                204, None, errors=(401, 404, 503), parameters=[_path_parameter("name")])},
            "/admin/adapters/{name}/upload": {"post": _operation(
                201, _ref("Adapter"), errors=(400, 401, 409, 413, 503),
                parameters=[_path_parameter("name")],
                body=_ref("AdapterUpload"), body_type="multipart/form-data")},
            "/admin/tenants": {"get": _operation(200, _list("Tenant"), errors=(401,))},
            "/admin/tenants/{name}/limits": {
                "put": _operation(200, _ref("Tenant"), body=_ref("Limits"),
                                  errors=(400, 401, 404, 413, 503),
                                  parameters=[_path_parameter("name")]),
                "delete": _operation(204, None, errors=(401, 404, 503),
                                     parameters=[_path_parameter("name")]),
            },
            "/admin/usage": {"get": _usage()},
        },
    }


def _completion(request: str, answer: str, event: str = "Chunk") -> dict:
    """A completion route: JSON, or a server-sent event stream when `stream` is true, whose
    events carry `event` objects, an error in `Error`'s shape, or `[DONE]`."""
    operation = _operation(200, _ref(answer), body=_ref(request),
                           errors=(400, 401, 404, 413, 422, 429, 500, 502, 503, 504))
    data = {"anyOf": [{"const": "[DONE]"}, {
        "type": "string", "contentMediaType": JSON,
        "contentSchema": {"anyOf": [_ref(event), _ref("Error")]}}]}
    operation["responses"]["200"]["content"]["text/event-stream"] = {"schema": {
        "type": "object", "required": ["data"], "properties": {"data": data}}}
    return operation


def _operation(status: int, answer: dict | None, *, errors: tuple[int, ...],
               body: dict | None = None, body_type: str = JSON,
               parameters: list[dict] | None = None) -> dict:
    responses: dict = {str(status): {"description": "success"}}
    if answer is not None:
        responses[str(status)]["content"] = {JSON: {"schema": answer}}
    for error in errors:
        responses[str(error)] = {"description": "error",
                                 "content": {JSON: {"schema": _ref("Error")}}}
    operation: dict = {"responses": responses}
    if body is not None:
        operation["requestBody"] = {"required": True, "content": {body_type: {"schema": body}}}
    if parameters:
        operation["parameters"] = parameters
    return operation


def _usage() -> dict:
    """`/admin/usage`: JSON, or CSV with `format=csv`."""
    operation = _operation(200, _ref("Usage"), errors=(400, 401, 503), parameters=[
        {"name": name, "in": "query", "required": False, "schema": {"type": "string"}}
        for name in ("tenant", "from", "to", "group_by", "format")])
    operation["responses"]["200"]["content"]["text/csv"] = {"schema": {"type": "string"}}
    return operation


def _path_parameter(name: str) -> dict:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _schemas() -> dict:
    optional_int = {"anyOf": [INT64, {"type": "null"}]}
    model = {"anyOf": [{"const": BASE_MODEL}, {"type": "string", "minLength": 1}]}
    sampling = {"model": model, "stream": {"type": "boolean"},
                "max_tokens": optional_int, "n": optional_int, "seed": optional_int,
                "temperature": {"type": "number"}, "top_p": {"type": "number"},
                "stop": {"anyOf": [{"type": "string"},
                                   {"type": "array", "items": {"type": "string"}}]},
                "stream_options": {"type": "object"}}
    choice = {"type": "object", "required": ["index"],
              "properties": {"index": {"type": "integer"}}}
    return {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["message", "type", "param", "code"],
            "properties": {"message": {"type": "string", "minLength": 1},
                           "type": {"enum": list(ERROR_TYPES)},
                           "param": {"type": ["string", "null"]},
                           "code": {"type": ["string", "null"]},
                           "problems": {"type": "array", "items": {"type": "string"}}}}}},
        "ChatRequest": {"type": "object", "required": ["model", "messages"], "properties": {
            **sampling, "max_completion_tokens": optional_int,
            "messages": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["role", "content"],
                "properties": {"role": {"enum": ["system", "user", "assistant", "developer"]},
                               "content": {"type": "string"}}}}}},
        "CompletionRequest": {"type": "object", "required": ["model", "prompt"], "properties": {
            **sampling, "prompt": {"anyOf": [
                {"type": "string"}, {"type": "array", "items": {"type": "string"}},
                {"type": "array", "items": {"type": "integer", "minimum": 0}}]}}},
        "ResponsesRequest": {"type": "object", "required": ["model", "input"], "properties": {
            "model": model, "stream": {"type": "boolean"}, "max_output_tokens": optional_int,
            "input": {"anyOf": [{"type": "string"},
                                {"type": "array", "items": {"type": "object"}}]}}},
        "Chunk": {"type": "object", "required": ["choices"],
                  "properties": {"choices": {"type": "array", "items": choice}}},
        "Response": {"type": "object", "required": ["id", "object", "model", "output"],
                     "properties": {"object": {"const": "response"},
                                    "model": {"type": "string"},
                                    "output": {"type": "array"}}},
        "ResponseEvent": {"type": "object", "required": ["type"],
                          "properties": {"type": {"type": "string"}}},
        "ChatCompletion": {"type": "object", "required": ["id", "object", "model", "choices"],
                           "properties": {"object": {"const": "chat.completion"},
                                          "model": {"type": "string"},
                                          "choices": {"type": "array", "items": choice}}},
        "Completion": {"type": "object", "required": ["id", "object", "model", "choices"],
                       "properties": {"object": {"const": "text_completion"},
                                      "model": {"type": "string"},
                                      "choices": {"type": "array", "items": choice}}},
        "Model": {"type": "object", "required": ["id", "object", "created", "owned_by"],
                  "properties": {"id": {"type": "string"}, "object": {"const": "model"},
                                 "created": {"type": "integer"},
                                 "owned_by": {"type": "string"}}},
        "ModelList": _list("Model"),
        "Adapter": {"type": "object",
                    "required": ["name", "is_dora", "hash", "internal_name", "servable"],
                    "properties": {"name": {"type": "string"}, "is_dora": {"type": "boolean"},
                                   "hash": {"type": "string"},
                                   "internal_name": {"type": "string"},
                                   "servable": {"type": "boolean"},
                                   "origin": {"enum": [origin.value for origin in Origin]},
                                   "added_by": {"type": "string"},
                                   "loaded_backends": {"type": "array",
                                                       "items": {"type": "string"}}}},
        "AdapterList": _list("Adapter"),
        "AddAdapter": {"type": "object", "required": ["name", "path"],
                       "additionalProperties": False,
                       "properties": {"name": {"type": "string", "pattern": f"^{NAME_PATTERN}$"},
                                      "path": {"type": "string"}}},
        "Limits": {"type": "object", "additionalProperties": False, "properties": {
            **{name: {"anyOf": [{"type": "integer", "minimum": 1, "maximum": MAX_LIMIT},
                                {"type": "null"}]}
               for name in ("requests_per_minute", "tokens_per_minute", "token_budget")},
            "budget_period": {"enum": [str(period) for period in BudgetPeriod]}}},
        "Tenant": {"type": "object", "required": ["name", "limits", "standing"],
                   "properties": {"name": {"type": "string"},
                                  "in_flight": {"type": "integer"},
                                  "limits": {"type": "object"},
                                  "standing": {"type": ["object", "null"]}}},
        "Usage": {"type": "object", "required": ["object", "data"],
                  "properties": {"object": {"const": "list"},
                                 "data": {"type": "array", "items": {"type": "object"}}}},
        "AdapterUpload": {"type": "object", "additionalProperties": False,
                          "required": ["adapter_config.json", "adapter_model.safetensors"],
                          "properties": {
                              "adapter_config.json": {"type": "string", "format": "binary"},
                              "adapter_model.safetensors": {"type": "string",
                                                            "format": "binary"}}},
    }


def _list(item: str) -> dict:
    return {"type": "object", "required": ["object", "data"],
            "properties": {"object": {"const": "list"},
                           "data": {"type": "array", "items": _ref(item)}}}
