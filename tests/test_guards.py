"""Guards that only matter when something goes wrong at the wrong moment (issue #9), each with a test
that fails without it. The append's replay guards are tested in ``tests/test_store.py`` (a reply lost
on its way back, through the worker's appender); here, with real processes:

- the takeover scan waits after Redis restarted, so a live worker that reconnects late keeps its
  stream (``worker.runner._scan``);
- a gateway's reader that hears nothing for ``TAILGATE_PING_S`` reads the stream anyway, so an
  event whose pub/sub message was lost still reaches it (``gateway.hub``);
- a worker started while Redis is down rides the outage out instead of shutting down
  (``worker.runner._listen``'s first subscription).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncGenerator

import httpx
import pytest
from arq.connections import ArqRedis
from redis.asyncio import Redis
from sse_starlette.sse import SendTimeoutError
from starlette.types import Message

from gateway import sse
from gateway.hub import Batch, Tailed
from tailgate import keys
from tailgate.dev.faultproxy import FaultProxy
from tailgate.dev.procs import RedisServer, await_until
from tailgate.dev.sse import assert_exactly_once, events, read_resuming, read_sse, text_of
from tailgate.events import Entry
from tests.harness import MakeStack, Stack, expected_answer
from worker.job import takeover

TAKEOVER_AFTER_S = 3.0
# Redis stays down longer than the takeover period, so every heartbeat is stale when it is back.
OUTAGE_S = TAKEOVER_AFTER_S + 1
# The running worker's own path to Redis comes back this long after Redis does (a reconnect
# backoff, a slow network): later than the other worker's takeover would land without the guard (its
# first scan within ~1 s; its loops, backing off, pick the job up within ~2 s), well before the scan's
# wait ends (1.5 takeover periods: 4.5 s; the running worker heartbeats within 0.5 s of coming back).
LATE_S = 3.0


async def create(client: httpx.AsyncClient, stack: Stack, url: str, prompt: str) -> str:
    r = await client.post(f"{url}/v1/streams", json={"prompt": prompt}, headers=stack.headers)
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


async def test_a_live_worker_reconnecting_late_after_a_redis_restart_keeps_its_stream(
    client: httpx.AsyncClient, own_redis: RedisServer, make_stack: MakeStack, mock_url: str, prompt: str
) -> None:
    s = make_stack(
        redis_url=own_redis.url, TAILGATE_HEARTBEAT_S="0.5", TAILGATE_TAKEOVER_AFTER_S=str(TAKEOVER_AFTER_S)
    )
    # Still generating when its worker is back and heartbeating (~8.5 s in): an attempt that is
    # finishing is not heartbeated, and its `done` could wait out the appender's backoff.
    prompt += " [mock:tokens=1000,delay_ms=10]"
    proxy = await FaultProxy(own_redis.port).start()
    try:
        url = await s.agateway()
        await s.aworker(TAILGATE_REDIS_URL=s.redis_url_at(proxy.port))  # the one that runs the stream
        stream_id = await create(client, s, url, prompt)
        path = f"/v1/streams/{stream_id}/events"
        reader = asyncio.create_task(read_resuming(client, [url], path, s.headers))
        scanner = await s.aworker()  # idle, on Redis directly: it would take the stream over
        async with Redis.from_url(s.redis_url, decode_responses=True) as r:

            async def running() -> bool:
                return int(await r.hget(keys.meta(stream_id), "seq") or 0) >= 10

            async def both_listening() -> bool:
                # The scanner's wake-up subscription is in place (made after its "ready"; a worker
                # whose first subscribe meets a dead Redis stops), so it can pick up a takeover job.
                [(_, listeners)] = await r.pubsub_numsub(keys.wake(s.env["TAILGATE_QUEUE_NAME"]))
                return int(listeners) == 2

            await await_until(running, "10 events stored")
            await await_until(both_listening, "both workers subscribed to wake-ups")

        proxy.refuse()
        await own_redis.astop(kill=True)
        await asyncio.sleep(OUTAGE_S)
        await own_redis.astart()
        async with Redis.from_url(s.redis_url, decode_responses=True) as r:
            beat = await r.zscore(keys.RUNNING, stream_id)
        assert beat is not None and time.time() * 1000 - beat > TAKEOVER_AFTER_S * 1000  # looks stale
        await asyncio.sleep(LATE_S)
        proxy.accept()
        got = (await reader).events
    finally:
        await proxy.close()

    assert not scanner.exited()  # it was there to take the stream over, and did not
    assert_exactly_once(got)
    assert [e for e in got if e.event == "reset"] == []
    assert got[-1].event == "done"
    assert text_of(got) == await expected_answer(mock_url, prompt)
    async with Redis.from_url(s.redis_url, decode_responses=True) as r:
        assert await r.hget(keys.meta(stream_id), "attempt") == "1"


async def test_an_event_whose_notification_was_lost_reaches_the_reader_at_its_idle_check(
    client: httpx.AsyncClient, make_stack: MakeStack
) -> None:
    s = make_stack(TAILGATE_PING_S="0.3")  # the gateway's idle check
    url = await s.agateway()  # no worker: the test writes the stream
    stream_id = await create(client, s, url, "hi")
    async with client.stream("GET", f"{url}/v1/streams/{stream_id}/events", headers=s.headers) as response:
        received = events(response)
        first = await anext(received)
        assert (first.event, first.data) == ("queued", {"seq": 1, "position": 1})
        # Entries as the append script writes them, without its PUBLISH: nobody tells the gateway.
        async with Redis.from_url(s.redis_url, decode_responses=True) as r:
            await r.xadd(keys.events(stream_id), {"t": "delta", "d": '{"seq":2,"text":"lost"}'})
            await r.xadd(keys.events(stream_id), {"t": "done", "d": '{"seq":3,"finish_reason":"stop"}'})
        rest: list[tuple[str, dict[str, object]]] = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):  # many idle checks; without them, it would wait for ever
                rest += [(e.event, e.data) async for e in received]

    assert rest == [("delta", {"seq": 2, "text": "lost"}), ("done", {"seq": 3, "finish_reason": "stop"})]


async def test_a_worker_started_while_redis_is_down_waits_for_it_and_then_serves(
    client: httpx.AsyncClient, own_redis: RedisServer, make_stack: MakeStack, mock_url: str, prompt: str
) -> None:
    s = make_stack(redis_url=own_redis.url)
    url = await s.agateway()
    await own_redis.astop()
    before = len(s.procs)
    ready = asyncio.create_task(s.aworker())  # "ready" once Redis answers (is it a cluster?)
    await await_until(lambda: len(s.procs) > before, "the worker to start")
    worker = s.procs[-1]
    # It is retrying (stamina logs each retry), not shutting down.
    await worker.await_log("stamina.retry_scheduled")
    assert worker.popen.poll() is None
    await own_redis.astart()
    assert await ready is worker
    stream_id = await create(client, s, url, prompt)
    resumed = await read_resuming(client, [url], f"/v1/streams/{stream_id}/events", s.headers)
    assert_exactly_once(resumed.events)
    assert text_of(resumed.events) == await expected_answer(mock_url, prompt)


async def test_a_takeover_job_for_a_stream_this_worker_runs_is_dropped_not_claimed(
    client: httpx.AsyncClient, make_stack: MakeStack, mock_url: str, prompt: str
) -> None:
    # As when this worker's heartbeats failed for a while (Redis unreachable) but its attempt lives:
    # another worker's scan saw the heartbeat stale and enqueued a takeover that reached this worker.
    s = make_stack()
    url = await s.agateway()
    await s.aworker()
    prompt += " [mock:tokens=150,delay_ms=20]"
    stream_id = await create(client, s, url, prompt)
    async with Redis.from_url(s.redis_url) as r, ArqRedis.from_url(s.redis_url) as queue:
        async with client.stream("GET", f"{url}/v1/streams/{stream_id}/events", headers=s.headers) as resp:
            async for event in events(resp):
                if event.event == "delta":
                    break
        await r.hset(keys.meta(stream_id), "heartbeat", 0)  # stale, as the scan saw it
        await takeover(queue, s.env["TAILGATE_QUEUE_NAME"], stream_id, "stale-0")
        _, got = await read_sse(client, f"{url}/v1/streams/{stream_id}/events", headers=s.headers)
    assert [e.event for e in got if e.event in ("reset", "started")] == ["started"]
    assert got[-1].event == "done" and got[-1].data["usage"]["completion_tokens"] == 150
    assert_exactly_once(got)
    assert text_of(got) == await expected_answer(mock_url, prompt)


async def test_a_send_blocked_past_the_send_timeout_ends_the_response_and_its_reader() -> None:
    # A client that stops reading blocks the server's send once the socket's buffers are full, which
    # on loopback takes megabytes; the response is driven directly here, its send blocking at once.
    closed = asyncio.Event()

    async def tailed() -> AsyncGenerator[Tailed, None]:
        try:
            for n in itertools.count(1):
                yield Batch([Entry(f"{n}-0", "delta", f'{{"seq":{n},"text":"x"}}', n)])
        finally:
            closed.set()  # the hub's subscription is released here

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)
        if len(sent) == 3:  # headers, one frame, then the client stops reading
            await asyncio.Event().wait()

    async def receive() -> Message:
        await asyncio.Event().wait()  # no disconnect: the peer is simply gone quiet
        raise AssertionError

    response = sse.respond(tailed(), sse.native_wire(0), stream_id="s", send_timeout=0.3)
    scope = {"type": "http", "method": "GET", "headers": []}
    started = time.monotonic()
    with pytest.raises(ExceptionGroup) as raised:
        async with asyncio.timeout(10):
            await response(scope, receive, send)
    assert raised.group_contains(SendTimeoutError)
    assert 0.3 <= time.monotonic() - started < 5
    assert closed.is_set()
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body", "http.response.body"]
