"""The Python client (``tailgate.client``) against real gateways and workers: the exact text, resume
through cut connections and a refusing gateway, a worker's death surfaced as a reset, replays dropped,
gaps refused, the error tree, both faces; and the README's example, run as written."""

from __future__ import annotations

import asyncio
import re
import secrets
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from tailgate.client import (
    DEFAULT_TIMEOUT,
    APIError,
    AsyncClient,
    Backoff,
    Client,
    Conflict,
    Event,
    NotFound,
    ProtocolError,
    RateLimited,
    Status,
    StreamCancelled,
    StreamError,
    Unauthorized,
    Unavailable,
    Unreachable,
)
from tailgate.dev.faultproxy import FaultProxy
from tailgate.dev.procs import RedisServer, arun, child_env, free_port
from tailgate.dev.sse import assert_exactly_once, text_of
from tests.conftest import OTHER_KEY
from tests.harness import MakeStack, Stack, expected_answer, takeover_stack

QUICK = Backoff(attempts=3, first_s=0.01, max_s=0.05, jitter_s=0.01)  # to see a give-up soon
OUTAGE_S = 0.5  # how long a proxy refuses: the scenario itself, not a wait for anything
README = Path(__file__).parent.parent / "README.md"


@pytest.fixture
async def tg(stack: Stack) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(stack.url, stack.api_key) as c:
        yield c


async def collect(events: AsyncIterator[Event]) -> list[Event]:
    return [e async for e in events]


async def test_create_and_follow_gives_the_exact_text_and_typed_events(
    tg: AsyncClient, mock_url: str, prompt: str
) -> None:
    created = await tg.create(prompt)
    assert created.status == "queued" and created.events_url == f"/v1/streams/{created.id}/events"

    events = await collect(tg.events(created.id))

    assert_exactly_once(events)
    queued, started, *deltas, done = events
    assert (queued.type, queued.seq, started.attempt, started.model) == ("queued", 1, 1, "gpt-4o-mini")
    assert {e.type for e in deltas} == {"delta"} and len(deltas) == 24
    assert (done.type, done.terminal, done.finish_reason) == ("done", True, "stop")
    assert done.usage is not None and done.usage["completion_tokens"] == 24
    expected = await expected_answer(mock_url, prompt)
    assert "".join(e.text for e in deltas) == expected
    assert await tg.text(created.id) == expected  # a second reader, from the start
    status = await tg.status(created.id)
    assert (status.status, status.finished, status.events, status.attempt) == ("completed", True, 27, 1)


async def test_sync_client_creates_reads_resumes_elsewhere_and_reads_status(
    stack: Stack, mock_url: str, prompt: str
) -> None:
    def use() -> tuple[list[Event], list[Event], str, Status, str]:
        with Client(stack.url, api_key=stack.api_key) as tg:
            created = tg.create(
                messages=[{"role": "user", "content": prompt}], max_tokens=5, metadata={"ticket": "T-1"}
            )
            first = []
            for event in tg.events(created.id):
                first.append(event)
                if len(first) == 4:
                    break  # this reader leaves; another one picks up after the event it kept
        with Client(stack.url, api_key=stack.api_key) as other:
            with pytest.raises(NotFound):
                list(other.events("0" * 32))
            rest = list(other.resume(created.id, after=first[-1]))
            return first, rest, other.text(created.id), other.status(created.id), other.cancel(created.id)

    first, rest, text, status, cancelled = await asyncio.to_thread(use)

    assert rest[0].seq == 5
    assert_exactly_once(first + rest)
    expected = await expected_answer(mock_url, prompt, max_tokens=5)
    assert text_of(first + rest) == text == expected
    assert rest[-1].finish_reason == "length"
    assert cancelled == "completed"  # cancel is idempotent: an ended stream says how it ended
    assert status.status == "completed" and status.events == len(first + rest) == 2 + 5 + 1
    assert status.usage is not None and status.usage["completion_tokens"] == 5
    assert status.metadata == {"ticket": "T-1"}
    assert status.created_at and status.started_at and status.finished_at
    assert status.created_at <= status.started_at <= status.finished_at


@pytest.mark.parametrize("face", ["async", "sync"])
async def test_resume_after_cut_connections_and_a_refusing_gateway_delivers_each_seq_once(
    stack: Stack, mock_url: str, prompt: str, face: str
) -> None:
    prompt += " [mock:tokens=200,delay_ms=5]"
    host, port = stack.url.removeprefix("http://").split(":")
    proxy = await FaultProxy(int(port)).start()
    loop = asyncio.get_running_loop()
    cursors: list[str | None] = []  # the Last-Event-ID of each request for the events

    def faults(event: Event) -> None:  # called from the reading thread, or on the loop
        if event.seq in (20, 80):
            loop.call_soon_threadsafe(proxy.cut)
        elif event.seq == 140:
            loop.call_soon_threadsafe(proxy.refuse)
            loop.call_soon_threadsafe(loop.call_later, OUTAGE_S, proxy.accept)

    base = f"http://{host}:{proxy.port}"
    try:
        async with AsyncClient(base, stack.api_key) as tg:
            created = await tg.create(prompt)
        events = await read_through(face, base, stack.api_key, created.id, faults, cursors)
    finally:
        await proxy.close()

    assert_exactly_once(events)
    assert text_of(events) == await expected_answer(mock_url, prompt)
    ids = [e.id for e in events]
    assert cursors[0] is None and len(cursors) >= 4  # 2 cuts, a refusal and at least one retry
    resumed_at = [ids.index(c) for c in cursors[1:] if c is not None]
    assert len(resumed_at) == len(cursors) - 1  # each resume names an event the reader was given
    assert resumed_at == sorted(resumed_at) and resumed_at[0] >= ids.index(events[19].id)
    assert len(set(cursors[1:])) < len(cursors[1:])  # refused: the same cursor tried again


async def read_through(
    face: str,
    base: str,
    key: str,
    stream_id: str,
    on_event: Callable[[Event], None],
    cursors: list[str | None],
) -> list[Event]:
    """Follow a stream with one face of the client, calling ``on_event`` on each event and keeping
    the ``Last-Event-ID`` of every request."""
    if face == "async":

        async def record(request: httpx.Request) -> None:
            cursors.append(request.headers.get("last-event-id"))

        async with httpx.AsyncClient(timeout=DEFAULT_TIMEOUT, event_hooks={"request": [record]}) as http:
            out = []
            async for event in AsyncClient(base, key, http=http).events(stream_id):
                on_event(event)
                out.append(event)
            return out

    def blocking() -> list[Event]:
        def record(request: httpx.Request) -> None:
            cursors.append(request.headers.get("last-event-id"))

        with httpx.Client(timeout=DEFAULT_TIMEOUT, event_hooks={"request": [record]}) as http:
            out = []
            for event in Client(base, key, http=http).events(stream_id):
                on_event(event)
                out.append(event)
            return out

    return await asyncio.to_thread(blocking)


async def test_worker_sigkill_is_surfaced_as_a_reset_and_the_text_is_the_final_attempts(
    make_stack: MakeStack, mock_url: str, prompt: str
) -> None:
    s, url = await takeover_stack(make_stack)
    prompt += " [mock:tokens=100,delay_ms=20]"
    async with AsyncClient(url, s.api_key) as tg:
        created = await tg.create(prompt)
        events = []
        async for event in tg.events(created.id):
            events.append(event)
            if event.seq == 12:
                async with Redis.from_url(s.redis_url, decode_responses=True) as r:
                    worker = await r.hget(f"tg:{{{created.id}}}:meta", "worker")  # host-pid-random
                assert worker is not None
                [owner] = [c for c in s.procs if c.pid == int(worker.rsplit("-", 2)[1])]
                owner.signal(signal.SIGKILL)
        text = await tg.text(created.id)

    assert_exactly_once(events)
    [reset] = [e for e in events if e.type == "reset"]
    assert (reset.attempt, reset.reason) == (2, "worker_lost")
    assert reset.seq > 12 and events[-1].type == "done"
    expected = await expected_answer(mock_url, prompt)
    assert text_of(events) == text == expected
    assert "".join(e.text for e in events[: events.index(reset)]) != expected  # void, and said so


class Rewinding(httpx.AsyncBaseTransport):
    """Sends another ``Last-Event-ID`` than the client asked for, as a confused proxy might, and keeps
    the ``seq`` of every event the server sent."""

    def __init__(self, replace: dict[str, str]) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.replace = replace
        self.sent: list[int] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        cursor = request.headers.get("last-event-id")
        if cursor in self.replace:
            request.headers["Last-Event-ID"] = self.replace[cursor]
        response = await self.inner.handle_async_request(request)
        body = b"".join([chunk async for chunk in response.aiter_raw()])
        self.sent += [int(seq) for seq in re.findall(rb'"seq":(\d+)', body)]
        return httpx.Response(response.status_code, headers=response.headers, content=body)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def finished_stream(tg: AsyncClient, prompt: str) -> tuple[str, list[Event]]:
    created = await tg.create(prompt + " [mock:tokens=10]")
    return created.id, await collect(tg.events(created.id))


async def test_replayed_events_are_dropped(tg: AsyncClient, stack: Stack, prompt: str) -> None:
    stream_id, full = await finished_stream(tg, prompt)
    rewinding = Rewinding({full[6].id: full[3].id})  # asks after seq 7, gets everything after seq 4
    async with httpx.AsyncClient(transport=rewinding) as http:
        rest = await collect(AsyncClient(stack.url, stack.api_key, http=http).resume(stream_id, full[6]))

    assert rewinding.sent[:3] == [5, 6, 7]  # replayed by the server...
    assert rest == full[7:]  # ...and dropped by the client


async def test_a_gap_in_seq_is_a_protocol_error(tg: AsyncClient, stack: Stack, prompt: str) -> None:
    stream_id, full = await finished_stream(tg, prompt)
    skipping = Rewinding({full[3].id: full[6].id})  # asks after seq 4, gets everything after seq 7
    async with httpx.AsyncClient(transport=skipping) as http:
        reader = AsyncClient(stack.url, stack.api_key, http=http)
        with pytest.raises(ProtocolError, match="seq 8 after 4, a gap"):
            await collect(reader.resume(stream_id, full[3]))


async def test_cursor_not_in_the_stream_surfaces_a_reset_then_the_whole_stream(
    tg: AsyncClient, prompt: str
) -> None:
    stream_id, full = await finished_stream(tg, prompt)
    future = "99999999999999-0"  # newer than the stream's end, as after a failover that lost its tail

    again = await collect(tg.resume(stream_id, future))

    assert (again[0].type, again[0].seq, again[0].reason) == ("reset", 0, "cursor_out_of_range")
    assert again[1:] == full
    assert await tg.text(stream_id) == text_of(again)
    assert await collect(tg.resume(stream_id, full[-1])) == []  # after the end: a 204


async def test_text_raises_stream_error_and_stream_cancelled_with_the_text_so_far(
    tg: AsyncClient, prompt: str
) -> None:
    failing = await tg.create(prompt + " [mock:fail_after=3]")
    with pytest.raises(StreamError) as failed:
        await tg.text(failing.id)
    assert type(failed.value) is StreamError and failed.value.code == "upstream_error"
    events = await collect(tg.events(failing.id))
    assert failed.value.text == text_of(events) != ""
    assert events[-1].code == "upstream_error" and events[-1].message == failed.value.message

    long = await tg.create(prompt + " [mock:tokens=400,delay_ms=10]")
    seen = []
    async for event in tg.events(long.id):
        seen.append(event)
        if event.seq == 5:
            assert await tg.cancel(long.id) == "running"
    assert seen[-1].type == "cancelled"
    with pytest.raises(StreamCancelled) as cancelled:
        await tg.text(long.id)
    assert cancelled.value.text == text_of(seen)
    assert cancelled.value.usage == {"completion_tokens": len([e for e in seen if e.type == "delta"])}
    assert await tg.cancel(long.id) == "cancelled"


async def test_errors_are_the_documented_classes(tg: AsyncClient, stack: Stack, prompt: str) -> None:
    for key in ("not-a-key", None):
        async with AsyncClient(stack.url, key) as stranger:
            with pytest.raises(Unauthorized) as unauthorized:
                await stranger.create(prompt)
            assert (unauthorized.value.status, unauthorized.value.code) == (401, "unauthorized")

    created = await tg.create(prompt + " [mock:tokens=3]")
    other = await tg.create(prompt + " other [mock:tokens=3]")
    async with AsyncClient(stack.url) as browser_like:  # no key: the read token opens its stream only
        assert await browser_like.text(created.id, token=created.read_token) == await tg.text(created.id)
        with pytest.raises(Unauthorized) as wrong_token:
            await collect(browser_like.events(other.id, token=created.read_token))
        assert wrong_token.value.code == "invalid_token"

    unknown = "0" * 32
    async with AsyncClient(stack.url, OTHER_KEY) as another_key:
        for attempt in (tg.status(unknown), tg.cancel(unknown), another_key.status(created.id)):
            with pytest.raises(NotFound) as not_found:
                await attempt
            assert (not_found.value.status, not_found.value.code) == (404, "not_found")
        with pytest.raises(NotFound):
            await collect(another_key.events(created.id))  # another key's stream: 404, never 403

    same = await tg.create(prompt + " [mock:tokens=2]", idempotency_key=f"order-{prompt}")
    again = await tg.create(prompt + " [mock:tokens=2]", idempotency_key=f"order-{prompt}")
    assert same.id == again.id
    with pytest.raises(Conflict) as conflict:
        await tg.create("else", idempotency_key=f"order-{prompt}")
    assert conflict.value.code == "idempotency_conflict"

    with pytest.raises(APIError) as bad_cursor:
        await collect(tg.resume(created.id, "not-a-cursor"))
    assert (type(bad_cursor.value), bad_cursor.value.status, bad_cursor.value.code) == (
        APIError, 400, "bad_cursor"
    )  # fmt: skip
    with pytest.raises(APIError) as invalid:
        await tg.create(prompt, max_tokens=0)
    assert (invalid.value.status, invalid.value.code) == (422, "invalid_request")
    with pytest.raises(ValueError, match="a prompt or messages"):
        await tg.create()
    with pytest.raises(ValueError, match="a prompt or messages"):
        await tg.create(prompt, messages=[{"role": "user", "content": prompt}])

    async with AsyncClient(f"http://127.0.0.1:{free_port()}", stack.api_key, backoff=QUICK) as nowhere:
        with pytest.raises(Unreachable, match="ConnectError"):
            await nowhere.status(created.id)
        with pytest.raises(Unreachable, match="ConnectError"):
            await collect(nowhere.events(created.id))


async def test_rate_limited_carries_retry_after(make_stack: MakeStack, prompt: str) -> None:
    key = f"tg-client-{secrets.token_hex(4)}"  # a key of its own: the rate window is per key
    s = make_stack(TAILGATE_RATE_LIMIT_PER_MIN="1", TAILGATE_API_KEYS=key)
    url = await s.agateway()  # no worker: nothing needs to run
    async with AsyncClient(url, key) as tg:
        await tg.create(prompt)
        with pytest.raises(RateLimited) as limited:
            await tg.create(prompt + " again")
    assert (limited.value.status, limited.value.code) == (429, "rate_limited")
    assert limited.value.retry_after is not None and limited.value.retry_after > 0


async def test_503_is_retried_until_the_gateway_is_back_then_raised_as_unavailable(
    make_stack: MakeStack, redis_server: RedisServer, mock_url: str, prompt: str
) -> None:
    proxy = await FaultProxy(redis_server.port).start()
    try:
        s = make_stack()
        url = await s.agateway(TAILGATE_REDIS_URL=s.redis_url_at(proxy.port))  # its Redis through the proxy
        await s.aworker()
        proxy.refuse()
        async with AsyncClient(url, s.api_key, backoff=QUICK) as impatient:
            with pytest.raises(Unavailable) as unavailable:
                await impatient.create(prompt)
        assert (unavailable.value.status, unavailable.value.code) == (503, "unavailable")
        assert unavailable.value.retry_after == 1

        asyncio.get_running_loop().call_later(OUTAGE_S, proxy.accept)
        async with AsyncClient(url, s.api_key) as patient:
            text = await patient.text((await patient.create(prompt)).id)
    finally:
        await proxy.close()
    assert text == await expected_answer(mock_url, prompt)


async def test_readme_example_runs_as_written(stack: Stack, mock_url: str) -> None:
    section = README.read_text().split("## Python client", 1)[1].split("\n## ", 1)[0]
    [code] = re.findall(r"```python\n(.*?)```", section, re.S)
    env = child_env(TAILGATE_URL=stack.url, TAILGATE_API_KEY=stack.api_key)

    run = await arun([sys.executable, "-c", code], env=env)

    assert run.returncode == 0, run.stderr
    text, usage, end = run.stdout.rsplit("\n", 2)
    assert (text, end) == (await expected_answer(mock_url, "Tell me about rivers"), "")
    assert "'completion_tokens': 24" in usage
