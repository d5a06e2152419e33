"""Redis Cluster, all real: the streams on a cluster of three masters and three replicas
(``tailgate.dev.procs.RedisCluster``), ``TAILGATE_STREAMS_REDIS_URL`` naming one of its nodes and
nothing else said; the ARQ queue and the store's bookkeeping on a plain ``redis-server``
(``TAILGATE_REDIS_URL``, a database of the session's own, as for every stack).

What the tests hold tailgate to is what a client sees, as on one Redis: every stream ends with the
model's exact text and every ``seq`` arrives once, through a resume, a cancel, a SIGKILLed worker
and manual failovers (``CLUSTER FAILOVER``) of two masters under a steady load of streams, in which
every stream whose create got 202 ends, and the streams created after them run as usual. And where
the data is: a stream's keys on the master that serves the slot of its hash tag ``{<id>}``, none on
the queue's Redis; ``tailgate inspect`` and ``tailgate top`` read the cluster stack as any other.

Tests of other modules run here again, unchanged, on a cluster stack: this module's ``stack`` and
``make_stack`` put the streams on the cluster (their names are assigned below). One test checks the
kit's cluster alone, with redis-py's cluster client.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest
from redis.asyncio import Redis
from redis.asyncio import RedisCluster as ClusterClient

from tailgate import keys
from tailgate.dev.procs import NotReady, RedisCluster, RedisServer, await_until
from tailgate.dev.sse import assert_exactly_once, read_sse, text_of
from tests import test_inspect, test_sentinel, test_streams, test_top
from tests.harness import MakeStack, Stack, Stacks, expected_answer
from tests.test_sentinel import Load

# The same tests as on one Redis (their fixtures `stack`, `make_stack`: this module's).
test_resume_after_disconnect_delivers_each_event_once = (
    test_streams.test_resume_after_disconnect_delivers_each_event_once
)
test_late_reader_gets_the_whole_stream_and_concurrent_readers_agree = (
    test_streams.test_late_reader_gets_the_whole_stream_and_concurrent_readers_agree
)
test_cancel_mid_stream_closes_the_upstream_and_ends_with_cancelled = (
    test_streams.test_cancel_mid_stream_closes_the_upstream_and_ends_with_cancelled
)
test_inspect_a_completed_stream_shows_its_one_attempt_timings_events_and_usage = (
    test_inspect.test_inspect_a_completed_stream_shows_its_one_attempt_timings_events_and_usage
)
test_inspect_after_a_worker_sigkill_shows_two_attempts_taken_over_then_done = (
    test_inspect.test_inspect_after_a_worker_sigkill_shows_two_attempts_taken_over_then_done
)
test_top_once_prints_one_frame_with_the_counters_in_redis = (
    test_top.test_top_once_prints_one_frame_with_the_counters_in_redis
)
tg = test_streams.tg
load_client = test_sentinel.load_client


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    """The module's cluster, for the tests that fail nothing over."""
    with RedisCluster() as c:
        yield c


@pytest.fixture
def own_cluster() -> Iterator[RedisCluster]:
    """A cluster of this test's own, to fail over."""
    with RedisCluster() as c:
        yield c


@pytest.fixture(scope="module")
def stack(stacks: Stacks, cluster: RedisCluster) -> Iterator[Stack]:
    """One gateway and one worker with their streams on the module's cluster, shared by the tests
    that kill nothing."""
    with stacks.running(TAILGATE_STREAMS_REDIS_URL=cluster.url) as s:
        s.gateway()
        s.worker()
        yield s


@pytest.fixture
def make_stack(make_stack: MakeStack, cluster: RedisCluster) -> MakeStack:
    """``make_stack`` with the streams on the module's cluster, unless ``env`` names another."""

    def make(redis_url: str | None = None, **env: str) -> Stack:
        return make_stack(redis_url, **({"TAILGATE_STREAMS_REDIS_URL": cluster.url} | env))

    return make


async def test_the_kits_cluster_serves_every_master_and_keeps_writes_through_a_failover(
    own_cluster: RedisCluster,
) -> None:
    c = own_cluster
    written = {f"kit:{{{i}}}": str(i) for i in range(30)}  # 30 hash tags: slots all over
    async with ClusterClient.from_url(c.url, decode_responses=True) as client:
        for key, value in written.items():
            assert await client.set(key, value)
        masters = {key: await c.amaster_of(key) for key in written}
        assert len({m.port for m in masters.values()}) == 3
        assert c.url in {m.url for m in masters.values()}  # the URL names a master at the start
        key = next(iter(written))
        before = masters[key]
        replica = await asyncio.to_thread(c.replica_of, before)

        promoted = await c.afailover(key)

        assert promoted is replica
        assert await c.amaster_of(key) is promoted
        assert await asyncio.to_thread(c.replica_of, promoted) is before  # the old master follows it
        assert {k: await client.get(k) for k in written} == written  # redirected, nothing lost
        assert await client.set(key, "after")
    async with Redis.from_url(promoted.url, decode_responses=True) as direct:
        assert await direct.get(key) == "after"


async def test_a_stream_is_on_the_master_of_its_slot_and_nothing_of_it_on_the_queues_redis(
    client: httpx.AsyncClient, stack: Stack, cluster: RedisCluster, mock_url: str, prompt: str
) -> None:
    stream_id = await test_inspect.create(client, stack.url, stack, prompt)
    _, events = await read_sse(client, f"{stack.url}/v1/streams/{stream_id}/events", headers=stack.headers)

    assert_exactly_once(events)
    assert events[-1].event == "done"
    assert text_of(events) == await expected_answer(mock_url, prompt)
    owner = await cluster.amaster_of(f"{{{stream_id}}}")
    assert owner is await cluster.amaster_of(keys.events(stream_id))
    async with Redis.from_url(owner.url, decode_responses=True) as direct:  # no redirects followed
        assert await direct.exists(keys.events(stream_id), keys.meta(stream_id)) == 2
        assert await direct.xlen(keys.events(stream_id)) == len(events)
        assert await direct.hget(keys.meta(stream_id), "status") == "completed"
    async with Redis.from_url(stack.redis_url, decode_responses=True) as queue:
        assert [k async for k in queue.scan_iter("tg:{*")] == []


async def holds(server: RedisServer, key: str) -> bool:
    """Whether the Redis of ``server`` holds ``key`` (asked directly: no redirect followed)."""
    async with Redis.from_url(server.url) as direct:
        return bool(await direct.exists(key))


async def created_more(load: Load, n: int) -> None:
    target = len(load.acknowledged) + n
    try:
        await await_until(lambda: len(load.acknowledged) >= target, f"{n} more streams created")
    except NotReady as e:
        raise NotReady(f"{e}; the last creates refused got {load.refused[-5:]}") from None


async def running_stream(client: httpx.AsyncClient, load: Load, c: RedisCluster, away_from: set[int]) -> str:
    """A stream of the load that runs now (its status says so) on a master none of whose ports is in
    ``away_from``: the newest such."""
    found: list[str] = []

    async def one() -> bool:
        for stream_id in reversed([sid for sid, reader in load.readers.items() if not reader.done()]):
            if (await c.amaster_of(keys.events(stream_id))).port in away_from:
                continue
            r = await client.get(f"{load.gateway}/v1/streams/{stream_id}", headers=load.stack.headers)
            if r.status_code == 200 and r.json()["status"] == "running":
                found.append(stream_id)
                return True
        return False

    await await_until(one, "a running stream on another master")
    return found[0]


async def test_failovers_of_two_masters_mid_load_lose_no_acknowledged_stream_or_event(
    own_cluster: RedisCluster,
    make_stack: MakeStack,
    client: httpx.AsyncClient,
    load_client: httpx.AsyncClient,
    prompt: str,
) -> None:
    c = own_cluster
    s = make_stack(TAILGATE_STREAMS_REDIS_URL=c.url)
    gateway = await s.agateway()
    await s.aworker()
    await s.aworker()
    load = Load(load_client, gateway, s, prompt)
    failed_over: set[int] = set()  # the ports of both nodes of each shard failed over
    started: list[float] = []
    async with load.running():
        for _ in range(2):
            await created_more(load, 10)
            stream_id = await running_stream(client, load, c, failed_over)
            before = await c.amaster_of(keys.events(stream_id))
            assert await holds(before, keys.events(stream_id))  # the failover is this stream's
            started.append(time.monotonic())
            promoted = await c.afailover(keys.events(stream_id))
            assert promoted is not before
            assert await c.amaster_of(keys.meta(stream_id)) is promoted
            failed_over |= {before.port, promoted.port}
        settled = time.monotonic()
        await created_more(load, 15)
    results = await load.outcome()  # every acknowledged stream: done, the model's text, each seq once

    for t in started:  # each failover came mid-load
        assert len(load.spanning(t)) >= 3, load.spanning(t)
    load.assert_as_usual_since(results, settled)
