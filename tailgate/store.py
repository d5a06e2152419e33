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

**Redis Cluster.** A stream's own keys share a slot (the hash tag); the bookkeeping keys do not
(``tg:running`` and ``tg:stats`` are global, ``tg:active:<owner>`` is per owner). So today every
script crosses slots: ``create``, ``discard``, ``claim``, ``cancel``, ``append`` (running, stats,
active; a non-terminal append touches only stats, to count its deltas), ``beat`` (running) and
``release`` (running, stats). Before the store
can run on a cluster, each of these must be split into the stream's own step and a bookkeeping step.

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
    ) -> None:
        self.redis = redis
        self._replicas = replicas
        self._maxlen = maxlen
        self._retention = retention_s
        self._live_ttl = live_ttl_s
        self._create = redis.register_script(scripts.CREATE)
        self._discard = redis.register_script(scripts.DISCARD)
        self._claim = redis.register_script(scripts.CLAIM)
        self._append = redis.register_script(scripts.APPEND)
        self._cancel = redis.register_script(scripts.CANCEL)
        self._beat = redis.register_script(scripts.BEAT)
        self._release = redis.register_script(scripts.RELEASE)

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
        now = int(time.time() * 1000)
        idem_key, idem_value = keys.rate(owner), ""
        if idempotency is not None:
            idem_key, idem_value = keys.idempotency(owner, idempotency[0]), f"{stream_id} {idempotency[1]}"
        stale_before = now - lim.active_stale_ms if lim.active_stale_ms else 0
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
        r = await self._replicated(self._create, ks, args, f"create of {stream_id}")
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

    async def discard(self, stream_id: str) -> None:
        """Undo a :meth:`create` whose job could not be enqueued: its meta and events, its place in
        its owner's active set (and the running index), and its ``created`` count."""
        ks = [keys.events(stream_id), keys.meta(stream_id), keys.RUNNING, keys.STATS, keys.QUEUED]
        await self._discard(keys=ks, args=[keys.ACTIVE_PREFIX, keys.RATE_PREFIX])

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
        self, script: AsyncScript, calls: list[tuple[list[str], list[Any]]], what: str
    ) -> list[Any]:
        """``script`` once per ``(keys, args)`` of ``calls``, in one pipelined round trip (with the
        wait for the replicas, when they are expected: ``what`` names it in the error if they do not
        acknowledge); each reply or error in its place. (redis-py's pipeline asks ``SCRIPT
        EXISTS`` before every execute that holds a script, a second round trip; here the script is
        loaded only when Redis has lost it, after a restart, and then no call of the batch has run,
        so the batch runs again whole.)"""
        for _ in range(2):
            async with self.redis.pipeline(transaction=False) as pipe:
                for ks, args in calls:
                    pipe.evalsha(script.sha, len(ks), *ks, *args)
                self._replicas.wait(pipe)
                replies: list[Any] = self._replicas.check(await pipe.execute(raise_on_error=False), what)
            if not any(isinstance(r, NoScriptError) for r in replies):
                break
            await self.redis.script_load(script.script)
        return replies

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
        r = await self._release(keys=ks, args=[attempt, reason, stamp()])
        return Reply(r)

    async def stale(self, stale_after_s: float, limit: int = 100) -> list[tuple[str, float]]:
        """Streams in the running index whose heartbeat is older than ``stale_after_s``."""
        before = time.time() * 1000 - stale_after_s * 1000
        rows = await self.redis.zrangebyscore(
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

    async def _replicated(self, script: AsyncScript, ks: list[str], args: list[Any], what: str) -> Any:
        """``script``'s reply, once the replicas have what it wrote, when replicas are expected
        (``tailgate.replication``): then it goes in one pipeline with the wait for them."""
        if not self._replicas.acks:
            return await script(keys=ks, args=args)
        async with self.redis.pipeline(transaction=False) as pipe:
            await script(keys=ks, args=args, client=pipe)
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
