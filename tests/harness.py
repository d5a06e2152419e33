"""What the tests share beyond the kit (``tailgate.dev.procs`` starts and waits for processes,
``tailgate.dev.sse`` reads SSE): a stack of gateway and worker processes on one queue and one Redis
database of its own, and what the mock upstream answers and was asked."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
import openai
import redis
from redis.asyncio import Redis, RedisCluster

from tailgate import keys
from tailgate.dev.procs import Child, RedisServer, child_env, free_port, tailgate_command, wait_until
from tailgate.dev.sse import Event, assert_exactly_once, read_sse

MODEL = "gpt-4o-mini"
# Heartbeat and takeover fast enough for a test that kills a worker (the defaults take 6 s or more).
FAST_TAKEOVER = {
    "TAILGATE_HEARTBEAT_S": "0.5",
    "TAILGATE_TAKEOVER_AFTER_S": "2",
}  # the gateway's default model, which the worker sends upstream


@dataclass
class Stack:
    """Gateways and workers sharing one environment (one Redis, one queue, one upstream). Each start
    waits until the process is ready; ``gateway`` and ``worker`` block, ``agateway`` and ``aworker``
    are for async tests."""

    env: dict[str, str]
    log_dir: Path
    api_key: str
    procs: list[Child] = field(default_factory=list)
    gateways: list[str] = field(default_factory=list)
    metrics: dict[int, str] = field(default_factory=dict)  # worker pid -> its /metrics URL

    def gateway(self, workers: int = 1, **env: str) -> str:
        """Start a gateway on a free port (``workers`` > 1: that many processes under a supervisor);
        its base URL once ``/readyz`` answers 200 and each process says it is ready."""
        port = free_port()
        more = ["--workers", str(workers)] if workers > 1 else []
        child = self._start("gateway", ["--host", "127.0.0.1", "--port", str(port), *more], env)
        url = f"http://127.0.0.1:{port}"
        child.wait_http(f"{url}/readyz")
        wait_until(
            lambda: child.log().count("gateway ready") >= workers, f"{workers} gateways ready", 30, child
        )
        self.gateways.append(url)
        return url

    def worker(self, processes: int = 1, **env: str) -> Child:
        """Start a worker (``processes`` > 1: that many under a supervisor, the child returned), with
        its metrics on a free port (:meth:`metrics_url`); the process, once each says it is ready."""
        port = free_port()
        more = ["--processes", str(processes)] if processes > 1 else []
        child = self._start("worker", ["--metrics-port", str(port), *more], env)
        self.metrics[child.pid] = f"http://127.0.0.1:{port}/metrics"
        ready = " ready (concurrency"
        wait_until(lambda: child.log().count(ready) >= processes, f"{processes} workers ready", 30, child)
        return child

    def metrics_url(self, worker: Child) -> str:
        """Where ``worker`` (started by :meth:`worker`) serves its Prometheus metrics."""
        return self.metrics[worker.pid]

    async def agateway(self, workers: int = 1, **env: str) -> str:
        return await asyncio.to_thread(self.gateway, workers, **env)

    async def aworker(self, processes: int = 1, **env: str) -> Child:
        return await asyncio.to_thread(self.worker, processes, **env)

    def _start(self, command: str, args: list[str], env: dict[str, str]) -> Child:
        child = Child(command, tailgate_command(command, *args), self.env | env, self.log_dir)
        self.procs.append(child)
        return child

    @property
    def url(self) -> str:
        return self.gateways[0]

    @property
    def redis_url(self) -> str:
        """The Redis database its processes use: where to read its streams' keys and counters."""
        return self.env["TAILGATE_REDIS_URL"]

    def redis_url_at(self, port: int) -> str:
        """Its Redis database reached on another local port (a ``FaultProxy`` in front of it)."""
        return f"redis://127.0.0.1:{port}{urlsplit(self.redis_url).path}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def close(self) -> None:
        stop_all([self])


def stop_all(stacks: Iterable[Stack]) -> None:
    """SIGTERM every process of ``stacks`` at once, then wait for each: stopping costs the slowest
    shutdown (a worker finishing its streams), not the sum of them."""
    children = [child for stack in stacks for child in stack.procs]
    for child in children:
        child.signal(signal.SIGTERM)
    for child in reversed(children):
        child.stop()


class Databases:
    """The numbered databases of one redis-server, lent one at a time (database 0 never is).

    A stack on a database of its own has its own running index, counters, worker registry, API keys
    and queue, so no other test's worker can take over its streams, and nothing it counts is another
    test's. Pub/sub is server-wide in Redis, but harmless across stacks: wake-ups go to a channel of each
    queue (stacks have queues of their own), and stream and cancel channels carry random stream ids."""

    def __init__(self, server: RedisServer, count: int) -> None:
        self._server = server
        self._free = list(range(count - 1, 0, -1))

    def lend(self) -> str:
        """An empty database's URL; no I/O, so async tests may call it."""
        if not self._free:
            raise RuntimeError("every database is lent: a test holds too many, or they are not given back")
        return f"redis://127.0.0.1:{self._server.port}/{self._free.pop()}"

    def give_back(self, url: str) -> None:
        """Empty the database (whatever used it has stopped) and lend it again. Blocking: call it
        from a fixture's teardown, not from a test."""
        with redis.Redis.from_url(url) as r:
            r.flushdb()
        self._free.append(int(urlsplit(url).path.lstrip("/")))


class Stacks:
    """Builds stacks: ``env`` (the tests' defaults) with a queue of its own and, unless given a Redis,
    a database of its own from ``databases``; :meth:`stop` stops them and gives their databases back."""

    def __init__(self, databases: Databases, env: dict[str, str], log_dir: Path, api_key: str) -> None:
        self._databases = databases
        self._env = env
        self._log_dir = log_dir
        self._api_key = api_key
        self._lent: dict[int, str] = {}  # id(stack) -> its database's URL

    def make(self, redis_url: str | None = None, **env: str) -> Stack:
        """A stack on ``redis_url`` as is, or on a database of its own; starts nothing."""
        url = redis_url or self._databases.lend()
        queue = f"tg:queue:{secrets.token_hex(4)}"
        stack = Stack(
            self._env | {"TAILGATE_REDIS_URL": url, "TAILGATE_QUEUE_NAME": queue} | env,
            self._log_dir,
            self._api_key,
        )
        if redis_url is None:
            self._lent[id(stack)] = url
        return stack

    def stop(self, stacks: list[Stack]) -> None:
        """Stop every process of ``stacks`` (all at once), then give their databases back."""
        try:
            stop_all(stacks)
        finally:
            for stack in stacks:
                url = self._lent.pop(id(stack), None)
                if url is not None:
                    self._databases.give_back(url)

    @contextlib.contextmanager
    def running(self, **env: str) -> Iterator[Stack]:
        """A stack (as :meth:`make`) that is stopped when the block ends."""
        stack = self.make(**env)
        try:
            yield stack
        finally:
            self.stop([stack])


class MakeStack(Protocol):
    """The ``make_stack`` fixture: a new stack with its own queue, on ``redis_url`` (default: a
    database of its own on the session's Redis), with ``env`` over the tests' defaults. Its processes
    stop when the test ends."""

    def __call__(self, redis_url: str | None = None, **env: str) -> Stack: ...


def start_mock(log_dir: Path, name: str, *args: str) -> tuple[Child, str]:
    """Start a mock upstream on a free port (``args`` go to ``tailgate mock-upstream``); it and its
    URL, once it answers. Whoever starts it stops it."""
    port = free_port()
    child = Child(name, tailgate_command("mock-upstream", "--port", str(port), *args), child_env(), log_dir)
    url = f"http://127.0.0.1:{port}"
    child.wait_http(f"{url}/v1/models")
    return child, url


async def expected_answer(mock_url: str, prompt: str, **kwargs: Any) -> str:
    """Ask the mock directly, with the real SDK, what it answers for this request."""
    async with openai.AsyncOpenAI(base_url=f"{mock_url}/v1", api_key="sk-test") as api:
        reply = await api.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], **kwargs
        )
    return reply.choices[0].message.content or ""


async def mock_requests(mock_url: str, prompt: str) -> list[dict[str, Any]]:
    """The streaming requests the mock served for ``prompt``, as its request log records them."""
    async with httpx.AsyncClient() as client:
        served: list[dict[str, Any]] = (await client.get(f"{mock_url}/mock/requests")).json()
    return [r for r in served if r["prompt"] == prompt and r["stream"]]


async def run_stream(client: httpx.AsyncClient, stack: Stack, prompt: str) -> list[Event]:
    """Create a stream on ``stack``'s first gateway and read it to its end: its events, each once."""
    r = await client.post(f"{stack.url}/v1/streams", json={"prompt": prompt}, headers=stack.headers)
    assert r.status_code == 202, r.text
    _, events = await read_sse(client, stack.url + r.json()["events_url"], headers=stack.headers)
    assert_exactly_once(events)
    return events


async def takeover_stack(make_stack: MakeStack) -> tuple[Stack, str]:
    """A gateway and two workers that take over fast: for a test that kills the one running its
    stream. The stack and the gateway's URL."""
    stack = make_stack(**FAST_TAKEOVER)
    url = await stack.agateway()
    await stack.aworker()
    await stack.aworker()
    return stack, url


@contextlib.asynccontextmanager
async def streams_redis(stack: Stack) -> AsyncIterator[Redis | RedisCluster]:
    """A client (strings) of the Redis that holds ``stack``'s streams: ``TAILGATE_STREAMS_REDIS_URL``
    if set, else its database; a cluster client if that URL names a node of a Redis Cluster."""
    url = stack.env.get("TAILGATE_STREAMS_REDIS_URL", stack.redis_url)
    async with Redis.from_url(url, decode_responses=True) as r:
        if (await r.info("cluster")).get("cluster_enabled") != 1:
            yield r
            return
    async with RedisCluster.from_url(url, decode_responses=True) as cluster:
        yield cluster


async def worker_of(stack: Stack, stream_id: str) -> Child:
    """The worker process of ``stack`` running the stream (a worker's id is host-pid-random)."""
    async with streams_redis(stack) as r:
        worker = await r.hget(keys.meta(stream_id), "worker")  # type: ignore[misc]
    pid = int(str(worker).rsplit("-", 2)[1])
    [child] = [c for c in stack.procs if c.pid == pid]
    return child
