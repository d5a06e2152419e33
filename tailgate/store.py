"""The stream store: every write to a stream goes through one of four atomic scripts.

- ``create``: the meta hash and the ``queued`` event, or nothing if the id exists.
- ``claim``: a worker starts an attempt; the attempt number goes up by one and becomes the fencing token.
- ``append``: events of one attempt, checked against the fencing token and the expected ``seq``
  (so a retried append after a lost reply is recognised, not duplicated); a terminal event also sets
  the final status and the retention TTL. Each appended batch is published to the stream's channel.
- ``cancel``: ends a queued stream at once, or flags a running one for its worker.

Each script assigns ``seq`` itself, so ``seq`` is contiguous over the whole stream across attempts.
Only EVAL/EVALSHA, so Redis 6.2 works; both keys carry the stream's hash tag, so Redis Cluster works.
"""

from __future__ import annotations

import enum
import json
import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from tailgate import keys
from tailgate.events import FINAL_STATUS, FINISHED, Entry, dumps, entry

_LIB = """
local function add(ek, maxlen, seq, kind, data, lines)
  seq = seq + 1
  if data == '{}' then
    data = '{"seq":' .. seq .. '}'
  else
    data = '{"seq":' .. seq .. ',' .. string.sub(data, 2)
  end
  local id = redis.call('XADD', ek, 'MAXLEN', '~', maxlen, '*', 't', kind, 'd', data)
  lines[#lines + 1] = id .. '\\t' .. kind .. '\\t' .. data
  return seq, id
end
local function finished(status)
  return status == 'completed' or status == 'failed' or status == 'cancelled'
end
local function close(ek, mk, status, now, retention)
  redis.call('HSET', mk, 'status', status, 'finished_at', now)
  redis.call('EXPIRE', ek, retention)
  redis.call('EXPIRE', mk, retention)
end
"""

# KEYS: events, meta, the owner's active set, stats. ARGV: maxlen, live_ttl, now, owner, stream id,
# then meta field/value pairs.
_CREATE = (
    _LIB
    + """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('HSET', KEYS[2], 'status', 'queued', 'attempt', 0, 'cancel', 0, 'created_at', ARGV[3])
for i = 6, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('HSET', KEYS[2], 'owner', ARGV[4])
redis.call('ZADD', KEYS[3], math.floor(tonumber(ARGV[3])), ARGV[5])
redis.call('HINCRBY', KEYS[4], 'created', 1)
local seq, id = add(KEYS[1], ARGV[1], 0, 'queued', '{}', {})
redis.call('HSET', KEYS[2], 'seq', seq, 'last_id', id)
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
"""
)

# KEYS: events, meta. ARGV: maxlen, channel, now, worker, stale_before, max_attempts, retention.
# A running stream is claimed only if its heartbeat is older than stale_before (its worker is gone or
# handed it back); past max_attempts it ends with `error` instead.
_CLAIM = (
    _LIB
    + """
local m = redis.call('HMGET', KEYS[2], 'status', 'seq', 'cancel', 'heartbeat', 'attempt', 'release',
  'request', 'owner', 'model')
if not m[1] then return {'gone'} end
if finished(m[1]) then return {'finished'} end
if m[1] == 'running' and tonumber(m[4]) > tonumber(ARGV[5]) then return {'busy'} end
local reason = m[6] or 'worker_lost'
local attempt = tonumber(m[5]) + 1
local lines = {}
local seq, id = tonumber(m[2]), nil
if attempt > tonumber(ARGV[6]) then
  local err = '{"code":"worker_lost","message":' .. cjson.encode(
    'the stream lost its worker ' .. m[5] .. ' times (last: ' .. reason .. '); giving up') .. '}'
  seq, id = add(KEYS[1], ARGV[1], seq, 'error', err, lines)
  redis.call('HSET', KEYS[2], 'seq', seq, 'last_id', id, 'error', err)
  close(KEYS[1], KEYS[2], 'failed', ARGV[3], ARGV[7])
  redis.call('PUBLISH', ARGV[2], table.concat(lines, '\\n'))
  return {'exhausted', '', '', '', m[8] or ''}
end
redis.call('HSET', KEYS[2], 'attempt', attempt, 'status', 'running', 'worker', ARGV[4], 'heartbeat', ARGV[3])
redis.call('HDEL', KEYS[2], 'release')
redis.call('HSETNX', KEYS[2], 'started_at', ARGV[3])
if attempt > 1 then
  seq, id = add(KEYS[1], ARGV[1], seq, 'reset',
    '{"attempt":' .. attempt .. ',"reason":' .. cjson.encode(reason) .. '}', lines)
end
seq, id = add(KEYS[1], ARGV[1], seq, 'started',
  '{"attempt":' .. attempt .. ',"model":' .. cjson.encode(m[9] or '') .. '}', lines)
redis.call('HSET', KEYS[2], 'seq', seq, 'last_id', id)
redis.call('PUBLISH', ARGV[2], table.concat(lines, '\\n'))
return {'ok', tostring(attempt), tostring(seq), m[3] or '0', m[8] or '', m[7]}
"""
)

# KEYS: events, meta. ARGV: attempt, expected seq, maxlen, channel, final status or '', now,
# retention, extra meta field/value pairs count, pairs..., then event type/data pairs.
_APPEND = (
    _LIB
    + """
local m = redis.call('HMGET', KEYS[2], 'status', 'attempt', 'seq', 'cancel')
if not m[1] then return {'gone'} end
if m[2] ~= ARGV[1] then return {'fenced'} end
if finished(m[1]) then return {'finished'} end
if m[3] ~= ARGV[2] then return {'seq', m[3]} end
local seq, id = tonumber(m[3]), nil
local lines = {}
local nextra = tonumber(ARGV[8])
for i = 9, 8 + nextra * 2, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
for i = 9 + nextra * 2, #ARGV, 2 do
  seq, id = add(KEYS[1], ARGV[3], seq, ARGV[i], ARGV[i + 1], lines)
end
redis.call('HSET', KEYS[2], 'seq', seq, 'last_id', id)
if ARGV[5] ~= '' then close(KEYS[1], KEYS[2], ARGV[5], ARGV[6], ARGV[7]) end
redis.call('PUBLISH', ARGV[4], table.concat(lines, '\\n'))
return {'ok', tostring(seq), m[4] or '0'}
"""
)

# KEYS: meta. ARGV: attempt, now. Stamps the heartbeat if this attempt still owns the stream;
# answers its cancel flag, or 'fenced'.
_BEAT = """
local m = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'cancel')
if m[1] ~= 'running' or m[2] ~= ARGV[1] then return 'fenced' end
redis.call('HSET', KEYS[1], 'heartbeat', ARGV[2])
return m[3] or '0'
"""

# KEYS: meta. ARGV: attempt, reason. Gives the stream up for another worker to claim at once.
_RELEASE = """
local m = redis.call('HMGET', KEYS[1], 'status', 'attempt')
if m[1] ~= 'running' or m[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'heartbeat', 0, 'release', ARGV[2])
return 1
"""

# KEYS: events, meta, stats. ARGV: maxlen, channel, now, retention, active-set key prefix, stream id.
# TEMP store contract: the owner's active set is named from the meta's owner (not Cluster-safe).
_CANCEL = (
    _LIB
    + """
local m = redis.call('HMGET', KEYS[2], 'status', 'seq', 'owner')
if not m[1] then return 'gone' end
if finished(m[1]) then return m[1] end
if m[1] == 'queued' then
  local lines = {}
  local seq, id = add(KEYS[1], ARGV[1], tonumber(m[2]), 'cancelled', '{"usage":null}', lines)
  redis.call('HSET', KEYS[2], 'seq', seq, 'last_id', id, 'cancel', 1)
  close(KEYS[1], KEYS[2], 'cancelled', ARGV[3], ARGV[4])
  if m[3] then redis.call('ZREM', ARGV[5] .. m[3], ARGV[6]) end
  redis.call('HINCRBY', KEYS[3], 'cancelled', 1)
  redis.call('PUBLISH', ARGV[2], table.concat(lines, '\\n'))
  return 'cancelled'
end
redis.call('HSET', KEYS[2], 'cancel', 1)
return m[1]
"""
)


# KEYS: events, meta, stats. ARGV: active-set key prefix, stream id. Takes back a create.
# TEMP store contract: the owner's active set is named from the meta's owner (not Cluster-safe).
_DISCARD = """
local owner = redis.call('HGET', KEYS[2], 'owner')
if not owner then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', ARGV[1] .. owner, ARGV[2])
redis.call('HINCRBY', KEYS[3], 'created', -1)
return 1
"""


class Outcome(enum.Enum):
    OK = "ok"
    GONE = "gone"  # the stream expired or never existed
    FENCED = "fenced"  # another attempt owns the stream now
    FINISHED = "finished"  # the stream already ended
    BUSY = "busy"  # claim: a live worker runs it
    EXHAUSTED = "exhausted"  # claim: too many attempts; the stream was ended with `error`


class SeqConflict(RuntimeError):
    """An append found the stream at a ``seq`` its writer did not expect."""


@dataclass(frozen=True, slots=True)
class Written:
    outcome: Outcome
    seq: int = 0
    attempt: int = 0
    cancel: bool = False


@dataclass(frozen=True, slots=True)
class Append:
    """One stream's events for one append, by the attempt that owns it, expected at ``seq``."""

    stream_id: str
    attempt: int
    seq: int
    events: list[tuple[str, dict[str, Any]]]
    meta: dict[str, str] | None = None  # fields set on the meta hash in the same step


def _written(a: Append, r: Any) -> Written | Exception:
    if isinstance(r, Exception):
        return r
    if r[0] == "seq":
        if int(r[1]) == a.seq + len(a.events):
            return Written(Outcome.OK, seq=int(r[1]), attempt=a.attempt)
        return SeqConflict(f"stream {a.stream_id} at seq {r[1]}, writer expected {a.seq}")
    if r[0] != "ok":
        return Written(Outcome(r[0]))
    return Written(Outcome.OK, seq=int(r[1]), attempt=a.attempt, cancel=r[2] == "1")


@dataclass(frozen=True, slots=True)
class Claimed:
    outcome: Outcome
    attempt: int = 0
    seq: int = 0
    cancel: bool = False
    owner: str = ""
    request: dict[str, Any] | None = None  # what the worker sends upstream


class StreamStore:
    """The streams Redis, seen through the four scripts plus plain reads."""

    def __init__(self, redis: Redis, *, maxlen: int, retention_s: int, live_ttl_s: int) -> None:
        self.redis = redis
        self._maxlen = maxlen
        self._retention = retention_s
        self._live_ttl = live_ttl_s
        self._create = redis.register_script(_CREATE)
        self._claim = redis.register_script(_CLAIM)
        self._append = redis.register_script(_APPEND)
        self._cancel = redis.register_script(_CANCEL)
        self._beat = redis.register_script(_BEAT)
        self._release = redis.register_script(_RELEASE)
        self._discard = redis.register_script(_DISCARD)

    async def create(self, stream_id: str, owner: str, fields: dict[str, str]) -> bool:
        """The stream, queued, owned by ``owner``, in ``owner``'s active set and counted as created;
        False (and nothing written) if the id exists."""
        args: list[Any] = [self._maxlen, self._live_ttl, stamp(), owner, stream_id]
        for k, v in fields.items():
            args += [k, v]
        return bool(
            await self._create(
                keys=[keys.events(stream_id), keys.meta(stream_id), keys.active(owner), keys.STATS],
                args=args,
            )
        )

    async def discard(self, stream_id: str) -> None:
        """Takes back a create whose enqueue failed: its keys, its active slot and its count."""
        await self._discard(
            keys=[keys.events(stream_id), keys.meta(stream_id), keys.STATS],
            args=[keys.active(""), stream_id],
        )

    async def claim(self, stream_id: str, worker: str, *, stale_after_s: float, max_attempts: int) -> Claimed:
        """Start a new attempt: writes ``reset`` (from the second attempt on) and ``started``.

        A running stream is taken over only if its heartbeat is older than ``stale_after_s``. The
        stream enters the running index first (same round trip), so a worker that dies right after
        claiming is still found by the takeover scan.
        """
        now = time.time() * 1000
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(keys.RUNNING, {stream_id: now})
            await self._claim(
                keys=[keys.events(stream_id), keys.meta(stream_id)],
                args=[
                    self._maxlen,
                    keys.notify(stream_id),
                    f"{now:.3f}",
                    worker,
                    f"{now - stale_after_s * 1000:.3f}",
                    max_attempts,
                    self._retention,
                ],
                client=pipe,
            )
            _, r = await pipe.execute()
        outcome = Outcome(r[0])
        if outcome is not Outcome.OK:
            return Claimed(outcome, owner=r[4] if len(r) > 4 else "")
        return Claimed(outcome, int(r[1]), int(r[2]), r[3] == "1", r[4], json.loads(r[5]))

    async def append_many(self, appends: list[Append]) -> list[Written | Exception]:
        """Each of ``appends`` in one pipelined round trip, each atomic on its own: its events go in if
        its attempt still owns the stream and the stream stands at its ``seq``.

        A terminal event last ends the stream. If the stream already stands at ``seq + len(events)``,
        that append was applied before (its reply was lost) and counts as done; any other ``seq`` is a
        :class:`SeqConflict` in its place in the result.
        """
        now = stamp()
        async with self.redis.pipeline(transaction=False) as pipe:
            for a in appends:
                extra = list((a.meta or {}).items())
                final = FINAL_STATUS.get(a.events[-1][0], "")
                args: list[Any] = [a.attempt, a.seq, self._maxlen, keys.notify(a.stream_id), final, now]
                args += [self._retention, len(extra)]
                for k, v in extra:
                    args += [k, v]
                for kind, data in a.events:
                    args += [kind, dumps(data)]
                await self._append(
                    keys=[keys.events(a.stream_id), keys.meta(a.stream_id)], args=args, client=pipe
                )
            replies = await pipe.execute(raise_on_error=False)
        return [_written(a, r) for a, r in zip(appends, replies, strict=True)]

    async def beat(self, attempts: dict[str, int]) -> dict[str, str]:
        """Heartbeat every stream in ``attempts`` (id -> attempt) in one round trip, and refresh
        them in the running index. Answers per stream: ``"1"`` cancel requested, ``"0"``, or ``"fenced"``."""
        now = stamp()
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream_id, attempt in attempts.items():
                await self._beat(keys=[keys.meta(stream_id)], args=[attempt, now], client=pipe)
            replies = dict(zip(attempts, (str(r) for r in await pipe.execute()), strict=True))
        # Only streams still ours, and only if still indexed (XX): one that finished in between was
        # removed from the index, and putting it back would invite a needless takeover.
        alive = [stream_id for stream_id, reply in replies.items() if reply != "fenced"]
        if alive:
            await self.redis.zadd(keys.RUNNING, dict.fromkeys(alive, float(now)), xx=True)
        return replies

    async def release(self, stream_id: str, attempt: int, reason: str) -> bool:
        return bool(await self._release(keys=[keys.meta(stream_id)], args=[attempt, reason]))

    async def stale(self, stale_after_s: float, limit: int = 100) -> list[tuple[str, float]]:
        """Streams in the running index whose heartbeat is older than ``stale_after_s``."""
        before = time.time() * 1000 - stale_after_s * 1000
        rows = await self.redis.zrangebyscore(
            keys.RUNNING, "-inf", before, start=0, num=limit, withscores=True
        )
        return [(str(m), float(s)) for m, s in rows]

    async def cancel(self, stream_id: str) -> str:
        """Returns the status after the request: ``cancelled`` at once if it was queued (which also
        gives back its owner's active slot and counts it)."""
        return str(
            await self._cancel(
                keys=[keys.events(stream_id), keys.meta(stream_id), keys.STATS],
                args=[
                    self._maxlen,
                    keys.notify(stream_id),
                    stamp(),
                    self._retention,
                    keys.active(""),
                    stream_id,
                ],
            )
        )

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


def is_finished(status: str | None) -> bool:
    return status in FINISHED
