"""Every Redis key and channel tailgate uses (tuning numbers live in ``tailgate.tuning``).

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
    """A hash: owner, status, attempt, seq, last_id, request, timings, usage, heartbeat, and
    ``attempts``: the attempt history, a JSON array (see ``tailgate.store``)."""
    return f"tg:{{{stream_id}}}:meta"


def notify(stream_id: str) -> str:
    """Pub/sub channel on the streams Redis: each append publishes its entries here."""
    return f"tg:{{{stream_id}}}:notify"


def stream_of(channel: str) -> str:
    """The stream id in a :func:`notify` channel name."""
    return channel[4:36]


def idempotency(owner: str, key_hash: str) -> str:
    """``<stream id> <body digest>`` of the stream an ``Idempotency-Key`` created (its hash here)."""
    return f"tg:idem:{owner}:{key_hash}"


# The store's scripts that know a stream only by its id build its owner's `active` key from this
# prefix and the owner in its meta (see tailgate.store).
ACTIVE_PREFIX = "tg:active:"


def active(owner: str) -> str:
    """Sorted set of one key's unfinished streams (score: creation ms), for the concurrency limit.
    Kept by the store's scripts: a create adds the stream, every way of ending it removes it."""
    return ACTIVE_PREFIX + owner


RATE_PREFIX = "tg:rate:"


def rate(owner: str) -> str:
    """Sorted set of one key's stream creations in the last minute (member: stream id, score: ms):
    the sliding window of the rate limit. Kept by the store's create (and discard) script."""
    return RATE_PREFIX + owner


# On the streams Redis.
# Hash: owner id -> label, the keys added by `tailgate keys add` (owner ids: tailgate.apikeys).
OWNERS = "tg:owners"
# Legacy hash: sha256(key) -> label, keys added before owner ids were keyed; each moves to OWNERS the
# first time a gateway sees it.
API_KEYS = "tg:apikeys"
# Shared through Redis only when not configured (development; see tailgate.apikeys.Secret):
SECRET = "tg:secret"  # the read-token signing secret (TAILGATE_SECRET)
OWNER_KEY = "tg:owner-key"  # the HMAC key of owner ids (TAILGATE_OWNER_KEY)
# Hash of counters for `tailgate top`, kept by the store's scripts: created (a discard takes one
# back), and completed, failed, cancelled: each stream counted once, by how it ended; failed:<code>
# by error code too; tokens (deltas written), takeovers (a lost worker's stream claimed again),
# handed_back (streams released by a worker shutting down).
STATS = "tg:stats"
# Sorted set of running streams, score: last heartbeat (ms; 0: handed back). Workers scan it for
# streams to take over. Kept by the store's scripts: claim adds, heartbeat refreshes, every end removes.
RUNNING = "tg:running"
# Sorted set of the streams waiting for their first start, score: creation ms; `tailgate top` reads
# the oldest. Kept by the store's scripts: create adds (and prunes what expired there), the claim, a
# cancel and a discard remove.
QUEUED = "tg:queued"

CANCEL_CHANNEL = "tg:cancel"  # message: a stream id whose generation must stop
WORKERS = "tg:workers"  # hash: worker id -> JSON {pid, host, running, beat_ms}

# On the streams Redis: always subscribed by the gateway's hub, so its connection exists before the
# first reader does.
HUB_CHANNEL = "tg:hub"

# Published after every write that must reach the replicas, before WAIT (TAILGATE_REPLICA_ACKS): a
# write every Redis replicates, so WAIT covers all the server had before it. Nobody subscribes.
REPLICATED = "tg:replicated"

# The ARQ job function's name.
JOB_GENERATE = "generate"


def fair(queue: str) -> str:
    """Hash beside ARQ's queue ``queue``, on its Redis: owner -> the virtual time its next job starts
    at (the owners seen since the queue last had nothing waiting: an enqueue then drops the rest);
    field ``""``: the latest virtual time given out. A job's score in the queue is its virtual
    start time, not a clock, so the queue runs its jobs fairly across owners (``scripts.FAIR``)."""
    return f"{queue}:fair"


def wake(queue: str) -> str:
    """Pub/sub channel on the queue Redis, one per queue (pub/sub spans every database of a server):
    the workers of ``queue`` listen here, so a fresh job starts without waiting for ARQ's poll. The
    message is the id of the job just enqueued, which the worker starts first."""
    return f"{queue}:wake"
