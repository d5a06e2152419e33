"""One attempt at one stream in this worker: its events on their way to Redis, and how it ends.

An :class:`Attempt` is created when a claim succeeds and is the state of that attempt only: the
events the upstream produced that are not written yet, the ``seq`` the stream stands at, the
requests to stop (cancel, hand-back) and, once it has one, its :class:`Outcome`. It does not write:
it tells the worker's one :class:`~worker.publisher.Appender` that it has events (``ready``), and
the appender, on its own schedule, asks it for a batch (``take``) and reports what Redis answered
(``applied``).

``halted`` is set as soon as the attempt must stop calling the upstream: a cancel was requested,
the worker hands the stream back, or Redis refused a write (another attempt owns the stream, the
stream ended, or it is gone). The job (``worker.job``) waits on it beside the upstream call.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from typing import TYPE_CHECKING, Any

from tailgate.events import TERMINAL
from tailgate.store import Append, Reply, Written
from worker import metrics

if TYPE_CHECKING:
    from worker.publisher import Appender

log = logging.getLogger(__name__)


class Outcome(enum.Enum):
    """How an attempt ended."""

    COMPLETED = "completed"  # it wrote `done`
    FAILED = "failed"  # it wrote `error`
    CANCELLED = "cancelled"  # it wrote `cancelled`
    HANDED_BACK = "handed_back"  # released on shutdown; another worker resumes the stream
    FENCED = "fenced"  # another attempt took the stream over
    FINISHED_ELSEWHERE = "finished_elsewhere"  # the stream had ended (cancelled queued, given up)
    GONE = "gone"  # the stream expired or was deleted
    WRITE_FAILED = "write_failed"  # an append failed in a way no retry fixes; the stream is taken over
    CRASHED = "crashed"  # a bug; logged with its traceback; the stream is taken over

    @property
    def wrote_terminal(self) -> bool:
        return self in (Outcome.COMPLETED, Outcome.FAILED, Outcome.CANCELLED)

    @property
    def terminal(self) -> str | None:
        """The terminal event the attempt wrote (``done``, ``error``, ``cancelled``), if it wrote one."""
        return _TERMINAL.get(self)


# The outcome of an attempt whose terminal event of this type went in.
_WROTE = {"done": Outcome.COMPLETED, "error": Outcome.FAILED, "cancelled": Outcome.CANCELLED}
_TERMINAL = {outcome: kind for kind, outcome in _WROTE.items()}


def refused(reply: Reply) -> Outcome:
    """The outcome of an attempt whose write (append, release) Redis refused with ``reply``."""
    if reply is Reply.FINISHED:
        return Outcome.FINISHED_ELSEWHERE
    if reply is Reply.TOO_LONG:
        return Outcome.FAILED  # the append script ended the stream with `stream_too_long`
    return Outcome.GONE if reply is Reply.GONE else Outcome.FENCED


class Attempt:
    """The state of one attempt (see the module docstring). ``number`` is its fencing token."""

    def __init__(self, appender: Appender, stream_id: str, owner: str, number: int, seq: int) -> None:
        self.stream_id = stream_id
        self.owner = owner
        self.number = number
        self.seq = seq  # where the stream stands after this attempt's last applied write
        self.halted = asyncio.Event()
        self.cancel_requested = False
        self.handing_back = False
        self.deltas = 0
        self.error = ""  # the code of the `error` event this attempt ends the stream with, if it does
        self.outcome: Outcome | None = None
        self.task: asyncio.Task[Outcome] | None = None  # the job's task running this attempt
        self._appender = appender
        self._pending: list[tuple[str, dict[str, Any]]] = []
        self._meta: dict[str, str] | None = None
        self._terminal: asyncio.Future[Outcome] | None = None  # set by `finish`
        # Deltas added up to the batch in flight, and those counted as written (the tokens metric).
        self._deltas_taken = 0
        self._deltas_counted = 0

    def __repr__(self) -> str:
        return f"<Attempt {self.stream_id} #{self.number} seq={self.seq} {self.outcome}>"

    @property
    def finishing(self) -> bool:
        """Ended, or its terminal event is on its way: what Redis answers that write decides."""
        return self.outcome is not None or self._terminal is not None

    def add(self, kind: str, data: dict[str, Any]) -> None:
        """Queue one event for the appender; nothing once the attempt ended or is finishing."""
        if self.outcome is not None or self._terminal is not None:
            return
        if kind == "delta":
            self.deltas += 1
        self._pending.append((kind, data))
        self._appender.ready(self)

    async def finish(self, kind: str, data: dict[str, Any], meta: dict[str, str] | None = None) -> Outcome:
        """Write what is pending plus the terminal event ``kind`` (and ``meta`` fields with it).
        Answers the outcome: the one ``kind`` stands for, or why Redis refused it."""
        if self.outcome is not None:
            return self.outcome
        if self._terminal is None:  # a second call waits for the first terminal, never adds one
            if kind == "error":
                self.error = data["code"]
            self._pending.append((kind, data))
            self._meta = meta
            self._terminal = asyncio.get_running_loop().create_future()
            self._appender.ready(self)
        return await self._terminal

    def request_cancel(self) -> None:
        self.cancel_requested = True
        self.halted.set()

    def request_handback(self) -> None:
        self.handing_back = True
        self.halted.set()

    def refuse(self, outcome: Outcome) -> Outcome:
        """Redis will take no more from this attempt (``outcome`` says why): stop."""
        if self.outcome is None:
            log.info("stream %s attempt %d refused: %s", self.stream_id, self.number, outcome.value)
        return self.end(outcome)

    def end(self, outcome: Outcome) -> Outcome:
        """Record how the attempt ended and stop writing. The first call wins; answers its outcome."""
        if self.outcome is None:
            self.outcome = outcome
        self.close()
        if self._terminal is not None and not self._terminal.done():
            self._terminal.set_result(self.outcome)
        self.halted.set()
        return self.outcome

    def close(self) -> None:
        """Write nothing more: drop what is pending and leave the appender's schedule."""
        self._pending.clear()
        self._appender.forget(self)

    def take(self) -> Append | None:
        """The appender's next write for this attempt: everything pending, in one append."""
        if not self._pending or self.outcome is not None:
            return None
        batch, self._pending = self._pending, []
        self._deltas_taken = self.deltas  # every delta added so far is in this batch or written
        meta, self._meta = (self._meta, None) if batch[-1][0] in TERMINAL else (None, self._meta)
        return Append(self.stream_id, self.owner, self.number, self.seq, batch, meta)

    def applied(self, append: Append, written: Written | Exception, retried: bool) -> None:
        """What Redis answered to ``append``; ``retried``: it may have been applied once before."""
        if isinstance(written, Exception):
            log.error("stream %s attempt %d append failed: %s", self.stream_id, self.number, written)
            self.end(Outcome.WRITE_FAILED)
            return
        kind = append.events[-1][0]
        if retried and kind in TERMINAL and written.reply is Reply.FINISHED:
            # Sent twice and the stream had ended: the first send went in and its reply was lost.
            # (The one other way a stream ends without fencing this attempt, a claim giving up on
            # it, needs this attempt's heartbeat to have gone stale first.)
            written = Written(Reply.OK, append.seq + len(append.events), self.number)
        if written.reply is not Reply.OK:
            if written.reply is Reply.TOO_LONG:
                self.error = "stream_too_long"  # the script ended the stream with it
            self.refuse(refused(written.reply))
            return
        self.seq = written.seq
        if self._deltas_taken > self._deltas_counted:  # one increment per batch, not per token
            metrics.TOKENS.inc(self._deltas_taken - self._deltas_counted)
            self._deltas_counted = self._deltas_taken
        if kind in TERMINAL:
            self.end(_WROTE[kind])
        elif written.cancel and not self.cancel_requested:
            self.request_cancel()
