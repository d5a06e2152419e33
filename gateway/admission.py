"""Admission: what a caller may send and start. Body size, rate per key, streams per key, queue depth.

Counters live in Redis so every replica enforces the same limits.
"""

from __future__ import annotations

import time

from redis.asyncio import Redis
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import ApiError, error_response
from tailgate import keys, tuning
from tailgate.settings import Settings


class BodyLimit:
    """413 for a request body over ``limit`` bytes, declared or streamed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reject(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                return await self._reject(scope, receive, send)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            413, "body_too_large", f"request body is over {self.limit} bytes; send a shorter prompt"
        )
        await response(scope, receive, send)


class Admission:
    """The checks before a stream is created. The store's scripts keep the counts they read: a
    create takes a slot in ``keys.active(owner)``, the end of a stream gives it back."""

    def __init__(self, settings: Settings, streams: Redis, queue: Redis) -> None:
        self._settings = settings
        self._streams = streams
        self._queue = queue

    async def admit(self, owner: str, now_ms: int) -> None:
        """429 with ``Retry-After`` when this key or the queue is over its limit."""
        s = self._settings
        minute = now_ms // 60_000
        async with self._streams.pipeline(transaction=False) as pipe:
            pipe.incr(keys.rate(owner, minute))
            pipe.expire(keys.rate(owner, minute), 120)
            stale = now_ms - (s.job_timeout_s + tuning.ACTIVE_STALE_S) * 1000
            pipe.zremrangebyscore(keys.active(owner), "-inf", stale)
            pipe.zcard(keys.active(owner))
            count, _, _, active = await pipe.execute()
        if count > s.rate_limit_per_min:
            retry = 60 - (now_ms // 1000) % 60
            raise ApiError(
                429,
                "rate_limited",
                f"more than {s.rate_limit_per_min} streams a minute for this key; retry in {retry}s",
                {"Retry-After": str(retry)},
            )
        if active >= s.max_active_per_key:
            raise ApiError(
                429,
                "too_many_streams",
                f"this key has {active} unfinished streams (limit {s.max_active_per_key}); "
                "wait for one to finish or cancel one",
                {"Retry-After": "1"},
            )
        if await self._queue.zcard(s.queue_name) >= s.max_queued:
            raise ApiError(429, "queue_full", "the queue is full; retry shortly", {"Retry-After": "1"})


def now_ms() -> int:
    return int(time.time() * 1000)
