"""Logging, configured once at each entry point: one JSON object per line in production, readable
lines in ``tailgate dev``; each retry of a loop riding out an outage logged with its cause."""

from __future__ import annotations

import json
import logging
import sys
import time

from stamina import instrumentation


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure(fmt: str, level: str, name: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {name:<8} %(levelname)-5s %(message)s", "%H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # stamina's own log line of a retry keeps its details in fields that neither format prints: this
    # one in its place (and its Prometheus counter, stamina_retries_total, as by default).
    instrumentation.set_on_retry_hooks([instrumentation.PrometheusOnRetryHook, _log_retry])
    # ARQ logs a line per job start and end; that is our own log's job, once.
    logging.getLogger("arq").setLevel(max(logging.WARNING, root.level))


def _log_retry(details: instrumentation.RetryDetails) -> None:
    logging.getLogger("stamina").warning(
        "stamina.retry_scheduled: %s, try %d in %.2f s (%.1f s so far) after %r",
        details.name,
        details.retry_num,
        details.wait_for,
        details.waited_so_far,
        details.caused_by,
    )
