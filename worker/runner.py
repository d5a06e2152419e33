"""The worker process: ARQ's worker, woken by the gateway instead of polling, plus its side loops.

- **Wake-up.** The gateway publishes on ``tg:wake`` right after it enqueues; the worker's main loop
  waits on that signal and polls ARQ's queue at once. ARQ's ``poll_delay`` remains only as a fallback
  (a lost message, a worker that was busy).
- **Cancel.** ``tg:cancel`` names a stream whose generation must stop; if it runs here, its publisher
  halts and the upstream response is closed.
- **Heartbeat.** Every ``heartbeat_s`` the worker stamps the meta of each stream it runs (and reads
  their cancel flags, in case a cancel message was missed) and registers itself in ``tg:workers``.
- **Shutdown.** SIGTERM/SIGINT: stop taking jobs, let running streams finish within
  ``shutdown_grace_s``, then cancel what is left (ARQ runs those jobs again).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
from typing import Any

from arq import Worker
from arq.connections import ArqRedis
from arq.worker import func
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tailgate import keys
from tailgate.connections import open_queue, open_store
from tailgate.settings import Settings
from tailgate.store import stamp
from worker import upstream
from worker.job import WorkerState, generate

log = logging.getLogger(__name__)


class TailgateWorker(Worker):
    """ARQ's worker with its poll sleep replaced by a wake-up event (ARQ's ``main``, minus the
    startup it does not need here)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.woken = asyncio.Event()

    async def main(self) -> None:
        self.ctx["redis"] = self.pool
        while True:
            self.woken.clear()
            await self._poll_iteration()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_delay_s):
                    await self.woken.wait()


async def run(settings: Settings) -> None:
    """Run one worker process until SIGTERM/SIGINT."""
    worker_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
    queue = open_queue(settings, "worker", keys.WORKER_QUEUE_POOL)
    store = open_store(settings, "worker", keys.WORKER_STREAMS_POOL)
    streams = store.redis
    state = WorkerState(worker_id, settings, store, streams, upstream.client(settings))
    worker = TailgateWorker(
        functions=[func(generate, name=keys.JOB_GENERATE)],
        redis_pool=queue,
        queue_name=settings.queue_name,
        max_jobs=settings.concurrency,
        job_timeout=settings.job_timeout_s,
        keep_result=0,
        poll_delay=settings.poll_delay_s,
        handle_signals=False,
        ctx={"tailgate": state},
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    listener = asyncio.create_task(_listen(queue, worker, state), name="listen")
    beat = asyncio.create_task(_heartbeat(queue, state), name="heartbeat")
    main = asyncio.create_task(worker.main(), name="arq-main")
    # The listener subscribes first thing; a job enqueued before that is found by the first poll.
    log.info("worker %s ready (concurrency %d)", worker_id, settings.concurrency)
    stopping = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({main, listener, beat, stopping}, return_when=asyncio.FIRST_COMPLETED)
    for task in done - {stopping}:
        task.result()  # a side loop that died is a bug: surface it

    log.info("worker %s stopping: %d streams running", worker_id, len(state.running))
    worker.allow_pick_jobs = False
    main.cancel()
    jobs = [t for t in worker.tasks.values() if not t.done()]
    if jobs:
        _, late = await asyncio.wait(jobs, timeout=settings.shutdown_grace_s)
        for t in late:
            t.cancel()
        await asyncio.gather(*late, return_exceptions=True)
    for task in (listener, beat, main):
        task.cancel()
    await asyncio.gather(listener, beat, main, return_exceptions=True)
    await queue.hdel(keys.WORKERS, worker_id)  # type: ignore[misc]
    await state.api.close()
    await streams.aclose()
    await queue.aclose()
    log.info("worker %s stopped", worker_id)


async def _listen(queue: ArqRedis, worker: TailgateWorker, state: WorkerState) -> None:
    pubsub = queue.pubsub()
    backoff = 0.05
    try:
        await pubsub.subscribe(keys.WAKE_CHANNEL, keys.CANCEL_CHANNEL)
        while True:
            try:
                msg = await pubsub.get_message(ignore_subscribe_messages=False, timeout=None)
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                log.warning("wake-up channel lost (%s); polling until it is back", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.05
            if msg is None:
                continue
            # After a (re)subscription too: a wake-up may have been missed meanwhile.
            channel = msg["channel"].decode()
            if channel == keys.WAKE_CHANNEL or msg["type"] == "subscribe":
                worker.woken.set()
            elif msg["type"] == "message" and channel == keys.CANCEL_CHANNEL:
                pub = state.running.get(msg["data"].decode())
                if pub is not None:
                    log.info("stream %s cancel requested", pub.stream_id)
                    pub.request_cancel()
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]


async def _heartbeat(queue: ArqRedis, state: WorkerState) -> None:
    while True:
        now = stamp()
        running = list(state.running.values())
        try:
            async with state.streams.pipeline(transaction=False) as pipe:
                for pub in running:
                    pipe.hset(keys.meta(pub.stream_id), "heartbeat", now)
                    pipe.hget(keys.meta(pub.stream_id), "cancel")
                replies = await pipe.execute() if running else []
            for pub, flag in zip(running, replies[1::2], strict=True):
                if flag == "1" and not pub.cancel_requested:
                    pub.request_cancel()
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "running": len(running),
                "beat_ms": float(now),
            }
            await queue.hset(keys.WORKERS, state.id, json.dumps(info))  # type: ignore[misc]
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            log.warning("heartbeat failed: %s", exc)
        await asyncio.sleep(state.settings.heartbeat_s)
