"""Prometheus metrics of several processes: what ``/metrics`` reads when one gateway or worker runs as
N processes (``tailgate gateway --workers N``, ``tailgate worker --processes N``).

prometheus_client's multiprocess mode: each process writes its metrics into files of its own in one
directory (``PROMETHEUS_MULTIPROC_DIR``, which prometheus_client reads when it is imported, so the
supervisor sets it before it starts its processes), and a scrape, served by any of them or by the
supervisor, reads them all: counters and histograms are summed; each gauge says how
(``multiprocess_mode``: ``livesum`` for what the processes hold, such as running streams and open SSE
connections, dropped with a process that died; ``mostrecent`` for a value that is the same whoever
reads it, the queue's depth). A gauge must be set, not computed when scraped (``set_function``): the
process that serves a scrape cannot call into the others.

What it does not carry: the ``process_*`` collectors (CPU, memory, file descriptors) describe one
process and are left out when N > 1; the container's own metrics (cAdvisor) cover the pod. With one
process (the default) nothing here is used: the default registry is served, as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

log = logging.getLogger(__name__)

DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
# The mode prometheus_client chose when it was imported (``prometheus_client.values``): the same read.
_SHARED = os.environ.get(DIR_ENV) or None


def registry() -> CollectorRegistry:
    """The registry a scrape of this process serves: its own, or, in multiprocess mode, the sum over
    every process writing into the shared directory."""
    return over(_SHARED) if _SHARED else REGISTRY


def over(directory: str) -> CollectorRegistry:
    """A registry that reads the metrics every process wrote into ``directory``."""
    summed = CollectorRegistry()
    MultiProcessCollector(summed, directory)  # type: ignore[no-untyped-call]
    return summed


@contextlib.contextmanager
def served(port: int, registry: CollectorRegistry) -> Iterator[None]:
    """Serve ``registry`` at ``http://<any interface>:<port>/metrics`` from a thread while the block
    runs (``port`` 0: not at all)."""
    if not port:
        yield
        return
    server, thread = start_http_server(port, registry=registry)
    log.info("metrics on http://0.0.0.0:%d/metrics", port)
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def process_dead(directory: str, pid: int) -> None:
    """Drop the ``live*`` gauges of a process that has exited (its counters stay in the sums)."""
    mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


@contextlib.contextmanager
def shared_directory(configured: str | None) -> Iterator[str]:
    """The directory the processes of one supervisor write their metrics into, emptied first.

    ``configured`` (``PROMETHEUS_MULTIPROC_DIR`` as the operator set it): used, its ``*.db`` files
    removed at start, as prometheus_client requires (a restarted container keeps an ``emptyDir``).
    Else a new directory in ``$TMPDIR``, removed on exit. A read-only root filesystem needs a writable
    volume there (``k8s/worker.yaml`` mounts an ``emptyDir`` at ``/tmp``)."""
    if configured:
        path = Path(configured)
        path.mkdir(parents=True, exist_ok=True)
        for old in path.glob("*.db"):
            old.unlink()
        yield str(path)
        return
    try:
        made = tempfile.mkdtemp(prefix="tailgate-metrics-")
    except OSError as exc:
        raise SystemExit(
            f"cannot create the metrics directory of several processes in {tempfile.gettempdir()} ({exc}):"
            f" mount a writable volume there (TMPDIR) or set {DIR_ENV} to a writable directory"
        ) from None
    try:
        yield made
    finally:
        shutil.rmtree(made, ignore_errors=True)
