"""What a failover does to a stream under its readers, staged by hand on a real Redis: the last events
a reader was given are lost (the replica that took over never got them), then written again. The
gateway's reader must neither repeat them nor splice another attempt onto them (``gateway.hub``).

Staged, because a real failover (``tests/test_sentinel.py``) hits each of these only some of the
time: here the test is the worker, writing through the store's own scripts, and the failover is the
loss of the entries after a ``seq``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from tailgate import keys
from tailgate.connections import open_store
from tailgate.dev.procs import await_until
from tailgate.dev.sse import Event, events, text_of
from tailgate.events import START, dumps
from tailgate.settings import Settings
from tailgate.store import Append, Claimed, Reply, StreamStore
from tests.harness import MakeStack, Stack


@pytest.fixture
async def staged(make_stack: MakeStack) -> AsyncIterator[tuple[Stack, str, StreamStore]]:
    """A gateway and no worker (the test writes), its URL, and the store on its Redis."""
    s = make_stack()
    url = await s.agateway()
    store = await open_store(Settings(redis_url=s.redis_url), "test", 2)
    yield s, url, store
    await store.aclose()


async def follow(client: httpx.AsyncClient, url: str, headers: dict[str, str], got: list[Event]) -> None:
    async with client.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200
        async for event in events(response):
            got.append(event)
            if event.terminal:
                return


async def begin(client: httpx.AsyncClient, s: Stack, url: str, store: StreamStore) -> tuple[str, Claimed]:
    r = await client.post(f"{url}/v1/streams", json={"prompt": "hi"}, headers=s.headers)
    assert r.status_code == 202, r.text
    stream_id = r.json()["id"]
    claim = await store.claim(stream_id, "test-worker", stale_after_s=60, max_attempts=3)
    assert claim.reply is Reply.OK
    return stream_id, claim


async def write(
    store: StreamStore, stream_id: str, claim: Claimed, seq: int, *texts: str, done: bool = False
) -> int:
    evs = [("delta", {"text": t}) for t in texts] + ([("done", {"finish_reason": "stop"})] if done else [])
    [written] = await store.append_many([Append(stream_id, claim.owner, claim.attempt, seq, evs)])
    assert not isinstance(written, Exception) and written.reply is Reply.OK, written
    return written.seq


async def abcd_given(
    client: httpx.AsyncClient, staged: tuple[Stack, str, StreamStore]
) -> tuple[StreamStore, str, Claimed, int, list[Event], asyncio.Task[None]]:
    """A stream whose attempt wrote "a", "b", then "c", "d", and a reader that was given all of it:
    the store, the stream, its claim, its seq, what the reader got (it goes on) and the reader."""
    s, url, store = staged
    stream_id, claim = await begin(client, s, url, store)
    seq = await write(store, stream_id, claim, claim.seq, "a", "b")
    seq = await write(store, stream_id, claim, seq, "c", "d")
    got: list[Event] = []
    reader = asyncio.create_task(follow(client, f"{url}/v1/streams/{stream_id}/events", s.headers, got))
    await await_until(lambda: any(e.seq == seq for e in got), "the reader has every event so far")
    return store, stream_id, claim, seq, got, reader


async def test_events_lost_and_written_again_the_same_reach_the_reader_once(
    client: httpx.AsyncClient, staged: tuple[Stack, str, StreamStore]
) -> None:
    store, stream_id, claim, seq, got, reader = await abcd_given(client, staged)

    # The failover: "c" and "d" are lost; the attempt writes them again, the same, under new ids.
    # The gateway's pub/sub connection breaks in the same step, so its reader finds them by reading
    # the stream after its cursor (the lost "d"), not on pub/sub.
    lost = [e for e in await store.after(stream_id, START, 100) if e.seq > seq - 2]
    async with store.redis.pipeline(transaction=True) as pipe:
        pipe.client_kill_filter(_type="pubsub")
        pipe.xdel(keys.events(stream_id), *[e.id for e in lost])
        for e in lost:
            pipe.xadd(keys.events(stream_id), {"t": e.type, "d": e.data})
        await pipe.execute()
    last = (await store.after(stream_id, START, 100))[-1].id
    await store.redis.hset(keys.meta(stream_id), "last_id", last)  # type: ignore[misc]
    await write(store, stream_id, claim, seq, "e", done=True)
    await reader

    assert [e.seq for e in got] == list(range(1, seq + 3))
    assert text_of(got) == "abcde"
    assert {e.id for e in lost} <= {e.id for e in got}  # the reader kept what it had


async def test_events_lost_and_written_over_by_another_attempt_restart_the_reader(
    client: httpx.AsyncClient, staged: tuple[Stack, str, StreamStore]
) -> None:
    store, stream_id, first, seq, got, reader = await abcd_given(client, staged)

    # The failover loses "c" and "d"; before their attempt writes them again, another worker takes
    # the stream over: its `reset` and `started` get the seq of "c" and "d".
    kept = [e for e in await store.after(stream_id, START, 100) if e.seq <= seq - 2]
    await store.redis.xdel(
        keys.events(stream_id), *[e.id for e in await store.after(stream_id, kept[-1].id, 100)]
    )
    await store.redis.hset(keys.meta(stream_id), mapping={"seq": seq - 2, "last_id": kept[-1].id})  # type: ignore[misc]
    assert await store.release(stream_id, first.attempt, "worker_lost") is Reply.OK
    second = await store.claim(stream_id, "other-worker", stale_after_s=60, max_attempts=3)
    assert second.reply is Reply.OK and second.seq == seq
    await write(store, stream_id, second, second.seq, "x", "y", done=True)
    await reader

    # "abcd" was void: the reader is told to start over (seq 0), then gets the stream from its start.
    restarts = [i for i, e in enumerate(got) if e.event == "reset" and e.seq == 0]
    assert len(restarts) == 1, f"no restart, but: {text_of(got)!r}"
    restart = restarts[0]
    assert [e.seq for e in got[:restart]] == list(range(1, seq + 1))
    assert got[restart].data == {"seq": 0, "attempt": 2, "reason": "cursor_out_of_range"}
    assert [e.seq for e in got[restart + 1 :]] == list(range(1, seq + 4))
    assert text_of(got) == "xy"


async def test_events_written_again_under_lower_ids_are_found_by_seq(
    client: httpx.AsyncClient, staged: tuple[Stack, str, StreamStore]
) -> None:
    store, stream_id, claim, seq, got, reader = await abcd_given(client, staged)

    # The failover loses "c" and "d", on a primary whose clock is behind the old one's: the attempt
    # writes them again, and "e" after them, under ids below the reader's cursor (the lost "d").
    old = await store.after(stream_id, START, 100)
    kept = [e for e in old if e.seq <= seq - 2]
    ms, n = (int(part) for part in kept[-1].id.split("-"))
    again = [*[e for e in old if e.seq > seq - 2], None]
    async with store.redis.pipeline(transaction=True) as pipe:
        pipe.client_kill_filter(_type="pubsub")
        pipe.delete(keys.events(stream_id))
        for e in kept:
            pipe.xadd(keys.events(stream_id), {"t": e.type, "d": e.data}, id=e.id)
        for i, lost in enumerate(again, 1):
            data = lost.data if lost else dumps({"seq": seq + 1, "text": "e"})
            pipe.xadd(keys.events(stream_id), {"t": "delta", "d": data}, id=f"{ms}-{n + i}")
        pipe.hset(keys.meta(stream_id), mapping={"seq": seq + 1, "last_id": f"{ms}-{n + len(again)}"})
        await pipe.execute()
    await write(store, stream_id, claim, seq + 1, "f", done=True)
    await reader

    assert [e.seq for e in got] == list(range(1, seq + 4))
    assert text_of(got) == "abcdef"
