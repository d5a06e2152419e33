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
  redis.call('ZREM', running, id)
  redis.call('ZREM', active, id)
  redis.call('HINCRBY', stats, status, 1)
  if status == 'failed' then redis.call('HINCRBY', stats, 'failed:' .. (code or 'unknown'), 1) end
end
"""

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

# KEYS: events, meta, active (the owner's), stats, rate (the owner's), idempotency (the rate key
# again when there is none), the queued index, and, when the queue shares this Redis, ARQ's queue,
# the job's key and the fair-share hash. ARGV: live_ttl, now, owner, max_active (0: no cap),
# active_stale_before, rate limit (0: none), rate window ms, idempotency value ('' for none: "<id>
# <digest>"), its ttl, the job (ARQ's serialized job, its expiry ms, the queue's cap, the wake-up
# channel; all '' without a queue), the place in the queue for the `queued` event (without a queue:
# the gateway's estimate; '' for none), then meta field/value pairs (the owner argument wins over an
# `owner` among them). Admission, creation and the enqueue in one step, so the caps hold under any
# concurrency, a refused request leaves nothing behind (no quota used, no idempotency record), and a
# created stream is queued: one round trip for the whole of a create. Answers 'created', the id, and
# the place in the queue ('' for none).
CREATE = (
    LIB
    + FAIR
    + """
local id = id_of(KEYS[2])
local now = tonumber(ARGV[2])
-- First: a create re-sent after its reply was lost finds its own stream, not a limit it now meets.
if redis.call('EXISTS', KEYS[2]) == 1 then return {'id_taken'} end
if ARGV[8] ~= '' then
  local prior = redis.call('GET', KEYS[6])
  if prior then
    local sid, digest = string.match(prior, '^(%S+) (%S+)$')
    if digest ~= string.match(ARGV[8], ' (%S+)$') then return {'conflict'} end
    return {'existing', sid}
  end
end
local queued = #KEYS == 10
if queued and redis.call('ZCARD', KEYS[8]) >= tonumber(ARGV[12]) then
  return {'queue_full'}
end
if tonumber(ARGV[6]) > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now - tonumber(ARGV[7]))
  if redis.call('ZCARD', KEYS[5]) >= tonumber(ARGV[6]) then
    local oldest = redis.call('ZRANGE', KEYS[5], 0, 0, 'WITHSCORES')
    return {'rate_limited', tostring(tonumber(oldest[2]) + tonumber(ARGV[7]) - now)}
  end
end
if tonumber(ARGV[4]) > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[5])
  local active = redis.call('ZCARD', KEYS[3])
  if active >= tonumber(ARGV[4]) then return {'too_many', tostring(active)} end
end
redis.call('HSET', KEYS[2], 'status', 'queued', 'attempt', 0, 'cancel', 0, 'created_at', ARGV[2])
for i = 15, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('HSET', KEYS[2], 'owner', ARGV[3])
local place = ARGV[14]
if queued then  -- as ARQ's enqueue_job writes a job, and the wake-up the gateway would publish
  redis.call('SET', KEYS[9], ARGV[10], 'PX', ARGV[11])
  place = tostring(fair_enqueue(KEYS[8], KEYS[10], ARGV[3], id))
  redis.call('PUBLISH', ARGV[13], id)
end
local seq, eid = add(KEYS[1], 0, 'queued', place == '' and '{}' or '{"position":' .. place .. '}', {})
redis.call('HSET', KEYS[2], 'seq', seq, 'last_id', eid)
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], id)
redis.call('HINCRBY', KEYS[4], 'created', 1)
if tonumber(ARGV[6]) > 0 then
  redis.call('ZADD', KEYS[5], ARGV[2], id)
  redis.call('PEXPIRE', KEYS[5], ARGV[7])
end
if ARGV[8] ~= '' then
  redis.call('SET', KEYS[6], ARGV[8], 'EX', ARGV[9])
  redis.call('HSET', KEYS[2], 'idempotency', KEYS[6])
end
-- The queued index: the oldest waiting stream, for `tailgate top`. A stream that expired while
-- queued (no worker ran it) leaves it here.
redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', now - tonumber(ARGV[1]) * 1000)
redis.call('ZADD', KEYS[7], now, id)
return {'created', id, place}
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
redis.call('ZREM', KEYS[3], id)
redis.call('ZREM', KEYS[5], id)
redis.call('ZREM', ARGV[1] .. owner, id)
redis.call('ZREM', ARGV[2] .. owner, id)
if m[2] then
  local prior = redis.call('GET', m[2])
  if prior and string.sub(prior, 1, #id + 1) == id .. ' ' then redis.call('DEL', m[2]) end
end
redis.call('HINCRBY', KEYS[4], 'created', -1)
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
redis.call('ZREM', KEYS[5], id_of(KEYS[2]))  -- its job left the queue, whatever the answer
if not m[1] or finished(m[1]) then
  redis.call('ZREM', KEYS[3], id_of(KEYS[2]))
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
  redis.call('HINCRBY', KEYS[4], 'takeovers', 1)
end
local history = attempts_of(KEYS[2])
history[#history + 1] = {attempt = attempt, worker = ARGV[3], started_at = ARGV[2]}
redis.call('HSET', KEYS[2], 'attempts', cjson.encode(history))
redis.call('HSET', KEYS[2], 'attempt', attempt, 'status', 'running', 'worker', ARGV[3], 'heartbeat', ARGV[2],
  'claim', ARGV[8])
redis.call('HDEL', KEYS[2], 'release')
redis.call('HSETNX', KEYS[2], 'started_at', ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[2], id_of(KEYS[2]))
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
  redis.call('HINCRBY', KEYS[4], 'tokens', deltas)
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
  redis.call('ZADD', KEYS[2], ARGV[2], id_of(KEYS[1]))
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
redis.call('ZADD', KEYS[2], 0, id_of(KEYS[1]))
end_attempt(KEYS[1], ARGV[3], 'handed_back', nil, nil)
redis.call('HINCRBY', KEYS[3], 'handed_back', 1)
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
  redis.call('ZREM', KEYS[5], id_of(KEYS[2]))
  close(KEYS[1], KEYS[2], 'cancelled', ARGV[2], ARGV[3], KEYS[3], KEYS[4], ARGV[4] .. (m[3] or ''))
  redis.call('PUBLISH', ARGV[1], table.concat(lines, '\\n'))
  return 'cancelled'
end
redis.call('HSET', KEYS[2], 'cancel', 1)
return m[1]
"""
)
