"""Admission: what a caller may send and start. Body size, rate per key, streams per key, queue depth.

Counters live in Redis so every replica enforces the same limits.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import ApiError, error_response
from tailgate import keys, scripts, tuning
from tailgate.connections import REDIS_ERRORS
from tailgate.settings import Settings
from tailgate.store import CreateReply, Creation, Limits

log = logging.getLogger(__name__)


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
    """What admits a new stream besides its body. The per-key limits (a sliding minute of creations,
    a cap on unfinished streams) are checked and taken in the store's create script, in one atomic
    step with the create itself, so they hold under any concurrency and a refusal uses no quota. The
    queue's depth lives on the queue Redis and is checked here first."""

    def __init__(self, settings: Settings, queue: Redis) -> None:
        self._settings = settings
        self._queue = queue
        self._peek = queue.register_script(scripts.PEEK)
        self.enqueue = queue.register_script(scripts.ENQUEUE)  # creation._enqueue's
        self.limits = Limits(
            max_active=settings.max_active_per_key,
            active_stale_ms=(settings.job_timeout_s + tuning.ACTIVE_STALE_S) * 1000,
            rate_per_min=settings.rate_limit_per_min,
        )
        self._depth = math.nan  # the queue's length as last read for metrics; NaN: never read
        self._depth_read_at = -math.inf
        self._depth_lock = asyncio.Lock()

    def check_request(self, request: dict[str, Any]) -> None:
        """What the operator allows upstream: 400 for a model outside ``TAILGATE_MODELS`` or a
        ``max_tokens`` over ``TAILGATE_MAX_TOKENS``; without one, the ceiling is sent."""
        s = self._settings
        models = s.allowed_models
        if models and request["model"] not in models:
            allowed = ", ".join(sorted(models))
            message = f"model {request['model'][:128]!r} is not served here; use one of: {allowed}"
            raise ApiError(400, "model_not_allowed", message)
        if s.max_tokens:
            asked = request.setdefault("max_tokens", s.max_tokens)
            if asked > s.max_tokens:
                message = f"max_tokens {asked} is over this server's ceiling of {s.max_tokens}; ask for less"
                raise ApiError(400, "max_tokens_too_large", message)

    async def check_queue(self, owner: str) -> int:
        """429 ``queue_full`` when the queue holds ``TAILGATE_MAX_QUEUED`` jobs; else the place a
        stream of ``owner`` would take in it now, for its ``queued`` event. (On one Redis, the store's
        create script does both itself, atomically.)"""
        queue = self._settings.queue_name
        depth, place = await self._peek(keys=[queue, keys.fair(queue)], args=[owner])
        if depth >= self._settings.max_queued:
            raise self.queue_full()
        return int(place)

    def queue_full(self) -> ApiError:
        return ApiError(429, "queue_full", "the queue is full; retry shortly", {"Retry-After": "1"})

    async def queue_depth(self) -> float:
        """The queue's length, for ``/metrics``: read at most once per ``QUEUE_DEPTH_CACHE_S`` (scrapes
        meanwhile get the value read; concurrent ones wait for one read), so one Redis call per scrape
        at most and none per request. While the queue Redis is unreachable: the last value read."""
        async with self._depth_lock:
            now = time.monotonic()
            if now - self._depth_read_at >= tuning.QUEUE_DEPTH_CACHE_S:
                self._depth_read_at = now
                try:
                    self._depth = await self._queue.zcard(self._settings.queue_name)
                except REDIS_ERRORS as exc:
                    log.warning("queue depth unknown: the queue Redis is unreachable: %s", exc)
        return self._depth

    def refused(self, creation: Creation) -> ApiError:
        """The 429 for a create the store's limits refused."""
        s = self._settings
        if creation.reply is CreateReply.RATE_LIMITED:
            retry = max(1, math.ceil(creation.retry_after_ms / 1000))
            return ApiError(
                429,
                "rate_limited",
                f"this key created {s.rate_limit_per_min} streams in the last minute "
                f"(TAILGATE_RATE_LIMIT_PER_MIN); retry in {retry}s",
                {"Retry-After": str(retry)},
            )
        return ApiError(
            429,
            "too_many_streams",
            f"this key has {creation.active} unfinished streams (limit {s.max_active_per_key}); "
            "wait for one to finish or cancel one",
            {"Retry-After": "1"},
        )


class ReaderSlots:
    """Open event streams per owner in this process, capped at ``TAILGATE_MAX_SSE_PER_KEY``: one key
    cannot hold every connection a process can take. Per process, not global: a check costs no
    round trip, and the connection cap it protects is per process too."""

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._open: Counter[str] = Counter()

    def take(self, owner: str) -> Callable[[], None]:
        """A slot for ``owner``, or 429 ``too_many_connections``; answers its release (idempotent)."""
        if self._open[owner] >= self._cap:
            raise ApiError(
                429,
                "too_many_connections",
                f"this key has {self._cap} open event streams on this server (TAILGATE_MAX_SSE_PER_KEY); "
                "close one",
                {"Retry-After": "1"},
            )
        self._open[owner] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._open[owner] -= 1
                if not self._open[owner]:
                    del self._open[owner]

        return release
