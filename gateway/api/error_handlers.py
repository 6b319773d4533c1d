"""Every error the app answers, in OpenAI's shape: ours, routing, validation and crashes.

Without these, FastAPI would answer unknown routes and validation errors in its own shape
(`{"detail": ...}`, 422), which OpenAI clients cannot read. A 5xx is the gateway's fault or
the engine's, never the client's: each one is logged with the request's id.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from gateway.api.json_body import body_problem
from gateway.api.request_ids import request_id
from gateway.errors import (
    GatewayError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    error_body,
    error_response,
    error_type_for,
)

log = logging.getLogger(__name__)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(GatewayError, _gateway_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _crash)


async def _gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
    if exc.status >= 500:
        log.warning("request %s answered %d %s: %s", request_id(request), exc.status,
                    exc.code, exc.message)
    return error_response(exc)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own errors: no route, wrong method, malformed multipart."""
    headers = dict(exc.headers or {})
    if exc.status_code == 404:
        error = NotFound(f"Invalid URL ({request.method} {request.url.path})", code="unknown_url")
    elif exc.status_code == 405:
        error = MethodNotAllowed(f"Method {request.method} is not allowed for "
                                 f"{request.url.path}", headers=headers)
    else:
        return JSONResponse(error_body(str(exc.detail), error_type_for(exc.status_code)),
                            status_code=exc.status_code, headers=headers)
    return error_response(error)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = exc.errors()
    first = problems[0] if problems else {}
    param = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or None
    message = "; ".join(_describe(problem) for problem in problems) or "Invalid request"
    return error_response(InvalidRequest(message, param=param, code="invalid_request"))


async def _crash(request: Request, exc: Exception) -> JSONResponse:
    """A route that tripped over a body already found bad gets that 400; anything else is
    our fault (Starlette also logs the traceback, and re-raises after this answer)."""
    problem = body_problem(request)
    if problem is not None:
        return error_response(problem)
    log.error("request %s failed: %r", request_id(request), exc)
    return JSONResponse(error_body("The gateway had an internal error", "server_error"),
                        status_code=500)


def _describe(problem: dict) -> str:
    location = ".".join(str(part) for part in problem.get("loc", ()) if part != "body")
    return f"{location}: {problem.get('msg')}" if location else str(problem.get("msg"))
