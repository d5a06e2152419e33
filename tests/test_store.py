"""The store's scripts against a real redis-server: every way a stream can end leaves its owner's
active set and the running index and is counted once; fencing and replayed appends; and the worker's
appender writing an attempt through them, also when the reply to an append is lost on the way back
(``tailgate.dev.faultproxy.FaultProxy.lose_reply_to``) and the appender sends it again.

The counters (``tg:stats``) are global, so each test has an empty database of its own on the
shared server (the ``redis_db`` fixture).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from tailgate import keys
from tailgate.connections import open_store
from tailgate.dev.faultproxy import FaultProxy
from tailgate.dev.procs import RedisServer, await_until
from tailgate.events import dumps
from tailgate.settings import Settings
from tailgate.store import Append, Claimed, CreateReply, Creation, Limits, Reply, StreamStore, Written
from worker.attempt import Attempt, Outcome
from worker.publisher import GAP, Appender

OWNER = "owner-one"
WORKER = "test-worker"
REQUEST: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def store(redis_db: str) -> AsyncIterator[StreamStore]:
    s = await open_store(Settings(redis_url=redis_db), "test", 4)
    yield s
    await s.aclose()


async def create(store: StreamStore) -> str:
    stream_id = secrets.token_hex(16)
    created = await store.create(stream_id, OWNER, {"model": REQUEST["model"], "request": dumps(REQUEST)})
    assert created.reply is CreateReply.CREATED
    return stream_id


async def claim(store: StreamStore, stream_id: str, max_attempts: int = 3) -> Any:
    return await store.claim(stream_id, WORKER, stale_after_s=60, max_attempts=max_attempts)


async def stats(store: StreamStore) -> dict[str, int]:
    return {k: int(v) for k, v in (await store.redis.hgetall(keys.STATS)).items()}  # type: ignore[misc]


async def history(store: StreamStore, stream_id: str) -> list[dict[str, Any]]:
    """The stream's attempt history, as the scripts keep it in its meta."""
    attempts: list[dict[str, Any]] = json.loads((await store.meta(stream_id))["attempts"])
    return attempts


async def active(store: StreamStore) -> dict[str, float]:
    return dict(await store.redis.zrange(keys.active(OWNER), 0, -1, withscores=True))


async def running(store: StreamStore) -> dict[str, float]:
    return dict(await store.redis.zrange(keys.RUNNING, 0, -1, withscores=True))


async def events(store: StreamStore, stream_id: str) -> list[tuple[str, dict[str, Any]]]:
    return [(e.type, json.loads(e.data)) for e in await store.after(stream_id, "0-0", 1000)]


async def write(store: StreamStore, one: Append) -> Written:
    [written] = await store.append_many([one])
    assert isinstance(written, Written), written
    return written


def append(stream_id: str, attempt: int, seq: int, *evs: tuple[str, dict[str, Any]]) -> Append:
    return Append(stream_id, OWNER, attempt, seq, list(evs))


async def test_create_writes_meta_and_queued_counts_created_and_enters_the_owners_active_set(
    store: StreamStore,
) -> None:
    before = time.time() * 1000
    stream_id = await create(store)
    after = time.time() * 1000

    meta = await store.meta(stream_id)
    assert meta["owner"] == OWNER and meta["status"] == "queued"
    assert before <= float(meta["created_at"]) <= after  # not cut to the millisecond
    assert await events(store, stream_id) == [("queued", {"seq": 1})]
    assert await stats(store) == {"created": 1}
    assert await active(store) == {stream_id: float(meta["created_at"])}
    # The same id again writes and counts nothing.
    assert (await store.create(stream_id, OWNER, {"model": "other"})).reply is CreateReply.ID_TAKEN
    assert await stats(store) == {"created": 1}
    assert (await store.meta(stream_id))["model"] == REQUEST["model"]


async def test_appends_and_heartbeats_load_their_script_again_when_redis_lost_it(store: StreamStore) -> None:
    # As after a restart of Redis: its script cache is empty; the batch runs whole, once.
    stream_id = await create(store)
    c = await claim(store, stream_id)
    await store.redis.script_flush()
    written = await write(store, append(stream_id, c.attempt, c.seq, ("delta", {"text": "a"})))
    assert written.seq == c.seq + 1
    await store.redis.script_flush()
    assert await store.beat({stream_id: c.attempt}) == {stream_id: "0"}
    assert [t for t, _ in await events(store, stream_id)] == ["queued", "started", "delta"]


async def test_cancel_of_a_queued_stream_ends_it_at_once_and_settles_its_bookkeeping(
    store: StreamStore,
) -> None:
    stream_id = await create(store)

    assert await store.cancel(stream_id) == "cancelled"

    assert await events(store, stream_id) == [
        ("queued", {"seq": 1}),
        ("cancelled", {"seq": 2, "usage": None}),
    ]
    assert (await store.meta(stream_id))["status"] == "cancelled"
    assert await stats(store) == {"created": 1, "cancelled": 1}
    assert await active(store) == {}
    # Idempotent: a second cancel neither writes nor counts.
    assert await store.cancel(stream_id) == "cancelled"
    assert len(await events(store, stream_id)) == 2
    assert await stats(store) == {"created": 1, "cancelled": 1}


async def test_cancel_of_a_running_stream_only_flags_it_for_its_worker(store: StreamStore) -> None:
    stream_id = await create(store)
    c = await claim(store, stream_id)

    assert await store.cancel(stream_id) == "running"

    assert (await store.meta(stream_id))["cancel"] == "1"
    assert await stats(store) == {"created": 1}
    assert stream_id in await active(store) and stream_id in await running(store)
    written = await write(store, append(stream_id, c.attempt, c.seq, ("delta", {"text": "a"})))
    assert written.cancel  # the worker learns it from its next append (or heartbeat)


@pytest.mark.parametrize(
    ("kind", "data", "status", "ended"),
    [
        ("done", {"finish_reason": "stop", "usage": None}, "completed", {"reason": "done"}),
        (
            "error",
            {"code": "upstream_error", "message": "boom"},
            "failed",
            {"reason": "error", "code": "upstream_error"},
        ),
        ("cancelled", {"usage": {"completion_tokens": 1}}, "cancelled", {"reason": "cancelled"}),
    ],
)
async def test_a_terminal_append_ends_the_stream_and_settles_its_bookkeeping_once(
    store: StreamStore, kind: str, data: dict[str, Any], status: str, ended: dict[str, str]
) -> None:
    stream_id = await create(store)
    c = await claim(store, stream_id)
    assert c.reply is Reply.OK and c.owner == OWNER and c.request == REQUEST
    meta = await store.meta(stream_id)
    assert await running(store) == {stream_id: float(meta["heartbeat"])}

    last = append(stream_id, c.attempt, c.seq, ("delta", {"text": "hi"}), (kind, data))
    written = await write(store, last)

    assert written.reply is Reply.OK and written.seq == c.seq + 2
    after = await store.meta(stream_id)
    assert after["status"] == status
    assert [t for t, _ in await events(store, stream_id)] == ["queued", "started", "delta", kind]
    counted = {"created": 1, status: 1, "tokens": 1} | (
        {"failed:" + data["code"]: 1} if kind == "error" else {}
    )
    assert await stats(store) == counted
    assert await active(store) == {}
    assert await running(store) == {}
    # The attempt's record: its worker, its start (the claim's), first token and end (the append's).
    started = meta["heartbeat"]
    finished = after["finished_at"]
    assert await history(store, stream_id) == [
        {
            "attempt": 1,
            "worker": WORKER,
            "started_at": started,
            "first_token_at": finished,
            "ended_at": finished,
        }
        | ended
    ]
    # The same append again (its reply lost): the stream has ended, nothing is written or counted.
    again = await write(store, last)
    assert again.reply is Reply.FINISHED
    assert await stats(store) == counted
    assert len(await events(store, stream_id)) == 4


async def test_a_claim_past_max_attempts_ends_the_stream_with_error_and_settles_its_bookkeeping(
    store: StreamStore,
) -> None:
    stream_id = await create(store)
    first = await claim(store, stream_id, max_attempts=1)
    assert await store.release(stream_id, first.attempt, "worker_shutdown") is Reply.OK

    second = await claim(store, stream_id, max_attempts=1)

    assert second.reply is Reply.EXHAUSTED
    kind, data = (await events(store, stream_id))[-1]
    assert kind == "error" and data["code"] == "worker_lost"
    assert "worker_shutdown" in data["message"]
    assert (await store.meta(stream_id))["status"] == "failed"
    assert await stats(store) == {"created": 1, "failed": 1, "failed:worker_lost": 1, "handed_back": 1}
    assert await active(store) == {}
    assert await running(store) == {}
    [handed_back] = await history(store, stream_id)  # the release ended it; the claim added none
    assert handed_back["reason"] == "handed_back"


async def test_a_claim_past_max_attempts_ends_the_lost_workers_attempt_as_worker_lost(
    store: StreamStore,
) -> None:
    stream_id = await create(store)
    await claim(store, stream_id, max_attempts=1)
    await store.redis.hset(keys.meta(stream_id), "heartbeat", "12.5")  # type: ignore[misc]  # then it vanished

    assert (await claim(store, stream_id, max_attempts=1)).reply is Reply.EXHAUSTED

    finished = (await store.meta(stream_id))["finished_at"]
    [lost] = await history(store, stream_id)
    assert lost == lost | {"reason": "worker_lost", "ended_at": finished, "last_heartbeat_at": "12.5"}
    assert await stats(store) == {"created": 1, "failed": 1, "failed:worker_lost": 1}


async def test_the_attempt_history_holds_every_attempt_its_worker_first_token_and_why_it_ended(
    store: StreamStore,
) -> None:
    stream_id = await create(store)
    one = await store.claim(stream_id, "worker-one", stale_after_s=60, max_attempts=3)
    await write(store, append(stream_id, 1, one.seq, ("delta", {"text": "a"})))
    first_token = json.loads((await store.meta(stream_id))["attempts"])[0]["first_token_at"]
    await write(store, append(stream_id, 1, one.seq + 1, ("delta", {"text": "b"})))
    beat = (await store.meta(stream_id))["heartbeat"]
    await store.redis.zadd(keys.RUNNING, {stream_id: 0})
    await store.redis.hset(keys.meta(stream_id), "heartbeat", "0")  # type: ignore[misc]  # worker-one is lost
    two = await store.claim(stream_id, "worker-two", stale_after_s=60, max_attempts=3)
    assert await store.release(stream_id, 2, "worker_shutdown") is Reply.OK
    three = await store.claim(stream_id, "worker-three", stale_after_s=60, max_attempts=3)
    error = {"code": "upstream_timeout", "message": "silence"}
    await write(store, append(stream_id, 3, three.seq, ("error", error)))

    h = await history(store, stream_id)
    assert [(a["attempt"], a["worker"], a["reason"], a.get("code")) for a in h] == [
        (1, "worker-one", "taken_over", None),
        (2, "worker-two", "handed_back", None),
        (3, "worker-three", "error", "upstream_timeout"),
    ]
    assert beat != "0" and h[0]["last_heartbeat_at"] == "0"  # what the takeover found
    assert h[0]["first_token_at"] == first_token  # the first delta's, not the second's
    assert "first_token_at" not in h[1] and "first_token_at" not in h[2]  # they wrote no delta
    assert all(float(a["started_at"]) <= float(a["ended_at"]) for a in h)
    assert h[0]["ended_at"] == h[1]["started_at"] and h[1]["ended_at"] <= h[2]["started_at"]
    assert h[2]["ended_at"] == (await store.meta(stream_id))["finished_at"]
    assert two.attempt == 2
    assert await stats(store) == {
        "created": 1,
        "failed": 1,
        "failed:upstream_timeout": 1,
        "tokens": 2,
        "takeovers": 1,
        "handed_back": 1,
    }


@pytest.mark.parametrize("claimed", [False, True])
async def test_discard_undoes_a_create_and_leaves_nothing(store: StreamStore, claimed: bool) -> None:
    stream_id = await create(store)
    if claimed:  # the enqueue went through after all, and its reply was lost
        await claim(store, stream_id)

    await store.discard(stream_id)

    assert not await store.redis.exists(keys.meta(stream_id), keys.events(stream_id))
    assert await active(store) == {}
    assert await running(store) == {}
    assert await stats(store) == {"created": 0}
    await store.discard(stream_id)  # nothing left to undo: counts nothing
    assert await stats(store) == {"created": 0}


async def test_heartbeat_restamps_the_running_index_and_a_hand_back_zeroes_it_for_good(
    store: StreamStore,
) -> None:
    stream_id = await create(store)
    c = await claim(store, stream_id)
    before = (await running(store))[stream_id]
    await asyncio.sleep(0.005)  # so that the new stamp differs

    assert await store.beat({stream_id: c.attempt}) == {stream_id: "0"}
    beat = float((await store.meta(stream_id))["heartbeat"])
    assert await running(store) == {stream_id: beat} and beat > before

    assert await store.release(stream_id, c.attempt, "worker_shutdown") is Reply.OK
    assert await running(store) == {stream_id: 0.0}
    # A heartbeat racing the hand-back must not make the stream look busy to the next claim.
    assert await store.beat({stream_id: c.attempt}) == {stream_id: "0"}
    assert await running(store) == {stream_id: 0.0}
    after = await claim(store, stream_id)
    assert after.reply is Reply.OK and after.attempt == 2
    assert await store.beat({stream_id: c.attempt}) == {stream_id: "fenced"}


async def test_a_claim_of_a_gone_stream_drops_it_from_the_running_index(store: StreamStore) -> None:
    stream_id = secrets.token_hex(16)
    await store.redis.zadd(keys.RUNNING, {stream_id: 1})  # indexed, then expired

    assert (await claim(store, stream_id)).reply is Reply.GONE
    assert await running(store) == {}


async def test_an_attempt_that_was_taken_over_cannot_write(store: StreamStore) -> None:
    stream_id = await create(store)
    zombie = await claim(store, stream_id)
    await store.redis.hset(keys.meta(stream_id), "heartbeat", "0")  # type: ignore[misc]  # its worker stopped heartbeating
    taker = await claim(store, stream_id)
    assert taker.attempt == zombie.attempt + 1
    kinds = [t for t, _ in await events(store, stream_id)]
    assert kinds == ["queued", "started", "reset", "started"]

    late = append(stream_id, zombie.attempt, zombie.seq, ("delta", {"text": "late"}), ("done", {}))
    written = await write(store, late)

    assert written.reply is Reply.FENCED
    assert [t for t, _ in await events(store, stream_id)] == kinds
    assert await stats(store) == {"created": 1, "takeovers": 1}


async def test_an_append_replayed_after_its_reply_was_lost_is_recognised_by_seq(store: StreamStore) -> None:
    stream_id = await create(store)
    c = await claim(store, stream_id)
    batch = append(stream_id, c.attempt, c.seq, ("delta", {"text": "a"}), ("delta", {"text": "b"}))

    first = await write(store, batch)
    replayed = await write(store, batch)

    assert first.reply is replayed.reply is Reply.OK
    assert first.seq == replayed.seq == c.seq + 2
    texts = [d["text"] for t, d in await events(store, stream_id) if t == "delta"]
    assert texts == ["a", "b"]


async def test_the_appender_writes_an_attempts_events_in_order_and_its_end_settles_the_stream(
    store: StreamStore,
) -> None:
    appender = Appender(store, window_s=0.005)
    loop = appender.start()
    try:
        stream_id = await create(store)
        c = await claim(store, stream_id)
        attempt = Attempt(appender, stream_id, c.owner, c.attempt, c.seq)
        for i in range(50):
            attempt.add("delta", {"text": f"t{i} "})
            if i % 10 == 0:
                await asyncio.sleep(0.002)  # some in one batch, some across batches

        outcome = await attempt.finish("done", {"finish_reason": "stop", "usage": None})

        assert outcome is Outcome.COMPLETED and attempt.outcome is Outcome.COMPLETED
        evs = await events(store, stream_id)
        assert [d["seq"] for _, d in evs] == list(range(1, 54))
        assert "".join(d["text"] for t, d in evs if t == "delta") == "".join(f"t{i} " for i in range(50))
        assert evs[-1][0] == "done"
        assert await stats(store) == {"created": 1, "completed": 1, "tokens": 50}
        assert await active(store) == {} and await running(store) == {}

        # An attempt that was taken over meanwhile is refused, and says so.
        other = await create(store)
        z = await claim(store, other)
        await store.redis.hset(keys.meta(other), "heartbeat", "0")  # type: ignore[misc]
        await claim(store, other)
        zombie = Attempt(appender, other, z.owner, z.attempt, z.seq)
        zombie.add("delta", {"text": "late"})
        await asyncio.wait_for(zombie.halted.wait(), 5)
        assert zombie.outcome is Outcome.FENCED
        assert await zombie.finish("done", {}) is Outcome.FENCED
        assert "late" not in json.dumps(await events(store, other))
    finally:
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop


async def test_the_appender_spaces_its_round_trips_yet_sends_a_token_after_a_quiet_spell_at_once(
    store: StreamStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    window = 0.5  # a gap of 0.1 s between the starts of round trips
    trips: list[tuple[float, list[str]]] = []  # (start, streams) of each round trip
    landed = asyncio.Event()
    append_many = store.append_many

    async def counted(appends: list[Append]) -> list[Written | Exception]:
        trips.append((time.monotonic(), [a.stream_id for a in appends]))
        try:
            return await append_many(appends)
        finally:
            landed.set()

    monkeypatch.setattr(store, "append_many", counted)
    appender = Appender(store, window_s=window)
    loop = appender.start()
    try:
        a, b, c = [await create(store) for _ in range(3)]
        attempts = {}
        for i in (a, b, c):
            claimed = await claim(store, i)
            attempts[i] = Attempt(appender, i, claimed.owner, claimed.attempt, claimed.seq)

        sent = time.monotonic()
        attempts[a].add("delta", {"text": "a"})
        await asyncio.wait_for(landed.wait(), 5)
        assert trips[0][0] - sent < window * GAP / 2  # at once: no round trip went out before it
        attempts[b].add("delta", {"text": "b"})  # due (its first write), but within the gap
        await asyncio.sleep(window * GAP / 5)
        attempts[c].add("delta", {"text": "c"})
        await await_until(lambda: len(trips) == 2, "a second round trip", 5)

        assert trips[1][1] == [b, c]  # one round trip for both, not one each
        assert trips[1][0] - trips[0][0] >= window * GAP
        end = {"finish_reason": "stop", "usage": None}
        for i, text in ((a, "a"), (b, "b"), (c, "c")):
            assert await attempts[i].finish("done", end) is Outcome.COMPLETED
            written = [(t, d.get("text")) for t, d in await events(store, i)]
            assert written == [("queued", None), ("started", None), ("delta", text), ("done", None)]
    finally:
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop


async def test_a_claim_whose_reply_was_lost_is_recognised_when_its_job_sends_it_again(
    store: StreamStore, redis_server: RedisServer, redis_db: str
) -> None:
    stream_id = await create(store)
    proxy = await FaultProxy(redis_server.port).start()
    url = f"redis://127.0.0.1:{proxy.port}{urlsplit(redis_db).path}"
    worker_store = await open_store(
        Settings(redis_url=url), "worker", 2, retry=False
    )  # as the worker opens it
    try:

        async def claim_it(token: str) -> Claimed:
            return await worker_store.claim(stream_id, WORKER, stale_after_s=60, max_attempts=3, token=token)

        proxy.lose_reply_to(b"EVALSHA")  # the claim goes in; its reply does not come back
        with pytest.raises(RedisConnectionError):
            await claim_it("run-1")
        assert proxy.lost == 1
        again = await claim_it("run-1")  # the job sends it again, with its run's token
        other = await claim_it("run-2")  # another run of the job, or another job
    finally:
        await worker_store.aclose()
        await proxy.close()

    assert (again.reply, again.attempt, again.seq, again.owner) == (Reply.OK, 1, 2, OWNER)
    assert again.request == REQUEST
    assert other.reply is Reply.BUSY
    assert [t for t, _ in await events(store, stream_id)] == ["queued", "started"]  # one claim, written once
    assert (await store.meta(stream_id))["attempt"] == "1"


@pytest.fixture
async def lossy(redis_server: RedisServer, redis_db: str) -> AsyncIterator[tuple[FaultProxy, Appender]]:
    """The worker's appender on a store opened as the worker opens it (no command re-send), through a
    proxy that can lose a reply; on the test's database."""
    proxy = await FaultProxy(redis_server.port).start()
    worker_store = await open_store(
        Settings(redis_url=f"redis://127.0.0.1:{proxy.port}{urlsplit(redis_db).path}"),
        "worker",
        4,
        retry=False,
    )
    appender = Appender(worker_store, window_s=0.005)
    loop = appender.start()
    try:
        yield proxy, appender
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        await worker_store.aclose()
        await proxy.close()


async def test_an_append_whose_reply_was_lost_is_written_once_and_the_attempt_goes_on(
    store: StreamStore, lossy: tuple[FaultProxy, Appender]
) -> None:
    proxy, appender = lossy
    stream_id = await create(store)
    c = await claim(store, stream_id)
    attempt = Attempt(appender, stream_id, c.owner, c.attempt, c.seq)

    proxy.lose_reply_to(b"EVALSHA")  # the append goes in; its reply does not come back
    attempt.add("delta", {"text": "a"})
    attempt.add("delta", {"text": "b"})
    await await_until(lambda: attempt.seq != c.seq or attempt.outcome is not None, "Redis's answer")
    assert proxy.lost == 1
    assert attempt.outcome is None and attempt.seq == c.seq + 2  # the re-sent append counted as applied
    outcome = await attempt.finish("done", {"finish_reason": "stop", "usage": None})

    assert outcome is Outcome.COMPLETED
    evs = await events(store, stream_id)
    assert [(t, d.get("text")) for t, d in evs] == [
        ("queued", None),
        ("started", None),
        ("delta", "a"),
        ("delta", "b"),
        ("done", None),
    ]
    assert [d["seq"] for _, d in evs] == [1, 2, 3, 4, 5]


async def test_a_terminal_append_whose_reply_was_lost_ends_the_attempt_as_completed_once(
    store: StreamStore, lossy: tuple[FaultProxy, Appender]
) -> None:
    proxy, appender = lossy
    stream_id = await create(store)
    c = await claim(store, stream_id)
    attempt = Attempt(appender, stream_id, c.owner, c.attempt, c.seq)
    attempt.add("delta", {"text": "a"})
    await await_until(lambda: attempt.seq == c.seq + 1, "the delta applied")

    proxy.lose_reply_to(b"EVALSHA")  # `done` goes in and ends the stream; its reply does not come back
    outcome = await attempt.finish("done", {"finish_reason": "stop", "usage": None})

    assert proxy.lost == 1
    assert outcome is Outcome.COMPLETED  # not "finished elsewhere": the stream ended with its own `done`
    assert [t for t, _ in await events(store, stream_id)] == ["queued", "started", "delta", "done"]
    assert (await store.meta(stream_id))["status"] == "completed"
    assert await stats(store) == {"created": 1, "completed": 1, "tokens": 1}
    assert await active(store) == {} and await running(store) == {}


async def test_an_append_past_the_length_cap_ends_the_stream_with_stream_too_long(redis_db: str) -> None:
    capped = await open_store(Settings(redis_url=redis_db, stream_maxlen=6), "test", 2)
    try:
        stream_id = await create(capped)  # queued (1)
        c = await claim(capped, stream_id)  # started (2)
        ok = await write(
            capped, append(stream_id, c.attempt, c.seq, ("delta", {"text": "a"}), ("delta", {"text": "b"}))
        )
        assert ok.reply is Reply.OK and ok.seq == 4  # room for one more delta and a terminal event
        more = ("delta", {"text": "c"}), ("delta", {"text": "d"})
        refused = await write(capped, append(stream_id, c.attempt, ok.seq, *more))

        assert refused.reply is Reply.TOO_LONG
        got = await events(capped, stream_id)
        assert [t for t, _ in got] == ["queued", "started", "delta", "delta", "error"]
        assert [d["seq"] for _, d in got] == [1, 2, 3, 4, 5]  # nothing trimmed, nothing skipped
        assert got[-1][1]["code"] == "stream_too_long"
        assert (await capped.meta(stream_id))["status"] == "failed"
        assert await stats(capped) == {"created": 1, "failed": 1, "failed:stream_too_long": 1, "tokens": 2}
        [ended] = json.loads((await capped.meta(stream_id))["attempts"])
        assert (ended["reason"], ended["code"]) == ("error", "stream_too_long")
        assert await active(capped) == {} and await running(capped) == {}
    finally:
        await capped.aclose()


LIMITS = Limits(max_active=3, active_stale_ms=3_600_000, rate_per_min=5)


async def create_limited(
    store: StreamStore, limits: Limits = LIMITS, idempotency: tuple[str, str] | None = None
) -> Creation:
    fields = {"model": REQUEST["model"], "request": dumps(REQUEST)}
    return await store.create(secrets.token_hex(16), OWNER, fields, limits=limits, idempotency=idempotency)


async def test_the_active_cap_admits_exactly_its_number_of_concurrent_creates(store: StreamStore) -> None:
    got = await asyncio.gather(*(create_limited(store, Limits(max_active=3)) for _ in range(40)))

    replies = [c.reply for c in got]
    assert replies.count(CreateReply.CREATED) == 3
    assert replies.count(CreateReply.TOO_MANY) == 37
    assert len(await active(store)) == 3
    assert await stats(store) == {"created": 3}


async def test_the_rate_limit_is_a_sliding_minute_and_refusals_use_no_quota(store: StreamStore) -> None:
    limits = Limits(rate_per_min=5)
    created = [await create_limited(store, limits) for _ in range(5)]
    assert {c.reply for c in created} == {CreateReply.CREATED}
    for _ in range(10):  # refused, and they do not push the window on
        refused = await create_limited(store, limits)
        assert refused.reply is CreateReply.RATE_LIMITED
        assert 59_000 < refused.retry_after_ms <= 60_000
    assert await store.redis.zcard(keys.rate(OWNER)) == 5

    # The minute slides: once the oldest creation is over a minute old, there is room for one.
    oldest = created[0].stream_id
    await store.redis.zadd(keys.rate(OWNER), {oldest: time.time() * 1000 - 60_001})
    assert (await create_limited(store, limits)).reply is CreateReply.CREATED
    assert (await create_limited(store, limits)).reply is CreateReply.RATE_LIMITED


async def test_a_discarded_create_gives_back_its_quota_and_its_idempotency_key(store: StreamStore) -> None:
    limits = Limits(rate_per_min=1)
    first = await create_limited(store, limits, idempotency=("key-hash", "digest"))
    assert first.reply is CreateReply.CREATED
    await store.discard(first.stream_id)

    again = await create_limited(store, limits, idempotency=("key-hash", "digest"))
    assert again.reply is CreateReply.CREATED and again.stream_id != first.stream_id


async def test_idempotent_creates_answer_the_one_stream_or_the_same_refusal(store: StreamStore) -> None:
    same = ("key-hash", "digest")
    burst = await asyncio.gather(*(create_limited(store, idempotency=same) for _ in range(20)))
    [stream_id] = {c.stream_id for c in burst}
    assert {c.reply for c in burst} == {CreateReply.CREATED, CreateReply.EXISTING}
    assert [c.reply for c in burst].count(CreateReply.CREATED) == 1
    assert (await create_limited(store, idempotency=("key-hash", "other"))).reply is CreateReply.CONFLICT

    # While rate limited, duplicates of a new key all get the refusal, and no id.
    limited = Limits(rate_per_min=1)
    refused = await asyncio.gather(*(create_limited(store, limited, ("new", "d")) for _ in range(20)))
    assert {(c.reply, c.stream_id) for c in refused} == {(CreateReply.RATE_LIMITED, "")}
    assert await store.redis.get(keys.idempotency(OWNER, "new")) is None
    assert await active(store) == {stream_id: pytest.approx(await active_score(store, stream_id))}


async def active_score(store: StreamStore, stream_id: str) -> float:
    score = await store.redis.zscore(keys.active(OWNER), stream_id)
    assert score is not None
    return float(score)


async def test_connections_pack_commands_with_hiredis_byte_for_byte_as_redis_py(store: StreamStore) -> None:
    from redis.asyncio.connection import Connection

    packing = store.redis.connection_pool.connection_class()
    assert type(packing).__mro__[1].__name__ == "_HiredisPacking"
    commands = [
        ("EVALSHA", "f" * 40, 2, "tg:{x}:events", b"raw", "héllo\n", 1.5, float("-inf"), 10**20, -3),
        ("SCRIPT LOAD", "return 1"),
        ("CLIENT SETNAME", "tailgate-test"),
    ]
    for args in commands:
        assert b"".join(packing.pack_command(*args)) == b"".join(Connection().pack_command(*args))
