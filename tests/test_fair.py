"""Fair scheduling across API keys (``tailgate.scripts.FAIR``), and where a queued stream stands.

The store's scripts on a real redis-server: the scores they give jobs, and the queued index that
``tailgate top`` reads. Then whole stacks, with the queue on the streams' Redis and apart from it: a
second key's stream starts beside a first key's backlog, not after it; a taken-over stream goes first
in line; ``position`` in the ``queued`` event and in the status.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from tailgate import keys
from tailgate.connections import open_store
from tailgate.dev.procs import RedisServer, await_until
from tailgate.dev.sse import read_sse
from tailgate.events import dumps
from tailgate.settings import Settings
from tailgate.store import CreateReply, Job, StreamStore
from tests.conftest import OTHER_KEY
from tests.harness import FAST_TAKEOVER, MakeStack, worker_of

QUEUE = "tg:queue:fair-test"
REQUEST = dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})


@pytest.fixture
async def store(redis_db: str) -> AsyncIterator[StreamStore]:
    s = await open_store(Settings(redis_url=redis_db), "test", 4)
    yield s
    await s.aclose()


async def queue(store: StreamStore, owner: str, n: int = 1) -> list[str]:
    """``n`` streams of ``owner``, created and enqueued in one step each, as a gateway on one Redis
    does; their ids, each checked against the place its create answered and its `queued` event."""
    ids = []
    for _ in range(n):
        stream_id = secrets.token_hex(16)
        job = Job(QUEUE, f"arq:job:{stream_id}", b"job", 60_000, 10_000, keys.wake(QUEUE), keys.fair(QUEUE))
        created = await store.create(stream_id, owner, {"request": REQUEST}, job=job)
        assert created.reply is CreateReply.CREATED
        rank = await store.redis.zrank(QUEUE, stream_id)
        assert rank is not None and created.position == rank + 1
        [(_, fields)] = await store.redis.xrange(keys.events(stream_id))
        assert json.loads(fields["d"]) == {"seq": 1, "position": rank + 1}
        ids.append(stream_id)
    return ids


async def take(store: StreamStore, *ids: str) -> None:
    """A worker claims these streams and drops their jobs."""
    for i in ids:
        claimed = await store.claim(i, "w", stale_after_s=60, max_attempts=3)
        assert claimed.reply.value == "ok"
    await store.redis.zrem(QUEUE, *ids)


async def scores(store: StreamStore, ids: list[str]) -> list[float]:
    return [float(await store.redis.zscore(QUEUE, i) or -1) for i in ids]


async def test_a_second_owner_is_scored_beside_the_first_owners_backlog_not_after_it(
    store: StreamStore,
) -> None:
    a = await queue(store, "a", 6)
    assert await scores(store, a) == [1, 2, 3, 4, 5, 6]  # one owner alone: first in, first out
    await take(store, a[0], a[1])
    [b1, b2] = await queue(store, "b", 2)
    # The head is now a's third job, at 3: b's jobs take turns with a's from there.
    assert await scores(store, [b1, b2]) == [3, 4]
    assert {await store.redis.zrank(QUEUE, b1), await store.redis.zrank(QUEUE, b2)} <= {0, 1, 2, 3}
    [c1] = await queue(store, "c")
    assert await scores(store, [c1]) == [3]
    # a's next job goes after a's own: an owner's jobs keep their order.
    [a7] = await queue(store, "a")
    assert await scores(store, [a7]) == [7]


async def test_virtual_time_does_not_go_back_when_the_queue_empties(store: StreamStore) -> None:
    a = await queue(store, "a", 3)
    await take(store, *a)
    c = await queue(store, "c", 3)
    [a4] = await queue(store, "a")
    # "now" was the latest time given out (4), not 1: else c would get 1, 2, 3 and a's job wait
    # behind all of c's for the time a once used.
    assert await scores(store, c) == [4, 5, 6]
    assert await scores(store, [a4]) == [4]
    assert await store.redis.zrank(QUEUE, a4) in (0, 1)


async def fair_hash(store: StreamStore) -> dict[str, str]:
    return await store.redis.hgetall(keys.fair(QUEUE))  # type: ignore[no-any-return,misc]


async def test_the_fair_hash_keeps_only_the_owners_of_what_waits(store: StreamStore) -> None:
    waited = [i for owner in ("a", "b", "c") for i in await queue(store, owner, 2)]
    await take(store, *waited)
    assert await fair_hash(store) == {"": "3", "a": "3", "b": "3", "c": "3"}
    [d1] = await queue(store, "d")  # nothing waits: a's, b's and c's next starts are all behind now
    assert await fair_hash(store) == {"": "4", "d": "4"}
    assert await scores(store, [d1]) == [3]
    [e1] = await queue(store, "e")  # d's job waits: d stays
    assert set(await fair_hash(store)) == {"", "d", "e"}
    assert await scores(store, [e1]) == [3]


async def test_a_takeover_job_is_first_in_line_and_is_not_the_queues_now(store: StreamStore) -> None:
    a = await queue(store, "a", 5)
    [b1] = await queue(store, "b")  # scored 1, beside a's first
    await take(store, a[0], b1, a[1], a[2])  # the head is a's fourth job, at 4
    await store.redis.zadd(QUEUE, {"x" * 32 + ":stale-1": 0})  # as worker.job.takeover enqueues
    [b2] = await queue(store, "b")
    assert await scores(store, [b2]) == [4]  # not 2: b earned nothing while it had nothing queued
    assert await store.redis.zrank(QUEUE, "x" * 32 + ":stale-1") == 0


async def test_the_queued_index_holds_exactly_the_streams_waiting_for_their_first_start(
    store: StreamStore,
) -> None:
    r = store.redis
    [taken, cancelled, discarded, waiting] = await queue(store, "a", 4)
    assert set(await r.zrange(keys.QUEUED, 0, -1)) == {taken, cancelled, discarded, waiting}
    await take(store, taken)
    assert await store.cancel(cancelled) == "cancelled"
    await store.discard(discarded)
    assert await r.zrange(keys.QUEUED, 0, -1) == [waiting]
    # A stream that expired while queued (no worker ran it) leaves the index at the next create.
    await r.delete(keys.meta(waiting), keys.events(waiting))
    settings = Settings()
    live_ms = (settings.retention_s + settings.job_timeout_s * 4) * 1000  # as open_store keeps them
    await r.zadd(keys.QUEUED, {waiting: time.time() * 1000 - live_ms - 1})
    [fresh] = await queue(store, "a")
    assert await r.zrange(keys.QUEUED, 0, -1) == [fresh]


# Whole stacks. Key one queues a backlog on a worker that runs 2 at a time; key two then queues one.
BACKLOG = 40
SLOW = "[mock:tokens=20,delay_ms=20]"  # about 0.4 s a stream


async def create(client: httpx.AsyncClient, url: str, key: str, prompt: str) -> dict[str, Any]:
    r = await client.post(
        f"{url}/v1/streams", json={"prompt": prompt}, headers={"Authorization": f"Bearer {key}"}
    )
    assert r.status_code == 202, r.text
    return r.json()  # type: ignore[no-any-return]


async def started_at(r: Redis, stream_id: str) -> float:
    return float(await r.hget(keys.meta(stream_id), "started_at") or "inf")  # type: ignore[misc]


@pytest.mark.parametrize("queue_redis", ["shared", "apart"])
async def test_a_second_keys_stream_starts_beside_a_backlog_and_says_where_it_stands(
    client: httpx.AsyncClient, make_stack: MakeStack, queue_redis: str
) -> None:
    apart = await RedisServer().astart() if queue_redis == "apart" else None
    try:
        env = {"TAILGATE_QUEUE_REDIS_URL": apart.url} if apart else {}
        s = make_stack(TAILGATE_CONCURRENCY="2", **env)
        url = await s.agateway()
        backlog = [await create(client, url, s.api_key, f"backlog {i} {SLOW}") for i in range(BACKLOG)]
        await s.aworker()
        async with Redis.from_url(s.redis_url, decode_responses=True) as r:
            await await_until(lambda: _started(r, backlog[:2]), "the backlog's first two to start")
            other = await create(client, url, OTHER_KEY, f"the other key {SLOW}")
            headers = {"Authorization": f"Bearer {OTHER_KEY}"}
            status = (await client.get(url + other["status_url"], headers=headers)).json()
            _, events = await read_sse(client, url + other["events_url"], headers=headers)
            # Its place: beside the backlog's next job (a tie either way), not behind 38 of them.
            assert events[0].event == "queued" and events[0].data["position"] in (1, 2)
            assert status["status"] != "queued" or status["position"] in (1, 2)
            assert events[-1].event == "done"
            before = [i for i in backlog if await started_at(r, i["id"]) < await started_at(r, other["id"])]
            assert len(before) <= 4, f"{len(before)} of the backlog started before the other key's stream"
            # The first key's next stream goes behind its own backlog. (The worker stopped: nothing moves.)
            s.procs[-1].signal(signal.SIGSTOP)
            last = await create(client, url, s.api_key, "last")
            last_status = (await client.get(url + last["status_url"], headers=s.headers)).json()
            async with Redis.from_url(apart.url if apart else s.redis_url) as q:
                depth = await q.zcard(s.env["TAILGATE_QUEUE_NAME"])
            assert depth > BACKLOG // 2
            assert last_status == last_status | {"status": "queued", "position": depth}
            s.procs[-1].signal(signal.SIGCONT)
    finally:
        if apart:
            await apart.astop()
            apart.close()


async def _started(r: Redis, streams: list[dict[str, Any]]) -> bool:
    return all([await started_at(r, i["id"]) < float("inf") for i in streams])


async def test_a_taken_over_stream_goes_before_the_queued_backlog(
    client: httpx.AsyncClient, make_stack: MakeStack
) -> None:
    s = make_stack(TAILGATE_CONCURRENCY="1", **FAST_TAKEOVER)
    url = await s.agateway()
    await s.aworker()
    lost = await create(client, url, s.api_key, "lost [mock:tokens=400,delay_ms=20]")
    async with Redis.from_url(s.redis_url, decode_responses=True) as r:
        await await_until(lambda: _started(r, [lost]), "the first stream to start")
        first = await worker_of(s, lost["id"])
        # 2 s each: the new worker starts the first at once, and finds the lost stream a few s later.
        slower = "[mock:tokens=100,delay_ms=20]"
        backlog = [await create(client, url, s.api_key, f"backlog {i} {slower}") for i in range(5)]
        first.signal(signal.SIGKILL)
        await s.aworker()  # starts the backlog's first, then its scan finds the lost stream
        await await_until(lambda: _attempt(r, lost["id"], 2), "the lost stream's second attempt", within=60)
        resumed = await started_again(r, lost["id"])
        later = [i for i in backlog if await started_at(r, i["id"]) > resumed]
        # The takeover waited for the stream running, not for those queued before it.
        assert len(later) >= 2, f"only {len(later)} of the backlog started after the takeover"


async def _attempt(r: Redis, stream_id: str, n: int) -> bool:
    return int(await r.hget(keys.meta(stream_id), "attempt") or 0) >= n  # type: ignore[misc]


async def started_again(r: Redis, stream_id: str) -> float:
    history = json.loads(await r.hget(keys.meta(stream_id), "attempts"))  # type: ignore[misc]
    return float(history[1]["started_at"])


async def test_a_worker_runs_only_its_own_queues_streams_on_a_shared_redis(
    client: httpx.AsyncClient, make_stack: MakeStack, redis_db: str
) -> None:
    # Two queues on one database: a worker woken by the other queue's create must not take its stream.
    idle, busy = make_stack(redis_url=redis_db), make_stack(redis_url=redis_db)
    idle_url, busy_url = await idle.agateway(), await busy.agateway()
    await busy.aworker()
    waiting = await create(client, idle_url, idle.api_key, "no worker serves my queue")
    served = await create(client, busy_url, busy.api_key, "mine")
    _, events = await read_sse(client, busy_url + served["events_url"], headers=busy.headers)
    assert events[-1].event == "done"  # the worker has read the other queue's wake-up before this one's
    status = (await client.get(idle_url + waiting["status_url"], headers=idle.headers)).json()
    assert status == status | {"status": "queued", "position": 1}


async def test_one_keys_streams_start_in_the_order_they_were_created_while_a_busy_worker_is_woken(
    client: httpx.AsyncClient, make_stack: MakeStack
) -> None:
    # Creates come faster than the worker (2 at a time, ~0.4 s each) ends streams, so a backlog
    # builds while every create's wake-up names its own job: none may start before older ones.
    s = make_stack(TAILGATE_CONCURRENCY="2")
    url = await s.agateway()
    await s.aworker()
    created = []
    for i in range(40):
        created.append(await create(client, url, s.api_key, f"in order {i} {SLOW}"))
        await asyncio.sleep(0.08)  # pacing the load, not waiting for anything
    async with Redis.from_url(s.redis_url, decode_responses=True) as r:
        await await_until(lambda: _started(r, created), "every stream to start", within=60)
        starts = [await started_at(r, c["id"]) for c in created]
    out_of_order = [i for i in range(1, len(starts)) if starts[i] < starts[i - 1]]
    assert out_of_order == [], f"streams {out_of_order} started before one created earlier"


async def test_a_stream_created_as_a_slot_frees_waits_for_those_the_last_poll_left_queued(
    client: httpx.AsyncClient, make_stack: MakeStack
) -> None:
    # One slot, and ARQ's poll 3 s apart: only wake-ups move the worker. B starts from a poll that
    # leaves C queued; once B is done, D's wake-up finds the slot free, and C must still go first.
    s = make_stack(TAILGATE_CONCURRENCY="1", TAILGATE_POLL_DELAY_S="3")
    url = await s.agateway()
    await s.aworker()
    a = await create(client, url, s.api_key, f"a {SLOW}")
    async with Redis.from_url(s.redis_url, decode_responses=True) as r:
        await await_until(lambda: _started(r, [a]), "A to start")
        b = await create(client, url, s.api_key, f"b {SLOW}")
        c = await create(client, url, s.api_key, f"c {SLOW}")
        await await_until(lambda: _started(r, [b]), "B to start, C left queued", within=15)
        await await_until(lambda: _status(r, b, "completed"), "B to end", within=15)
        d = await create(client, url, s.api_key, f"d {SLOW}")
        await await_until(lambda: _started(r, [c, d]), "C and D to start", within=30)
        assert await started_at(r, c["id"]) < await started_at(r, d["id"])


async def _status(r: Redis, stream: dict[str, Any], status: str) -> bool:
    return await r.hget(keys.meta(stream["id"]), "status") == status  # type: ignore[misc,no-any-return]
