"""The publisher: one per running attempt; coalesces events into atomic appends.

Tokens arrive one by one; writing each on its own would cost a Redis round trip per token. The
publisher writes whatever is pending in one append, then waits ``window`` before the next, so a
burst of tokens becomes one script call while each event keeps its own id and ``seq``. With a window
of 0 it still batches what piled up while the previous append was in flight.

An append (or a heartbeat) can be refused: another attempt owns the stream (fenced), the stream
ended, or it is gone. Then ``halted`` is set and the attempt stops its upstream call. A cancellation
request (from the cancel channel, the heartbeat, or an append's reply) and a hand-back on shutdown
set ``halted`` too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tailgate.events import TERMINAL
from tailgate.store import Outcome, StreamStore, Written

log = logging.getLogger(__name__)

# How long a worker retries an append while Redis is unreachable before it gives the attempt up.
APPEND_RETRY_S = 60.0


class Publisher:
    def __init__(self, store: StreamStore, stream_id: str, attempt: int, seq: int, window_s: float) -> None:
        self.stream_id = stream_id
        self.attempt = attempt
        self.halted = asyncio.Event()
        self.refused: Outcome | None = None  # why appends stopped, if they did
        self.cancel_requested = False
        self.handing_back = False
        self.deltas = 0
        self._store = store
        self._seq = seq
        self._window = window_s
        self._pending: list[tuple[str, dict[str, Any]]] = []
        self._ready = asyncio.Event()
        self._closing = False
        self._task = asyncio.create_task(self._run(), name=f"publisher-{stream_id}")

    def add(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "delta":
            self.deltas += 1
        self._pending.append((kind, data))
        self._ready.set()

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
        self.halted.set()

    async def finish(self, kind: str, data: dict[str, Any], meta: dict[str, str] | None = None) -> bool:
        """Flush what is pending plus the terminal event in one append. False if refused."""
        self._closing = True
        self._ready.set()
        await self._task
        if self.refused is not None:
            self._pending.clear()
            return False
        batch, self._pending = [*self._pending, (kind, data)], []
        written = await self._write(batch, meta)
        return written.outcome is Outcome.OK

    async def abandon(self) -> None:
        """Stop without a terminal event (the stream is someone else's now)."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            if self._pending and not self._closing and self.refused is None:
                batch, self._pending = self._pending, []
                await self._write(batch)
            if self._closing or self.refused is not None:
                return
            if self._window:
                await asyncio.sleep(self._window)

    async def _write(
        self, batch: list[tuple[str, dict[str, Any]]], meta: dict[str, str] | None = None
    ) -> Written:
        deadline = time.monotonic() + APPEND_RETRY_S
        delay = 0.05
        retried = False
        while True:
            try:
                written = await self._store.append(self.stream_id, self.attempt, self._seq, batch, meta)
                break
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                # Safe to retry: the script recognises an append it already applied by its seq.
                if time.monotonic() > deadline:
                    raise
                log.warning("append to %s failed (%s); retrying in %.2fs", self.stream_id, exc, delay)
                retried = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        if retried and written.outcome is Outcome.FINISHED and batch[-1][0] in TERMINAL:
            return Written(Outcome.OK, attempt=self.attempt)  # our own terminal append, reply lost
        if written.outcome is not Outcome.OK:
            self.refuse(written.outcome)
        else:
            self._seq = written.seq
            if written.cancel:
                self.request_cancel()
        return written
