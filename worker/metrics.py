"""The worker's Prometheus metrics, served on ``http://<host>:<TAILGATE_METRICS_PORT>/metrics``
(``tailgate worker --metrics-port P``, by ``worker.runner``) beside the process collectors; with
``--processes N``, by the supervisor, summed over the processes (``tailgate.prometheus``).

Every label set is bounded, so a worker exports a fixed number of series: ``outcome`` is one of
three, ``code`` one of :data:`ERROR_CODES` (``""`` unless the outcome is ``error``), and a takeover's
``reason`` one of :data:`TAKEOVER_REASONS`; anything else would be a bug and counts as ``other``.

What counts where, and what it costs: a claim observes the queue wait (first attempts only: a
takeover's wait would include the attempts before it) and counts a takeover (later attempts); the
first delta of an attempt observes the upstream's first token; an applied append batch adds its
deltas to the tokens in one increment; an attempt that wrote its stream's terminal event counts it
finished, as does a claim that gave an exhausted stream up (``worker_lost``). A stream cancelled
while still queued ends in a gateway, so no worker counts it.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram

from tailgate import tuning
from worker import upstream

log = logging.getLogger(__name__)

OUTCOMES = ("done", "error", "cancelled")
# Every `code` of an `error` event a worker writes: the upstream's, the generation timeout, the
# length cap (written by the append script) and the last lost worker (written by the claim script).
ERROR_CODES = (*upstream.CODES, "generation_timeout", "stream_too_long", "worker_lost")
# Why the attempt before a takeover ended: its worker stopped heartbeating, or handed it back.
TAKEOVER_REASONS = ("worker_lost", "worker_shutdown")
OTHER = "other"

QUEUE_WAIT = Histogram(
    "tailgate_stream_queue_wait_seconds",
    "Stream created -> first claimed by a worker (the gateway's clock, then the worker's)",
    buckets=tuning.QUEUE_WAIT_BUCKETS_S,
)
FIRST_TOKEN = Histogram(
    "tailgate_upstream_first_token_seconds",
    "Upstream request sent -> first text delta, per attempt",
    buckets=tuning.FIRST_TOKEN_BUCKETS_S,
)
FINISHED = Counter(
    "tailgate_streams_finished_total",
    "Streams this worker ended, by terminal event; code: the error's code, '' for done and cancelled",
    ["outcome", "code"],
)
TOKENS = Counter("tailgate_tokens_total", "Text deltas (upstream chunks, about a token each) appended")
TAKEOVERS = Counter(
    "tailgate_takeovers_total", "Streams this worker claimed again after another attempt", ["reason"]
)
# Set as attempts start and end (worker.job), not read when scraped: with several processes, the
# supervisor serves the sum of what the live ones set (tailgate.prometheus).
RUNNING = Gauge("tailgate_streams_running", "Attempts running on this worker", multiprocess_mode="livesum")

# Every series exists from the start, at zero: a rate() or an alert sees the first increment.
FINISHED.labels("done", "")
FINISHED.labels("cancelled", "")
for _code in (*ERROR_CODES, OTHER):
    FINISHED.labels("error", _code)
for _reason in (*TAKEOVER_REASONS, OTHER):
    TAKEOVERS.labels(_reason)


def bounded(value: str, allowed: tuple[str, ...]) -> str:
    """``value`` as a label: one of ``allowed``, else ``other``."""
    return value if value in allowed else OTHER


def finished(outcome: str, code: str = "") -> None:
    """Count one stream ended with the terminal event ``outcome`` (``error``: with ``code``)."""
    FINISHED.labels(outcome, bounded(code, ERROR_CODES) if outcome == "error" else "").inc()


def taken_over(reason: str) -> None:
    TAKEOVERS.labels(bounded(reason, TAKEOVER_REASONS)).inc()
