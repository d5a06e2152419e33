"""The worker process: ARQ's worker, woken by the gateway instead of polling, plus its side loops.

- **Wake-up.** The gateway publishes on its queue's wake-up channel (``keys.wake``) right after it
  enqueues; the worker's main loop waits on that signal and polls ARQ's queue at once. ARQ's
  ``poll_delay`` remains only as a fallback (a lost message, a worker that was busy). At
  ``concurrency`` running streams it stops taking jobs, which stay queued for other workers.
- **Jobs.** When the queue shares the streams' Redis (the default), the worker runs a polled job
  itself instead of through ARQ's ``run_job``: the claims of every stream polled go in one pipelined
  round trip, the attempts start, and then the jobs are dropped from the queue as ARQ drops a job
  that ran (four round trips a job through ARQ). The stream's claim is what makes a job run once:
  two workers polling the same job both claim, and the second is answered ``busy``. The claims ride
  out an outage (a failover) for up to ``CLAIM_PATIENCE_S``, sent again with the same tokens, so a
  claim whose reply was lost is recognised. A job whose claim failed stays queued for the next poll;
  a worker that dies before it drops its jobs leaves them to be claimed again, which the claim
  answers ``busy``, or takes over if the worker is gone.
- **Cancel.** ``tg:cancel`` names a stream whose generation must stop; if it runs here, its attempt
  halts and the upstream response is closed.
- **Heartbeat.** Every ``heartbeat_s`` the worker stamps the meta of each stream it runs (an attempt
  that is no longer the stream's owner learns it here and stops), reads their cancel flags, and
  registers itself in ``tg:workers``.
- **Takeover.** Every second it looks for running streams whose heartbeat is older than
  ``takeover_after_s`` and enqueues a job that claims them again. Right after Redis itself restarted,
  or a Sentinel failover put a replica in the primary's place (the server's run id changed), it waits
  one takeover period first: every heartbeat looks old then, though the workers are alive.
- **Metrics.** With ``metrics_port``, Prometheus metrics (``worker.metrics``) are served from a
  thread for as long as the loops run. One of ``tailgate worker --processes N``'s processes serves
  none: it writes them into the directory its supervisor sums and serves (``tailgate.supervisor``).
- **Shutdown.** SIGTERM/SIGINT, or a side loop that died: stop taking jobs, let claims in flight
  land, let running streams finish within ``shutdown_grace_s``, then hand the rest back (``reset``
  reason ``worker_shutdown``) so other workers resume them at once; cancel what is still stuck, then
  the side loops, then close the pools (``run``'s ``finally``). A loop's error is raised after that.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import os
import secrets
import signal
import socket
from collections.abc import Awaitable
from typing import Any

from arq import Worker
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, job_key_prefix, retry_key_prefix
from arq.utils import timestamp_ms
from arq.worker import func

from tailgate import keys, prometheus, tuning
from tailgate.connections import REDIS_ERRORS, open_queue, open_store, ride_out
from tailgate.settings import Settings
from tailgate.store import Claimed, Reply, stamp
from worker import upstream
from worker.attempt import Outcome, refused
from worker.job import WorkerState, generate, start, takeover
from worker.publisher import Appender

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


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
        self.wake_ids: list[bytes] = []  # the job ids that wake-ups named since the last poll
        self.more = False  # the last poll read a full page: more jobs may be due behind it
        # The last poll found more due jobs than there was room for: a job a wake-up names now is
        # behind them in the fair order (tailgate.scripts.FAIR), so it waits for a poll too.
        self.backlog = False
        self._claim_jobs = self.pool.register_script(_CLAIM_JOBS)

    async def start_jobs(self, job_ids: list[bytes], *, polled: bool = True) -> None:
        # TAILGATE_CONCURRENCY is a hard cap: every job in flight may become a running stream, so
        # the jobs started here and the streams running already never add up to more than it.
        s = self.state
        room = min(self.max_jobs, s.settings.concurrency - len(s.running)) - self.job_counter
        if polled:  # ARQ's poll: the due jobs, lowest score first
            self.more = len(job_ids) >= self.queue_read_limit and room > len(job_ids)
            self.backlog = len(job_ids) > max(room, 0)
        if room <= 0 or not job_ids:
            return
        ids = [j.decode() for j in job_ids[:room]]
        if s.settings.one_redis:
            # A task in `tasks`, as ARQ's jobs are: shutdown waits for the claims in flight.
            task = self.tasks[f"claims-{ids[0]}"] = self.loop.create_task(self._run_jobs(ids))
            await task
            return
        ttl_ms = int(tuning.JOB_IN_PROGRESS_S * 1000)
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

    async def _run_jobs(self, job_ids: list[str]) -> None:
        """Run polled ``generate`` jobs here (see the module docstring): claim their streams in one
        round trip, start the attempts, then drop the jobs."""
        s = self.state
        # A job id is its stream's id, or ``<stream id>:<tag>`` for a takeover job (worker.job).
        streams = [j[:32] for j in job_ids]
        # A takeover job for a stream that runs here (our heartbeat failed, not the attempt): drop it.
        wanted = [i for i in streams if i not in s.running]
        # Each claim's own token: sent again after a lost reply (a failover), it is recognised.
        tokens = [secrets.token_hex(8) for _ in wanted]

        def claim_all() -> Awaitable[list[Claimed | Exception]]:
            settings = s.settings
            return s.store.claim_many(
                wanted,
                s.id,
                stale_after_s=settings.takeover_after_s,
                max_attempts=settings.max_attempts,
                tokens=tokens,
            )

        try:
            claims = await ride_out(claim_all, patience_s=tuning.CLAIM_PATIENCE_S)
        except REDIS_ERRORS as exc:
            log.warning("claims of %d streams failed (%s); their jobs stay queued", len(wanted), exc)
            return
        failed: set[str] = set()
        for stream_id, claim in zip(wanted, claims, strict=True):
            if isinstance(claim, Exception):
                log.warning("stream %s: claim failed (%s); its job stays queued", stream_id, claim)
                failed.add(stream_id)
            else:
                start(s, stream_id, claim)
        done = [j for j, i in zip(job_ids, streams, strict=True) if i not in failed]
        if done:
            try:
                async with self.pool.pipeline(transaction=False) as pipe:
                    for j in done:  # as ARQ's finish_job leaves a job that ran with keep_result=0
                        pipe.delete(job_key_prefix + j, retry_key_prefix + j, in_progress_key_prefix + j)
                    pipe.zrem(self.queue_name, *done)
                    await pipe.execute()
            except REDIS_ERRORS as exc:  # claimed again later, and answered `busy` (or taken over)
                log.warning("dropping %d claimed jobs failed: %s", len(done), exc)

    async def main(self) -> None:
        self.ctx["redis"] = self.pool
        while True:
            self.woken.clear()
            s = self.state
            self.allow_pick_jobs = not s.stopping and len(s.running) < s.settings.concurrency
            named, self.wake_ids = self.wake_ids, []
            if named and not self.allow_pick_jobs:
                self.backlog = True  # they wait in the queue, and so will any named after them
            if named and self.allow_pick_jobs and s.settings.one_redis and not self.backlog:
                # The jobs a wake-up named start first, without the poll's round trip before them;
                # the poll then finds what else is due (the named ones are dropped by then). Not
                # while older jobs wait: they go first, and the poll takes them in order.
                await ride_out(functools.partial(self.start_jobs, named, polled=False))
            await ride_out(self._poll_iteration)
            if self.more and self.allow_pick_jobs:
                continue  # a burst: read the next page now, not after a wake-up or a poll_delay
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_delay_s):
                    await self.woken.wait()


async def run(settings: Settings) -> None:
    """Run one worker process until SIGTERM/SIGINT, or until one of its loops dies (a bug, whose
    error is raised once the worker has shut down)."""
    worker_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
    queue = open_queue(settings, "worker", tuning.WORKER_QUEUE_POOL)
    store = await open_store(settings, "worker", tuning.WORKER_STREAMS_POOL, retry=False)
    api = upstream.client(settings)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    try:
        appender = Appender(store, settings.coalesce_ms / 1000)
        state = WorkerState(worker_id, settings, store, queue, api, appender)
        with prometheus.served(settings.metrics_port, prometheus.registry()):
            await _serve(state, stop)
    finally:
        for sig in SIGNALS:
            loop.remove_signal_handler(sig)
        with contextlib.suppress(*REDIS_ERRORS):
            await queue.hdel(keys.WORKERS, worker_id)  # type: ignore[misc]
        await api.close()
        await store.aclose()
        await queue.aclose()
        log.info("worker %s stopped", worker_id)


async def _serve(state: WorkerState, stop: asyncio.Event) -> None:
    """The loops, until ``stop`` is set or one of them ends; then shut down in order."""
    worker = _arq_worker(state)
    loops = [
        asyncio.create_task(_listen(state.queue, worker, state), name="listen"),
        asyncio.create_task(_heartbeat(state), name="heartbeat"),
        asyncio.create_task(_scan(state), name="takeover-scan"),
        asyncio.create_task(worker.main(), name="arq-main"),
        state.appender.start(),
    ]
    log.info("worker %s ready (concurrency %d)", state.id, state.settings.concurrency)
    stopping = asyncio.create_task(stop.wait(), name="signal")
    try:
        await asyncio.wait({*loops, stopping}, return_when=asyncio.FIRST_COMPLETED)
        died = [t for t in loops if t.done()]
        for t in died:  # a bug: shut down in order all the same, then raise its error
            log.error("worker %s: loop %s ended; shutting down", state.id, t.get_name())
    finally:
        stopping.cancel()
        await _shut_down(state, worker, loops)
    for t in died:
        t.result()
        raise RuntimeError(f"worker loop {t.get_name()} ended without an error")


def _arq_worker(state: WorkerState) -> TailgateWorker:
    s = state.settings
    return TailgateWorker(
        state,
        functions=[func(generate, name=keys.JOB_GENERATE, max_tries=tuning.CLAIM_MAX_TRIES)],
        redis_pool=state.queue,
        queue_name=s.queue_name,
        max_jobs=tuning.WORKER_ARQ_JOBS,
        job_timeout=tuning.ARQ_JOB_TIMEOUT_S,
        keep_result=0,
        poll_delay=s.poll_delay_s,
        handle_signals=False,
        ctx={"tailgate": state},
    )


async def _shut_down(state: WorkerState, worker: TailgateWorker, loops: list[asyncio.Task[None]]) -> None:
    """In order: drain the streams (below), then cancel the side loops, even if draining failed."""
    try:
        await _drain(state, worker)
    finally:
        for t in loops:
            t.cancel()
        await asyncio.gather(*loops, return_exceptions=True)


async def _drain(state: WorkerState, worker: TailgateWorker) -> None:
    """Stop taking jobs; let the running streams finish within the grace period, then hand the rest
    back; then cancel what still runs. The side loops keep running meanwhile: the heartbeat keeps the
    finishing streams ours, the appender writes their ends."""
    s = state.settings
    log.info("worker %s stopping: %d streams running", state.id, len(state.running))
    state.stopping = True
    worker.allow_pick_jobs = False
    # Claims in flight (a round trip each) become attempts, which the steps below must see.
    jobs = [t for t in worker.tasks.values() if not t.done()]
    if jobs:
        await asyncio.wait(jobs, timeout=tuning.SHUTDOWN_CLAIMS_S)
    attempts = _tasks(state)
    if attempts:
        _, late = await asyncio.wait(attempts, timeout=s.shutdown_grace_s)
        if late:
            log.info("worker %s hands back %d streams", state.id, len(late))
            for attempt in list(state.running.values()):
                attempt.request_handback()
            _, late = await asyncio.wait(late, timeout=tuning.SHUTDOWN_HANDBACK_S)
        for task in late:  # stuck (Redis unreachable, say): their heartbeat stops, they are taken over
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)


def _tasks(state: WorkerState) -> list[asyncio.Task[Outcome]]:
    return [a.task for a in state.running.values() if a.task is not None]


async def _listen(queue: ArqRedis, worker: TailgateWorker, state: WorkerState) -> None:
    pubsub = queue.pubsub()
    try:
        # Through an outage too: a worker started while Redis is down waits for it, polling meanwhile.
        wake = keys.wake(state.settings.queue_name)
        await ride_out(lambda: pubsub.subscribe(wake, keys.CANCEL_CHANNEL))
        while True:
            # While the channel is lost, ARQ's poll still finds new jobs.
            msg = await ride_out(lambda: pubsub.get_message(ignore_subscribe_messages=False, timeout=None))
            if msg is None:
                continue
            # After a (re)subscription too: a wake-up may have been missed meanwhile.
            channel = msg["channel"].decode()
            if channel == wake or msg["type"] == "subscribe":
                if msg["type"] == "message":
                    worker.wake_ids.append(msg["data"])  # the job id
                worker.woken.set()
            elif msg["type"] == "message" and channel == keys.CANCEL_CHANNEL:
                attempt = state.running.get(msg["data"].decode())
                if attempt is not None:
                    log.info("stream %s cancel requested", attempt.stream_id)
                    attempt.request_cancel()
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]


async def _heartbeat(state: WorkerState) -> None:
    while True:
        # A finishing attempt is left out: what Redis answers its terminal append decides its outcome.
        running = {i: a for i, a in state.running.items() if not a.finishing}
        try:
            if running:
                replies = await state.store.beat({i: a.number for i, a in running.items()})
                for stream_id, reply in replies.items():
                    attempt = running[stream_id]
                    if reply == "1":
                        if not attempt.cancel_requested:
                            attempt.request_cancel()
                    elif reply != "0" and not attempt.finishing:
                        attempt.refuse(refused(Reply(reply)))
            info = {"pid": os.getpid(), "host": socket.gethostname(), "running": len(state.running)}
            info["beat_ms"] = float(stamp())
            await state.queue.hset(keys.WORKERS, state.id, json.dumps(info))  # type: ignore[misc]
        except REDIS_ERRORS as exc:
            log.warning("heartbeat failed: %s", exc)
        await asyncio.sleep(state.settings.heartbeat_s)


async def _scan(state: WorkerState) -> None:
    s = state.settings
    loop = asyncio.get_running_loop()
    server, changed = "", -math.inf  # the Redis it scanned last (its run id), and when that changed
    while True:
        await asyncio.sleep(tuning.TAKEOVER_SCAN_S)
        if state.stopping:
            continue
        try:
            # The Redis of the running index (on a cluster, the queue's; tailgate.store)
            info = await state.store.books.info("server")
            if info["run_id"] != server:
                changed = loop.time() if server else changed  # a failover, or a restart
                server = info["run_id"]
            settled = min(int(info["uptime_in_seconds"]), loop.time() - changed)
            if settled < s.takeover_after_s * 1.5:
                # Redis just restarted, or a replica just took over from a primary that died:
                # every heartbeat looks old; give live workers time to heartbeat there again.
                continue
            for stream_id, beat_ms in await state.store.stale(s.takeover_after_s):
                if stream_id in state.running:
                    continue  # ours: our own heartbeat is what failed, not the attempt
                log.warning("stream %s: no heartbeat since %.0f; enqueueing its takeover", stream_id, beat_ms)
                await takeover(state.queue, s.queue_name, stream_id, f"stale-{beat_ms:.0f}")
        except REDIS_ERRORS as exc:
            log.warning("takeover scan failed: %s", exc)
