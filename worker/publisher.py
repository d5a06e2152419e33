"""Appends, coalesced twice: over time within a stream, and across the streams of a worker.

Each running :class:`~worker.attempt.Attempt` buffers its events; one :class:`Appender` per worker
process writes them. A stream is due when ``window`` has passed since its last write (so a token
after a quiet spell, the first one above all, goes out at once, and a burst waits at most one
window); every stream due at the same moment goes to Redis in one pipelined round trip (one atomic
append script per stream, so each event keeps its own id and ``seq``). A burst of tokens becomes one
script call, and hundreds of streams share a round trip. With a window of 0 it still batches whatever
piled up while the previous round trip was in flight. One round trip at a time keeps each stream's
appends in order.

Round trips start at least a fifth of the window apart (``GAP``). Under load, streams fall due one
after another, and a round trip for each handful of them costs the worker a socket write and a read
(the write alone was a sixth of a worker's samples at 200 streams); spaced, each round trip carries
more streams, for at most 2 ms more latency at the default window. A token after a quiet spell still
goes out at once: the gap counts from the start of the last round trip, long past by then.

The appender owns the schedule (which attempts have events, when each is due); the attempt owns
its events and its state. They meet at four calls: ``Appender.ready`` and ``Appender.forget`` (from
the attempt), ``Attempt.take`` and ``Attempt.applied`` (from the appender).

While Redis is unreachable, the appender retries (``ride_out``) until it is back, and tells each
attempt that its write was retried: the append script recognises a write it already applied by its
``seq``, and a terminal write that finds its stream ended needs that hint to count as its own.
"""

from __future__ import annotations

import asyncio
import logging

from tailgate.connections import ride_out
from tailgate.store import Append, StreamStore, Written
from worker.attempt import Attempt

log = logging.getLogger(__name__)

GAP = 0.2  # the least time between the starts of two round trips, as a share of the window


class Appender:
    """The worker's one writer of events (see the module docstring)."""

    def __init__(self, store: StreamStore, window_s: float) -> None:
        self._store = store
        self._window = window_s
        self._ready: dict[Attempt, None] = {}  # insertion-ordered set: attempts with events pending
        self._due: dict[Attempt, float] = {}  # loop time before which an attempt's next write waits
        self._wake = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> asyncio.Task[None]:
        """The appender's loop; the worker keeps and, at shutdown, cancels it with its other loops."""
        return asyncio.create_task(self._run(), name="appender")

    def ready(self, attempt: Attempt) -> None:
        """``attempt`` has events to write."""
        self._ready[attempt] = None
        self._wake.set()

    def forget(self, attempt: Attempt) -> None:
        """``attempt`` writes nothing more."""
        self._ready.pop(attempt, None)
        self._due.pop(attempt, None)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            now = loop.time()
            due = [a for a in self._ready if self._due.get(a, 0.0) <= now]
            for a in due:
                del self._ready[a]
            work = [(a, append) for a in due if (append := a.take()) is not None]
            if work:
                for a, _ in work:
                    self._due[a] = now + self._window
                await self._write(work)
                if (rest := now + self._window * GAP - loop.time()) > 0:
                    await asyncio.sleep(rest)  # what falls due meanwhile goes in the next round trip
            if self._ready:  # streams inside their window: wake when the first one is due
                if self._timer is not None:
                    self._timer.cancel()
                self._timer = loop.call_at(min(self._due.get(a, 0.0) for a in self._ready), self._wake.set)

    async def _write(self, work: list[tuple[Attempt, Append]]) -> None:
        tries = 0

        async def write() -> list[Written | Exception]:
            nonlocal tries
            tries += 1
            return await self._store.append_many([append for _, append in work])

        results = await ride_out(write)
        for (attempt, append), result in zip(work, results, strict=True):
            attempt.applied(append, result, tries > 1)
