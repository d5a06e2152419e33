"""N copies of one process under a small supervisor, so that one pod uses its cores:
``tailgate worker --processes N`` and ``tailgate gateway --workers N``. With N = 1 there is no
supervisor: the command runs itself, as it always did.

- **Children.** Each is the command as it runs alone (``python -m tailgate worker``; ``gateway`` on
  the same port, with ``SO_REUSEPORT``: see ``gateway.server``), so each has its own Redis pools,
  worker id, hub subscription and ``TAILGATE_CONCURRENCY``. Each runs in a session of its own, so a
  terminal's Ctrl-C reaches the supervisor alone and each child gets one signal, not two; and each
  dies with the supervisor (``PR_SET_PDEATHSIG``, SIGTERM: an ordered shutdown) if that is SIGKILLed.
- **Signals.** SIGTERM or SIGINT: SIGTERM to every child, which shuts down in its own order (a
  worker finishes or hands back its streams, a gateway drains and sends its SSE clients elsewhere);
  the supervisor exits when they all have, 0 if each ended cleanly. A further signal is forwarded
  too (a gateway then skips the rest of its drain).
- **A child that exits unasked** (a bug, the OOM killer, a failed start): the supervisor SIGTERMs the
  others, waits for their ordered shutdown, and exits 1. Deliberately no restart in place: the exit
  is how the orchestrator learns of the failure and restarts the pod, with its backoff, its restart
  count and its alerts, so a crash loop stays visible; a restart in here would hide it. Nothing is
  lost meanwhile: the dead child's streams are taken over by any worker once their heartbeat is
  stale, the others hand theirs back, and SSE clients resume on another replica.
- **Metrics.** The children write theirs into one directory (``tailgate.prometheus``), which a scrape
  sums. A worker's supervisor serves that sum on ``metrics_port``; a gateway's processes serve it
  on their HTTP port.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
from types import FrameType

from tailgate import prometheus

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """SIGTERM this process when its parent goes away, however it goes: in a child before exec (a
    ``preexec_fn``), or first thing in a ``multiprocessing`` child. Linux; elsewhere nothing."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Supervisor:
    """Runs ``processes`` copies of ``argv`` with ``env`` until they have all exited (:meth:`run`)."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        processes: int,
        metrics_dir: str,
    ) -> None:
        self.name = name
        self._argv = argv
        self._env = env | {prometheus.DIR_ENV: metrics_dir}
        self._processes = processes
        self._metrics_dir = metrics_dir
        self._live: dict[int, subprocess.Popen[bytes]] = {}
        self._stopping = False
        self._failed = False

    def __repr__(self) -> str:
        return f"<Supervisor {self.name} ×{self._processes}: {sorted(self._live)} live>"

    def run(self, metrics_port: int = 0) -> int:
        """Start the children, serve their metrics' sum on ``metrics_port`` (0: not at all), forward
        signals, and wait for every child; the exit code (see the module docstring)."""
        previous = {sig: signal.signal(sig, self._signalled) for sig in SIGNALS}
        try:
            self._start()
            with prometheus.served(metrics_port, prometheus.over(self._metrics_dir)):
                self._wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        log.info("%s supervisor exits (%s)", self.name, "failed" if self._failed else "clean")
        return 1 if self._failed else 0

    def _start(self) -> None:
        # Before any thread of ours runs: a preexec_fn is only safe in a process with one thread.
        for _ in range(self._processes):
            if self._stopping:
                break  # a signal during startup: start no more
            child = subprocess.Popen(
                self._argv,
                env=self._env,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
            self._live[child.pid] = child
        log.info("%s supervisor started %d processes: %s", self.name, len(self._live), sorted(self._live))

    def _wait(self) -> None:
        """Reap each child as it exits (no polling: ``waitid`` blocks until one does); the first to
        exit unasked stops the rest."""
        while self._live:
            # WNOWAIT: learn which child exited, then let Popen reap it (and record its code).
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
            child = self._live.pop(info.si_pid, None) if info is not None else None
            if child is None:
                continue
            code = child.wait()
            prometheus.process_dead(self._metrics_dir, child.pid)
            if not self._stopping:
                log.error(
                    "%s process %d exited unasked (code %d); stopping the other %d, then exiting 1",
                    self.name,
                    child.pid,
                    code,
                    len(self._live),
                )
                self._failed = True
                self._forward()
            elif code not in (0, -signal.SIGTERM):
                log.error("%s process %d exited with code %d while stopping", self.name, child.pid, code)
                self._failed = True
            else:
                log.info("%s process %d stopped", self.name, child.pid)

    def _signalled(self, sig: int, _: FrameType | None) -> None:
        name = signal.Signals(sig).name
        log.info("%s supervisor: %s, stopping %d processes", self.name, name, len(self._live))
        self._forward()

    def _forward(self) -> None:
        self._stopping = True
        for pid in list(self._live):
            with contextlib.suppress(ProcessLookupError):  # exited; reaped by `_wait` next
                os.kill(pid, signal.SIGTERM)
