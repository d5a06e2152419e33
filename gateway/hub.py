"""Fan-out: one Redis pub/sub connection per gateway process, however many SSE readers it serves.

Workers publish every appended batch on the stream's channel (see ``tailgate.store``). The hub holds
one subscription per stream that has local readers and hands each published batch, parsed once, to
all of them. A reader catches up with XRANGE from its cursor, then takes live batches, dropping what
it already has by ``seq`` and going back to XRANGE whenever it sees a gap: after a reconnect of the
pub/sub connection, when it fell too far behind, or when nothing arrived for a while.

What moves, typed: a subscription's inbox holds :class:`Batch`, :class:`Resync` and :class:`Leave`;
``Hub.tail`` yields :class:`Batch` and :class:`Idle` (a reader's cue for a keep-alive). Nothing is
allocated per idle reader beyond its subscription: the markers are shared instances.

Deliberate oddities:
- ``subscribe`` waits for Redis's acknowledgement before the reader's first XRANGE; otherwise an
  append landing between the two would be seen by neither.
- A ``subscribe`` acknowledgement nobody waits for means the connection was re-established (redis-py
  re-subscribes by itself); the readers of that channel then resynchronise with XRANGE.
- Only the hub's own task connects its pub/sub connection (its client re-sends nothing); a reader
  subscribes while the connection is up, and otherwise waits until it is. redis-py lets any caller
  of a subscription reconnect it, and a reader that did so while the task waited for messages would
  read the handshake's replies beside it (``RuntimeError: read() called while another coroutine is
  already waiting``), which a Sentinel's lookup of the new primary made likely.
- On shutdown, ``release`` ends every SSE reader without a terminal event, so clients reconnect
  (elsewhere) and resume; tutorial ``/ask_query`` readers cannot resume, so they are left to finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeAlias, assert_never

from prometheus_client import Gauge
from redis.asyncio import Redis

from tailgate import keys, tuning
from tailgate.connections import REDIS_ERRORS, ride_out
from tailgate.events import START, Entry, dumps, parse_published
from tailgate.store import StreamStore

log = logging.getLogger(__name__)

# livesum: with several processes, a scrape sums the live ones' (tailgate.prometheus).
HUB_SUBSCRIPTIONS = Gauge(
    "tailgate_hub_subscriptions", "Stream channels this gateway is subscribed to", multiprocess_mode="livesum"
)
HUB_READERS = Gauge(
    "tailgate_hub_readers", "Readers tailing streams on this gateway", multiprocess_mode="livesum"
)


@dataclass(frozen=True, slots=True)
class Batch:
    """Events that are ready together, in order: one published append, or one page of the stream."""

    entries: Sequence[Entry]


@dataclass(frozen=True, slots=True)
class Resync:
    """Pushed to a subscription: the reader may have missed a batch; read the stream itself."""


@dataclass(frozen=True, slots=True)
class Leave:
    """Pushed to a subscription: the process is shutting down; end without a terminal event."""


@dataclass(frozen=True, slots=True)
class Idle:
    """Nothing happened for ``idle_check_s``. From ``Subscription.next``: look at the stream anyway;
    from ``Hub.tail``: time for a keep-alive."""


RESYNC, LEAVE, IDLE = Resync(), Leave(), Idle()
Delivery: TypeAlias = Batch | Resync | Leave  # what a subscription's inbox holds
Tailed: TypeAlias = Batch | Idle  # what `Hub.tail` yields


class Subscription:
    """One reader's inbox of deliveries.

    Kept small, as every idle SSE connection holds one: a list rather than a deque (~700 bytes
    empty) and a bare future while the reader waits rather than an ``asyncio.Event`` (two more).
    Popping the head of a list of at most ``READER_BACKLOG`` items costs nothing that matters."""

    __slots__ = ("_inbox", "_waiter", "resumable", "stream_id")

    def __init__(self, stream_id: str, resumable: bool) -> None:
        self.stream_id = stream_id
        self.resumable = resumable
        self._inbox: list[Delivery] = []
        self._waiter: asyncio.Future[None] | None = None

    def push(self, item: Delivery) -> None:
        if self._inbox and isinstance(self._inbox[0], Leave):
            return  # leaving: nothing after that matters (and it must not be cleared away below)
        if isinstance(item, Leave):
            self._inbox = [item]
        elif len(self._inbox) >= tuning.READER_BACKLOG:
            # A slow reader re-reads from the stream instead of growing memory.
            self._inbox = [RESYNC]
        else:
            self._inbox.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self, wait_s: float) -> Delivery | Idle:
        """The next delivery, or ``IDLE`` when none came within ``wait_s``."""
        if not self._inbox:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait_s):
                        await self._waiter
            finally:
                self._waiter = None
            if not self._inbox:
                return IDLE
        return self._inbox.pop(0)


class Hub:
    """The process's one pub/sub connection and the readers it serves, by stream."""

    def __init__(self, redis: Redis, store: StreamStore, *, idle_check_s: float) -> None:
        """``redis``: a client of its own, which it closes (``connections.open_subscriber``)."""
        self._redis = redis
        self._pubsub = redis.pubsub()
        self._up = asyncio.Event()  # the connection is up, and only `_run` brings it up again
        self._store = store
        self._idle_check_s = idle_check_s
        self._readers: dict[str, set[Subscription]] = {}
        self._acks: dict[str, asyncio.Future[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._unsubscribing: set[asyncio.Task[None]] = set()
        self.released = False

    @property
    def subscriptions(self) -> int:
        """Stream channels this process is subscribed to (a metric; tests assert it returns to 0)."""
        return len(self._readers)

    @property
    def readers(self) -> int:
        return sum(len(s) for s in self._readers.values())

    def _counted(self) -> None:
        # Set as they change, not read when scraped: with several processes, the one that serves a
        # scrape sums the values the others set (tailgate.prometheus).
        HUB_SUBSCRIPTIONS.set(len(self._readers))
        HUB_READERS.set(self.readers)

    def release(self) -> None:
        """Shutdown: every resumable reader ends now (the caller sends its client a retry hint)."""
        self.released = True
        for readers in self._readers.values():
            for sub in readers:
                if sub.resumable:
                    sub.push(LEAVE)

    async def start(self) -> None:
        await self._pubsub.subscribe(keys.HUB_CHANNEL)
        self._up.set()
        self._task = asyncio.create_task(self._run(), name="hub")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        await self._redis.aclose()

    async def _run(self) -> None:
        while True:
            msg = await ride_out(self._next)
            if msg is not None:
                self._dispatch(msg)

    async def _next(self) -> dict[str, str] | None:
        """The next message; reconnects (and redis-py re-subscribes) if the connection was lost."""
        try:
            msg: dict[str, str] | None = await self._pubsub.get_message(timeout=None)
        except REDIS_ERRORS:
            self._up.clear()
            raise
        self._up.set()  # what comes first after a reconnect: an acknowledgement of a re-subscription
        return msg

    async def _send(self, command: Callable[[str], Awaitable[object]], channel: str) -> None:
        """SUBSCRIBE or UNSUBSCRIBE ``channel`` once the connection is up (see the module docstring)."""
        while True:
            await self._up.wait()
            connection = self._pubsub.connection
            if connection is not None and connection.is_connected:
                try:
                    await command(channel)
                    return
                except REDIS_ERRORS:
                    pass  # lost on the way: `_run` connects again
            self._up.clear()

    def _dispatch(self, msg: dict[str, str]) -> None:
        kind, channel = msg["type"], msg["channel"]
        if kind == "message":
            stream_id = keys.stream_of(channel)
            readers = self._readers.get(stream_id)
            if readers:
                batch = Batch(parse_published(msg["data"]))  # parsed once, shared by every reader
                for sub in readers:
                    sub.push(batch)
        elif kind == "subscribe":
            ack = self._acks.pop(channel, None)
            if ack is not None:
                if not ack.done():
                    ack.set_result(None)
            elif channel != keys.HUB_CHANNEL:
                readers = self._readers.get(keys.stream_of(channel))
                if readers:
                    for sub in readers:
                        sub.push(RESYNC)
                else:
                    # redis-py re-subscribed a channel whose readers left while the connection was down.
                    self._schedule_unsubscribe(keys.stream_of(channel))

    async def _subscribe(self, stream_id: str, resumable: bool) -> Subscription:
        sub = Subscription(stream_id, resumable)
        readers = self._readers.setdefault(stream_id, set())
        readers.add(sub)
        self._counted()
        channel = keys.notify(stream_id)
        ack = self._acks.get(channel)
        if len(readers) == 1 and ack is None:
            ack = self._acks[channel] = asyncio.get_running_loop().create_future()
            try:
                await self._send(self._pubsub.subscribe, channel)
            except BaseException:
                self._acks.pop(channel, None)
                self._leave(sub)
                raise
        if ack is not None:
            try:
                await asyncio.shield(ack)
            except BaseException:
                self._leave(sub)
                raise
        return sub

    def _leave(self, sub: Subscription) -> None:
        readers = self._readers.get(sub.stream_id)
        if readers is None:
            return
        readers.discard(sub)
        if not readers:
            del self._readers[sub.stream_id]
            self._acks.pop(keys.notify(sub.stream_id), None)
            self._schedule_unsubscribe(sub.stream_id)
        self._counted()

    def _schedule_unsubscribe(self, stream_id: str) -> None:
        # Unsubscribing only writes a command; its reply arrives in `_run`.
        task = asyncio.create_task(self._unsubscribe(stream_id))
        self._unsubscribing.add(task)
        task.add_done_callback(self._unsubscribing.discard)

    async def _unsubscribe(self, stream_id: str) -> None:
        if stream_id in self._readers:  # a new reader arrived meanwhile
            return
        connection = self._pubsub.connection
        if self._up.is_set() and connection is not None and connection.is_connected:
            try:
                await self._pubsub.unsubscribe(keys.notify(stream_id))
                return
            except REDIS_ERRORS:
                pass
        # The connection is down: `_run` connects again, redis-py subscribes the channel again, and
        # `_dispatch` unsubscribes it, finding no reader.
        log.info("unsubscribe of %s deferred to reconnect", stream_id)

    async def tail(
        self, stream_id: str, after: str, last_seq: int, resumable: bool = True
    ) -> AsyncGenerator[Tailed, None]:
        """Events of ``stream_id`` strictly after ``after`` (whose ``seq`` is ``last_seq``), up to
        and including the terminal event, as a :class:`Batch` of those that are ready together.
        ``IDLE`` means nothing happened for ``idle_check_s``: time for a keep-alive.

        Ends early, without a terminal event, when the process shuts down (``resumable`` readers).

        After a failover (see :func:`_rewritten`), what it delivered may be written again: by the
        same attempt, the same events under new ids, which it drops by ``seq``; or by another
        attempt, which it cannot splice onto what it delivered: it then sends a ``reset`` with
        ``seq`` 0 (``cursor_out_of_range``, as to a client whose cursor is not in the stream) and
        the stream from its start."""
        if self.released and resumable:
            return
        sub = await self._subscribe(stream_id, resumable)
        attempt = 0  # the latest attempt this reader delivered a `started` or `reset` of
        try:
            behind = True  # read the stream itself until a page comes back short
            while True:
                live = False
                if behind:
                    page, behind = await self._catch_up(stream_id, after)
                else:
                    item = await sub.next(self._idle_check_s)
                    match item:
                        case Batch():
                            page, live = item.entries, True
                        case Resync():
                            behind = True
                            continue
                        case Idle():
                            # Quiet for a while: look at the stream anyway, in case a message was lost.
                            page, behind = await self._catch_up(stream_id, after)
                            if not page:
                                yield IDLE
                                continue
                        case Leave():
                            return
                        case _:
                            assert_never(item)
                if _rewritten(page, last_seq, attempt):
                    log.warning(
                        "stream %s rewritten after seq %d was delivered; restarting", stream_id, last_seq
                    )
                    yield Batch((Entry(START, "reset", dumps(_restart(page)), 0),))
                    after, last_seq, attempt, behind = START, 0, 0, True
                    continue
                entries = [e for e in page if e.seq > last_seq]  # what it has, written again: dropped
                if entries and entries[0].seq != last_seq + 1:
                    if live:
                        behind = True  # a gap: the stream has what pub/sub lost
                        continue
                    if after != START and not await self._has(stream_id, after):
                        # A failover lost the cursor's entry and the stream was written again under
                        # lower ids: find the reader's place by seq, from the start.
                        after, behind = START, True
                        continue
                if not live and page and not entries:
                    after = page[-1].id  # a page of events it has: read on after them
                if entries:
                    yield Batch(entries)
                    after, last_seq = entries[-1].id, entries[-1].seq
                    attempt = max(attempt, *(_attempt_of(e) for e in entries))
                    if entries[-1].terminal:
                        return
        finally:
            self._leave(sub)

    async def _catch_up(self, stream_id: str, after: str) -> tuple[Sequence[Entry], bool]:
        """One XRANGE page of the entries after ``after``, and whether the stream may hold more (the
        page is full). Rides out a Redis restart or a cut connection for a while."""
        page = await ride_out(
            lambda: self._store.after(stream_id, after, tuning.CATCHUP_PAGE),
            patience_s=tuning.OUTAGE_PATIENCE_S,
        )
        return page, len(page) == tuning.CATCHUP_PAGE

    async def _has(self, stream_id: str, cursor: str) -> bool:
        entry = await ride_out(lambda: self._store.at(stream_id, cursor), patience_s=tuning.OUTAGE_PATIENCE_S)
        return entry is not None


def _attempt_of(e: Entry) -> int:
    """The attempt a ``started`` or ``reset`` begins; 0 for other events."""
    return int(json.loads(e.data)["attempt"]) if e.type in ("started", "reset") else 0


def _rewritten(entries: Sequence[Entry], last_seq: int, attempt: int) -> bool:
    """Whether the stream was written again under a reader that delivered up to ``last_seq``, by
    ``attempt``, so that what it delivered is void.

    A failover can lose the last events a reader delivered (replication is asynchronous; the worker
    moves on only once replicas have a write, but the gateway sees it first). The attempt that wrote
    them writes them again, the same, and the reader drops them by ``seq``. If that attempt lost the
    stream meanwhile, another wrote those ``seq``: its ``reset`` or ``started`` is of a later attempt
    than the reader's, or the stream ended (a terminal event the reader never delivered: it stops at
    one). Ordinary duplicates (an append seen both in a page and on pub/sub) are neither."""
    return any(
        e.seq <= last_seq and (e.terminal or _attempt_of(e) > attempt)
        for e in entries
        if e.type in ("started", "reset") or e.terminal
    )


def _restart(entries: Sequence[Entry]) -> dict[str, int | str]:
    return {"seq": 0, "attempt": max(map(_attempt_of, entries)), "reason": "cursor_out_of_range"}
