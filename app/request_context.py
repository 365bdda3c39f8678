"""Request ids: each request gets one (or keeps a well-formed `X-Request-ID` it came with).

The id is returned in the `X-Request-ID` header and quoted in error messages that hide a third-party
error's text, so a team can hand the operator the id and the operator finds the detail in the log.
It lives in a context variable: starlette's thread pool copies the context, so code run there sees it.
"""

from __future__ import annotations

import re
import uuid
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "x-request-id"
_WELL_FORMED = re.compile(r"[A-Za-z0-9._-]{1,64}")
_current: ContextVar[str | None] = ContextVar("request_id", default=None)


def current_request_id() -> str | None:
    return _current.get()


class RequestId:
    """ASGI middleware: sets the request id for the request's context and echoes it in the response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = dict(scope["headers"]).get(HEADER.encode(), b"").decode("latin-1")
        request_id = sent if _WELL_FORMED.fullmatch(sent) else uuid.uuid4().hex
        # Not reset afterwards: each request runs in its own task (its own context), and the handler of
        # unhandled errors runs outside this middleware, after the call below has raised.
        _current.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (HEADER.encode(), request_id.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)
