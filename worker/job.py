"""The ARQ job: generate one stream's answer into its Redis Stream.

One call is one attempt. It claims the stream (the attempt number becomes its fencing token), streams
the upstream into a publisher, and ends the stream with exactly one terminal event: ``done``,
``error`` or ``cancelled``. If its appends are refused (another attempt took over), it stops the
upstream call and writes nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import openai
from redis.asyncio import Redis

from tailgate import keys
from tailgate.events import dumps
from tailgate.settings import Settings
from tailgate.store import Outcome, StreamStore
from worker import upstream
from worker.publisher import Publisher

log = logging.getLogger(__name__)


@dataclass
class WorkerState:
    """What every job of one worker process shares; ARQ passes it in ``ctx["tailgate"]``."""

    id: str
    settings: Settings
    store: StreamStore
    streams: Redis
    api: openai.AsyncOpenAI
    running: dict[str, Publisher] = field(default_factory=dict)


async def generate(ctx: dict[str, Any], stream_id: str) -> str:
    w: WorkerState = ctx["tailgate"]
    meta = await w.store.meta(stream_id)
    if not meta:
        log.warning("stream %s is gone; nothing to do", stream_id)
        return "gone"
    request = json.loads(meta["request"])
    claim = await w.store.claim(stream_id, w.id, request["model"], "worker_lost")
    if claim.outcome is not Outcome.OK:
        log.info("stream %s not claimed: %s", stream_id, claim.outcome.value)
        return str(claim.outcome.value)
    log.info("stream %s attempt %d started", stream_id, claim.attempt)
    pub = Publisher(w.store, stream_id, claim.attempt, claim.seq, w.settings.coalesce_ms / 1000)
    w.running[stream_id] = pub
    try:
        if claim.cancel:
            pub.request_cancel()
        status = await _run_attempt(w, pub, request)
    finally:
        w.running.pop(stream_id, None)
    if status in ("completed", "failed", "cancelled"):
        await _bookkeep(w, stream_id, meta.get("owner", ""), status)
    log.info("stream %s attempt %d %s", stream_id, claim.attempt, status)
    return status


async def _run_attempt(w: WorkerState, pub: Publisher, request: dict[str, Any]) -> str:
    call = asyncio.create_task(upstream.stream(w.api, request, lambda text: pub.add("delta", {"text": text})))
    halted = asyncio.create_task(pub.halted.wait())
    try:
        await asyncio.wait({call, halted}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        halted.cancel()
        if not call.done():
            call.cancel()  # closes the upstream response: no more tokens generated or billed
            with contextlib.suppress(asyncio.CancelledError, upstream.UpstreamError):
                await call
    if pub.refused is not None:
        await pub.abandon()
        return pub.refused.value
    if pub.cancel_requested:
        # Usage so far: the upstream reports usage only at the end, so count the chunks streamed.
        usage = {"completion_tokens": pub.deltas}
        ok = await pub.finish("cancelled", {"usage": usage}, {"usage": dumps(usage)})
        return "cancelled" if ok else _refused(pub)
    try:
        result = call.result()
    except upstream.UpstreamError as exc:
        log.warning("stream %s upstream failed: %s", pub.stream_id, exc)
        error = {"code": exc.code, "message": exc.message}
        ok = await pub.finish("error", error, {"error": dumps(error)})
        return "failed" if ok else _refused(pub)
    meta = {"usage": dumps(result.usage)} if result.usage else None
    ok = await pub.finish("done", {"finish_reason": result.finish_reason, "usage": result.usage}, meta)
    return "completed" if ok else _refused(pub)


def _refused(pub: Publisher) -> str:
    return pub.refused.value if pub.refused is not None else "refused"


async def _bookkeep(w: WorkerState, stream_id: str, owner: str, status: str) -> None:
    """After the terminal event: counters for `tailgate top`, and the owner's concurrency slot."""
    async with w.streams.pipeline(transaction=False) as pipe:
        pipe.hincrby(keys.STATS, status, 1)
        if owner:
            pipe.zrem(keys.active(owner), stream_id)
        await pipe.execute()
