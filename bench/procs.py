"""The benchmark's processes on the kit of ``tailgate.dev.procs``: Redis, the mock upstream, the naive
proxy, tailgate's gateway and worker, and the load client; and what the bench counts of them (CPU
time, memory, connections). :meth:`Procs.close` stops every one, on success, error and Ctrl-C alike
(and the kernel sends them SIGTERM if the bench itself dies: ``PR_SET_PDEATHSIG``)."""

from __future__ import annotations

import contextlib
import resource
import sys
from pathlib import Path

import psutil  # type: ignore[import-untyped]

from bench.client import LoadClient
from tailgate.dev.procs import Child, RedisServer, child_env, free_port, tailgate_command, wait_until
from tailgate.dev.procs import worker_registered as registered

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def raise_fd_limit() -> int:
    """Raise this process's open-file limit (children inherit it): 10,000 idle connections need it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in (65536, hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, soft), max(want, hard)))
            return max(want, soft)
    return soft


def connections(pid: int, redis_port: int, listen_port: int = 0) -> tuple[int, int]:
    """Established TCP connections of process ``pid``: to Redis (its pools and the hub's pub/sub
    connection), and from clients to ``listen_port``."""
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return 0, 0
    up = [c for c in conns if c.status == psutil.CONN_ESTABLISHED and c.raddr]
    return sum(c.raddr.port == redis_port for c in up), sum(c.laddr.port == listen_port for c in up)


class Procs:
    """Everything the bench runs; ``close`` stops all of it."""

    API_KEY = "tg-bench-key"
    IDLE_KEY = "tg-bench-idle-key"

    def __init__(self, log_dir: Path, redis: RedisServer | None = None, **env: str) -> None:
        """``env`` overrides the servers' environment (:meth:`env`) for every server started."""
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.redis = redis or RedisServer(extra=["--maxclients", "20000"])
        self.overrides = env
        self.children: dict[str, Child] = {}
        self.ports: dict[str, int] = {}
        self.client: LoadClient | None = None

    def env(self, **overrides: str) -> dict[str, str]:
        """The servers' environment: no quotas, logs at WARNING, the mock as the upstream."""
        env = {
            "TAILGATE_REDIS_URL": self.redis.url,
            "TAILGATE_API_KEYS": f"{self.API_KEY},{self.IDLE_KEY}",
            "TAILGATE_RATE_LIMIT_PER_MIN": "100000000",
            "TAILGATE_MAX_ACTIVE_PER_KEY": "100000000",
            "TAILGATE_MAX_QUEUED": "1000000",
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

    def _start(self, name: str, argv: list[str], env: dict[str, str], ready: str = "") -> Child:
        child = self.children[name] = Child(name, argv, env, self.log_dir, own_session=True)
        if ready:
            child.wait_http(f"http://127.0.0.1:{self.ports[name]}{ready}")
        return child

    def start_redis(self) -> RedisServer:
        self.ports["redis"] = self.redis.start().port
        return self.redis

    def start_mock(self) -> Child:
        port = self.ports["mock"] = free_port()
        args = [
            "mock-upstream",
            "--port",
            str(port),
            "--tokens",
            "64",
            "--delay-ms",
            "20",
            "--ttft-ms",
            "200",
        ]
        return self._start("mock", tailgate_command(*args), child_env(), "/v1/models")

    def start_naive(self) -> Child:
        port = self.ports["naive"] = free_port()
        args = [sys.executable, "-m", "uvicorn", "bench.naive_proxy:app", "--app-dir", str(ROOT)]
        args += ["--port", str(port), "--log-level", "warning", "--no-access-log", "--backlog", "4096"]
        return self._start("naive", args, self.env(), "/openapi.json")

    def start_gateway(self, name: str = "gateway", **env: str) -> Child:
        """A gateway; started again under the same name, on the same port."""
        port = self.ports.setdefault(name, free_port())
        argv = tailgate_command("gateway", "--host", "127.0.0.1", "--port", str(port))
        return self._start(name, argv, self.env(**env), "/readyz")

    def start_worker(self, name: str = "worker") -> Child:
        child = self._start(name, tailgate_command("worker"), self.env())
        wait_until(lambda: registered(self.redis.url, child.pid), f"{name}: registered", 60, child)
        return child

    def start_client(self) -> LoadClient:
        self.client = LoadClient(self.log_dir / "client.log")
        return self.client

    def stop(self, name: str, *, kill: bool = False) -> None:
        self.children.pop(name).stop(15, kill=kill)

    def close(self) -> None:
        if self.client is not None:
            self.client.stop()
        for name in reversed(list(self.children)):
            with contextlib.suppress(Exception):
                self.stop(name)
        self.redis.close()
