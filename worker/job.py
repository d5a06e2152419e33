"""Streams in a worker process: the ARQ job claims one, an attempt task generates it.

The ARQ job (``generate``) is short on purpose: it claims the stream (the attempt number becomes the
attempt's fencing token) and starts the attempt as a task of the worker process, then returns. ARQ
keeps a job in its queue until the job returns and re-checks every such job on each poll, so a
job that lasted the whole generation would make every poll cost one round trip per running stream.
Losing a worker is handled by heartbeats and takeover (``worker.runner``), not by ARQ's timeout.

An attempt ends the stream with exactly one terminal event (``done``, ``error``, ``cancelled``),
or stops without one when its appends are refused (another attempt took over), or hands the stream
back on shutdown (``release``), enqueueing a takeover job so another worker resumes it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import openai
from arq import Retry
from arq.connections import ArqRedis

from tailgate import keys
from tailgate.connections import REDIS_ERRORS
from tailgate.events import dumps
from tailgate.settings import Settings
from tailgate.store import Outcome, StreamStore
from worker import upstream
from worker.publisher import Appender, Publisher

log = logging.getLogger(__name__)


@dataclass
class WorkerState:
    """What every job of one worker process shares; ARQ passes it in ``ctx["tailgate"]``."""

    id: str
    settings: Settings
    store: StreamStore
    queue: ArqRedis
    api: openai.AsyncOpenAI
    appender: Appender
    running: dict[str, Publisher] = field(default_factory=dict)
    attempts: set[asyncio.Task[None]] = field(default_factory=set)
    stopping: bool = False


async def generate(ctx: dict[str, Any], stream_id: str) -> str:
    """ARQ job: claim ``stream_id`` and start its attempt in the background."""
    w: WorkerState = ctx["tailgate"]
    if w.stopping:
        raise Retry(defer=0.1)  # another worker takes it
    try:
        claim = await w.store.claim(
            stream_id, w.id, stale_after_s=w.settings.takeover_after_s, max_attempts=w.settings.max_attempts
        )
    except REDIS_ERRORS as exc:
        log.warning("stream %s: Redis unavailable at claim (%s); retrying", stream_id, exc)
        raise Retry(defer=1) from exc
    if claim.outcome is not Outcome.OK or claim.request is None:
        log.info("stream %s not claimed: %s", stream_id, claim.outcome.value)
        if claim.outcome is Outcome.EXHAUSTED:
            await _bookkeep(w, stream_id, claim.owner, "failed")
        elif claim.outcome is not Outcome.BUSY:
            await w.store.redis.zrem(keys.RUNNING, stream_id)
        return str(claim.outcome.value)
    log.info("stream %s attempt %d started", stream_id, claim.attempt)
    pub = Publisher(w.appender, stream_id, claim.attempt, claim.seq)
    if claim.cancel:
        pub.request_cancel()
    w.running[stream_id] = pub
    task = asyncio.create_task(_attempt(w, pub, claim.request, claim.owner), name=f"attempt-{stream_id}")
    w.attempts.add(task)
    task.add_done_callback(w.attempts.discard)
    return "started"


async def _attempt(w: WorkerState, pub: Publisher, request: dict[str, Any], owner: str) -> None:
    try:
        try:
            async with asyncio.timeout(w.settings.job_timeout_s):
                status = await _run(w, pub, request)
        except TimeoutError:
            error = {
                "code": "generation_timeout",
                "message": f"generation ran past {w.settings.job_timeout_s}s",
            }
            ok = await pub.finish("error", error, {"error": dumps(error)})
            status = "failed" if ok else _refused(pub)
    except Exception:
        log.exception("stream %s attempt %d crashed", pub.stream_id, pub.attempt)
        raise  # the stream is taken over once its heartbeat stops
    finally:
        w.running.pop(pub.stream_id, None)
    if status in ("completed", "failed", "cancelled"):
        await _bookkeep(w, pub.stream_id, owner, status)
    log.info("stream %s attempt %d %s", pub.stream_id, pub.attempt, status)


async def _run(w: WorkerState, pub: Publisher, request: dict[str, Any]) -> str:
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
        pub.abandon()
        return pub.refused.value
    if pub.handing_back:
        return await _hand_back(w, pub)
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


async def _hand_back(w: WorkerState, pub: Publisher) -> str:
    """Give the stream up for another worker: it resumes with a ``reset`` (``worker_shutdown``)."""
    pub.abandon()
    if not await w.store.release(pub.stream_id, pub.attempt, "worker_shutdown"):
        return "refused"
    await w.store.redis.zadd(keys.RUNNING, {pub.stream_id: 0})
    await takeover(w.queue, w.settings.queue_name, pub.stream_id, f"release-{pub.attempt}")
    return "handed_back"


async def takeover(queue: ArqRedis, queue_name: str, stream_id: str, tag: str) -> None:
    """Enqueue a job that claims ``stream_id`` again. ``tag`` makes the job id unique per stale
    heartbeat, so several workers noticing the same loss enqueue it once."""
    await queue.enqueue_job(
        keys.JOB_GENERATE, stream_id, _job_id=f"{stream_id}:{tag}", _queue_name=queue_name
    )
    await queue.publish(keys.WAKE_CHANNEL, stream_id)


def _refused(pub: Publisher) -> str:
    return pub.refused.value if pub.refused is not None else "refused"


async def _bookkeep(w: WorkerState, stream_id: str, owner: str, status: str) -> None:
    """After the terminal event: counters for `tailgate top`, the running index, the owner's slot."""
    async with w.store.redis.pipeline(transaction=False) as pipe:
        pipe.hincrby(keys.STATS, status, 1)
        pipe.zrem(keys.RUNNING, stream_id)
        if owner:
            pipe.zrem(keys.active(owner), stream_id)
        await pipe.execute()
