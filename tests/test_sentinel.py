"""Redis Sentinel, all real: a primary, a replica that copies it, and ``redis-sentinel`` processes that
watch them; gateway, workers and the command line on a ``redis+sentinel://`` URL for the queue and
the streams, with ``TAILGATE_REPLICA_ACKS=1`` (``tailgate.replication``).

The failover tests SIGKILL the primary under a steady load of streams and bring it back as a replica
of the one the Sentinels promoted. What they hold tailgate to is what a client can check: every
stream whose create was acknowledged (202) ends, every ``seq`` arrives once, the text is the model's,
and streams created after the failover run as usual. One of them first cuts the replica off, so that
the primary dies holding writes the replica never got: the window that asynchronous replication
leaves, made wide enough to hit every time. Another makes the failover outlast the takeover period
(without replica acknowledgements: what it tests is the takeover scan), and no stream may be taken
from its live worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from tailgate import keys
from tailgate.connections import open_client
from tailgate.dev.mock_upstream import tokens_for
from tailgate.dev.procs import (
    RedisServer,
    SentinelServer,
    arun,
    await_until,
    free_port,
    sentinel_url,
    tailgate_command,
    wait_until,
    worker_registered,
)
from tailgate.dev.sse import Resumed, assert_exactly_once, exactly_once_problems, read_resuming, text_of
from tests.harness import FAST_TAKEOVER, MODEL, MakeStack, Stack, expected_answer

REPLICATED = {"TAILGATE_REPLICA_ACKS": "1", "TAILGATE_REPLICA_ACK_TIMEOUT_MS": "250"}
TOKENS = 30  # per stream, 20 ms apart: a stream runs ~0.6 s, so a dozen are in flight at any time
PACE_S = 0.05  # between creates


@dataclass
class Watched:
    """A primary, its replica and the Sentinels that watch them."""

    primary: RedisServer
    replica: RedisServer
    sentinels: list[SentinelServer]

    def url(self, db: int = 0) -> str:
        return sentinel_url(self.sentinels, db)

    def named_primary(self, port: int) -> bool:
        """Whether every Sentinel names the Redis on ``port`` as the primary."""
        return all(s.primary() == port for s in self.sentinels)


def watch(count: int, down_after_ms: int = 500) -> Iterator[Watched]:
    primary = RedisServer().start()
    replica = RedisServer(replica_of=primary.port).start()
    sentinels: list[SentinelServer] = []
    quorum = count // 2 + 1
    try:
        wait_until(replica.linked, "the replica synced with the primary")
        sentinels += [
            SentinelServer(primary.port, quorum=quorum, down_after_ms=down_after_ms).start()
            for _ in range(count)
        ]
        # Each knows the replica, and the other Sentinels, before anything depends on a failover.
        wait_until(lambda: all(s.knows(1, count - 1) for s in sentinels), "the Sentinels know each other")
        yield Watched(primary, replica, sentinels)
    finally:
        for s in sentinels:
            s.close()
        replica.close()
        primary.close()


@pytest.fixture
def watched() -> Iterator[Watched]:
    """One Sentinel: enough to find the primary."""
    yield from watch(1)


@pytest.fixture
def watched_by_three() -> Iterator[Watched]:
    """Three Sentinels with a quorum of two, as a deployment runs them."""
    yield from watch(3)


@pytest.fixture
def watched_slowly() -> Iterator[Watched]:
    """One Sentinel that waits 3 s before it calls the primary down: a failover longer than the
    takeover period of ``FAST_TAKEOVER``."""
    yield from watch(1, down_after_ms=3000)


async def test_a_sentinel_url_serves_streams_and_the_command_line(
    watched: Watched, make_stack: MakeStack, mock_url: str, prompt: str
) -> None:
    dead = free_port()  # a Sentinel listed first that is not there: the next one is asked
    url = watched.url(db=2).replace("://", f"://127.0.0.1:{dead},", 1)
    s = make_stack(redis_url=url, **REPLICATED)
    gateway = await s.agateway()
    worker = await s.aworker()

    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.post(f"{gateway}/v1/streams", json={"prompt": prompt}, headers=s.headers)
        assert r.status_code == 202, r.text
        result = await read_resuming(client, [gateway], r.json()["events_url"], s.headers, deadline_s=30)
    assert_exactly_once(result.events)
    assert result.events[-1].event == "done"
    assert text_of(result.events) == await expected_answer(mock_url, prompt)

    # The stream is in database 2 of the primary, and on the replica.
    for server in (watched.primary, watched.replica):
        async with open_client(f"redis://127.0.0.1:{server.port}/2", "test") as redis:
            assert await redis.hget(keys.meta(r.json()["id"]), "status") == "completed"  # type: ignore[misc]

    # The command line and the dev kit take the same URL.
    added = await arun(tailgate_command("keys", "add", "sentinel-label"), s.env)
    assert added.returncode == 0, added.stderr
    listed = await arun(tailgate_command("keys", "list"), s.env)
    assert "sentinel-label" in listed.stdout, listed.stderr
    top = await arun(tailgate_command("top", "--once"), s.env)
    assert re.search(r"completed\s+1\b", top.stdout), top.stdout + top.stderr
    assert re.search(r"^workers 1$", top.stdout, re.M), top.stdout
    assert await asyncio.to_thread(worker_registered, url, worker.pid)


@dataclass
class Load:
    """Streams created one after another, each followed by a reader of its own until it ends."""

    client: httpx.AsyncClient
    gateway: str
    stack: Stack
    prompt: str
    acknowledged: dict[str, float] = field(default_factory=dict)  # stream id -> when its 202 came
    prompts: dict[str, str] = field(default_factory=dict)
    readers: dict[str, asyncio.Task[Resumed]] = field(default_factory=dict)
    ended: dict[str, float] = field(default_factory=dict)  # stream id -> when its reader stopped
    refused: list[int] = field(default_factory=list)  # what creates got instead of a 202 (0: no answer)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            prompt = f"{self.prompt} {i} [mock:tokens={TOKENS},delay_ms=20]"
            i += 1
            try:
                r = await self.client.post(
                    f"{self.gateway}/v1/streams", json={"prompt": prompt}, headers=self.stack.headers
                )
            except httpx.TransportError:
                self.refused.append(0)
                continue
            if r.status_code != 202:
                self.refused.append(r.status_code)
            else:
                stream_id = r.json()["id"]
                self.acknowledged[stream_id] = time.monotonic()
                self.prompts[stream_id] = prompt
                self.readers[stream_id] = asyncio.create_task(self.follow(stream_id, r.json()["events_url"]))
            await asyncio.sleep(PACE_S)

    async def follow(self, stream_id: str, events_url: str) -> Resumed:
        """The stream read to its end; a stream that does not end within 30 s is a problem (an open
        SSE response only waits)."""
        try:
            async with asyncio.timeout(30):
                return await read_resuming(self.client, [self.gateway], events_url, self.stack.headers)
        finally:
            self.ended[stream_id] = time.monotonic()

    @property
    def answered(self) -> int:
        return len(self.acknowledged) + len(self.refused)

    def since(self, t: float) -> list[str]:
        return [sid for sid, at in self.acknowledged.items() if at > t]

    def spanning(self, t: float) -> list[str]:
        """The streams acknowledged before ``t`` whose reader ended after it."""
        return [sid for sid, at in self.acknowledged.items() if at < t < self.ended[sid]]

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Creates streams (:meth:`run`) while the block runs."""
        driver = asyncio.create_task(self.run())
        try:
            yield
        finally:
            self.stop.set()
            await driver

    async def outcome(self) -> dict[str, Resumed]:
        """What each reader got, once all have ended; the test fails if any client saw something
        wrong: a reader that failed, a ``seq`` not exactly once, an end other than ``done``, a text
        other than the model's."""
        ended = await asyncio.gather(*self.readers.values(), return_exceptions=True)
        results: dict[str, Resumed] = {}
        problems = []
        for stream_id, result in zip(self.readers, ended, strict=True):
            if isinstance(result, BaseException):
                problems.append(f"{stream_id}: {result!r}")
                continue
            results[stream_id] = result
            events = result.events
            problems += [f"{stream_id}: {p}" for p in exactly_once_problems(events)]
            messages = [{"role": "user", "content": self.prompts[stream_id]}]
            expected = "".join(tokens_for(MODEL, messages, TOKENS))
            if events and events[-1].event == "done" and text_of(events) != expected:
                problems.append(f"{stream_id}: the text is not the model's")
            elif events and events[-1].event != "done":
                problems.append(f"{stream_id}: ended with {events[-1].event} {events[-1].data}")
        assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:20])
        return results

    def assert_as_usual_since(self, results: dict[str, Resumed], t: float) -> None:
        """The streams created after ``t`` ran as usual: no reset (nothing taken over), and followed
        live (~0.6 s of tokens), not found by a reader's idle look (``TAILGATE_PING_S``)."""
        for stream_id in self.since(t):
            assert "reset" not in [e.event for e in results[stream_id].events], stream_id
            assert self.ended[stream_id] - self.acknowledged[stream_id] < 5, stream_id


@pytest.fixture
async def load_client() -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0), limits=limits) as client:
        yield client


async def listening(port: int, subscribers: dict[str, int]) -> bool:
    """Whether the Redis on ``port`` has these subscribers on these channels."""
    async with open_client(f"redis://127.0.0.1:{port}", "test") as redis:
        return dict(await redis.pubsub_numsub(*subscribers)) == subscribers


async def replication_offset(port: int) -> int:
    async with open_client(f"redis://127.0.0.1:{port}", "test") as redis:
        return int((await redis.info("replication"))["master_repl_offset"])


async def disconnect(replica: RedisServer) -> None:
    """Disconnect the replica from its primary and keep it away: a wrong password for the primary
    (which has none) fails its handshake."""
    async with open_client(f"redis://127.0.0.1:{replica.port}", "test") as redis:
        await redis.config_set("masterauth", "not-the-password")
        await redis.client_kill_filter(_type="master")


async def cut_off(replica: RedisServer, primary: RedisServer) -> None:
    """:func:`disconnect` the replica, then wait until the primary has written more than the
    replica has: writes that, without WAIT, a client would be told are done."""
    await disconnect(replica)
    behind = await replication_offset(replica.port)

    async def ahead() -> bool:
        return await replication_offset(primary.port) > behind + 4096

    await await_until(ahead, "the primary 4 KiB ahead of its replica")


async def reconnectable(replica: RedisServer) -> None:
    async with open_client(f"redis://127.0.0.1:{replica.port}", "test") as redis:
        await redis.config_set("masterauth", "")


@pytest.mark.parametrize("cut", [False, True], ids=["replica_in_sync", "replica_cut_off_before"])
async def test_primary_killed_mid_load_loses_no_acknowledged_stream_or_event(
    watched_by_three: Watched, make_stack: MakeStack, load_client: httpx.AsyncClient, prompt: str, cut: bool
) -> None:
    w = watched_by_three
    s = make_stack(redis_url=w.url(), **REPLICATED)
    gateway = await s.agateway()
    await s.aworker()
    await s.aworker()
    load = Load(load_client, gateway, s, prompt)
    async with load.running():
        await await_until(lambda: len(load.acknowledged) >= 20, "20 streams created")
        if cut:
            await cut_off(w.replica, w.primary)
            answered = load.answered
            await await_until(lambda: load.answered >= answered + 3, "3 creates answered while cut off")
        await w.primary.astop(kill=True)
        killed = time.monotonic()
        await await_until(
            lambda: w.named_primary(w.replica.port), "the replica promoted", within=30, blocking=True
        )
        if cut:
            await reconnectable(w.replica)
        # The old primary comes back as a replica of the new one (writes wait for a replica).
        w.primary.replica_of = w.replica.port
        await w.primary.astart()
        await await_until(w.primary.linked, "the old primary synced as a replica", blocking=True)
        rejoined = time.monotonic()
        await await_until(lambda: len(load.since(rejoined)) >= 15, "15 streams created after the failover")
    results = await load.outcome()

    # The kill came mid-load: streams acknowledged before it ended after it.
    assert len(load.spanning(killed)) >= 3, load.spanning(killed)
    # After the failover, streams run as usual: no reset, nothing taken over.
    load.assert_as_usual_since(results, rejoined)
    # Every listener subscribed again on the new primary: the gateway's hub, each worker's wake-up
    # and cancel channels.
    await await_until(
        lambda: listening(
            w.replica.port,
            {keys.HUB_CHANNEL: 1, keys.wake(s.env["TAILGATE_QUEUE_NAME"]): 2, keys.CANCEL_CHANNEL: 2},
        ),
        "listeners on the new primary",
    )
    if cut:
        # Creates were refused (503) while the replica was cut off, not acknowledged and lost.
        assert 503 in load.refused, load.refused


async def test_failover_longer_than_the_takeover_period_takes_no_stream_from_a_live_worker(
    watched_slowly: Watched, make_stack: MakeStack, client: httpx.AsyncClient, prompt: str
) -> None:
    w = watched_slowly
    s = make_stack(redis_url=w.url(), **FAST_TAKEOVER)  # stale after 2 s
    gateway = await s.agateway()
    await s.aworker()
    await s.aworker()  # the one that would take the stream over
    prompt += " [mock:tokens=400,delay_ms=20]"
    r = await client.post(f"{gateway}/v1/streams", json={"prompt": prompt}, headers=s.headers)
    assert r.status_code == 202, r.text
    reader = asyncio.create_task(
        read_resuming(client, [gateway], r.json()["events_url"], s.headers, deadline_s=40)
    )

    async def running() -> bool:
        async with open_client(f"redis://127.0.0.1:{w.primary.port}", "test") as redis:
            return int(await redis.hget(keys.meta(r.json()["id"]), "seq") or 0) >= 10  # type: ignore[misc]

    await await_until(running, "the stream running")
    await w.primary.astop(kill=True)
    killed = time.monotonic()
    await await_until(
        lambda: w.named_primary(w.replica.port), "the replica promoted", within=30, blocking=True
    )
    assert time.monotonic() - killed > 2  # every heartbeat on the new primary looks stale
    w.primary.replica_of = w.replica.port
    await w.primary.astart()
    result = await reader

    assert_exactly_once(result.events)
    assert [e.event for e in result.events if e.event == "reset"] == []
    assert result.events[-1].event == "done"
    expected = "".join(tokens_for(MODEL, [{"role": "user", "content": prompt}], 400))
    assert text_of(result.events) == expected


async def test_while_no_replica_acknowledges_a_create_gets_503_and_leaves_nothing(
    watched: Watched, make_stack: MakeStack, client: httpx.AsyncClient
) -> None:
    s = make_stack(redis_url=watched.url(), **REPLICATED)
    gateway = await s.agateway()
    await disconnect(watched.replica)

    refused = await client.post(f"{gateway}/v1/streams", json={"prompt": "hi"}, headers=s.headers)

    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "unavailable"
    assert refused.headers["retry-after"] == "1"
    async with open_client(f"redis://127.0.0.1:{watched.primary.port}", "test") as redis:
        assert [k async for k in redis.scan_iter("tg:{*")] == []  # the create was taken back
        assert int(await redis.hget(keys.STATS, "created") or 0) == 0  # type: ignore[misc]
        assert [k async for k in redis.scan_iter(keys.ACTIVE_PREFIX + "*")] == []

    await reconnectable(watched.replica)
    await await_until(watched.replica.linked, "the replica back", blocking=True)
    accepted = await client.post(f"{gateway}/v1/streams", json={"prompt": "hi"}, headers=s.headers)
    assert accepted.status_code == 202, accepted.text
