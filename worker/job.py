"""Streams in a worker process: the ARQ job claims one, an attempt task generates it.

The ARQ job (``generate``) is short on purpose: it claims the stream (the attempt number becomes the
attempt's fencing token) and starts the attempt as a task of the worker process, then returns. ARQ
keeps a job in its queue until the job returns and re-checks every such job on each poll, so a
job that lasted the whole generation would make every poll cost one round trip per running stream.
Losing a worker is handled by heartbeats and takeover (``worker.runner``), not by ARQ's timeout.

An attempt ends the stream with exactly one terminal event (``done``, ``error``, ``cancelled``),
or stops without one when its appends are refused (another attempt took over), or hands the stream
back on shutdown (``release``), enqueueing a takeover job so another worker resumes it at once.
:class:`~worker.attempt.Outcome` says which. The bookkeeping of an ended stream (its owner's active
set, the running index, the counters) is the store's scripts' business, not the job's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import openai
from arq import Retry
from arq.connections import ArqRedis

from tailgate import keys, tuning
from tailgate.connections import REDIS_ERRORS, ride_out
from tailgate.events import dumps
from tailgate.settings import Settings
from tailgate.store import Claimed, Reply, StreamStore
from worker import metrics, upstream
from worker.attempt import Attempt, Outcome, refused
from worker.publisher import Appender

log = logging.getLogger(__name__)

FIRST_IN_LINE = datetime.fromtimestamp(0, UTC)  # score 0 in ARQ's queue


@dataclass
class WorkerState:
    """What every job of one worker process shares; ARQ passes it in ``ctx["tailgate"]``."""

    id: str
    settings: Settings
    store: StreamStore
    queue: ArqRedis
    api: openai.AsyncOpenAI
    appender: Appender
    # The attempts this worker runs, by stream id, each holding its task: the one registry (the
    # concurrency count, the heartbeat, cancel requests, hand-back). An attempt leaves it when its
    # task is done.
    running: dict[str, Attempt] = field(default_factory=dict)
    stopping: bool = False


async def generate(ctx: dict[str, Any], stream_id: str) -> str:
    """ARQ job: claim ``stream_id`` and start its attempt in the background. Answers what the claim
    answered (ARQ logs it)."""
    w: WorkerState = ctx["tailgate"]
    if w.stopping:
        raise Retry(defer=0.1)  # another worker takes it
    if stream_id in w.running:
        # Ours already: a takeover job for a stream whose heartbeat failed here (a Redis outage), not
        # its attempt. Claiming would start a second attempt beside the first for nothing.
        log.info("stream %s not claimed: it runs here", stream_id)
        return str(Reply.BUSY.value)
    token = secrets.token_hex(8)  # this run's claim, which the claim script recognises when re-sent

    def claim_it() -> Awaitable[Claimed]:
        s = w.settings
        return w.store.claim(
            stream_id, w.id, stale_after_s=s.takeover_after_s, max_attempts=s.max_attempts, token=token
        )

    try:
        claim = await ride_out(claim_it, patience_s=tuning.CLAIM_PATIENCE_S)
    except REDIS_ERRORS as exc:
        log.warning("stream %s: Redis unavailable at claim (%s); retrying", stream_id, exc)
        raise Retry(defer=1) from exc
    start(w, stream_id, claim)
    return str(claim.reply.value)


def start(w: WorkerState, stream_id: str, claim: Claimed) -> None:
    """Start the attempt ``claim`` gave this worker, as a task of the worker (if it gave one)."""
    if claim.reply is not Reply.OK or claim.request is None:
        log.info("stream %s not claimed: %s", stream_id, claim.reply.value)
        if claim.reply is Reply.EXHAUSTED:  # the claim script ended it
            metrics.finished("error", "worker_lost")
        return
    if claim.attempt == 1:
        metrics.QUEUE_WAIT.observe(claim.queue_wait_s)
    else:
        metrics.taken_over(claim.reason)
    log.info("stream %s attempt %d started", stream_id, claim.attempt)
    attempt = Attempt(w.appender, stream_id, claim.owner, claim.attempt, claim.seq)
    if claim.cancel:
        attempt.request_cancel()
    attempt.task = asyncio.create_task(_attempt(w, attempt, claim.request), name=f"attempt-{stream_id}")
    w.running[stream_id] = attempt
    metrics.RUNNING.set(len(w.running))

    def leave(_: asyncio.Task[Outcome]) -> None:
        if w.running.get(stream_id) is attempt:
            del w.running[stream_id]
            metrics.RUNNING.set(len(w.running))

    attempt.task.add_done_callback(leave)


async def _attempt(w: WorkerState, attempt: Attempt, request: dict[str, Any]) -> Outcome:
    try:
        outcome = await _run(w, attempt, request)
    except Exception:
        # The stream is taken over once its heartbeat stops, which it does as this task ends.
        log.exception("stream %s attempt %d crashed", attempt.stream_id, attempt.number)
        outcome = Outcome.CRASHED
    finally:
        attempt.close()
    outcome = attempt.end(outcome)  # a hand-back stays one, whatever a heartbeat learns after it
    log.info("stream %s attempt %d %s", attempt.stream_id, attempt.number, outcome.value)
    if outcome.terminal is not None:
        metrics.finished(outcome.terminal, attempt.error)
    return outcome


async def _run(w: WorkerState, attempt: Attempt, request: dict[str, Any]) -> Outcome:
    """Call the upstream until it ends, the attempt halts, or the job timeout; then end the stream
    (or give it up) accordingly."""
    sent = time.monotonic()
    first = True

    def on_text(text: str) -> None:
        nonlocal first
        if first:
            first = False
            metrics.FIRST_TOKEN.observe(time.monotonic() - sent)
        attempt.add("delta", {"text": text})

    call = asyncio.create_task(upstream.stream(w.api, request, on_text))
    halted = asyncio.create_task(attempt.halted.wait())
    try:
        # The timeout bounds the generation, not the terminal append after it: that one must go in.
        done, _ = await asyncio.wait(
            {call, halted}, timeout=w.settings.job_timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        halted.cancel()
        if not call.done():
            call.cancel()  # closes the upstream response: no more tokens generated or billed
            with contextlib.suppress(asyncio.CancelledError, upstream.UpstreamError):
                await call
    if attempt.outcome is not None:  # refused: another attempt owns the stream, or it ended
        return attempt.outcome
    if attempt.handing_back and call not in done:  # a generation that just completed is written
        return await _hand_back(w, attempt)
    if attempt.cancel_requested:
        # Usage so far: the upstream reports usage only at the end, so count the chunks streamed.
        usage = {"completion_tokens": attempt.deltas}
        return await attempt.finish("cancelled", {"usage": usage}, {"usage": dumps(usage)})
    if not done:
        error = {"code": "generation_timeout", "message": f"generation ran past {w.settings.job_timeout_s}s"}
        return await attempt.finish("error", error, {"error": dumps(error)})
    try:
        result = call.result()
    except upstream.UpstreamError as exc:
        log.warning("stream %s upstream failed: %s", attempt.stream_id, exc)
        error = {"code": exc.code, "message": exc.message}
        return await attempt.finish("error", error, {"error": dumps(error)})
    meta = {"usage": dumps(result.usage)} if result.usage else None
    return await attempt.finish("done", {"finish_reason": result.finish_reason, "usage": result.usage}, meta)


async def _hand_back(w: WorkerState, attempt: Attempt) -> Outcome:
    """Give the stream up for another worker: it resumes with a ``reset`` (``worker_shutdown``)."""
    attempt.close()
    reply = await w.store.release(attempt.stream_id, attempt.number, "worker_shutdown")
    if reply is not Reply.OK:
        return attempt.refuse(refused(reply))
    attempt.end(Outcome.HANDED_BACK)
    await takeover(w.queue, w.settings.queue_name, attempt.stream_id, f"release-{attempt.number}")
    return Outcome.HANDED_BACK


async def takeover(queue: ArqRedis, queue_name: str, stream_id: str, tag: str) -> None:
    """Enqueue a job that claims ``stream_id`` again. ``tag`` makes the job id unique per stale
    heartbeat, so several workers noticing the same loss enqueue it once. It goes first in line
    (score 0, before every fair score: ``tailgate.scripts.FAIR``): its reader is mid-answer."""
    job_id = f"{stream_id}:{tag}"
    await queue.enqueue_job(
        keys.JOB_GENERATE,
        stream_id,
        _job_id=job_id,
        _queue_name=queue_name,
        _defer_until=FIRST_IN_LINE,
        _expires=timedelta(milliseconds=queue.expires_extra_ms),
    )
    await queue.publish(keys.wake(queue_name), job_id)  # a wake-up names the job it is for
