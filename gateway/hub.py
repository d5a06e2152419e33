"""Fan-out: one Redis pub/sub connection per gateway process (on a Redis Cluster, one per shard),
however many SSE readers it serves.

Workers publish every appended batch on the stream's channel (see ``tailgate.store``). The hub holds
one subscription per stream that has local readers and hands each published batch, parsed once, to
all of them. A reader catches up with XRANGE from its cursor, then takes live batches, dropping what
it already has by ``seq`` and going back to XRANGE whenever it sees a gap: after a reconnect of the
pub/sub connection, when it fell too far behind, or when nothing arrived for a while.

What moves, typed: a subscription's inbox holds :class:`Batch`, :class:`Resync` and :class:`Leave`;
``Hub.tail`` yields :class:`Batch` and :class:`Idle` (a reader's cue for a keep-alive). Nothing is
allocated per idle reader beyond its subscription: the markers are shared instances.

Deliberate oddities (the sharded hub's are in :class:`ShardedHub`):
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
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, assert_never

from prometheus_client import Gauge
from redis.asyncio import Redis
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from tailgate import keys, tuning
from tailgate.connections import REDIS_ERRORS, Cluster, ride_out
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
    """The readers this process serves, by stream, and the subscriptions that feed them. How a
    channel is subscribed is a subclass's: :class:`PlainHub` (one connection, ``SUBSCRIBE``) or
    :class:`ShardedHub` (a Redis Cluster: one connection per shard, ``SSUBSCRIBE``)."""

    def __init__(self, store: StreamStore, *, idle_check_s: float) -> None:
        self._store = store
        self._idle_check_s = idle_check_s
        self._readers: dict[str, set[Subscription]] = {}
        self._background: set[asyncio.Task[None]] = set()
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
        raise NotImplementedError

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    async def _open(self, channel: str, first: bool) -> None:
        """Subscribe ``channel`` for a new reader (``first``: the first), returning once Redis has
        acknowledged the subscription."""
        raise NotImplementedError

    def _close(self, channel: str) -> None:
        """The last reader of ``channel`` left."""
        raise NotImplementedError

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _deliver(self, channel: str, data: str) -> None:
        readers = self._readers.get(keys.stream_of(channel))
        if readers:
            batch = Batch(parse_published(data))  # parsed once, shared by every reader
            for sub in readers:
                sub.push(batch)

    def _resync(self, channel: str) -> bool:
        """The readers of ``channel`` may have missed a message: they read the stream. Whether it
        has readers."""
        readers = self._readers.get(keys.stream_of(channel))
        for sub in readers or ():
            sub.push(RESYNC)
        return bool(readers)

    async def _subscribe(self, stream_id: str, resumable: bool) -> Subscription:
        sub = Subscription(stream_id, resumable)
        readers = self._readers.setdefault(stream_id, set())
        readers.add(sub)
        self._counted()
        try:
            await self._open(keys.notify(stream_id), first=len(readers) == 1)
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
            self._close(keys.notify(sub.stream_id))
        self._counted()

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
        the stream from its start.

        One loop, over 60 lines, on purpose: every branch moves the same four things together (the
        cursor, the last ``seq``, the attempt, whether to read the stream itself); split up, they
        would travel between the pieces as one more object to keep in step."""
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


class PlainHub(Hub):
    """Every channel on one pub/sub connection (``SUBSCRIBE``): one Redis, a Sentinel's primary, or
    a Redis Cluster older than Redis 7, which copies every message to every node."""

    def __init__(self, redis: Redis, store: StreamStore, *, idle_check_s: float) -> None:
        """``redis``: a client of its own, which it closes (``connections.open_subscriber``)."""
        super().__init__(store, idle_check_s=idle_check_s)
        self._redis = redis
        self._pubsub = redis.pubsub()
        self._up = asyncio.Event()  # the connection is up, and only `_run` brings it up again
        self._acks: dict[str, asyncio.Future[None]] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._pubsub.subscribe(keys.HUB_CHANNEL)
        self._up.set()
        self._task = asyncio.create_task(self._run(), name="hub")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await super().close()
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
            self._deliver(channel, msg["data"])
        elif kind == "subscribe":
            ack = self._acks.pop(channel, None)
            if ack is not None:
                if not ack.done():
                    ack.set_result(None)
            elif channel != keys.HUB_CHANNEL and not self._resync(channel):
                # redis-py re-subscribed a channel whose readers left while the connection was down.
                self._close(channel)

    async def _open(self, channel: str, first: bool) -> None:
        ack = self._acks.get(channel)
        if first and ack is None:
            ack = self._acks[channel] = asyncio.get_running_loop().create_future()
            try:
                await self._send(self._pubsub.subscribe, channel)
            except BaseException:
                self._acks.pop(channel, None)
                raise
        if ack is not None:
            await asyncio.shield(ack)

    def _close(self, channel: str) -> None:
        # Unsubscribing only writes a command; its reply arrives in `_run`.
        self._acks.pop(channel, None)
        self._in_background(self._unsubscribe(channel))

    async def _unsubscribe(self, channel: str) -> None:
        if keys.stream_of(channel) in self._readers:  # a new reader arrived meanwhile
            return
        connection = self._pubsub.connection
        if self._up.is_set() and connection is not None and connection.is_connected:
            try:
                await self._pubsub.unsubscribe(channel)
                return
            except REDIS_ERRORS:
                pass
        # The connection is down: `_run` connects again, redis-py subscribes the channel again, and
        # `_dispatch` unsubscribes it, finding no reader.
        log.info("unsubscribe of %s deferred to reconnect", channel)


class _Shard:
    """One node's pub/sub connection for sharded channels, read by its own task (``ShardedHub``)."""

    def __init__(self, name: str, redis: Redis) -> None:
        self.name = name
        self.redis = redis
        self.pubsub = redis.pubsub()
        self.acks: dict[str, asyncio.Future[None]] = {}  # SSUBSCRIBE sent, not yet acknowledged
        self.alive = True  # until its connection is lost: then it is closed, never reconnected
        self.task: asyncio.Task[None] | None = None

    async def subscribe(self, channel: str) -> None:
        """``SSUBSCRIBE channel``, returning once acknowledged; raises if refused (``MOVED``) or lost."""
        if not self.alive:
            raise RedisConnectionError(f"the pub/sub connection to {self.name} was lost")
        ack = self.acks.get(channel)
        if ack is None:
            ack = self.acks[channel] = asyncio.get_running_loop().create_future()
            try:
                await self.pubsub.execute_command("SSUBSCRIBE", channel)
            except BaseException:
                self.acks.pop(channel, None)
                raise
        async with asyncio.timeout(tuning.SUBSCRIBE_TIMEOUT_S):
            await asyncio.shield(ack)

    def acknowledged(self, channel: str) -> None:
        ack = self.acks.pop(channel, None)
        if ack is not None and not ack.done():
            ack.set_result(None)

    def refused(self, error: ResponseError) -> None:
        """An ``SSUBSCRIBE`` was refused: ``MOVED <slot> <node>`` names the slot; its channels'
        subscriptions fail (any other error fails every pending one)."""
        words = str(error).split()
        slot = int(words[1]) if len(words) > 1 and words[0] == "MOVED" and words[1].isdigit() else None
        for channel in [c for c in self.acks if slot is None or key_slot(c.encode()) == slot]:
            self._fail(channel, error)

    def lost(self) -> None:
        self.alive = False
        for channel in list(self.acks):
            self._fail(channel, RedisConnectionError(f"the pub/sub connection to {self.name} was lost"))

    def _fail(self, channel: str, error: Exception) -> None:
        ack = self.acks.pop(channel)
        if not ack.done():
            ack.set_exception(error)
            ack.exception()  # retrieved: nobody may be waiting any more

    async def aclose(self) -> None:
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        await self.pubsub.aclose()  # type: ignore[no-untyped-call]
        await self.redis.aclose()


class ShardedHub(Hub):
    """Sharded pub/sub on a Redis Cluster of Redis 7 (``SSUBSCRIBE``): the workers ``SPUBLISH`` a
    stream's batches to the nodes of its shard only, and the hub subscribes its channel on the
    primary that serves its slot, one connection per node, however many channels.

    A subscription follows its slot. When the slot moves (a failover: the old primary sends
    ``sunsubscribe``) or the connection to its node is lost (the node died), the channel's readers
    read the stream, and the hub asks the cluster again where the slot is (``Cluster.remap``) and
    subscribes there, trying until it can; its readers then read the stream once more, for what was
    published meanwhile. Until then a reader still looks at the stream every ``idle_check_s``. A
    lost connection is closed for good; the next channel placed on its node connects again."""

    def __init__(
        self,
        cluster: Cluster,
        subscriber: Callable[[str, int], Redis],
        store: StreamStore,
        *,
        idle_check_s: float,
    ) -> None:
        """``cluster``: the store's cluster client, for where a slot is; ``subscriber``: a client of
        one connection to a node (host, port), which the hub closes (``connections.open_subscriber``)."""
        super().__init__(store, idle_check_s=idle_check_s)
        self._cluster = cluster
        self._subscriber = subscriber
        self._shards: dict[str, _Shard] = {}  # by node, "host:port"
        self._connecting: dict[str, asyncio.Future[_Shard]] = {}
        self._homes: dict[str, _Shard] = {}  # channel -> where it is subscribed (acknowledged)
        self._placing: dict[str, asyncio.Task[None]] = {}  # channel -> its subscription under way
        self._remapping: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connects to every primary now, so that the first readers do not wait for it."""
        for node in self._cluster.get_primaries():
            with contextlib.suppress(*REDIS_ERRORS):
                await self._shard(node.host, int(node.port))

    async def close(self) -> None:
        for task in self._placing.values():
            task.cancel()
        await asyncio.gather(*self._placing.values(), return_exceptions=True)
        await super().close()
        await asyncio.gather(*(shard.aclose() for shard in self._shards.values()), return_exceptions=True)

    async def _open(self, channel: str, first: bool) -> None:
        if channel in self._homes:
            return
        task = self._placing.get(channel) or self._place(channel, resync=False)
        await asyncio.shield(task)

    def _close(self, channel: str) -> None:
        shard = self._homes.pop(channel, None)
        if shard is not None:  # (a subscription under way sees, once made, that nobody reads it)
            self._in_background(self._sunsubscribe(shard, channel))

    async def _sunsubscribe(self, shard: _Shard, channel: str) -> None:
        # A reader that arrives meanwhile subscribes again in a task made after this one, whose
        # SSUBSCRIBE therefore follows this SUNSUBSCRIBE on the connection: it stays subscribed.
        with contextlib.suppress(*REDIS_ERRORS):
            await shard.pubsub.execute_command("SUNSUBSCRIBE", channel)

    def _place(self, channel: str, *, resync: bool) -> asyncio.Task[None]:
        """Subscribe ``channel`` where its slot is, trying until it can or its readers have left;
        ``resync``: then its readers read the stream (it was lost for a while)."""

        async def place() -> None:
            try:
                await ride_out(lambda: self._try(channel))
            finally:
                del self._placing[channel]
            if keys.stream_of(channel) not in self._readers:
                self._close(channel)
            elif resync:
                self._resync(channel)

        task = self._placing[channel] = asyncio.create_task(place())
        return task

    async def _try(self, channel: str) -> None:
        if keys.stream_of(channel) not in self._readers:
            return
        try:
            shard = await self._shard(*self._cluster.primary_of(channel))
            await shard.subscribe(channel)
        except (*REDIS_ERRORS, ResponseError) as exc:
            log.info("subscribing %s: %s; asking the cluster where its slot is", channel, exc)
            await self._remap()
            raise RedisConnectionError(str(exc)) from exc  # `ride_out` tries again
        self._homes[channel] = shard

    async def _remap(self) -> None:
        """The cluster's map asked again, once for however many channels need it at a time."""
        if self._remapping is None or self._remapping.done():
            self._remapping = asyncio.create_task(self._cluster.remap())
        with contextlib.suppress(*REDIS_ERRORS):
            await asyncio.shield(self._remapping)

    async def _shard(self, host: str, port: int) -> _Shard:
        """The connection to the node at ``host``:``port``, made once for its first channel."""
        name = f"{host}:{port}"
        shard = self._shards.get(name)
        if shard is not None:
            return shard
        connecting = self._connecting.get(name)
        if connecting is None:
            connecting = self._connecting[name] = asyncio.ensure_future(self._connect(name, host, port))
            connecting.add_done_callback(lambda _: self._connecting.pop(name, None))
        return await asyncio.shield(connecting)

    async def _connect(self, name: str, host: str, port: int) -> _Shard:
        shard = _Shard(name, self._subscriber(host, port))
        try:
            await shard.pubsub.connect()  # type: ignore[no-untyped-call]
        except BaseException:
            await shard.aclose()
            raise
        shard.task = asyncio.create_task(self._read(shard), name=f"hub {name}")
        self._shards[name] = shard
        return shard

    async def _read(self, shard: _Shard) -> None:
        try:
            while True:
                try:
                    msg = await shard.pubsub.get_message(timeout=None)
                except ResponseError as exc:
                    shard.refused(exc)
                    continue
                if msg is not None:
                    self._dispatch(shard, msg)
        except REDIS_ERRORS as exc:
            log.info("pub/sub connection to %s lost (%s): its channels move", shard.name, exc)
            self._lost(shard)

    def _dispatch(self, shard: _Shard, msg: dict[str, str]) -> None:
        kind, channel = msg["type"], msg["channel"]
        if kind == "smessage":
            self._deliver(channel, msg["data"])
        elif kind == "ssubscribe":
            shard.acknowledged(channel)
        elif kind == "sunsubscribe" and self._homes.get(channel) is shard:
            # Not a reply to its own SUNSUBSCRIBE (that channel left `_homes` first, and a new
            # subscription of it is acknowledged after this reply): its slot moved (a failover).
            del self._homes[channel]
            self._follow(channel)

    def _lost(self, shard: _Shard) -> None:
        shard.lost()
        if self._shards.get(shard.name) is shard:
            del self._shards[shard.name]
        for channel in [c for c, home in self._homes.items() if home is shard]:
            del self._homes[channel]
            self._follow(channel)
        self._in_background(shard.aclose())

    def _follow(self, channel: str) -> None:
        if self._resync(channel) and channel not in self._placing:
            self._place(channel, resync=True)


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
