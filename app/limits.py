"""Request limits: a cap on body size for every route, and a per-team classify rate limit."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import ApiError, error_response


class BodySizeLimit:
    """ASGI middleware: refuse bodies over the route's limit, by Content-Length or while streaming.

    Counting the stream as it arrives covers chunked uploads that announce no length; the handler
    sees the overflow as an exception while it reads, before anything is stored.
    """

    def __init__(self, app: ASGIApp, limit_for_path: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for_path = limit_for_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for_path(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        refusal = f"the request body exceeds {limit} bytes"
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await error_response(413, "request_too_large", refusal)(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise ApiError(413, "request_too_large", refusal)
            return message

        await self.app(scope, counting_receive, send)


class RateLimiter:
    """Token buckets per key (team), refilled continuously: `rate` per second up to `burst`.

    Kept in the API process: with several API replicas each enforces its own share.
    """

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def check(self, key: str) -> None:
        """Take one token, or raise a 429 telling when the next one is available."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                wait = math.ceil((1.0 - tokens) / self.rate)
                raise ApiError(
                    429,
                    "rate_limited",
                    "too many classify requests; retry later",
                    headers={"Retry-After": str(max(1, wait))},
                )
            self._buckets[key] = (tokens - 1.0, now)
