"""Appends, coalesced twice: over time within a stream, and across the streams of a worker.

Each running attempt has a :class:`Publisher` that buffers its events. One :class:`Appender` per
worker process writes them. A stream is due when ``window`` has passed since its last write (so a
token after a quiet spell, the first one above all, goes out at once, and a burst waits at most one
window); every stream due at the same moment goes to Redis in one pipelined round trip (one atomic
append script per stream, so each event keeps its own id and ``seq``). A burst of tokens becomes one
script call, and hundreds of streams share a round trip. With a window of 0 it still batches whatever
piled up while the previous round trip was in flight. One round trip at a time keeps each stream's
appends in order.

An append (or a heartbeat) can be refused: another attempt owns the stream (fenced), the stream
ended, or it is gone. Then ``halted`` is set and the attempt stops its upstream call. A cancellation
request (from the cancel channel, the heartbeat, or an append's reply) and a hand-back on shutdown
set ``halted`` too. While Redis is unreachable, the appender retries (safely: the script recognises
an append it already applied by its ``seq``) until it is back or the attempt times out.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from tailgate.connections import ride_out
from tailgate.events import TERMINAL
from tailgate.store import Append, Outcome, StreamStore, Written

log = logging.getLogger(__name__)


class Publisher:
    def __init__(self, appender: Appender, stream_id: str, attempt: int, seq: int) -> None:
        self.stream_id = stream_id
        self.attempt = attempt
        self.seq = seq
        self.halted = asyncio.Event()
        self.refused: Outcome | None = None  # why appends stopped, if they did
        self.cancel_requested = False
        self.handing_back = False
        self.deltas = 0
        self._appender = appender
        self._pending: list[tuple[str, dict[str, Any]]] = []
        self._meta: dict[str, str] | None = None
        self._done: asyncio.Future[bool] | None = None  # set by `finish`
        self.due_at = 0.0  # loop time before which this stream's next write waits (coalescing)

    def add(self, kind: str, data: dict[str, Any]) -> None:
        if self.refused is not None or self._done is not None:
            return
        if kind == "delta":
            self.deltas += 1
        self._pending.append((kind, data))
        self._appender.ready(self)

    def request_cancel(self) -> None:
        self.cancel_requested = True
        self.halted.set()

    def request_handback(self) -> None:
        self.handing_back = True
        self.halted.set()

    def refuse(self, outcome: Outcome) -> None:
        if self.refused is None:
            log.info("stream %s attempt %d refused: %s", self.stream_id, self.attempt, outcome.value)
            self.refused = outcome
        self._pending.clear()
        if self._done is not None and not self._done.done():
            self._done.set_result(False)
        self.halted.set()

    async def finish(self, kind: str, data: dict[str, Any], meta: dict[str, str] | None = None) -> bool:
        """Append what is pending plus the terminal event ``kind``; False if refused."""
        if self.refused is not None:
            return False
        self._pending.append((kind, data))
        self._meta = meta
        self._done = asyncio.get_running_loop().create_future()
        self._appender.ready(self)
        return await self._done

    def abandon(self) -> None:
        """Stop without a terminal event (the stream is someone else's, or is handed back)."""
        self._pending.clear()
        self._appender.forget(self)

    def take(self) -> Append | None:
        """What the next tick writes for this stream."""
        if not self._pending or self.refused is not None:
            return None
        batch, self._pending = self._pending, []
        meta, self._meta = (self._meta, None) if batch[-1][0] in TERMINAL else (None, self._meta)
        return Append(self.stream_id, self.attempt, self.seq, batch, meta)

    def applied(self, append: Append, written: Written, retried: bool) -> None:
        terminal = append.events[-1][0] in TERMINAL
        if retried and terminal and written.outcome is Outcome.FINISHED:
            written = Written(Outcome.OK, append.seq + len(append.events), self.attempt)  # ours, reply lost
        if written.outcome is not Outcome.OK:
            self.refuse(written.outcome)
            return
        self.seq = written.seq
        if written.cancel:
            self.request_cancel()
        if terminal and self._done is not None and not self._done.done():
            self._done.set_result(True)


class Appender:
    """The worker's one writer of events (see the module docstring)."""

    def __init__(self, store: StreamStore, window_s: float) -> None:
        self._store = store
        self._window = window_s
        self._ready: dict[Publisher, None] = {}  # insertion-ordered set
        self._wake = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> asyncio.Task[None]:
        """The appender's loop; the worker keeps and, at shutdown, cancels it with its other loops."""
        return asyncio.create_task(self._run(), name="appender")

    def ready(self, pub: Publisher) -> None:
        self._ready[pub] = None
        self._wake.set()

    def forget(self, pub: Publisher) -> None:
        self._ready.pop(pub, None)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            now = loop.time()
            due = [pub for pub in self._ready if pub.due_at <= now]
            for pub in due:
                del self._ready[pub]
            work = [(pub, append) for pub in due if (append := pub.take()) is not None]
            if work:
                for pub, _ in work:
                    pub.due_at = now + self._window
                await self._write(work)
            if self._ready:  # streams inside their window: wake when the first one is due
                if self._timer is not None:
                    self._timer.cancel()
                self._timer = loop.call_at(min(p.due_at for p in self._ready), self._wake.set)

    async def _write(self, work: list[tuple[Publisher, Append]]) -> None:
        tries = 0

        async def write() -> list[Written | Exception]:
            nonlocal tries
            tries += 1
            return await self._store.append_many([append for _, append in work])

        results = await ride_out(write)
        retried = tries > 1
        for (pub, append), result in zip(work, results, strict=True):
            if isinstance(result, Exception):
                log.error("stream %s append failed: %s", pub.stream_id, result)
                pub.refuse(Outcome.GONE)
            else:
                pub.applied(append, result, retried)
