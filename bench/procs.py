"""The benchmark's processes: Redis, the mock upstream, the naive proxy, tailgate's gateway and worker,
and the load client; their CPU time, memory and Redis connections. Every child is started here and
stopped by :meth:`Procs.close`, which ``python -m bench`` runs on success, error and Ctrl-C alike (and
children get SIGTERM from the kernel if the bench itself dies: ``PR_SET_PDEATHSIG``)."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import queue
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, cast

import psutil  # type: ignore[import-untyped]
import redis

from tailgate import keys
from tailgate.dev.procs import free_port, redis_binary, stop_process

ROOT = Path(__file__).resolve().parent.parent


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the bench process goes away, however it goes."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def raise_fd_limit() -> int:
    """Raise this process's open-file limit (children inherit it): 10,000 idle connections need it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in (65536, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, soft), max(want, hard)))
            return max(want, soft)
        except (ValueError, OSError):
            continue
    return soft


class Child:
    """One child process with its output in a log file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            args,
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the bench only; it stops the children in order
            preexec_fn=_die_with_parent,
        )
        self.proc = psutil.Process(self.popen.pid)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, n: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def check(self) -> None:
        if self.popen.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}")

    def cpu_s(self) -> float:
        t = self.proc.cpu_times()
        return float(t.user + t.system)

    def rss(self) -> int:
        return int(self.proc.memory_info().rss)

    def stop(self, timeout: float = 15.0) -> None:
        stop_process(self.popen, timeout)
        self._log.close()


class Client:
    """The load client (``bench.client``) as a child; one JSON command, one JSON answer."""

    def __init__(self, log_dir: Path) -> None:
        self._log = (log_dir / "client.log").open("wb")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "bench.client"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self._lines: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self._lines.put(line)
        self._lines.put(b"")

    def send(self, cmd: dict[str, Any]) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(json.dumps(cmd).encode() + b"\n")
        self.popen.stdin.flush()

    def wait(self, timeout: float, every: float = 0.25, tick: Any = None) -> dict[str, Any]:
        """The answer to the last command; ``tick()`` is called every ``every`` seconds meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=every)
            except queue.Empty:
                if tick is not None:
                    tick()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the load client did not answer within {timeout:.0f}s") from None
                continue
            if not line:
                raise RuntimeError(f"the load client exited ({self.popen.poll()})")
            out: dict[str, Any] = json.loads(line)
            if "error" in out:
                raise RuntimeError(f"the load client failed: {out['error']}")
            return out

    def call(self, cmd: dict[str, Any], timeout: float, tick: Any = None) -> dict[str, Any]:
        self.send(cmd)
        return self.wait(timeout, tick=tick)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()  # it may be in the middle of a command: no polite "quit"
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()


def _wait_http(url: str, child: Child, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        child.check()
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{child.name}: {url} not ready within {timeout:.0f}s:\n{child.tail()}")
        time.sleep(0.05)


def _wait_registered(child: Child, r: redis.Redis, timeout: float = 60.0) -> None:
    """A worker is up once its heartbeat has registered it (its "ready" line is INFO, and the bench
    runs the workers at WARNING)."""
    deadline = time.monotonic() + timeout
    while True:
        child.check()
        workers = cast(dict[str, str], r.hgetall(keys.WORKERS))
        if any(json.loads(v).get("pid") == child.pid for v in workers.values()):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{child.name}: not registered within {timeout:.0f}s:\n{child.tail()}")
        time.sleep(0.05)


class Procs:
    """Everything the bench runs; ``close`` stops all of it."""

    API_KEY = "tg-bench-key"
    IDLE_KEY = "tg-bench-idle-key"

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.children: list[Child] = []
        self.redis: Child | None = None
        self.redis_dir = tempfile.TemporaryDirectory(prefix="tailgate-bench-redis-")
        self.client: Client | None = None
        self.ports: dict[str, int] = {}
        self.env: dict[str, str] = {}

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> Child:
        child = Child(name, args, env, self.log_dir)
        self.children.append(child)
        return child

    def start_redis(self) -> Child:
        """A redis-server like ``tailgate.embedded.RedisServer`` (no persistence), but a :class:`Child`
        so that it too goes away with the bench."""
        port = self.ports["redis"] = free_port()
        args = [
            redis_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        args += ["--dir", self.redis_dir.name, "--maxclients", "20000"]
        self.redis = self._spawn("redis", args, dict(os.environ))
        deadline = time.monotonic() + 10
        while True:
            self.redis.check()
            with contextlib.suppress(redis.RedisError):
                if self.redis_client().ping():
                    return self.redis
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server did not answer on port {port}:\n{self.redis.tail()}")
            time.sleep(0.05)

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.ports['redis']}/0"

    def base_env(self) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("TAILGATE_", "OPENAI_"))}
        return keep | {
            "TAILGATE_REDIS_URL": self.redis_url,
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
            "OPENAI_BASE_URL": f"http://127.0.0.1:{self.ports['mock']}/v1",
            "PYTHONUNBUFFERED": "1",
        }

    def start_mock(self) -> Child:
        port = self.ports["mock"] = free_port()
        args = ["--tokens", "64", "--delay-ms", "20", "--ttft-ms", "200"]
        cmd = [sys.executable, "-m", "tailgate", "mock-upstream", "--port", str(port), *args]
        child = self._spawn("mock", cmd, dict(os.environ))
        _wait_http(f"http://127.0.0.1:{port}/v1/models", child)
        return child

    def start_naive(self) -> Child:
        port = self.ports["naive"] = free_port()
        args = [sys.executable, "-m", "uvicorn", "bench.naive_proxy:app", "--host", "127.0.0.1"]
        args += ["--port", str(port), "--log-level", "warning", "--no-access-log", "--backlog", "4096"]
        child = self._spawn("naive", args, self.base_env())
        _wait_http(f"http://127.0.0.1:{port}/openapi.json", child)
        return child

    def start_gateway(self, name: str = "gateway", **env: str) -> Child:
        port = self.ports[name] = free_port()
        args = [sys.executable, "-m", "tailgate", "gateway", "--host", "127.0.0.1", "--port", str(port)]
        child = self._spawn(name, args, self.base_env() | env)
        _wait_http(f"http://127.0.0.1:{port}/readyz", child)
        return child

    def start_worker(self, **env: str) -> Child:
        child = self._spawn("worker", [sys.executable, "-m", "tailgate", "worker"], self.base_env() | env)
        _wait_registered(child, self.redis_client())
        return child

    def redis_client(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, decode_responses=True)

    def start_client(self) -> Client:
        self.client = Client(self.log_dir)
        return self.client

    def stop(self, child: Child) -> None:
        child.stop()
        if child in self.children:
            self.children.remove(child)

    def close(self) -> None:
        if self.client is not None:
            self.client.stop()
            self.client = None
        for child in reversed(self.children):
            with contextlib.suppress(Exception):
                child.stop()
        self.children.clear()
        self.redis = None
        self.redis_dir.cleanup()


def redis_connections(child: Child, redis_port: int) -> int:
    """TCP connections from this process to Redis (its pools plus the hub's pub/sub connection)."""
    return sum(
        1
        for c in child.proc.net_connections(kind="tcp")
        if c.raddr and c.raddr.port == redis_port and c.status == psutil.CONN_ESTABLISHED
    )
