"""Faults: killed, paused and stopped workers, stopped gateways, a restarted Redis, cut connections,
clients that come and go, and readers that stop reading. Nothing acknowledged is lost or repeated."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import time

import httpx
import pytest
import redis

from tailgate.dev.faultproxy import FaultProxy
from tailgate.dev.procs import RedisServer
from tests.harness import (
    Proc,
    Stack,
    assert_exactly_once,
    expected_answer,
    read_resuming,
    read_sse,
    text_of,
)

FAST_TAKEOVER = {"TAILGATE_HEARTBEAT_S": "0.5", "TAILGATE_TAKEOVER_AFTER_S": "2"}


async def create(client: httpx.AsyncClient, url: str, stack: Stack, prompt: str) -> str:
    r = await client.post(f"{url}/v1/streams", json={"prompt": prompt}, headers=stack.headers)
    assert r.status_code == 202, r.text
    return str(r.json()["events_url"])


def meta(redis_url: str, events_url: str) -> dict[str, str]:
    stream_id = events_url.split("/")[3]
    with redis.Redis.from_url(redis_url, decode_responses=True) as r:
        return r.hgetall(f"tg:{{{stream_id}}}:meta")  # type: ignore[return-value]


def owner(stack: Stack, redis_url: str, events_url: str) -> Proc:
    """The worker process running the stream (its id is host-pid-random)."""
    pid = int(meta(redis_url, events_url)["worker"].rsplit("-", 2)[1])
    [proc] = [p for p in stack.procs if p.popen.pid == pid]
    return proc


async def until(predicate, within_s: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + within_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


def resets(events) -> list:  # type: ignore[no-untyped-def]
    return [e for e in events if e.event == "reset"]


async def test_killed_worker_is_taken_over_within_10s_and_the_client_sees_one_reset(
    client, make_stack, redis_server, mock_url, prompt
):
    s = make_stack()  # default heartbeat (2 s) and takeover (6 s)
    url = s.gateway()
    s.worker()
    s.worker()
    prompt += " [mock:tokens=100,delay_ms=20]"
    path = await create(client, url, s, prompt)
    _, first = await read_sse(client, url + path, headers=s.headers, limit=12)

    owner(s, redis_server.url, path).signal(signal.SIGKILL)
    killed = time.monotonic()
    events, _ = await read_resuming(client, [url], path, s.headers | {"Last-Event-ID": first[-1].id})
    elapsed = time.monotonic() - killed

    events = first + events
    assert_exactly_once(events)
    [reset] = resets(events)
    assert reset.data["attempt"] == 2 and reset.data["reason"] == "worker_lost"
    after = events[events.index(reset) + 1]
    assert after.event == "started" and after.data["attempt"] == 2
    assert events[-1].event == "done"
    assert text_of(events) == await expected_answer(mock_url, prompt)
    assert elapsed < 10 + 100 * 0.020 + 1  # takeover bound + a whole new generation + slack


async def test_paused_worker_is_fenced_after_takeover_and_nothing_it_writes_reaches_readers(
    client, make_stack, redis_server, mock_url, prompt
):
    s = make_stack(**FAST_TAKEOVER)
    url = s.gateway()
    s.worker()
    s.worker()
    prompt += " [mock:tokens=300,delay_ms=10]"
    path = await create(client, url, s, prompt)
    reader = asyncio.create_task(read_resuming(client, [url], path, s.headers))
    await until(lambda: int(meta(redis_server.url, path).get("seq", 0)) >= 12)

    zombie = owner(s, redis_server.url, path)
    zombie.signal(signal.SIGSTOP)
    try:
        await until(lambda: meta(redis_server.url, path)["attempt"] == "2")
    finally:
        zombie.signal(signal.SIGCONT)  # it wakes with upstream chunks buffered and tries to append them
    events, _ = await reader

    zombie.wait_for_log("refused: fenced")
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
    client, make_stack, redis_server, mock_url, prompt
):
    s = make_stack(TAILGATE_SHUTDOWN_GRACE_S="1", **FAST_TAKEOVER)
    url = s.gateway()
    leaving = s.worker()
    long_prompt, short_prompt = (
        prompt + " long [mock:tokens=300,delay_ms=10]",
        prompt + " short [mock:tokens=40,delay_ms=10]",
    )
    long_path = await create(client, url, s, long_prompt)
    short_path = await create(client, url, s, short_prompt)
    readers = [
        asyncio.create_task(read_resuming(client, [url], p, s.headers)) for p in (long_path, short_path)
    ]
    await until(lambda: int(meta(redis_server.url, short_path).get("seq", 0)) >= 5)

    leaving.signal(signal.SIGTERM)
    s.worker()  # the one that resumes the handed-back stream
    (long_events, _), (short_events, _) = await asyncio.gather(*readers)

    assert leaving.popen.wait(30) == 0
    for events, p in ((long_events, long_prompt), (short_events, short_prompt)):
        assert_exactly_once(events)
        assert events[-1].event == "done"
        assert text_of(events) == await expected_answer(mock_url, p)
    assert resets(short_events) == []  # finished within the grace period
    [reset] = resets(long_events)
    assert reset.data["reason"] == "worker_shutdown"


async def test_sigterm_gateway_drains_then_sends_readers_elsewhere_without_a_5xx(
    client, make_stack, redis_server, mock_url, prompt
):
    s = make_stack(TAILGATE_DRAIN_S="1")
    leaving, staying = s.gateway(), s.gateway()
    s.worker()
    prompt += " [mock:tokens=300,delay_ms=10]"
    path = await create(client, leaving, s, prompt)
    hints: list[str] = []
    reader = asyncio.create_task(read_sse(client, leaving + path, headers=s.headers, retries=hints))
    await until(lambda: int(meta(redis_server.url, path).get("seq", 0)) >= 10)

    gateway_proc = s.procs[0]
    gateway_proc.signal(signal.SIGTERM)
    await until(lambda: httpx.get(f"{leaving}/readyz").status_code == 503, within_s=5)
    during = await client.post(f"{leaving}/v1/streams", json={"prompt": prompt}, headers=s.headers)
    assert during.status_code == 202  # draining: still serving, only readiness fails
    response, first = await reader

    assert response.status_code == 200
    assert hints == ["500"]
    assert first[-1].event == "delta"  # ended without a terminal event: the client reconnects
    rest, _ = await read_resuming(client, [staying], path, s.headers | {"Last-Event-ID": first[-1].id})
    events = first + rest
    assert_exactly_once(events)
    assert resets(events) == []
    assert text_of(events) == await expected_answer(mock_url, prompt)
    # An orderly shutdown; uvicorn then re-raises the SIGTERM it caught, as it does by design.
    assert gateway_proc.popen.wait(30) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in gateway_proc.log()


async def test_redis_restart_mid_stream_loses_and_repeats_nothing(client, make_stack, mock_url, prompt):
    with RedisServer(appendonly=True) as server:
        s = make_stack(redis_url=server.url, **FAST_TAKEOVER)
        url = s.gateway()
        s.worker()
        prompts = [f"{prompt} {i} [mock:tokens=200,delay_ms=10]" for i in range(5)]
        paths = [await create(client, url, s, p) for p in prompts]
        readers = [asyncio.create_task(read_resuming(client, [url], p, s.headers)) for p in paths]
        await until(lambda: all(int(meta(server.url, p).get("seq", 0)) >= 10 for p in paths))

        server.stop(kill=True)  # every acknowledged write is on disk (appendfsync always)
        await asyncio.sleep(1.0)  # the outage itself
        server.start()
        results = await asyncio.gather(*readers)

        for (events, _), p in zip(results, prompts, strict=True):
            assert_exactly_once(events)
            assert events[-1].event == "done"
            assert resets(events) == []  # live workers are not taken over because Redis blinked
            assert text_of(events) == await expected_answer(mock_url, p)


async def test_cut_gateway_redis_connection_mid_stream_loses_and_repeats_nothing(
    client, make_stack, redis_server, mock_url, prompt
):
    proxy = await FaultProxy(redis_server.port).start()
    try:
        s = make_stack()
        # The worker talks to Redis directly. (In a thread: the proxy runs on this event loop.)
        url = await asyncio.to_thread(s.gateway, TAILGATE_REDIS_URL=proxy.url)
        s.worker()
        prompts = [f"{prompt} {i} [mock:tokens=200,delay_ms=10]" for i in range(5)]
        paths = [await create(client, url, s, p) for p in prompts]
        readers = [asyncio.create_task(read_resuming(client, [url], p, s.headers)) for p in paths]
        await until(lambda: all(int(meta(redis_server.url, p).get("seq", 0)) >= 10 for p in paths))

        assert proxy.cut() >= 1
        await until(lambda: all(int(meta(redis_server.url, p).get("seq", 0)) >= 100 for p in paths))
        assert proxy.cut() >= 1
        results = await asyncio.gather(*readers)
    finally:
        await proxy.close()

    for (events, _), p in zip(results, prompts, strict=True):
        assert_exactly_once(events)
        assert events[-1].event == "done"
        assert text_of(events) == await expected_answer(mock_url, p)


async def test_1000_random_disconnects_alternating_gateways_lose_and_repeat_nothing(
    make_stack, mock_url, prompt
):
    s = make_stack()
    gateways = [s.gateway(), s.gateway()]
    s.worker()
    prompts = [f"{prompt} {i} [mock:tokens=400,delay_ms=5]" for i in range(10)]
    rng = random.Random(7)
    reconnects = 0
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0), limits=limits) as client:

        async def hop(p: str) -> list:  # type: ignore[type-arg]
            nonlocal reconnects
            path = await create(client, gateways[0], s, p)
            events: list = []  # type: ignore[type-arg]
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


async def test_reader_that_stops_reading_is_dropped_and_frees_its_subscription(client, make_stack, prompt):
    s = make_stack(TAILGATE_SEND_TIMEOUT_S="1")
    url = s.gateway()
    s.worker()
    path = await create(client, url, s, prompt + " [mock:tokens=20000,delay_ms=0]")

    def gauge(name: str) -> float:
        for line in httpx.get(f"{url}/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"no {name} in /metrics")

    assert gauge("tailgate_hub_readers") == 0
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    host, port = url.removeprefix("http://").split(":")
    stalled.connect((host, int(port)))
    auth = s.headers["Authorization"]
    stalled.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {auth}\r\n\r\n".encode())
    try:
        await until(lambda: gauge("tailgate_hub_readers") == 1)
        await until(lambda: gauge("tailgate_hub_readers") == 0)  # dropped after the send timeout
        await until(lambda: gauge("tailgate_hub_subscriptions") == 0)
    finally:
        stalled.close()

    # Generation went on without it; its client can still resume, and everyone else gets it all.
    _, events = await read_sse(client, url + path, headers=s.headers)
    assert events[-1].event == "done"
    assert_exactly_once(events)
    assert len([e for e in events if e.event == "delta"]) == 20000


@pytest.fixture(autouse=True)
def _no_stopped_children():
    """A test that SIGSTOPs a worker must not leave it stopped for the fixtures' teardown."""
    yield
    for pid in _stopped_pids():
        os.kill(pid, signal.SIGCONT)


def _stopped_pids() -> list[int]:
    out = []
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
