"""The tuning numbers that are not settings: pool sizes, pages, backoff, scan intervals, patience.

Each has a why-comment where its value is not obvious. Settings (``tailgate.settings``) are what an
operator changes; these are what a developer changes after measuring.
"""

from __future__ import annotations

CATCHUP_PAGE = 512  # entries per XRANGE when a reader catches up
READER_BACKLOG = 256  # live batches a slow reader may queue before it falls back to XRANGE
# While Redis is unreachable, every loop retries after 50 ms, doubling up to 2 s, plus up to 50 ms
# of jitter (tailgate.connections.ride_out).
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 2.0
# One command whose connection failed is re-sent up to 3 times, after a random 0..min(0.5 s,
# 10 ms * 2^n): enough for a dropped connection, short enough that a real outage reaches the loops.
COMMAND_RETRIES = 3
COMMAND_RETRY_BASE_S = 0.01
COMMAND_RETRY_CAP_S = 0.5
ACTIVE_STALE_S = 3600  # an entry in `active` older than job timeout + this is pruned
# Redis connections of one gateway process, however many SSE clients it serves: readers share the
# hub's pub/sub connection (a client of its own) and commands share the streams pool. A connection
# carries one command per turn of the event loop, and under a burst of new streams a turn takes
# milliseconds: with 2 connections, creates and catch-ups queued behind each other for seconds at
# 200 new streams a second. 16 keeps that queue short and the count bounded.
# The queue pool serves only the queue-depth check when the queue has a Redis of its own (on one
# Redis, the create script enqueues) and that path's enqueue transaction.
GATEWAY_STREAMS_POOL = 16
GATEWAY_QUEUE_POOL = 2
# A worker appends for hundreds of streams side by side.
WORKER_STREAMS_POOL = 64
WORKER_QUEUE_POOL = 8
# ARQ jobs only claim a stream and hand it to the worker's own supervisor, so few run at once;
# TAILGATE_CONCURRENCY bounds the streams.
WORKER_ARQ_JOBS = 64
# Asking a Sentinel where the primary is: a Sentinel that does not answer within this is skipped for
# the next one in the URL, so a dead Sentinel costs a connect timeout, not a hang.
SENTINEL_TIMEOUT_S = 1.0
# How often a worker looks for streams whose worker stopped heartbeating.
TAKEOVER_SCAN_S = 1.0
# How long a gateway's reader rides out a Redis outage before it lets its client go (to reconnect,
# elsewhere perhaps, and resume from its cursor).
OUTAGE_PATIENCE_S = 30.0
# How long the hub waits for Redis to acknowledge a sharded subscription before it asks again.
SUBSCRIBE_TIMEOUT_S = 5.0
# ARQ's own timeout for a `generate` job. The job only claims a stream (a round trip or two); the
# generation runs under the worker's supervision, bounded by TAILGATE_JOB_TIMEOUT_S.
ARQ_JOB_TIMEOUT_S = 30
# How long a job a worker took is its own (ARQ's in-progress key; ARQ's own is the job timeout plus
# 10 s). A job only claims its stream, in milliseconds; if its worker loses the queue's Redis while it
# runs (a failover that lost the job's last writes but kept the key, say), another worker runs it
# once this has passed. A second run is harmless: its claim finds the stream busy, or claims it if
# the first never did.
JOB_IN_PROGRESS_S = 5.0
# A claim that meets an unreachable Redis (or replicas that do not acknowledge it) is sent again by
# its job, recognised by its token, for up to 20 s: through a Sentinel failover, say, whose new
# primary may or may not have it. Then the job is retried every second (arq.Retry), as a new claim:
# 300 tries ride out a five-minute outage. Below ARQ_JOB_TIMEOUT_S, so ARQ never cancels a claim.
CLAIM_PATIENCE_S = 20.0
CLAIM_MAX_TRIES = 300
# Half-open client connections (the peer vanished without a FIN): TCP keepalive probes after 30 s
# of silence, every 10 s, 3 unanswered close it; data unacknowledged for 60 s closes it too.
TCP_KEEPIDLE_S = 30
TCP_KEEPINTVL_S = 10
TCP_KEEPCNT = 3
TCP_USER_TIMEOUT_MS = 60_000
# Worker shutdown, beside TAILGATE_SHUTDOWN_GRACE_S: how long it waits for claims in flight (a round
# trip each) before it counts its streams, and for handed-back streams to be released and re-enqueued.
SHUTDOWN_CLAIMS_S = 5.0
SHUTDOWN_HANDBACK_S = 10.0
# Read tokens. A token whose expiry is further ahead than TAILGATE_READ_TOKEN_TTL_S plus this is
# refused: the slack is for replicas' clocks, which NTP keeps within milliseconds of each other.
READ_TOKEN_SKEW_S = 60
# Secrets shared through Redis (no TAILGATE_SECRET or TAILGATE_OWNER_KEY): a gateway reads them again
# at least this often, so that replicas that diverged (the key was lost and created anew) converge
# within seconds; and at once when it meets a read token of a key id it does not know, but never more
# often than once per SHARED_REREAD_MIN_S, so a flood of forged tokens costs Redis one GET a second.
SHARED_RECHECK_S = 5.0
SHARED_REREAD_MIN_S = 1.0
# POST /v1/responses/{id}/cancel waits this long for a running response's worker to stop, so that it
# can answer `cancelled` as OpenAI does; past it, it answers the response still `in_progress`.
RESPONSE_CANCEL_WAIT_S = 5.0
# Metrics. A gateway reads the queue's length for /metrics at most once a second: one Redis call per
# scrape at most (Prometheus scrapes every 15 s or so), never one per request.
QUEUE_DEPTH_CACHE_S = 1.0
# Histogram buckets: a stream's wait in the queue is a few ms when workers have room and grows to
# minutes when they do not; an upstream's first token takes from ~100 ms to tens of seconds.
QUEUE_WAIT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
FIRST_TOKEN_BUCKETS_S = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 30, 60)
# `tailgate top` lists the workers heard from in the last 10 minutes: a worker that was killed never
# takes its entry out of tg:workers, and one that went silent recently is worth seeing.
TOP_FORGET_WORKER_S = 600
# A gateway's listen queue: a burst of reconnects after a replica died (every SSE client of it at
# once) waits there rather than being refused. With several processes, they share one socket.
GATEWAY_LISTEN_BACKLOG = 4096
