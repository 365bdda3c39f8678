"""Request limits: a cap on body size for every route, and a per-team classify rate limit."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import ApiError, error_response

log = logging.getLogger(__name__)


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

    Kept in this process: with several API processes and no Redis, each enforces its own share.
    """

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    async def check(self, key: str) -> None:
        """Take one token, or raise a 429 telling when the next one is available."""
        self.take(key)

    def take(self, key: str) -> None:
        now = time.monotonic()
        with self._lock:  # held for a dictionary update: safe on the event loop
            tokens, last = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                raise rate_limited(tokens, self.rate)
            self._buckets[key] = (tokens - 1.0, now)

    async def aclose(self) -> None:
        """Nothing to release; the Redis limiter has a connection pool."""


def rate_limited(tokens: float, rate: float) -> ApiError:
    wait = math.ceil((1.0 - tokens) / rate)
    return ApiError(
        429,
        "rate_limited",
        "too many classify requests; retry later",
        headers={"Retry-After": str(max(1, wait))},
    )


# One atomic step of a token bucket kept in a Redis hash; the clock is Redis's, so API processes on
# several hosts agree. Returns {1 if a token was taken else 0, tokens left as a string (Lua numbers
# would be cut to integers)}.
_TAKE_TOKEN = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(state[1]) or burst, tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local taken = 0
if tokens >= 1 then
  tokens = tokens - 1
  taken = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {taken, tostring(tokens)}
"""


class RedisRateLimiter(RateLimiter):
    """The same buckets in Redis, shared by every API process that uses the same Redis.

    If Redis cannot be reached the process falls back to its own bucket (and logs it): classify stays
    up, limited per process, rather than failing with the limiter.
    """

    def __init__(self, url: str, rate: float, burst: int, prefix: str = "must:rate:classify:") -> None:
        super().__init__(rate, burst)
        self.url = url
        self.prefix = prefix
        self._client: Any = None
        self._script: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _take_token(self) -> Any:
        """The script on a client bound to the running loop (an asyncio connection cannot move between
        loops); sent by its SHA after the first call."""
        import redis.asyncio

        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client = redis.asyncio.Redis.from_url(self.url, socket_timeout=1.0, socket_connect_timeout=1.0)
            self._script = self._client.register_script(_TAKE_TOKEN)
            self._loop = loop
        return self._script

    async def check(self, key: str) -> None:
        try:
            taken, tokens = await self._take_token()(keys=[self.prefix + key], args=[self.rate, self.burst])
        except Exception as exc:  # any Redis failure: limit in this process instead
            log.warning("shared rate limit unavailable (%s); limiting in this process", exc)
            self.take(key)
            return
        if not int(taken):
            raise rate_limited(float(tokens), self.rate)

    async def aclose(self) -> None:
        if self._client is not None and self._loop is asyncio.get_running_loop():
            await self._client.aclose()
        self._client = None


def create_rate_limiter(url: str, rate: float, burst: int) -> RateLimiter:
    """Shared through Redis when a URL is given, else per process."""
    return RedisRateLimiter(url, rate, burst) if url else RateLimiter(rate, burst)
