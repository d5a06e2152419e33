"""The benchmark's processes on the kit of ``tailgate.dev.procs``: Redis, the mock upstream, the naive
proxy, tailgate's gateway and worker, and the load client; and what the bench counts of them (CPU
time, memory, connections). :meth:`Procs.close` stops every one, on success, error and Ctrl-C alike
(and the kernel sends them SIGTERM if the bench itself dies: ``PR_SET_PDEATHSIG``)."""

from __future__ import annotations

import contextlib
import resource
import socket
import sys
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
import redis

from bench.client import LoadClient
from bench.report import ROOT
from tailgate.dev.procs import Child, RedisServer, child_env, free_port, tailgate_command, wait_until
from tailgate.dev.procs import worker_registered as registered


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to its hard limit (children inherit it): 10,000 idle
    connections need it. The limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 1 << 20)), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Procs:
    """Everything the bench runs; ``close`` stops all of it."""

    API_KEY = "tg-bench-key"
    IDLE_KEY = "tg-bench-idle-key"

    def __init__(self, log_dir: Path, redis: RedisServer | None = None, **env: str) -> None:
        """``env`` overrides the servers' environment (:meth:`env`) for every server started."""
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir, self.overrides = log_dir, env
        self.redis = redis or RedisServer(extra=["--maxclients", "20000"])
        self.children: dict[str, Child] = {}
        self.ports: dict[str, int] = {}
        self.watched: dict[str, int] = {}  # more processes whose CPU :meth:`cpu` counts, by name

    def env(self, **overrides: str) -> dict[str, str]:
        """The servers' environment: no quotas, logs at WARNING, the mock as the upstream."""
        env = {
            "TAILGATE_REDIS_URL": self.redis.url,
            "TAILGATE_API_KEYS": f"{self.API_KEY},{self.IDLE_KEY}",
            "TAILGATE_RATE_LIMIT_PER_MIN": "100000000",
            "TAILGATE_MAX_ACTIVE_PER_KEY": "100000000",
            "TAILGATE_MAX_QUEUED": "1000000",
            "TAILGATE_MAX_SSE_PER_KEY": "100000",  # the idle phase holds 10,000 streams of one key
            "TAILGATE_LOG_LEVEL": "WARNING",
            "TAILGATE_LOG_FORMAT": "text",
            # One worker must be able to run the highest level of the sustained phase (default 500).
            "TAILGATE_CONCURRENCY": "2000",
            "TAILGATE_SHUTDOWN_GRACE_S": "2",  # Ctrl-C: do not wait for streams nobody reads any more
            "OPENAI_API_KEY": "sk-bench",
            "OPENAI_BASE_URL": f"http://127.0.0.1:{self.ports.get('mock')}/v1",
            "PYTHONUNBUFFERED": "1",
        }
        return child_env(**(env | self.overrides | overrides))

    def spawn(self, name: str, argv: list[str], env: dict[str, str], ready: str = "", **kw: Any) -> Child:
        """Child ``name``; with ``ready``, once that path of its port answers 200."""
        child = self.children[name] = Child(name, argv, env, self.log_dir, own_session=True, **kw)
        if ready:
            child.wait_http(f"http://127.0.0.1:{self.ports[name]}{ready}")
        return child

    def port(self, name: str) -> str:
        """The port of ``name``: a free one, the same again if ``name`` is started again."""
        return str(self.ports.setdefault(name, free_port()))

    def start_mock(self) -> Child:
        """The mock upstream, TTFT 200 ms and tokens 20 ms apart by default (a prompt can say otherwise)."""
        argv = tailgate_command("mock-upstream", "--port", self.port("mock"))
        return self.spawn("mock", argv, child_env(), "/v1/models")

    def start_naive(self) -> Child:
        args = [sys.executable, "-m", "uvicorn", "bench.naive_proxy:app", "--app-dir", str(ROOT), "--port"]
        args += [self.port("naive"), "--log-level", "warning", "--no-access-log", "--backlog", "4096"]
        return self.spawn("naive", args, self.env(), "/openapi.json")

    def start_gateway(self, name: str = "gateway", processes: int = 1, **env: str) -> Child:
        """Gateway ``name``: ``processes`` of them on one port (``tailgate gateway --workers``), once
        each listens."""
        argv = tailgate_command("gateway", "--host", "127.0.0.1", "--port", self.port(name))
        env["TAILGATE_GATEWAY_WORKERS"] = str(processes)
        child = self.spawn(name, argv, self.env(**env), "/readyz")
        port = self.ports[name]

        def listening() -> bool:
            return sum(any(c.laddr.port == port for c in _listens(p)) for p in _tree(child.pid)) == processes

        wait_until(listening, f"{name}: {processes} processes listening", 60, child)
        return child

    def start_worker(self, name: str = "worker", processes: int = 1, **env: str) -> Child:
        """Worker ``name``: ``processes`` of them (``tailgate worker --processes``), once each has
        registered."""
        env["TAILGATE_WORKER_PROCESSES"] = str(processes)
        child = self.spawn(name, tailgate_command("worker"), self.env(**env))

        def ready() -> bool:
            pids = [p.pid for p in _tree(child.pid)[processes > 1 :]]  # not the supervisor
            return len(pids) == processes and all(registered(self.redis.url, pid) for pid in pids)

        wait_until(ready, f"{name}: {processes} processes registered", 60, child)
        return child

    def start_client(self) -> LoadClient:
        """The load client (``bench/client.py``), which the bench talks to over a socket pair."""
        ours, theirs = socket.socketpair()
        argv = [sys.executable, "-m", "bench.client", str(theirs.fileno())]
        child = self.spawn("client", argv, child_env(), pass_fds=(theirs.fileno(),))
        theirs.close()
        return LoadClient(Connection(ours.detach()), child)

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of each child (with a supervisor's processes), of Redis and of the bench
        itself; of the whole machine: time in tasks (``machine``), in interrupts (``irq``, mostly
        loopback networking) and taken by the hypervisor (``steal``). ``machine`` minus ours is what
        other processes took."""
        pids = {name: child.pid for name, child in self.children.items()}
        pids |= ({"redis": self.redis.pid} if self.redis.pid is not None else {}) | self.watched
        out = {name: sum(sum(p.cpu_times()[:2]) for p in _tree(pid)) for name, pid in pids.items()}
        out["bench"] = sum(psutil.Process().cpu_times()[:2])
        m = psutil.cpu_times()
        return out | {"machine": m.user + m.nice + m.system, "irq": m.irq + m.softirq, "steal": m.steal}

    def redis_commands(self, url: str = "") -> dict[str, int]:
        """µs Redis (the one at ``url``) has spent in each command since it started (``INFO
        commandstats``; ``evalsha`` holds the scripts)."""
        with redis.Redis.from_url(url or self.redis.url) as r:
            stats = r.info("commandstats")
        return {k.removeprefix("cmdstat_"): int(v["usec"]) for k, v in stats.items()}

    def connections(self, name: str) -> tuple[int, int]:
        """Established TCP connections of child ``name``: to Redis (its pools and the hub's pub/sub
        connection), and from clients to its port."""
        try:
            conns = psutil.Process(self.children[name].pid).net_connections(kind="tcp")
        except psutil.Error:
            return 0, 0
        up = [c for c in conns if c.status == psutil.CONN_ESTABLISHED and c.raddr]
        port = self.ports.get(name)
        return sum(c.raddr.port == self.redis.port for c in up), sum(c.laddr.port == port for c in up)

    def stop(self, name: str, *, kill: bool = False) -> None:
        self.children.pop(name).stop(15, kill=kill)

    def close(self) -> None:
        for name in reversed(list(self.children)):
            with contextlib.suppress(Exception):
                self.stop(name)
        self.redis.close()


def _tree(pid: int) -> list[psutil.Process]:
    """Process ``pid`` and its descendants (those still there)."""
    top = psutil.Process(pid)
    return [top, *top.children(recursive=True)]


def _listens(p: psutil.Process) -> list[Any]:
    try:
        return [c for c in p.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
    except psutil.Error:
        return []
