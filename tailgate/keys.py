"""Every Redis key and channel tailgate uses, and the tuning numbers that are not settings.

One stream's keys share a hash tag (``{<id>}``) so that a Redis Cluster keeps them in one slot and a
script can touch both atomically.
"""

from __future__ import annotations

import re

# Stream ids: 128 random bits as hex. Anything else in a path is a 404 without a Redis round trip.
STREAM_ID_RE = re.compile(r"^[0-9a-f]{32}$")


def events(stream_id: str) -> str:
    """The Redis Stream of one answer's events."""
    return f"tg:{{{stream_id}}}:events"


def meta(stream_id: str) -> str:
    """A hash: owner, status, attempt, seq, last_id, request, timings, usage, heartbeat."""
    return f"tg:{{{stream_id}}}:meta"


def notify(stream_id: str) -> str:
    """Pub/sub channel on the streams Redis: each append publishes its entries here."""
    return f"tg:{{{stream_id}}}:notify"


def stream_of(channel: str) -> str:
    """The stream id in a :func:`notify` channel name."""
    return channel[4:36]


def idempotency(owner: str, key_hash: str) -> str:
    return f"tg:idem:{owner}:{key_hash}"


def active(owner: str) -> str:
    """Sorted set of one key's unfinished streams (score: creation ms), for the concurrency limit."""
    return f"tg:active:{owner}"


def rate(owner: str, minute: int) -> str:
    return f"tg:rate:{owner}:{minute}"


# On the streams Redis.
API_KEYS = "tg:apikeys"  # hash: sha256(key) -> label; keys added by `tailgate keys add`
SECRET = "tg:secret"  # read-token signing secret shared by every replica when none is configured
STATS = "tg:stats"  # hash of counters: created, completed, failed, cancelled
# Sorted set of running streams, score: last heartbeat (ms). Workers scan it for streams to take over.
RUNNING = "tg:running"

# On the queue Redis: the worker listens here, so a fresh job starts without waiting for ARQ's poll.
WAKE_CHANNEL = "tg:wake"
CANCEL_CHANNEL = "tg:cancel"  # message: a stream id whose generation must stop
WORKERS = "tg:workers"  # hash: worker id -> JSON {pid, host, running, beat_ms}

# The ARQ job function's name.
JOB_GENERATE = "generate"

# Tuning.
CATCHUP_PAGE = 512  # entries per XRANGE when a reader catches up
READER_BACKLOG = 256  # live batches a slow reader may queue before it falls back to XRANGE
# While Redis is unreachable, every loop retries after 50 ms, doubling up to 2 s.
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 2.0
ACTIVE_STALE_S = 3600  # an entry in `active` older than job timeout + this is pruned
# Redis connections of one gateway process, however many SSE clients it serves: readers share the
# hub's pub/sub connection (taken from the streams pool) and commands share the rest; at most 4.
# One queue connection enqueues a few thousand jobs a second (ARQ's enqueue is a WATCH transaction).
GATEWAY_STREAMS_POOL = 3
GATEWAY_QUEUE_POOL = 1
# A worker appends for hundreds of streams side by side.
WORKER_STREAMS_POOL = 64
WORKER_QUEUE_POOL = 8
# ARQ jobs only claim a stream and hand it to the worker's own supervisor, so few run at once;
# TAILGATE_CONCURRENCY bounds the streams.
WORKER_ARQ_JOBS = 64
# How often a worker looks for streams whose worker stopped heartbeating.
TAKEOVER_SCAN_S = 1.0
