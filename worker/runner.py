"""The worker process: ARQ's worker, woken by the gateway instead of polling, plus its side loops.

- **Wake-up.** The gateway publishes on ``tg:wake`` right after it enqueues; the worker's main loop
  waits on that signal and polls ARQ's queue at once. ARQ's ``poll_delay`` remains only as a fallback
  (a lost message, a worker that was busy). At ``concurrency`` running streams it stops taking jobs,
  which stay queued for other workers.
- **Cancel.** ``tg:cancel`` names a stream whose generation must stop; if it runs here, its publisher
  halts and the upstream response is closed.
- **Heartbeat.** Every ``heartbeat_s`` the worker stamps the meta of each stream it runs (an attempt
  that is no longer the stream's owner learns it here and stops), reads their cancel flags, and
  registers itself in ``tg:workers``.
- **Takeover.** Every second it looks for running streams whose heartbeat is older than
  ``takeover_after_s`` and enqueues a job that claims them again. Right after Redis itself restarted
  it waits one takeover period first: every heartbeat looks old then, though the workers are alive.
- **Shutdown.** SIGTERM/SIGINT: stop taking jobs, let running streams finish within
  ``shutdown_grace_s``, then hand the rest back (``reset`` reason ``worker_shutdown``) so other
  workers resume them at once.
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
from arq.constants import in_progress_key_prefix
from arq.utils import timestamp_ms
from arq.worker import func

from tailgate import keys, tuning
from tailgate.connections import REDIS_ERRORS, open_queue, open_store, ride_out
from tailgate.settings import Settings
from tailgate.store import Outcome, stamp
from worker import upstream
from worker.job import WorkerState, generate, takeover
from worker.publisher import Appender

log = logging.getLogger(__name__)


# Claims a batch of queued ARQ jobs at once: the same in-progress key ARQ's own WATCH/MULTI sets, for
# the jobs that are due and not in progress. ARQ claims job after job, four round trips each, so a
# burst of 500 streams waited seconds for their start. KEYS: queue. ARGV: in-progress key prefix,
# its TTL in ms, now in ms, job ids.
_CLAIM_JOBS = """
local out = {}
for i = 4, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) <= tonumber(ARGV[3])
     and redis.call('SET', ARGV[1] .. ARGV[i], '1', 'PX', ARGV[2], 'NX') then
    out[#out + 1] = ARGV[i]
    out[#out + 1] = score
  end
end
return out
"""


class TailgateWorker(Worker):
    """ARQ's worker with its poll sleep replaced by a wake-up event, jobs claimed in batches, and Redis
    outages survived (ARQ's ``main`` minus the startup it does not need here)."""

    def __init__(self, state: WorkerState, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.state = state
        self.woken = asyncio.Event()
        self._claim_jobs = self.pool.register_script(_CLAIM_JOBS)

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        room = self.max_jobs - self.job_counter
        if room <= 0 or not job_ids:
            return
        ids = [j.decode() for j in job_ids[:room]]
        ttl_ms = int(self.in_progress_timeout_s * 1000)
        claimed = await self._claim_jobs(
            keys=[self.queue_name], args=[in_progress_key_prefix, ttl_ms, timestamp_ms(), *ids]
        )
        for job_id, score in zip(claimed[::2], claimed[1::2], strict=True):
            await self.sem.acquire()  # free: `room` counted the running jobs
            self.job_counter += 1
            job = job_id.decode()
            task = self.loop.create_task(self.run_job(job, int(float(score))))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job] = task

    async def main(self) -> None:
        self.ctx["redis"] = self.pool
        while True:
            self.woken.clear()
            s = self.state
            self.allow_pick_jobs = not s.stopping and len(s.running) < s.settings.concurrency
            await ride_out(self._poll_iteration)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_delay_s):
                    await self.woken.wait()


async def run(settings: Settings) -> None:
    """Run one worker process until SIGTERM/SIGINT."""
    worker_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
    queue = open_queue(settings, "worker", tuning.WORKER_QUEUE_POOL)
    store = open_store(settings, "worker", tuning.WORKER_STREAMS_POOL, retry=False)
    appender = Appender(store, settings.coalesce_ms / 1000)
    state = WorkerState(worker_id, settings, store, queue, upstream.client(settings), appender)
    worker = TailgateWorker(
        state,
        functions=[func(generate, name=keys.JOB_GENERATE, max_tries=tuning.CLAIM_MAX_TRIES)],
        redis_pool=queue,
        queue_name=settings.queue_name,
        max_jobs=tuning.WORKER_ARQ_JOBS,
        job_timeout=tuning.ARQ_JOB_TIMEOUT_S,
        keep_result=0,
        poll_delay=settings.poll_delay_s,
        handle_signals=False,
        ctx={"tailgate": state},
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    loops = [
        asyncio.create_task(_listen(queue, worker, state), name="listen"),
        asyncio.create_task(_heartbeat(state), name="heartbeat"),
        asyncio.create_task(_scan(state), name="takeover-scan"),
        asyncio.create_task(worker.main(), name="arq-main"),
        appender.start(),
    ]
    log.info("worker %s ready (concurrency %d)", worker_id, settings.concurrency)
    stopping = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({*loops, stopping}, return_when=asyncio.FIRST_COMPLETED)
    for task in done - {stopping}:
        task.result()  # a side loop that died is a bug: surface it

    log.info("worker %s stopping: %d streams running", worker_id, len(state.running))
    state.stopping = True
    worker.allow_pick_jobs = False
    if state.attempts:
        _, late = await asyncio.wait(state.attempts, timeout=settings.shutdown_grace_s)
        if late:
            log.info("worker %s hands back %d streams", worker_id, len(state.running))
            for pub in list(state.running.values()):
                pub.request_handback()
            await asyncio.wait(late, timeout=10)
    for task in loops:
        task.cancel()
    await asyncio.gather(*loops, return_exceptions=True)
    with contextlib.suppress(*REDIS_ERRORS):
        await queue.hdel(keys.WORKERS, worker_id)  # type: ignore[misc]
    await state.api.close()
    await store.redis.aclose()
    await queue.aclose()
    log.info("worker %s stopped", worker_id)


async def _listen(queue: ArqRedis, worker: TailgateWorker, state: WorkerState) -> None:
    pubsub = queue.pubsub()
    try:
        await pubsub.subscribe(keys.WAKE_CHANNEL, keys.CANCEL_CHANNEL)
        while True:
            # While the channel is lost, ARQ's poll still finds new jobs.
            msg = await ride_out(lambda: pubsub.get_message(ignore_subscribe_messages=False, timeout=None))
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


async def _heartbeat(state: WorkerState) -> None:
    while True:
        running = dict(state.running)
        try:
            if running:
                replies = await state.store.beat({i: pub.attempt for i, pub in running.items()})
                for stream_id, reply in replies.items():
                    pub = running[stream_id]
                    if reply == "fenced":
                        pub.refuse(Outcome.FENCED)
                    elif reply == "1" and not pub.cancel_requested:
                        pub.request_cancel()
            info = {"pid": os.getpid(), "host": socket.gethostname(), "running": len(running)}
            info["beat_ms"] = float(stamp())
            await state.queue.hset(keys.WORKERS, state.id, json.dumps(info))  # type: ignore[misc]
        except REDIS_ERRORS as exc:
            log.warning("heartbeat failed: %s", exc)
        await asyncio.sleep(state.settings.heartbeat_s)


async def _scan(state: WorkerState) -> None:
    s = state.settings
    while True:
        await asyncio.sleep(tuning.TAKEOVER_SCAN_S)
        if state.stopping:
            continue
        try:
            info = await state.store.redis.info("server")
            if int(info["uptime_in_seconds"]) < s.takeover_after_s * 1.5:
                continue  # Redis just restarted: give live workers time to heartbeat again
            for stream_id, beat_ms in await state.store.stale(s.takeover_after_s):
                if stream_id in state.running:
                    continue  # ours: our own heartbeat is what failed, not the attempt
                log.warning("stream %s: no heartbeat since %.0f; enqueueing its takeover", stream_id, beat_ms)
                await takeover(state.queue, s.queue_name, stream_id, f"stale-{beat_ms:.0f}")
        except REDIS_ERRORS as exc:
            log.warning("takeover scan failed: %s", exc)
