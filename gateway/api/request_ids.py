"""Every request's id: made once, sent back as `X-Request-Id` (errors included), forwarded to
vLLM as its `request_id`, and named in the log line of every 5xx, so what a client reports
can be found in the gateway's and the engine's logs."""

from __future__ import annotations

import uuid

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"
_KEY = "request_id"


def request_id(request: Request) -> str:
    return scope_request_id(request.scope)


def scope_request_id(scope: Scope) -> str:
    """The id of the request `scope` describes, made on first use."""
    return scope.setdefault("state", {}).setdefault(_KEY, uuid.uuid4().hex)


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = (HEADER, scope_request_id(scope).encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if all(name.lower() != HEADER for name, _ in headers):
                    message = {**message, "headers": [*headers, header]}
            await send(message)

        await self.app(scope, receive, send_with_id)
