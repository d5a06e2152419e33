"""The stream store: every write to a stream goes through one of seven atomic scripts.

- ``create``: the meta hash (with the stream's owner) and the ``queued`` event, or nothing if the id
  exists; when the queue is on the same Redis, the stream's ARQ job and a worker's wake-up too.
- ``discard``: undoes a create whose job could not be enqueued; nothing of the stream is left.
- ``claim``: a worker starts an attempt; the attempt number goes up by one and becomes the fencing
  token. Past ``max_attempts`` the stream ends with ``error`` instead.
- ``append``: events of one attempt, checked against the fencing token and the expected ``seq``
  (so a retried append after a lost reply is recognised, not duplicated); a terminal event ends the
  stream. Each appended batch is published to the stream's channel. A stream is never trimmed: at
  ``TAILGATE_STREAM_MAXLEN`` events the append ends it with ``error`` (``stream_too_long``) instead,
  so a reader from the start never meets a silent gap.
- ``beat``: the attempt's heartbeat, if it still owns the stream; answers the cancel flag.
- ``release``: the attempt hands the stream back, for another worker to claim at once.
- ``cancel``: ends a queued stream at once, or flags a running one for its worker.

Each script assigns ``seq`` itself, so ``seq`` is contiguous over the whole stream across attempts.
Only EVAL/EVALSHA, so Redis 6.2 works; the Lua is in ``tailgate.scripts``.

**Bookkeeping.** Besides a stream's own two keys, three structures follow its life: its owner's
active set (``keys.active``, the per-key limit on unfinished streams), the running index
(``keys.RUNNING``, which takeover scans) and the counters (``keys.STATS``, for ``tailgate top``).
These scripts keep them, and nothing else writes them: ``create`` adds the stream to the active set
and counts ``created``; ``claim`` indexes it as running, ``beat`` and ``release`` restamp it; every way
a stream ends (a terminal append; a claim past ``max_attempts``, which ends it with ``error``; a
cancel of a queued stream) goes through one Lua function, ``close``, which also takes the stream out
of both sets and counts its final status (a failure also as ``failed:<code>``). A script that finds
its stream ended returns before writing, so no stream is counted twice. ``discard`` takes a create
back, ``created`` included. The counters also hold ``tokens`` (deltas: an append adds its own, one
increment per append, not per token), ``takeovers`` (claims of a stream whose worker stopped
heartbeating) and ``handed_back`` (releases).

**Attempt history.** The meta's ``attempts`` field is a JSON array with one object per attempt, kept
by the same scripts in the same step as what it records, so it is never out of step with the stream:
``claim`` adds one (number, worker, ``started_at``) and ends the one it takes over (``taken_over``, or
``worker_lost`` when it gives up, with the lost worker's last heartbeat); the first append with a
delta stamps ``first_token_at``; ``release`` ends it ``handed_back``; ``close`` ends it by how the
stream ended (``done``, ``error`` with its ``code``, ``cancelled``). It holds at most ``max_attempts``
objects and expires with the meta. ``tailgate inspect`` shows it.

**Keys.** Every key a script touches is in its KEYS but one: the owner's active set, where the caller
does not know the owner (``claim`` ending an exhausted stream, ``cancel``, ``discard``: their callers
hold only the stream id). Those scripts read the owner from the meta and build the key from
``keys.ACTIVE_PREFIX``, passed in ARGV; the alternative, a read of the meta before the script, would
cost a round trip and open a race. ``create`` and ``append`` get the key in KEYS: the gateway and the
attempt know the owner. Every ``append`` gets the bookkeeping keys, as any append may end its stream
(a terminal event, or the length cap); only one that does touches the sets. The member of both sets is
the stream id, which the scripts take from the hash tag of the stream's keys.

**Redis Cluster.** A stream's own keys share a slot (the hash tag), and so does its channel; the
bookkeeping keys cannot (``tg:running`` and ``tg:stats`` are global, ``tg:active:<owner>`` is per
owner), and a script may touch one slot only. So on a cluster (``connections.open_store`` detects
one) the bookkeeping lives on the queue's Redis, a single primary (``books``), and each script runs in
two steps. The scripts write the bookkeeping through one Lua function, ``book``: alone on a Redis it
writes at once, in the script's own step, as above; on a cluster (``scripts.clustered``) it collects
the writes, the script answers them beside its reply, and the store makes them on ``books`` in one
step (``scripts.APPLY``; for a pipeline of appends, all of them at once). A create is the other way
round, as admission must read before it writes: admission and its bookkeeping first
(``scripts.ADMIT``), then the stream (``scripts.MAKE``); if that fails, the admission is taken back.

What two steps give up is atomicity across them, and the store is built so that a process dying
between them loses no stream and leaves nothing that does not heal. The meta stays the truth:
- a claim indexes the stream as running before it claims it: a worker that dies
  between the two leaves a stream that the takeover scan finds, never one running unindexed;
- a stream that ended but is still indexed (its worker died between the steps of its last append or
  of a cancel) is found by the takeover scan, or its job's claim, which answers ``finished`` and
  takes it out of the indexes and its owner's active set;
- a create whose gateway dies between the steps leaves a place in the owner's active set, which the
  next create of that owner prunes once it is an hour old (``tuning.ACTIVE_STALE_S`` past the job
  timeout), and its idempotency record names a stream that does not exist (404) until it expires;
- what can be lost is counts (``tg:stats``): a step that never ran counts nothing.
Notifications on a cluster are sharded pub/sub (``SPUBLISH``, Redis 7): a message goes to the
nodes of its stream's shard only, and the gateway subscribes to each stream's channel on its shard
(``gateway.hub.ShardedHub``). A cluster with a node older than Redis 7 (no sharded pub/sub) gets
plain pub/sub, which every node copies to every other; the gateway then subscribes on the node its
URL names, or on another while that one does not answer (``connections.open_subscriber``), and both
processes log that they fell back. ``TAILGATE_REPLICA_ACKS`` is refused on a cluster.

**Replays.** The worker opens its store without redis-py's command re-send (``retry=False``): the
worker's loops retry themselves, knowing that they did, which recognising a replay needs. A re-sent
append is recognised by its ``seq``; a re-sent terminal append finds its stream ended, which the
writer, knowing it retried, counts as its own. A claim is re-sent by the job that made it, with a
token of that job run's own (random, kept in the meta by the claim), and recognised by it: the same
attempt, nothing written. ARQ job ids are reused (a takeover job's id is the stream's id and the
heartbeat it found stale), so the token is not the job id: a later run of the same job, or another
job, carries another token, and finds the claimant's fresh heartbeat (``busy``). So a claim whose
reply was lost is recognised while its job retries it; a job that gave up on it (after
``tuning.CLAIM_PATIENCE_S``) leaves the stream to the takeover scan (``takeover_after_s``, then one
``reset``).

**Replicas.** With ``TAILGATE_REPLICA_ACKS`` (``tailgate.replication``), ``create``, ``claim``,
``cancel`` and every ``append_many`` go in one pipeline with a wait for the replicas, and a shortfall
is a ``ConnectionError`` like any outage. The reasoning above holds as it is: the worker's retry of
an append the replicas did not acknowledge is a replay (recognised by its ``seq`` on the same
primary; applied anew on a promoted replica that never got it, as the first send), and so is the
job's retry of such a claim (recognised by its token). An attempt starts only once the replicas
have its claim, so no generation runs under a claim that a failover could lose and hand, under the
same attempt number, to another.
"""

from __future__ import annotations

import enum
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

from tailgate import keys, scripts
from tailgate.events import FINAL_STATUS, FINISHED, Entry, dumps, entry
from tailgate.replication import UNREPLICATED, Replicas


class Reply(enum.Enum):
    """What a script answered."""

    OK = "ok"
    GONE = "gone"  # the stream expired or never existed
    FENCED = "fenced"  # another attempt owns the stream now
    FINISHED = "finished"  # the stream already ended
    BUSY = "busy"  # claim: a live worker runs it
    EXHAUSTED = "exhausted"  # claim: too many attempts; the stream was ended with `error`
    TOO_LONG = "too_long"  # append: past TAILGATE_STREAM_MAXLEN; the stream was ended with `error`


class CreateReply(enum.Enum):
    """What the create script answered."""

    CREATED = "created"
    EXISTING = "existing"  # the Idempotency-Key created this stream before, with the same body
    CONFLICT = "conflict"  # the Idempotency-Key was used with another body
    RATE_LIMITED = "rate_limited"  # the owner's creations in the last minute reached the limit
    TOO_MANY = "too_many"  # the owner's unfinished streams reached the cap
    # A stream with this id exists: ids are random, so it is this very create, re-sent after its
    # reply was lost (redis-py's command retry), and the stream is the caller's.
    ID_TAKEN = "id_taken"
    QUEUE_FULL = "queue_full"  # with a `Job`: the queue holds its cap of jobs


@dataclass(frozen=True, slots=True)
class Limits:
    """What admits a new stream of one owner; 0 turns a limit off."""

    max_active: int = 0  # unfinished streams
    active_stale_ms: int = 0  # an entry of the active set older than this is pruned (a lost stream)
    rate_per_min: int = 0  # creations in any 60 s


@dataclass(frozen=True, slots=True)
class Job:
    """The stream's queue job, for a create on the Redis that holds the queue too: the create
    enqueues it in the same step (ARQ's job key and payload, as ``ArqRedis.enqueue_job`` writes them)
    and wakes a worker."""

    queue: str  # ARQ's queue, a sorted set
    key: str  # the job's key
    payload: bytes  # ARQ's serialized job
    expires_ms: int
    max_queued: int  # the queue's cap: at this many jobs, QUEUE_FULL
    wake: str  # the channel that wakes an idle worker
    fair: str  # the fair-share hash beside the queue (tailgate.scripts.FAIR)


@dataclass(frozen=True, slots=True)
class Creation:
    reply: CreateReply
    stream_id: str = ""  # CREATED: the new stream; EXISTING: the one the Idempotency-Key made
    retry_after_ms: int = 0  # RATE_LIMITED: when the oldest creation leaves the window
    active: int = 0  # TOO_MANY: how many are unfinished
    position: int | None = None  # CREATED: its place in the queue (1: next), as its `queued` event says


class SeqConflict(RuntimeError):
    """An append found the stream at a ``seq`` its writer did not expect."""


@dataclass(frozen=True, slots=True)
class Written:
    reply: Reply
    seq: int = 0
    attempt: int = 0
    cancel: bool = False


@dataclass(frozen=True, slots=True)
class Append:
    """One stream's events for one append, by the attempt that owns it, expected at ``seq``."""

    stream_id: str
    owner: str  # whose active set a terminal event takes the stream out of
    attempt: int
    seq: int
    events: list[tuple[str, dict[str, Any]]]
    meta: dict[str, str] | None = None  # fields set on the meta hash in the same step


def _written(a: Append, r: Any) -> Written | Exception:
    if isinstance(r, Exception):
        return r
    if r[0] == "seq":
        if int(r[1]) == a.seq + len(a.events):
            return Written(Reply.OK, seq=int(r[1]), attempt=a.attempt)
        return SeqConflict(f"stream {a.stream_id} at seq {r[1]}, writer expected {a.seq}")
    if r[0] != "ok":
        return Written(Reply(r[0]))
    return Written(Reply.OK, seq=int(r[1]), attempt=a.attempt, cancel=r[2] == "1")


def _creation(r: Any) -> Creation:
    reply = CreateReply(r[0])
    if reply is CreateReply.CREATED:
        return Creation(reply, stream_id=r[1], position=int(r[2]) if r[2] else None)
    if reply is CreateReply.EXISTING:
        return Creation(reply, stream_id=r[1])
    if reply is CreateReply.RATE_LIMITED:
        return Creation(reply, retry_after_ms=int(float(r[1])))
    if reply is CreateReply.TOO_MANY:
        return Creation(reply, active=int(r[1]))
    return Creation(reply)


def _flat(calls: list[tuple[Any, ...]]) -> list[Any]:
    """Bookkeeping writes as ``scripts.APPLY`` takes them: each one's length, then its words."""
    return [word for call in calls for word in (len(call), *call)]


def _summed(writes: list[Any]) -> list[Any]:
    """A batch's bookkeeping writes (as ``_flat`` makes them) with the increments of each counter
    summed into one ``HINCRBY``: every append counts its tokens, and a pipeline of appends would
    otherwise send the queue's Redis one command per append, per token at 50 tokens/s."""
    calls: list[list[Any]] = []
    counters: dict[tuple[str, str], list[Any]] = {}
    i = 0
    while i < len(writes):
        n = int(writes[i])
        call, i = list(writes[i + 1 : i + 1 + n]), i + 1 + n
        if call[0] == "HINCRBY":
            if (counter := counters.get((call[1], call[2]))) is not None:
                counter[3] = int(counter[3]) + int(call[3])
                continue
            counters[(call[1], call[2])] = call
        calls.append(call)
    return _flat([tuple(call) for call in calls])


def _claimed(r: Any, now: float) -> Claimed | Exception:
    if isinstance(r, Exception):
        return r
    reply = Reply(r[0])
    if reply is not Reply.OK:
        return Claimed(reply)
    attempt, seq, cancel, owner, request, created_at = int(r[1]), int(r[2]), r[3] == "1", r[4], r[5], r[6]
    return Claimed(reply, attempt, seq, cancel, owner, json.loads(request), float(created_at), now, r[7])


@dataclass(frozen=True, slots=True)
class Claimed:
    reply: Reply
    attempt: int = 0
    seq: int = 0
    cancel: bool = False
    owner: str = ""
    request: dict[str, Any] | None = None  # what the worker sends upstream
    created_at: float = 0.0  # Unix ms: the stream's creation (a gateway's clock)
    claimed_at: float = 0.0  # Unix ms: this claim (the worker's clock)
    reason: str = ""  # from the second attempt on, why the one before ended (`worker_lost`, ...)

    @property
    def queue_wait_s(self) -> float:
        """Created → claimed, in seconds; never negative (the two clocks may disagree a little)."""
        return max(0.0, self.claimed_at - self.created_at) / 1000


@dataclass(frozen=True, slots=True)
class _Script:
    """A store script; on a cluster its variant (``scripts.clustered``), whose first ``stream_keys``
    keys are the stream's own and the rest go to the front of its arguments (0: not on a cluster)."""

    lua: AsyncScript
    stream_keys: int

    def call(self, ks: list[str], args: list[Any]) -> tuple[list[str], list[Any]]:
        """The keys and arguments to send for ``ks`` and ``args``."""
        if not self.stream_keys:
            return ks, args
        return ks[: self.stream_keys], [*ks[self.stream_keys :], *args]


class StreamStore:
    """The streams Redis, seen through the seven scripts plus plain reads."""

    def __init__(
        self,
        redis: Redis,
        *,
        maxlen: int,
        retention_s: int,
        live_ttl_s: int,
        replicas: Replicas = UNREPLICATED,
        books: Redis | None = None,
        nodes: list[tuple[str, int]] | None = None,
        sharded: bool = False,
    ) -> None:
        """``books``: on a Redis Cluster (``redis``), the Redis that keeps the bookkeeping (see
        "Redis Cluster" above); ``None``: ``redis`` keeps it, in the scripts' own step. ``nodes``:
        the cluster's nodes (host, port) when it opened. ``sharded``: the cluster's notifications
        are sharded pub/sub (every node runs Redis 7 or later)."""
        self.redis = redis
        self.nodes = nodes or []
        self.sharded = sharded
        self.books: Redis = books if books is not None else redis
        self.clustered = books is not None
        self._replicas = replicas
        self._maxlen = maxlen
        self._retention = retention_s
        self._live_ttl = live_ttl_s

        def script(lua: str, stream_keys: int, book_keys: int) -> _Script:
            if self.clustered:
                lua = scripts.clustered(lua, stream_keys, book_keys, sharded=sharded)
            return _Script(redis.register_script(lua), stream_keys if self.clustered else 0)

        self._create = _Script(redis.register_script(scripts.CREATE), 0)
        self._discard = script(scripts.DISCARD, 2, 3)
        self._claim = script(scripts.CLAIM, 2, 3)
        self._append = script(scripts.APPEND, 2, 3)
        self._cancel = script(scripts.CANCEL, 2, 3)
        self._beat = script(scripts.BEAT, 1, 1)
        self._release = script(scripts.RELEASE, 1, 2)
        # On a cluster: a create's two steps, and the bookkeeping's writes on its own Redis.
        self._admit = self.books.register_script(scripts.ADMIT)
        self._make = redis.register_script(scripts.MAKE)
        self._apply = self.books.register_script(scripts.APPLY)

    async def aclose(self) -> None:
        await self.redis.aclose()
        if self.clustered:
            await self.books.aclose()

    async def create(
        self,
        stream_id: str,
        owner: str,
        fields: dict[str, str],
        *,
        limits: Limits | None = None,
        idempotency: tuple[str, str] | None = None,
        job: Job | None = None,
        position: int | None = None,
    ) -> Creation:
        """A new stream of ``owner``, queued, if ``limits`` admit it: its meta (``fields`` and the
        owner), the ``queued`` event, a place in the owner's active set and rate window, and one more
        ``created``. With ``idempotency`` (the key's hash, the body's digest): the stream that key
        created before, or a conflict if that body differed. With ``job`` (the queue is on this
        Redis): the job enqueued too, fairly across owners, unless the queue is full; else
        ``position``: the gateway's estimate of its place in the queue. All in one atomic step."""
        lim = limits or Limits()
        now = float(stamp())  # the meta's `created_at` too, to the µs
        idem_key, idem_value = keys.rate(owner), ""
        if idempotency is not None:
            idem_key, idem_value = keys.idempotency(owner, idempotency[0]), f"{stream_id} {idempotency[1]}"
        stale_before = now - lim.active_stale_ms if lim.active_stale_ms else 0
        if self.clustered:
            admission = [lim.max_active, stale_before, lim.rate_per_min, 60_000, idem_value, self._retention]
            book = [keys.active(owner), keys.STATS, keys.rate(owner), idem_key, keys.QUEUED]
            made = [
                self._live_ttl,
                now,
                owner,
                idem_key if idem_value else "",
                "" if position is None else position,
            ]
            for k, v in fields.items():
                made += [k, v]
            return await self._create_in_two(
                stream_id, book, [self._live_ttl, now, stream_id, *admission], made
            )
        args: list[Any] = [self._live_ttl, now, owner, lim.max_active, stale_before]
        args += [lim.rate_per_min, 60_000, idem_value, self._retention]
        ks = [keys.events(stream_id), keys.meta(stream_id), keys.active(owner), keys.STATS]
        ks += [keys.rate(owner), idem_key, keys.QUEUED]
        if job is None:
            args += ["", "", "", "", "" if position is None else position]
        else:
            args += [job.payload, job.expires_ms, job.max_queued, job.wake, ""]
            ks += [job.queue, job.key, job.fair]
        for k, v in fields.items():
            args += [k, v]
        return _creation(await self._replicated(self._create, ks, args, f"create of {stream_id}"))

    async def _create_in_two(
        self, stream_id: str, book: list[str], admit: list[Any], made: list[Any]
    ) -> Creation:
        """A create on a cluster: admission and its bookkeeping (``book``: the keys) on the
        bookkeeping's Redis, then the stream on its slot; if that fails, the admission is taken back
        and the error raised."""
        r = await self._admit(keys=book, args=admit)
        if r[0] != CreateReply.CREATED.value:
            return _creation(r)
        try:
            r = await self._make(keys=[keys.events(stream_id), keys.meta(stream_id)], args=made)
        except Exception:
            active, stats, rate, _, queued = book
            undo: list[tuple[Any, ...]] = [("ZREM", k, stream_id) for k in (active, rate, queued)]
            undo += [("HINCRBY", stats, "created", -1)] + (
                [("_delif", made[3], stream_id)] if made[3] else []
            )
            await self._apply(keys=[], args=_flat(undo))
            raise
        if r[0] == CreateReply.ID_TAKEN.value:  # this create, sent again: the stream is the caller's
            return Creation(
                CreateReply.CREATED, stream_id=stream_id, position=int(made[4]) if made[4] != "" else None
            )
        return _creation(r)

    async def discard(self, stream_id: str) -> None:
        """Undo a :meth:`create` whose job could not be enqueued: its meta and events, its place in
        its owner's active set (and the running index), and its ``created`` count."""
        ks = [keys.events(stream_id), keys.meta(stream_id), keys.RUNNING, keys.STATS, keys.QUEUED]
        await self._one(self._discard, ks, [keys.ACTIVE_PREFIX, keys.RATE_PREFIX], f"discard of {stream_id}")

    async def claim(
        self, stream_id: str, worker: str, *, stale_after_s: float, max_attempts: int, token: str = ""
    ) -> Claimed:
        """Start a new attempt: writes ``reset`` (from the second attempt on) and ``started``, and
        indexes the stream as running in the same step, so a worker that dies right after claiming
        is still found by the takeover scan.

        A running stream is taken over only if its heartbeat is older than ``stale_after_s``. Past
        ``max_attempts`` the stream ends with ``error`` (:attr:`Reply.EXHAUSTED`). The same claim
        sent again (the same ``token``, which no other claim may carry) answers as the first did.
        """
        [claimed] = await self.claim_many(
            [stream_id], worker, stale_after_s=stale_after_s, max_attempts=max_attempts, tokens=[token]
        )
        if isinstance(claimed, Exception):
            raise claimed
        return claimed

    async def claim_many(
        self,
        stream_ids: list[str],
        worker: str,
        *,
        stale_after_s: float,
        max_attempts: int,
        tokens: list[str] | None = None,
    ) -> list[Claimed | Exception]:
        """:meth:`claim` for each of ``stream_ids`` (with its token of ``tokens``, if given), in one
        pipelined round trip, each atomic on its own; a claim that failed has its error in its place."""
        now = time.time() * 1000
        tail = [f"{now:.3f}", worker, f"{now - stale_after_s * 1000:.3f}", max_attempts, self._retention]
        calls: list[tuple[list[str], list[Any]]] = [
            (
                [keys.events(i), keys.meta(i), keys.RUNNING, keys.STATS, keys.QUEUED],
                [keys.notify(i), *tail, keys.ACTIVE_PREFIX, token],
            )
            for i, token in zip(stream_ids, tokens or [""] * len(stream_ids), strict=True)
        ]
        if self.clustered:
            # Indexed as running before the claim, not after: a worker that dies between the two
            # steps leaves a stream that the takeover scan finds.
            await self._apply(keys=[], args=_flat([("ZADD", keys.RUNNING, tail[0], i) for i in stream_ids]))
        return [_claimed(r, now) for r in await self._pipelined(self._claim, calls, "claim")]

    async def append_many(self, appends: list[Append]) -> list[Written | Exception]:
        """Each of ``appends`` in one pipelined round trip, each atomic on its own: its events go in if
        its attempt still owns the stream and the stream stands at its ``seq``.

        A terminal event last ends the stream. If the stream already stands at ``seq + len(events)``,
        that append was applied before (its reply was lost) and counts as done; any other ``seq`` is a
        :class:`SeqConflict` in its place in the result.
        """
        now = stamp()
        calls = []
        for a in appends:
            extra = list((a.meta or {}).items())
            final = FINAL_STATUS.get(a.events[-1][0], "")
            args: list[Any] = [a.attempt, a.seq, self._maxlen, keys.notify(a.stream_id), final, now]
            args += [self._retention, len(extra)]
            for k, v in extra:
                args += [k, v]
            for kind, data in a.events:
                args += [kind, dumps(data)]
            # The bookkeeping keys: the stream may end here (a terminal event, or the cap).
            ks = [keys.events(a.stream_id), keys.meta(a.stream_id), keys.RUNNING, keys.STATS]
            ks.append(keys.active(a.owner))
            calls.append((ks, args))
        replies = await self._pipelined(self._append, calls, "append")
        return [_written(a, r) for a, r in zip(appends, replies, strict=True)]

    async def _pipelined(
        self, script: _Script, calls: list[tuple[list[str], list[Any]]], what: str, *, replicated: bool = True
    ) -> list[Any]:
        """``script`` once per ``(keys, args)`` of ``calls``, in one pipelined round trip (with the
        wait for the replicas, when they are expected and ``replicated``: ``what`` names it in the
        error if they do not acknowledge); each reply or error in its place. (redis-py's pipeline
        asks ``SCRIPT EXISTS`` before every execute that holds a script, a second round trip; here
        the script is loaded only when Redis has lost it, after a restart or on a promoted replica,
        and then no call of the batch has run, so the batch runs again whole.) On a cluster, the
        bookkeeping writes the calls answered are then made on the bookkeeping's Redis, all in one
        step."""
        lua = script.lua
        for _ in range(2):
            async with self.redis.pipeline(transaction=False) as pipe:
                for ks, args in calls:
                    ks, args = script.call(ks, args)
                    # (not `pipe.evalsha`, which redis-py's cluster pipeline refuses; this routes by key)
                    pipe.execute_command("EVALSHA", lua.sha, len(ks), *ks, *args)
                waits = self._replicas.wait(pipe) if replicated else 0
                try:
                    replies: list[Any] = await pipe.execute(raise_on_error=False)
                except AttributeError as exc:
                    if not self.clustered:
                        raise
                    # redis-py 5.3's cluster pipeline, having run the commands, fails when one
                    # erred (NOSCRIPT on a promoted replica, MOVED) and another task's reconnect
                    # has just reset the client's default node (`'NoneType' object has no attribute
                    # 'name'`). The replies are lost, as with a broken connection: every caller
                    # recognises the same call sent again. Closed, the client maps the cluster
                    # afresh, default node included, before its next command.
                    await self.redis.aclose()
                    raise RedisConnectionError(f"cluster pipeline lost its replies: {exc}") from exc
            if not any(isinstance(r, NoScriptError) for r in replies):
                break
            await self.redis.script_load(lua.script)
        if waits:
            replies = self._replicas.check(replies, what)
        if not script.stream_keys:
            return replies
        writes = _summed([w for r in replies if not isinstance(r, Exception) for w in r[1]])
        if writes:
            await self._apply(keys=[], args=writes)
        return [r if isinstance(r, Exception) else r[0] for r in replies]

    async def _one(self, script: _Script, ks: list[str], args: list[Any], what: str) -> Any:
        """``script``'s reply to one call, or its error raised (no wait for replicas)."""
        [reply] = await self._pipelined(script, [(ks, args)], what, replicated=False)
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def beat(self, attempts: dict[str, int]) -> dict[str, str]:
        """Heartbeat every stream in ``attempts`` (id -> attempt) in one round trip, in its meta and
        in the running index. Answers per stream: ``"1"`` cancel requested, ``"0"``, or a
        :class:`Reply` value saying why the attempt no longer owns it (``gone``, ``fenced``,
        ``finished``)."""
        now = stamp()
        calls = [([keys.meta(i), keys.RUNNING], [attempt, now]) for i, attempt in attempts.items()]
        replies = await self._pipelined(self._beat, calls, "heartbeat")
        for r in replies:
            if isinstance(r, Exception):
                raise r
        return dict(zip(attempts, (str(r) for r in replies), strict=True))

    async def release(self, stream_id: str, attempt: int, reason: str) -> Reply:
        """Hand the stream back (heartbeat 0): the next claim takes it at once and writes ``reset``
        with ``reason``. Anything but :attr:`Reply.OK` means the attempt no longer owns it."""
        ks = [keys.meta(stream_id), keys.RUNNING, keys.STATS]
        return Reply(
            await self._one(self._release, ks, [attempt, reason, stamp()], f"release of {stream_id}")
        )

    async def stale(self, stale_after_s: float, limit: int = 100) -> list[tuple[str, float]]:
        """Streams in the running index whose heartbeat is older than ``stale_after_s``."""
        before = time.time() * 1000 - stale_after_s * 1000
        rows = await self.books.zrangebyscore(
            keys.RUNNING, "-inf", before, start=0, num=limit, withscores=True
        )
        return [(str(m), float(s)) for m, s in rows]

    async def cancel(self, stream_id: str) -> str:
        """Returns the status after the request: a queued stream is ended at once (``cancelled``),
        a running one is flagged for its worker (``running``)."""
        status = await self._replicated(
            self._cancel,
            [keys.events(stream_id), keys.meta(stream_id), keys.RUNNING, keys.STATS, keys.QUEUED],
            [keys.notify(stream_id), stamp(), self._retention, keys.ACTIVE_PREFIX],
            f"cancel of {stream_id}",
        )
        return str(status)

    async def _replicated(self, script: _Script, ks: list[str], args: list[Any], what: str) -> Any:
        """``script``'s reply, once the replicas have what it wrote, when replicas are expected
        (``tailgate.replication``): then it goes in one pipeline with the wait for them."""
        if script.stream_keys:
            return await self._one(script, ks, args, what)
        if not self._replicas.acks:
            return await script.lua(keys=ks, args=args)
        async with self.redis.pipeline(transaction=False) as pipe:
            await script.lua(keys=ks, args=args, client=pipe)
            self._replicas.wait(pipe)
            [reply] = self._replicas.check(await pipe.execute(), what)
        return reply

    async def meta(self, stream_id: str) -> dict[str, str]:
        return await self.redis.hgetall(keys.meta(stream_id))  # type: ignore[no-any-return,misc]

    async def after(self, stream_id: str, cursor: str, count: int) -> list[Entry]:
        """Up to ``count`` entries strictly after ``cursor``."""
        rows = await self.redis.xrange(keys.events(stream_id), min=f"({cursor}", count=count)
        return [entry(i, f) for i, f in rows]

    async def at(self, stream_id: str, cursor: str) -> Entry | None:
        rows = await self.redis.xrange(keys.events(stream_id), min=cursor, max=cursor, count=1)
        return entry(*rows[0]) if rows else None


def stamp() -> str:
    """Now, in Unix milliseconds with microsecond decimals: the meta's `*_at` and heartbeat."""
    return f"{time.time() * 1000:.3f}"


def iso(ms: str | None) -> str | None:
    """A :func:`stamp` as ISO 8601 in UTC, to the millisecond (``2024-11-24T10:13:20.123Z``)."""
    if not ms:
        return None
    at = datetime.fromtimestamp(float(ms) / 1000, UTC)
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def is_finished(status: str | None) -> bool:
    return status in FINISHED
