"""Correctness under load and on the fast paths (no timing assertions: speed lives in bench/)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator

import httpx
import openai
import pytest
from redis.asyncio import Redis

from tailgate import keys, tuning
from tailgate.dev.sse import Event, events, read_sse, text_of
from tests.conftest import API_KEY
from tests.harness import MODEL, MakeStack, Stack, Stacks


@pytest.fixture(scope="module")
def pair(stacks: Stacks) -> Iterator[Stack]:
    """Two gateway processes and two workers on one queue, for this module's tests."""
    with stacks.running() as s:
        s.gateway()
        s.gateway()
        s.worker()
        s.worker()
        yield s


async def test_500_concurrent_streams_through_two_gateways_each_get_exactly_their_text(
    pair: Stack, mock_url: str
) -> None:
    n = 500
    prompts = [f"load {i} {random.random()} [mock:tokens=20,delay_ms=20]" for i in range(n)]
    async with openai.AsyncOpenAI(base_url=f"{mock_url}/v1", api_key="sk-test") as api:
        answers = await asyncio.gather(
            *(
                api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": p}])
                for p in prompts
            )
        )
    expected = [a.choices[0].message.content for a in answers]
    limits = httpx.Limits(max_connections=2 * n, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=limits) as client:

        async def one(i: int) -> tuple[str, list[int]]:
            create_on, read_on = pair.gateways[i % 2], pair.gateways[(i + 1) % 2]  # cross replicas
            r = await client.post(
                f"{create_on}/v1/streams", json={"prompt": prompts[i]}, headers=pair.headers
            )
            assert r.status_code == 202, r.text
            _, got = await read_sse(client, read_on + r.json()["events_url"], headers=pair.headers)
            assert got[-1].event == "done", got[-1]
            return text_of(got), [e.data["seq"] for e in got]

        results = await asyncio.gather(*(one(i) for i in range(n)))

    for i, (text, seqs) in enumerate(results):
        assert text == expected[i], f"stream {i}"
        assert seqs == list(range(1, len(seqs) + 1)), f"stream {i}"


async def test_readers_joining_mid_stream_get_prefix_and_live_rest_with_no_seam(
    client: httpx.AsyncClient, pair: Stack
) -> None:
    r = await client.post(
        f"{pair.gateways[0]}/v1/streams",
        json={"prompt": f"seam {random.random()} [mock:tokens=150,delay_ms=10]"},
        headers=pair.headers,
    )
    url = r.json()["events_url"]
    joined: list[asyncio.Task[tuple[httpx.Response, list[Event]]]] = []
    # Read from the start; every 10 deltas, another reader joins with no cursor, on either gateway.
    async with client.stream("GET", pair.gateways[0] + url, headers=pair.headers) as response:
        deltas = 0
        async for event in events(response):
            if event.event == "delta":
                deltas += 1
                if deltas % 10 == 0:
                    gateway = pair.gateways[len(joined) % 2]
                    joined.append(asyncio.create_task(read_sse(client, gateway + url, headers=pair.headers)))
    full = (await read_sse(client, pair.gateways[1] + url, headers=pair.headers))[1]
    assert len(joined) == 15
    for task in joined:
        _, got = await task
        assert [(e.id, e.event, e.data) for e in got] == [(e.id, e.event, e.data) for e in full]


async def test_gateway_redis_connections_do_not_grow_with_sse_clients(make_stack: MakeStack) -> None:
    idle = make_stack()
    url = await idle.agateway()  # no worker: every stream stays queued and its readers stay connected
    gateway_pid = idle.procs[-1].pid
    name = f"tailgate-gateway-{gateway_pid}"  # tailgate.connections.client_name in that process

    async def connections() -> int:
        async with Redis.from_url(idle.redis_url, decode_responses=True) as r:
            return sum(1 for c in await r.client_list() if c["name"] == name)

    limits = httpx.Limits(max_connections=400)
    async with httpx.AsyncClient(timeout=httpx.Timeout(60.0), limits=limits) as client:
        ids: list[str] = []
        for _ in range(20):
            r = await client.post(f"{url}/v1/streams", json={"prompt": "idle"}, headers=idle.headers)
            ids.append(r.json()["id"])
        baseline = await connections()
        opened = asyncio.Event()
        readers_open = 0

        async def hold(stream_id: str) -> None:
            nonlocal readers_open
            async with client.stream(
                "GET", f"{url}/v1/streams/{stream_id}/events", headers=idle.headers
            ) as resp:
                async for event in events(resp):
                    if event.event == "queued":
                        readers_open += 1
                        if readers_open == 300:
                            opened.set()
                        await asyncio.Event().wait()  # hold the connection open

        holders = [asyncio.create_task(hold(ids[i % len(ids)])) for i in range(300)]
        await asyncio.wait_for(opened.wait(), 60)
        with_clients = await connections()
        for h in holders:
            h.cancel()
        await asyncio.gather(*holders, return_exceptions=True)

    # The pools' sizes and the hub's one subscriber connection bound them, not the 300 clients.
    most = tuning.GATEWAY_STREAMS_POOL + tuning.GATEWAY_QUEUE_POOL + 1
    assert 1 <= baseline <= most
    assert with_clients <= most


async def test_wake_up_starts_a_job_without_waiting_for_the_poll(
    client: httpx.AsyncClient, make_stack: MakeStack, prompt: str
) -> None:
    # A poll every 10 minutes: only the wake-up can start this job before the test times out.
    lazy = make_stack(TAILGATE_POLL_DELAY_S="600")
    url = await lazy.agateway()
    worker = await lazy.aworker()
    await worker.await_log("ready (concurrency")
    for i in range(3):
        r = await client.post(
            f"{url}/v1/streams", json={"prompt": f"{prompt} {i} [mock:tokens=3]"}, headers=lazy.headers
        )
        _, got = await read_sse(client, url + r.json()["events_url"], headers=lazy.headers)
        assert got[-1].event == "done"


async def test_fallback_poll_starts_a_job_whose_wake_up_was_lost(
    client: httpx.AsyncClient, make_stack: MakeStack, prompt: str
) -> None:
    from arq.connections import ArqRedis

    from tailgate.apikeys import owner_of
    from tailgate.connections import open_store
    from tailgate.events import dumps
    from tailgate.settings import Settings

    polling = make_stack(TAILGATE_POLL_DELAY_S="0.2")
    url = await polling.agateway()
    await polling.aworker()
    # Enqueue exactly as the gateway does, but publish no wake-up.
    settings = Settings(redis_url=polling.redis_url, queue_name=polling.env["TAILGATE_QUEUE_NAME"])
    store = await open_store(settings, "test", 2)
    queue = ArqRedis.from_url(polling.redis_url)
    stream_id = "f" * 16 + random.randbytes(8).hex()
    request = {"model": MODEL, "messages": [{"role": "user", "content": prompt + " [mock:tokens=3]"}]}
    owner = await owner_of(store.redis, API_KEY)
    await store.create(stream_id, owner, {"model": MODEL, "request": dumps(request)})
    await queue.enqueue_job(keys.JOB_GENERATE, stream_id, _job_id=stream_id, _queue_name=settings.queue_name)
    await queue.aclose()
    await store.aclose()

    _, got = await read_sse(client, f"{url}/v1/streams/{stream_id}/events", headers=polling.headers)
    assert [e.event for e in got] == ["queued", "started", "delta", "delta", "delta", "done"]


async def test_a_job_whose_claim_fails_stays_queued_and_the_others_run(
    client: httpx.AsyncClient, make_stack: MakeStack, prompt: str
) -> None:
    s = make_stack(TAILGATE_POLL_DELAY_S="0.2")
    url = await s.agateway()  # no worker yet: both jobs wait in the queue
    ids = []
    for i in range(2):
        r = await client.post(
            f"{url}/v1/streams", json={"prompt": f"{prompt} {i} [mock:tokens=3]"}, headers=s.headers
        )
        ids.append(r.json()["id"])
    broken, fine = ids
    queue = s.env["TAILGATE_QUEUE_NAME"]
    async with Redis.from_url(s.redis_url) as r:
        # The claim script meets a key of the wrong type: it fails with an error, not with a reply.
        await r.delete(keys.meta(broken))
        await r.set(keys.meta(broken), "not a hash")
        await s.aworker()
        _, got = await read_sse(client, f"{url}/v1/streams/{fine}/events", headers=s.headers)
        assert got[-1].event == "done"
        worker = s.procs[-1]
        await worker.await_log(f"stream {broken}: claim failed")
        # Not dropped as a job that ran: it stays for the next poll (and the operator's eyes).
        assert await r.zscore(queue, broken) is not None
        assert await r.zscore(queue, fine) is None
