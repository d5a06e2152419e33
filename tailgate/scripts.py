"""The Lua of the stream store's atomic scripts (``tailgate.store`` runs them and says what they
promise). Each script is ``LIB`` plus its body; only EVAL/EVALSHA, so Redis 6.2 works."""

from __future__ import annotations

LIB = """
local function add(ek, seq, kind, data, lines)
  seq = seq + 1
  if data == '{}' then
    data = '{"seq":' .. seq .. '}'
  else
    data = '{"seq":' .. seq .. ',' .. string.sub(data, 2)
  end
  local id = redis.call('XADD', ek, '*', 't', kind, 'd', data)
  lines[#lines + 1] = id .. '\\t' .. kind .. '\\t' .. data
  return seq, id
end
local function finished(status)
  return status == 'completed' or status == 'failed' or status == 'cancelled'
end
-- A stream's id: the hash tag of its keys (tailgate.keys).
local function id_of(key)
  return string.match(key, '{(.-)}')
end
-- The attempt history: the meta field `attempts`, a JSON array with one object per attempt (so at
-- most max_attempts): attempt, worker, started_at, then first_token_at, and once it ended ended_at,
-- reason (done, error with its code, cancelled, taken_over, handed_back, worker_lost) and, for a
-- worker that vanished, last_heartbeat_at. Times are the meta's millisecond stamps, as strings
-- (cjson keeps 14 digits of a number).
local function attempts_of(mk)
  local raw = redis.call('HGET', mk, 'attempts')
  if not raw then return {} end
  return cjson.decode(raw)
end
-- Ends the stream's current attempt, unless it ended before (a hand-back) or there is none.
local function end_attempt(mk, now, reason, code, beat)
  local list = attempts_of(mk)
  local last = list[#list]
  if not last or last.ended_at then return end
  last.ended_at = now
  last.reason = reason
  last.code = code
  last.last_heartbeat_at = beat
  redis.call('HSET', mk, 'attempts', cjson.encode(list))
end
-- Bookkeeping writes: the indexes and counters beside the streams (tailgate.store, "Bookkeeping").
-- One command per call, as a table; `_delif` KEY ID deletes KEY if its value names stream ID (an
-- idempotency record). With BOOK nil, book() makes the write here, in this script's step; on a
-- cluster, where the bookkeeping lives on another Redis, it collects them in BOOK, which the script
-- answers beside its reply and the store makes there (APPLY).
local BOOK = nil
local function perform(call)
  if call[1] == '_delif' then
    local v = redis.call('GET', call[2])
    if v and string.sub(v, 1, #call[3] + 1) == call[3] .. ' ' then redis.call('DEL', call[2]) end
  else
    redis.call(unpack(call))
  end
end
local function book(...)
  local call = {...}
  if not BOOK then return perform(call) end
  BOOK[#BOOK + 1] = #call
  for i = 1, #call do BOOK[#BOOK + 1] = call[i] end
end
local REASON = {completed = 'done', failed = 'error', cancelled = 'cancelled'}
-- The one place a stream ends: its final status, the retention TTL, the end of its current attempt,
-- and the bookkeeping (it leaves the running index and its owner's active set; its final status is
-- counted, a failure also by its error code).
local function close(ek, mk, status, now, retention, running, stats, active, code)
  redis.call('HSET', mk, 'status', status, 'finished_at', now)
  redis.call('EXPIRE', ek, retention)
  redis.call('EXPIRE', mk, retention)
  end_attempt(mk, now, REASON[status], code, nil)
  local id = id_of(mk)
  book('ZREM', running, id)
  book('ZREM', active, id)
  book('HINCRBY', stats, status, 1)
  if status == 'failed' then book('HINCRBY', stats, 'failed:' .. (code or 'unknown'), 1) end
end
"""

# On the Redis of the bookkeeping, when that is not the streams' (a cluster): the writes a script
# collected (LIB's `book`), in one step. ARGV: per write, its length, then its words.
APPLY = (
    LIB
    + """
local i = 1
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  perform({unpack(ARGV, i + 1, i + n)})
  i = i + n + 1
end
return 1
"""
)


def clustered(script: str, stream_keys: int, book_keys: int, *, sharded: bool) -> str:
    """``script`` (``LIB`` and a body) for a stream store on a Redis Cluster: KEYS only the stream's
    own (``stream_keys``, one slot); the ``book_keys`` bookkeeping keys that come after them first in
    ARGV; the bookkeeping writes collected and answered as ``{reply, writes}`` (see ``book``).
    ``sharded``: the stream's notifications go out with ``SPUBLISH`` (Redis 7), to its shard only."""
    lib, body = script[: len(LIB)], script[len(LIB) :]
    assert lib == LIB, "a script this takes is LIB and a body"
    if sharded:
        body = body.replace("redis.call('PUBLISH', ", "redis.call('SPUBLISH', ")
    names = [f"KEYS[{i}]" for i in range(1, stream_keys + 1)]
    names += [f"ARGV[{i}]" for i in range(1, book_keys + 1)]
    prologue = f"BOOK = {{}}\nlocal KEYS = {{{', '.join(names)}}}\n"
    prologue += f"local ARGV = {{unpack(ARGV, {book_keys + 1})}}\n"
    return f"{LIB}{prologue}local function body()\n{body}\nend\nreturn {{body(), BOOK}}\n"


# Fair scheduling across owners, on the Redis of ARQ's queue (start-time fair queueing). A job's
# score is its virtual start time, not a clock: the later of "now" in virtual time (the score of the
# first job waiting; when none waits, the latest time given out) and the end of its owner's previous
# job (its start + 1). ARQ runs the lowest score first, so an owner's backlog of thousands does not
# delay another owner's next stream: that one is scored at the head's time, beside the backlog's
# first job. Each owner's jobs keep their order. The scores stay far below the clock in ms, so every
# job is due at once. Score 0 is a takeover's (worker.job.takeover): first in line, and not "now".
FAIR = """
local function fair_start(queue, fair, owner)
  local head = redis.call('ZRANGEBYSCORE', queue, '(0', '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  local now = tonumber(head[2] or redis.call('HGET', fair, '') or 1)
  return math.max(now, tonumber(redis.call('HGET', fair, owner) or 0))
end
-- Queues job `id` of `owner` (once: a re-sent enqueue keeps its place) and answers its place in the
-- queue, 1 for next.
local function fair_enqueue(queue, fair, owner, id)
  if not redis.call('ZSCORE', queue, id) then
    if redis.call('HLEN', fair) > 1 and not redis.call('ZRANGEBYSCORE', queue, '(0', '+inf', 'LIMIT', 0, 1)[1]
    then
      -- Nothing waits, so "now" is the latest time given out, and every owner's next start is behind
      -- it: only that time matters. Kept alone, the hash holds the owners of what waits, not every
      -- owner ever seen.
      local latest = redis.call('HGET', fair, '')
      redis.call('DEL', fair)
      redis.call('HSET', fair, '', latest)
    end
    local start = fair_start(queue, fair, owner)
    redis.call('ZADD', queue, start, id)
    redis.call('HSET', fair, owner, start + 1)
    if start + 1 > tonumber(redis.call('HGET', fair, '') or 0) then
      redis.call('HSET', fair, '', start + 1)
    end
  end
  return redis.call('ZRANK', queue, id) + 1
end
"""

# When the queue has a Redis of its own. KEYS: queue, fair. ARGV: owner. Answers the queue's depth,
# and the place a job of this owner would take now (ties counted ahead), for its `queued` event.
PEEK = (
    FAIR
    + """
local place = redis.call('ZCOUNT', KEYS[1], '-inf', fair_start(KEYS[1], KEYS[2], ARGV[1])) + 1
return {redis.call('ZCARD', KEYS[1]), place}
"""
)

# When the queue has a Redis of its own. KEYS: queue, fair, the job's key. ARGV: owner, job id, ARQ's
# serialized job, its expiry ms, the wake-up channel. Writes the job as ARQ's enqueue_job does, with
# its fair score, and wakes a worker; every write is once only, so redis-py may send it again after a
# broken connection. Answers the job's place in the queue.
ENQUEUE = (
    FAIR
    + """
redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[4], 'NX')
local place = fair_enqueue(KEYS[1], KEYS[2], ARGV[1], ARGV[2])
redis.call('PUBLISH', ARGV[5], ARGV[2])
return place
"""
)

# A create's parts, for CREATE (one step) and, on a cluster, ADMIT and MAKE (two).
CREATING = """
-- Whether a new stream of an owner is refused, and why: the idempotency record first (a create sent
-- again finds its stream, not a limit it now meets), then a full queue, the rate, the active cap.
local function refusal(active, rate, idem, now, max_active, stale_before, rate_limit, window, idem_value,
    full)
  if idem_value ~= '' then
    local prior = redis.call('GET', idem)
    if prior then
      local sid, digest = string.match(prior, '^(%S+) (%S+)$')
      if digest ~= string.match(idem_value, ' (%S+)$') then return {'conflict'} end
      return {'existing', sid}
    end
  end
  if full then return {'queue_full'} end
  if rate_limit > 0 then
    redis.call('ZREMRANGEBYSCORE', rate, '-inf', now - window)
    if redis.call('ZCARD', rate) >= rate_limit then
      local oldest = redis.call('ZRANGE', rate, 0, 0, 'WITHSCORES')
      return {'rate_limited', tostring(tonumber(oldest[2]) + window - now)}
    end
  end
  if max_active > 0 then
    redis.call('ZREMRANGEBYSCORE', active, '-inf', stale_before)
    local n = redis.call('ZCARD', active)
    if n >= max_active then return {'too_many', tostring(n)} end
  end
  return nil
end
-- The admitted stream's bookkeeping: its owner's active set and rate window, the idempotency record,
-- `created`, and the queued index (the oldest waiting stream, for `tailgate top`; a stream that
-- expired while queued, which no worker ran, is pruned from it here).
local function reserve(active, stats, rate, idem, queued, id, now, live_ttl, rate_limit, window, idem_value,
    idem_ttl)
  redis.call('ZADD', active, now, id)
  redis.call('HINCRBY', stats, 'created', 1)
  if rate_limit > 0 then
    redis.call('ZADD', rate, now, id)
    redis.call('PEXPIRE', rate, window)
  end
  if idem_value ~= '' then redis.call('SET', idem, idem_value, 'EX', idem_ttl) end
  redis.call('ZREMRANGEBYSCORE', queued, '-inf', now - live_ttl * 1000)
  redis.call('ZADD', queued, now, id)
end
-- The stream itself: its meta (status, fields from ARGV[first] on as field/value pairs, the owner
-- winning over an `owner` among them, the idempotency key if any) and its `queued` event.
local function make(events, meta, live_ttl, now, owner, idem, place, first)
  redis.call('HSET', meta, 'status', 'queued', 'attempt', 0, 'cancel', 0, 'created_at', now)
  for i = first, #ARGV, 2 do redis.call('HSET', meta, ARGV[i], ARGV[i + 1]) end
  redis.call('HSET', meta, 'owner', owner)
  if idem ~= '' then redis.call('HSET', meta, 'idempotency', idem) end
  local seq, eid = add(events, 0, 'queued', place == '' and '{}' or '{"position":' .. place .. '}', {})
  redis.call('HSET', meta, 'seq', seq, 'last_id', eid)
  redis.call('EXPIRE', events, live_ttl)
  redis.call('EXPIRE', meta, live_ttl)
end
"""

# KEYS: events, meta, active (the owner's), stats, rate (the owner's), idempotency (the rate key
# again when there is none), the queued index, and, when the queue shares this Redis, ARQ's queue,
# the job's key and the fair-share hash. ARGV: live_ttl, now, owner, max_active (0: no cap),
# active_stale_before, rate limit (0: none), rate window ms, idempotency value ('' for none: "<id>
# <digest>"), its ttl, the job (ARQ's serialized job, its expiry ms, the queue's cap, the wake-up
# channel; all '' without a queue), the place in the queue for the `queued` event (without a queue:
# the gateway's estimate; '' for none), then meta field/value pairs. Admission, creation and the
# enqueue in one step, so the caps hold under any concurrency, a refused request leaves nothing
# behind (no quota used, no idempotency record), and a created stream is queued: one round trip for
# the whole of a create. Answers 'created', the id, and the place in the queue ('' for none).
CREATE = (
    LIB
    + FAIR
    + CREATING
    + """
local id = id_of(KEYS[2])
local now = tonumber(ARGV[2])
-- First: a create re-sent after its reply was lost finds its own stream, not a limit it now meets.
if redis.call('EXISTS', KEYS[2]) == 1 then return {'id_taken'} end
local queued = #KEYS == 10
local full = queued and redis.call('ZCARD', KEYS[8]) >= tonumber(ARGV[12])
local no = refusal(KEYS[3], KEYS[5], KEYS[6], now, tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6]),
  tonumber(ARGV[7]), ARGV[8], full)
if no then return no end
local place = ARGV[14]
if queued then  -- as ARQ's enqueue_job writes a job, and the wake-up the gateway would publish
  redis.call('SET', KEYS[9], ARGV[10], 'PX', ARGV[11])
  place = tostring(fair_enqueue(KEYS[8], KEYS[10], ARGV[3], id))
  redis.call('PUBLISH', ARGV[13], id)
end
make(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[8] ~= '' and KEYS[6] or '', place, 15)
reserve(KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], id, now, tonumber(ARGV[1]), tonumber(ARGV[6]),
  tonumber(ARGV[7]), ARGV[8], ARGV[9])
return {'created', id, place}
"""
)

# On a cluster, a create's first step, on the bookkeeping's Redis: admission and its bookkeeping
# (MAKE then creates the stream on the cluster). KEYS: active, stats, rate, idempotency (the rate key
# again when none), queued index. ARGV: live_ttl, now, the stream id, max_active, active_stale_before,
# rate limit, rate window ms, idempotency value, its ttl. Sent again (its reply lost), it finds its
# own place in the active set and answers as the first did. Answers 'created', or the refusal.
ADMIT = (
    LIB
    + CREATING
    + """
local now = tonumber(ARGV[2])
if redis.call('ZSCORE', KEYS[1], ARGV[3]) then return {'created'} end
local no = refusal(KEYS[1], KEYS[3], KEYS[4], now, tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6]),
  tonumber(ARGV[7]), ARGV[8], false)
if no then return no end
reserve(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[3], now, tonumber(ARGV[1]), tonumber(ARGV[6]),
  tonumber(ARGV[7]), ARGV[8], ARGV[9])
return {'created'}
"""
)

# On a cluster, a create's second step, on the stream's slot. KEYS: events, meta. ARGV: live_ttl, now,
# owner, the idempotency key ('' for none), the place in the queue ('' for none), then meta
# field/value pairs. Answers 'created', the id and the place; 'id_taken' if sent again.
MAKE = (
    LIB
    + CREATING
    + """
if redis.call('EXISTS', KEYS[2]) == 1 then return {'id_taken'} end
make(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], 6)
return {'created', id_of(KEYS[2]), ARGV[5]}
"""
)

# KEYS: events, meta, running, stats, queued index. ARGV: active prefix, rate prefix. Also takes back
# the creation's place in the rate window and its idempotency record (if it still names this stream).
DISCARD = (
    LIB
    + """
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
local m = redis.call('HMGET', KEYS[2], 'owner', 'idempotency')
local owner = m[1] or ''
local id = id_of(KEYS[2])
redis.call('DEL', KEYS[1], KEYS[2])
book('ZREM', KEYS[3], id)
book('ZREM', KEYS[5], id)
book('ZREM', ARGV[1] .. owner, id)
book('ZREM', ARGV[2] .. owner, id)
if m[2] then book('_delif', m[2], id) end
book('HINCRBY', KEYS[4], 'created', -1)
return 1
"""
)

# KEYS: events, meta, running, stats, queued index. ARGV: channel, now, worker, stale_before, max_attempts,
# retention, active prefix, claim token ('' for none). A running stream is claimed only if its
# heartbeat is older than stale_before (its worker is gone or handed it back); past max_attempts it
# ends with `error` instead. A stream that is gone or ended leaves the running index (it may have
# expired there). A claim sent again with the token of the claim that made the stream's attempt is
# that claim: it answers the same, and writes nothing. The attempt a claim takes over ends here
# (`taken_over`; `worker_lost` when none is left), unless it was handed back (the release ended it);
# a takeover of a lost worker's stream is counted. Answers, when claimed: 'ok', attempt, seq, cancel
# flag, owner, request, created_at, and why the previous attempt ended ('' for the first, and for a
# claim sent again).
CLAIM = (
    LIB
    + """
local m = redis.call('HMGET', KEYS[2], 'status', 'seq', 'cancel', 'heartbeat', 'attempt', 'release',
  'request', 'owner', 'model', 'created_at', 'claim')
book('ZREM', KEYS[5], id_of(KEYS[2]))  -- its job left the queue, whatever the answer
if not m[1] or finished(m[1]) then
  -- Gone or ended: out of the indexes, and of its owner's active set (on a cluster a crash can leave
  -- it there: tailgate.store, "Redis Cluster").
  book('ZREM', KEYS[3], id_of(KEYS[2]))
  if m[8] then book('ZREM', ARGV[7] .. m[8], id_of(KEYS[2])) end
  return {m[1] and 'finished' or 'gone'}
end
if m[1] == 'running' and ARGV[8] ~= '' and m[11] == ARGV[8] then
  return {'ok', m[5], m[2], m[3] or '0', m[8] or '', m[7], m[10] or ARGV[2], ''}
end
if m[1] == 'running' and tonumber(m[4]) > tonumber(ARGV[4]) then return {'busy'} end
local reason = m[6] or 'worker_lost'
local attempt = tonumber(m[5]) + 1
local lines = {}
local seq, id = tonumber(m[2]), nil
if attempt > tonumber(ARGV[5]) then
  end_attempt(KEYS[2], ARGV[2], 'worker_lost', nil, m[4])
  local err = '{"code":"worker_lost","message":' .. cjson.encode(
    'the stream lost its worker ' .. m[5] .. ' times (last: ' .. reason .. '); giving up') .. '}'
  seq, id = add(KEYS[1], seq, 'error', err, lines)
  redis.call('HSET', KEYS[2], 'seq', seq, 'last_id', id, 'error', err)
  close(KEYS[1], KEYS[2], 'failed', ARGV[2], ARGV[6], KEYS[3], KEYS[4], ARGV[7] .. (m[8] or ''),
    'worker_lost')
  redis.call('PUBLISH', ARGV[1], table.concat(lines, '\\n'))
  return {'exhausted'}
end
if attempt > 1 and not m[6] then
  end_attempt(KEYS[2], ARGV[2], 'taken_over', nil, m[4])
  book('HINCRBY', KEYS[4], 'takeovers', 1)
end
local history = attempts_of(KEYS[2])
history[#history + 1] = {attempt = attempt, worker = ARGV[3], started_at = ARGV[2]}
redis.call('HSET', KEYS[2], 'attempts', cjson.encode(history))
redis.call('HSET', KEYS[2], 'attempt', attempt, 'status', 'running', 'worker', ARGV[3], 'heartbeat', ARGV[2],
  'claim', ARGV[8])
redis.call('HDEL', KEYS[2], 'release')
redis.call('HSETNX', KEYS[2], 'started_at', ARGV[2])
book('ZADD', KEYS[3], ARGV[2], id_of(KEYS[2]))
if attempt > 1 then
  seq, id = add(KEYS[1], seq, 'reset',
    '{"attempt":' .. attempt .. ',"reason":' .. cjson.encode(reason) .. '}', lines)
end
seq, id = add(KEYS[1], seq, 'started',
  '{"attempt":' .. attempt .. ',"model":' .. cjson.encode(m[9] or '') .. '}', lines)
redis.call('HSET', KEYS[2], 'seq', seq, 'last_id', id)
redis.call('PUBLISH', ARGV[1], table.concat(lines, '\\n'))
return {'ok', tostring(attempt), tostring(seq), m[3] or '0', m[8] or '', m[7], m[10] or ARGV[2],
  attempt > 1 and reason or ''}
"""
)

# KEYS: events, meta, running, stats, active (the owner's). ARGV: attempt, expected seq, maxlen (the
# length cap, in events), channel, final status or '', now, retention, extra meta field/value pairs
# count, pairs..., then event type/data pairs.
APPEND = (
    LIB
    + """
local m = redis.call('HMGET', KEYS[2], 'status', 'attempt', 'seq', 'cancel', 'first_token_attempt')
if not m[1] then return {'gone'} end
if m[2] ~= ARGV[1] then return {'fenced'} end
if finished(m[1]) then return {'finished'} end
if m[3] ~= ARGV[2] then return {'seq', m[3]} end
local seq, id = tonumber(m[3]), nil
local lines = {}
local nextra = tonumber(ARGV[8])
local first = 9 + nextra * 2
-- The length cap: a stream never grows past it silently (no trimming). A batch that would leave no
-- room for a terminal event (or, ending the stream, pass the cap) ends it with `error` instead.
local room = tonumber(ARGV[3]) - seq - (#ARGV - first + 1) / 2
if room < 0 or (room == 0 and ARGV[5] == '') then
  local err = '{"code":"stream_too_long","message":' .. cjson.encode(
    'the stream reached ' .. ARGV[3] .. ' events (TAILGATE_STREAM_MAXLEN) and was ended') .. '}'
  seq, id = add(KEYS[1], seq, 'error', err, lines)
  redis.call('HSET', KEYS[2], 'seq', seq, 'last_id', id, 'error', err)
  close(KEYS[1], KEYS[2], 'failed', ARGV[6], ARGV[7], KEYS[3], KEYS[4], KEYS[5], 'stream_too_long')
  redis.call('PUBLISH', ARGV[4], table.concat(lines, '\\n'))
  return {'too_long'}
end
for i = 9, first - 1, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
local deltas = 0
for i = first, #ARGV, 2 do
  seq, id = add(KEYS[1], seq, ARGV[i], ARGV[i + 1], lines)
  if ARGV[i] == 'delta' then deltas = deltas + 1 end
end
redis.call('HSET', KEYS[2], 'seq', seq, 'last_id', id)
-- `tokens` counts deltas (a chunk from the model each, about a token), one increment per append.
if deltas > 0 then
  book('HINCRBY', KEYS[4], 'tokens', deltas)
  if m[5] ~= ARGV[1] then  -- this attempt's first token: once per attempt
    local history = attempts_of(KEYS[2])
    if #history > 0 then
      history[#history].first_token_at = ARGV[6]
      redis.call('HSET', KEYS[2], 'attempts', cjson.encode(history))
    end
    redis.call('HSET', KEYS[2], 'first_token_attempt', ARGV[1])
  end
end
if ARGV[5] == 'failed' then
  local ok, data = pcall(cjson.decode, ARGV[#ARGV])
  local code = ok and type(data) == 'table' and type(data.code) == 'string' and data.code or nil
  close(KEYS[1], KEYS[2], ARGV[5], ARGV[6], ARGV[7], KEYS[3], KEYS[4], KEYS[5], code)
elseif ARGV[5] ~= '' then
  close(KEYS[1], KEYS[2], ARGV[5], ARGV[6], ARGV[7], KEYS[3], KEYS[4], KEYS[5])
end
redis.call('PUBLISH', ARGV[4], table.concat(lines, '\\n'))
return {'ok', tostring(seq), m[4] or '0'}
"""
)

# KEYS: meta, running. ARGV: attempt, now. Stamps the heartbeat (in the meta and the running index)
# if this attempt still owns the stream; answers its cancel flag, or why not ('gone', 'fenced',
# 'finished'). A released stream keeps its zero heartbeat, or a beat racing the hand-back would make
# it look busy to the next claim.
BEAT = (
    LIB
    + """
local m = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'cancel', 'release')
if not m[1] then return 'gone' end
if m[2] ~= ARGV[1] then return 'fenced' end
if finished(m[1]) then return 'finished' end
if not m[4] then
  redis.call('HSET', KEYS[1], 'heartbeat', ARGV[2])
  book('ZADD', KEYS[2], ARGV[2], id_of(KEYS[1]))
end
return m[3] or '0'
"""
)

# KEYS: meta, running, stats. ARGV: attempt, reason, now. Gives the stream up for another worker to
# claim at once: a zero heartbeat, in the running index too, so the takeover scan finds it if the job
# is lost. The attempt ends here (`handed_back`), and is counted.
RELEASE = (
    LIB
    + """
local m = redis.call('HMGET', KEYS[1], 'status', 'attempt')
if not m[1] then return 'gone' end
if finished(m[1]) then return 'finished' end
if m[1] ~= 'running' or m[2] ~= ARGV[1] then return 'fenced' end
redis.call('HSET', KEYS[1], 'heartbeat', 0, 'release', ARGV[2])
book('ZADD', KEYS[2], 0, id_of(KEYS[1]))
end_attempt(KEYS[1], ARGV[3], 'handed_back', nil, nil)
book('HINCRBY', KEYS[3], 'handed_back', 1)
return 'ok'
"""
)

# KEYS: events, meta, running, stats, queued index. ARGV: channel, now, retention, active prefix.
CANCEL = (
    LIB
    + """
local m = redis.call('HMGET', KEYS[2], 'status', 'seq', 'owner')
if not m[1] then return 'gone' end
if finished(m[1]) then return m[1] end
if m[1] == 'queued' then
  local lines = {}
  local seq, id = add(KEYS[1], tonumber(m[2]), 'cancelled', '{"usage":null}', lines)
  redis.call('HSET', KEYS[2], 'seq', seq, 'last_id', id, 'cancel', 1)
  book('ZREM', KEYS[5], id_of(KEYS[2]))
  close(KEYS[1], KEYS[2], 'cancelled', ARGV[2], ARGV[3], KEYS[3], KEYS[4], ARGV[4] .. (m[3] or ''))
  redis.call('PUBLISH', ARGV[1], table.concat(lines, '\\n'))
  return 'cancelled'
end
redis.call('HSET', KEYS[2], 'cancel', 1)
return m[1]
"""
)
