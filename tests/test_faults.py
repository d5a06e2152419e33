"""Faults: killed, paused and stopped workers, stopped gateways, a restarted Redis, cut connections,
clients that come and go, and readers that stop reading. Nothing acknowledged is lost or repeated."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from redis.asyncio import Redis

from tailgate.dev.faultproxy import FaultProxy
from tailgate.dev.procs import RedisServer, await_until
from tailgate.dev.sse import Event, Extras, assert_exactly_once, read_resuming, read_sse, text_of
from tests.harness import FAST_TAKEOVER, MakeStack, Stack, expected_answer, takeover_stack, worker_of

OUTAGE_S = 1.0  # how long Redis stays down: the scenario itself, not a wait for anything


async def create(client: httpx.AsyncClient, url: str, stack: Stack, prompt: str) -> str:
    r = await client.post(f"{url}/v1/streams", json={"prompt": prompt}, headers=stack.headers)
    assert r.status_code == 202, r.text
    return str(r.json()["events_url"])


async def meta(redis_url: str, events_url: str) -> dict[str, str]:
    """The stream's meta hash, read straight from Redis."""
    stream_id = events_url.split("/")[3]
    async with Redis.from_url(redis_url, decode_responses=True) as r:
        fields: dict[str, str] = await r.hgetall(f"tg:{{{stream_id}}}:meta")
    return fields


async def written(redis_url: str, events_urls: list[str], seq: int) -> bool:
    """Whether every one of these streams has stored its event ``seq``."""
    return all([int((await meta(redis_url, url)).get("seq", 0)) >= seq for url in events_urls])


def resets(events: list[Event]) -> list[Event]:
    return [e for e in events if e.event == "reset"]


async def test_killed_worker_is_taken_over_within_10s_and_the_client_sees_one_reset(
    client: httpx.AsyncClient, make_stack: MakeStack, mock_url: str, prompt: str
) -> None:
    s = make_stack()  # default heartbeat (2 s) and takeover (6 s)
    url = await s.agateway()
    await s.aworker()
    await s.aworker()
    prompt += " [mock:tokens=100,delay_ms=20]"
    path = await create(client, url, s, prompt)
    _, first = await read_sse(client, url + path, headers=s.headers, limit=12)

    (await worker_of(s, path.split("/")[3])).signal(signal.SIGKILL)
    killed = time.monotonic()
    rest = await read_resuming(client, [url], path, s.headers | {"Last-Event-ID": first[-1].id})
    elapsed = time.monotonic() - killed

    events = first + rest.events
    assert_exactly_once(events)
    [reset] = resets(events)
    assert reset.data["attempt"] == 2 and reset.data["reason"] == "worker_lost"
    after = events[events.index(reset) + 1]
    assert after.event == "started" and after.data["attempt"] == 2
    assert events[-1].event == "done"
    assert text_of(events) == await expected_answer(mock_url, prompt)
    assert elapsed < 10 + 100 * 0.020 + 1  # takeover bound + a whole new generation + slack


async def test_paused_worker_is_fenced_after_takeover_and_nothing_it_writes_reaches_readers(
    client: httpx.AsyncClient, make_stack: MakeStack, mock_url: str, prompt: str
) -> None:
    s, url = await takeover_stack(make_stack)
    prompt += " [mock:tokens=300,delay_ms=10]"
    path = await create(client, url, s, prompt)
    reader = asyncio.create_task(read_resuming(client, [url], path, s.headers))
    await await_until(lambda: written(s.redis_url, [path], 12), "12 events stored")

    async def taken_over() -> bool:
        return (await meta(s.redis_url, path))["attempt"] == "2"

    zombie = await worker_of(s, path.split("/")[3])
    zombie.signal(signal.SIGSTOP)
    try:
        await await_until(taken_over, "attempt 2 under another worker")
    finally:
        zombie.signal(signal.SIGCONT)  # it wakes with upstream chunks buffered and tries to append them
    events = (await reader).events

    await zombie.await_log("refused: fenced")
    assert_exactly_once(events)
    [reset] = resets(events)
    assert events[events.index(reset) + 1].data == {
        "seq": reset.data["seq"] + 1,
        "attempt": 2,
        "model": "gpt-4o-mini",
    }
    assert events[-1].event == "done"
    assert text_of(events) == await expected_answer(mock_url, prompt)


async def test_sigterm_worker_finishes_short_streams_and_hands_long_ones_back(
    client: httpx.AsyncClient, make_stack: MakeStack, mock_url: str, prompt: str
) -> None:
    s = make_stack(TAILGATE_SHUTDOWN_GRACE_S="1", **FAST_TAKEOVER)
    url = await s.agateway()
    leaving = await s.aworker()
    long_prompt, short_prompt = (
        prompt + " long [mock:tokens=300,delay_ms=10]",
        prompt + " short [mock:tokens=40,delay_ms=10]",
    )
    long_path = await create(client, url, s, long_prompt)
    short_path = await create(client, url, s, short_prompt)
    readers = [
        asyncio.create_task(read_resuming(client, [url], p, s.headers)) for p in (long_path, short_path)
    ]
    await await_until(lambda: written(s.redis_url, [short_path], 5), "5 events stored")

    leaving.signal(signal.SIGTERM)
    await s.aworker()  # the one that resumes the handed-back stream
    long_read, short_read = await asyncio.gather(*readers)
    long_events, short_events = long_read.events, short_read.events

    assert await leaving.await_exit(30) == 0
    for events, p in ((long_events, long_prompt), (short_events, short_prompt)):
        assert_exactly_once(events)
        assert events[-1].event == "done"
        assert text_of(events) == await expected_answer(mock_url, p)
    assert resets(short_events) == []  # finished within the grace period
    [reset] = resets(long_events)
    assert reset.data["reason"] == "worker_shutdown"


async def test_sigterm_gateway_drains_then_sends_readers_elsewhere_without_a_5xx(
    client: httpx.AsyncClient, make_stack: MakeStack, mock_url: str, prompt: str
) -> None:
    s = make_stack(TAILGATE_DRAIN_S="1")
    leaving, staying = await s.agateway(), await s.agateway()
    await s.aworker()
    prompt += " [mock:tokens=300,delay_ms=10]"
    path = await create(client, leaving, s, prompt)
    extras = Extras()
    reader = asyncio.create_task(read_sse(client, leaving + path, headers=s.headers, extras=extras))
    await await_until(lambda: written(s.redis_url, [path], 10), "10 events stored")

    async def not_ready() -> bool:
        return (await client.get(f"{leaving}/readyz")).status_code == 503

    gateway_proc = s.procs[0]
    gateway_proc.signal(signal.SIGTERM)
    await await_until(not_ready, "the draining gateway's /readyz answering 503", within=5)
    during = await client.post(f"{leaving}/v1/streams", json={"prompt": prompt}, headers=s.headers)
    assert during.status_code == 202  # draining: still serving, only readiness fails
    response, first = await reader

    assert response.status_code == 200
    assert extras.retries == [1000, 500]  # the stream's hint, then the shutdown's
    assert first[-1].event == "delta"  # ended without a terminal event: the client reconnects
    rest = await read_resuming(client, [staying], path, s.headers | {"Last-Event-ID": first[-1].id})
    events = first + rest.events
    assert_exactly_once(events)
    assert resets(events) == []
    assert text_of(events) == await expected_answer(mock_url, prompt)
    # An orderly shutdown; uvicorn then re-raises the SIGTERM it caught, as it does by design.
    assert await gateway_proc.await_exit(30) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in await asyncio.to_thread(gateway_proc.log)


async def test_redis_restart_mid_stream_loses_and_repeats_nothing(
    client: httpx.AsyncClient, own_redis: RedisServer, make_stack: MakeStack, mock_url: str, prompt: str
) -> None:
    s = make_stack(redis_url=own_redis.url, **FAST_TAKEOVER)
    url = await s.agateway()
    await s.aworker()
    prompts = [f"{prompt} {i} [mock:tokens=200,delay_ms=10]" for i in range(5)]
    paths = [await create(client, url, s, p) for p in prompts]
    readers = [asyncio.create_task(read_resuming(client, [url], p, s.headers)) for p in paths]
    await await_until(lambda: written(own_redis.url, paths, 10), "10 events of each stream stored")

    await own_redis.astop(kill=True)  # every acknowledged write is on disk (appendfsync always)
    await asyncio.sleep(OUTAGE_S)
    await own_redis.astart()
    results = await asyncio.gather(*readers)

    for result, p in zip(results, prompts, strict=True):
        events = result.events
        assert_exactly_once(events)
        assert events[-1].event == "done"
        assert resets(events) == []  # live workers are not taken over because Redis blinked
        assert text_of(events) == await expected_answer(mock_url, p)


async def test_cut_gateway_redis_connection_mid_stream_loses_and_repeats_nothing(
    client: httpx.AsyncClient, make_stack: MakeStack, redis_server: RedisServer, mock_url: str, prompt: str
) -> None:
    s = make_stack()
    proxy = await FaultProxy(redis_server.port).start()
    try:
        # The worker talks to Redis directly; the gateway through the proxy, which runs on this loop.
        url = await s.agateway(TAILGATE_REDIS_URL=s.redis_url_at(proxy.port))
        await s.aworker()
        prompts = [f"{prompt} {i} [mock:tokens=200,delay_ms=10]" for i in range(5)]
        paths = [await create(client, url, s, p) for p in prompts]
        readers = [asyncio.create_task(read_resuming(client, [url], p, s.headers)) for p in paths]
        await await_until(lambda: written(s.redis_url, paths, 10), "10 events of each stream stored")

        assert proxy.cut() >= 1
        await await_until(lambda: written(s.redis_url, paths, 100), "100 events of each stream stored")
        assert proxy.cut() >= 1
        results = await asyncio.gather(*readers)
    finally:
        await proxy.close()

    for result, p in zip(results, prompts, strict=True):
        events = result.events
        assert_exactly_once(events)
        assert events[-1].event == "done"
        assert text_of(events) == await expected_answer(mock_url, p)


async def test_1000_random_disconnects_alternating_gateways_lose_and_repeat_nothing(
    make_stack: MakeStack, mock_url: str, prompt: str
) -> None:
    s = make_stack()
    gateways = [await s.agateway(), await s.agateway()]
    await s.aworker()
    prompts = [f"{prompt} {i} [mock:tokens=400,delay_ms=5]" for i in range(10)]
    rng = random.Random(7)
    reconnects = 0
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0), limits=limits) as client:

        async def hop(p: str) -> list[Event]:
            nonlocal reconnects
            path = await create(client, gateways[0], s, p)
            events: list[Event] = []
            while not events or events[-1].event != "done":
                cursor = {"Last-Event-ID": events[-1].id} if events else {}
                url = gateways[reconnects % 2] + path
                reconnects += 1
                _, got = await read_sse(client, url, headers=s.headers | cursor, limit=rng.randint(1, 6))
                events += got
            return events

        results = await asyncio.gather(*(hop(p) for p in prompts))

    assert reconnects >= 1000
    for events, p in zip(results, prompts, strict=True):
        assert_exactly_once(events)
        assert text_of(events) == await expected_answer(mock_url, p)


async def test_reader_that_stops_reading_is_dropped_and_frees_its_subscription(
    client: httpx.AsyncClient, make_stack: MakeStack, prompt: str
) -> None:
    s = make_stack(TAILGATE_SEND_TIMEOUT_S="1")
    url = await s.agateway()
    await s.aworker()
    path = await create(client, url, s, prompt + " [mock:tokens=20000,delay_ms=0]")

    async def gauge(name: str) -> float:
        for line in (await client.get(f"{url}/metrics")).text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"no {name} in /metrics")

    async def gauge_is(name: str, value: float) -> bool:
        return await gauge(name) == value

    assert await gauge("tailgate_hub_readers") == 0
    loop = asyncio.get_running_loop()
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.setblocking(False)
    host, port = url.removeprefix("http://").split(":")
    auth = s.headers["Authorization"]
    try:
        await loop.sock_connect(stalled, (host, int(port)))
        request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {auth}\r\n\r\n"
        await loop.sock_sendall(stalled, request.encode())
        await await_until(lambda: gauge_is("tailgate_hub_readers", 1), "one hub reader")
        await await_until(lambda: gauge_is("tailgate_hub_readers", 0), "reader dropped (send timeout)")
        await await_until(lambda: gauge_is("tailgate_hub_subscriptions", 0), "no hub subscription")
    finally:
        stalled.close()

    # Generation went on without it; its client can still resume, and everyone else gets it all.
    _, events = await read_sse(client, url + path, headers=s.headers)
    assert events[-1].event == "done"
    assert_exactly_once(events)
    assert len([e for e in events if e.event == "delta"]) == 20000


@pytest.fixture(autouse=True)
def _no_stopped_children() -> Iterator[None]:
    """A test that SIGSTOPs a worker must not leave it stopped for the fixtures' teardown."""
    yield
    for pid in _stopped_pids():
        os.kill(pid, signal.SIGCONT)


def _stopped_pids() -> list[int]:
    out: list[int] = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] == "T" and int(fields[1]) == os.getpid():
                out.append(int(entry))
    return out
