"""The gateway's HTTP errors, all rendered in OpenAI's error shape.

OpenAI clients (the `openai` SDK among them) pick their exception class from the status
code and read `error.message` / `error.code` from the body, so every error the gateway
answers, on `/v1` and elsewhere, is `{"error": {"message", "type", "param", "code"}}`: `type`
one of OpenAI's (`ERROR_TYPES`), `code` a string or null, `param` the request field at fault
where one is known.
"""

from __future__ import annotations

from starlette.responses import JSONResponse

from adapters.errors import DoraGatewayError, SourceError

ERROR_TYPES = ("invalid_request_error", "authentication_error", "permission_error",
               "not_found_error", "rate_limit_error", "insufficient_quota", "server_error")


def error_type_for(status: int) -> str:
    """OpenAI's error `type` for an HTTP status (404 is an invalid request, as OpenAI says)."""
    if status >= 500:
        return "server_error"
    return {401: "authentication_error", 403: "permission_error",
            429: "rate_limit_error"}.get(status, "invalid_request_error")


class GatewayError(DoraGatewayError):
    """An error with the HTTP status and OpenAI `type` / `code` / `param` to answer with."""

    status = 500
    error_type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.error_type, code=self.code, param=self.param)


class AuthenticationFailed(GatewayError):
    status = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class InvalidRequest(GatewayError):
    status = 400
    error_type = "invalid_request_error"


class InvalidAdapter(InvalidRequest):
    """An adapter that failed validation; `problems` lists everything wrong with it."""

    code = "invalid_adapter"

    def __init__(self, message: str, problems: list[str]) -> None:
        super().__init__(message)
        self.problems = problems

    def body(self) -> dict:
        body = super().body()
        body["error"]["problems"] = self.problems
        return body


class AdapterUnavailable(InvalidRequest):
    """A registered adapter that a backend refused to load, with the engine's reason: the
    operator must replace the adapter (or change the engine), so retrying cannot help."""

    code = "adapter_unavailable"

    def __init__(self, message: str) -> None:
        super().__init__(message, param="model")


class NotFound(InvalidRequest):
    status = 404
    code = "not_found"


class ModelNotFound(NotFound):
    """Also answers for adapters a tenant may not use, so names cannot be probed."""

    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model '{model}' does not exist", param="model")


class MethodNotAllowed(InvalidRequest):
    status = 405
    code = "method_not_allowed"


class Conflict(InvalidRequest):
    status = 409
    code = "conflict"


class BodyTooLarge(InvalidRequest):
    status = 413
    code = "request_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"The request body is larger than the limit of {limit} bytes")


class RateLimited(GatewayError):
    status = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class LimitExceeded(GatewayError):
    """Over a requests- or tokens-per-minute limit; `headers` say when to retry."""

    status = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"


class QuotaSpent(GatewayError):
    """The tenant's token budget for the period is spent (OpenAI's `insufficient_quota`):
    retrying before the next period cannot help."""

    status = 429
    error_type = "insufficient_quota"
    code = "insufficient_quota"


class LimitsUnavailable(GatewayError):
    """The limit counters cannot be reached and `[limits] fail` is "closed"."""

    status = 503
    code = "limits_unavailable"


class BackendError(GatewayError):
    """The backend answered something the gateway could not use (e.g. a failed adapter load)."""

    status = 502
    code = "backend_error"


class StoreFailed(GatewayError):
    """Object storage or the Hub failed a fetch or a write the request needed (down, access
    denied to the gateway's credentials, bytes that do not match their hash): nothing was
    changed, and the adapters already loaded keep serving."""

    status = 502
    code = "store_error"


def source_error(error: SourceError, param: str | None = None) -> GatewayError:
    """The answer for `error`: 400 for what the request named wrong, 502 for a failing store.
    The message says what failed and where."""
    if error.kind in SourceError.CLIENT_KINDS:
        return InvalidRequest(str(error), param=param, code=f"source_{error.kind}")
    return StoreFailed(str(error), code=f"store_{error.kind}")


class BackendTimeout(GatewayError):
    status = 504
    code = "backend_timeout"


class BackendUnavailable(GatewayError):
    status = 503
    code = "backend_unavailable"

    def __init__(self, message: str = "No model backend is available; retry shortly") -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class RegistryUnavailable(GatewayError):
    """The adapter registry's database cannot be reached: admin changes wait for it, while
    the adapters already known keep being served."""

    status = 503
    code = "registry_unavailable"

    def __init__(self, message: str = "The adapter registry is unavailable; retry shortly",
                 ) -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class ShuttingDown(BackendUnavailable):
    """A request that arrived after the gateway began to stop, or still waited for vLLM when
    its grace period ended: another replica, or this one once it is back, can serve it."""

    code = "shutting_down"

    def __init__(self) -> None:
        super().__init__("The gateway is shutting down; retry shortly")


class BackendUnreachable(BackendUnavailable):
    """The backend gave no answer: it could not be connected to, so the request never
    reached it (or `BackendDropped`). Another backend may safely be tried."""


class BackendDropped(BackendUnreachable):
    """The backend closed the connection before answering (it died, say): nothing reached
    the client, and the generation stopped with the connection."""


def error_body(message: str, type_: str, *, code: str | None = None,
               param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(error: GatewayError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)
