"""Limits that hold under concurrency: the worker's concurrency cap, the per-key caps on active
streams and SSE connections, the rate limit, idempotency while rejected, and the stream length cap."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets

import httpx

from tailgate.dev.procs import await_until
from tailgate.dev.sse import assert_exactly_once, read_sse
from tests.conftest import OTHER_KEY
from tests.harness import MakeStack, Stack, mock_requests


async def _create(client: httpx.AsyncClient, stack: Stack, prompt: str, **headers: str) -> httpx.Response:
    return await client.post(
        f"{stack.url}/v1/streams", json={"prompt": prompt}, headers=stack.headers | headers
    )


async def test_a_worker_never_runs_more_streams_at_once_than_its_concurrency(
    make_stack: MakeStack, client: httpx.AsyncClient, mock_url: str
) -> None:
    stack = make_stack(TAILGATE_CONCURRENCY="3")
    await stack.agateway()
    await stack.aworker()
    tag = secrets.token_hex(4)
    prompts = [f"cap {tag} {i} [mock:tokens=8,delay_ms=60]" for i in range(12)]
    created = await asyncio.gather(*(_create(client, stack, p) for p in prompts))
    assert [r.status_code for r in created] == [202] * 12
    reads = [read_sse(client, stack.url + r.json()["events_url"], headers=stack.headers) for r in created]
    for _, events in await asyncio.gather(*reads):
        assert_exactly_once(events)
        assert events[-1].event == "done"

    served = [r for p in prompts for r in await mock_requests(mock_url, p)]
    assert len(served) == 12
    spans = [(r["opened_at"], r["closed_at"]) for r in served]
    most = max(sum(1 for a, b in spans if a <= t < b) for t, _ in spans)
    assert most == 3  # never more, and the cap is used


async def test_a_stream_past_its_length_cap_ends_with_stream_too_long_and_no_gap(
    make_stack: MakeStack, client: httpx.AsyncClient, mock_url: str, prompt: str
) -> None:
    stack = make_stack(TAILGATE_STREAM_MAXLEN="20", TAILGATE_COALESCE_MS="0")
    await stack.agateway()
    await stack.aworker()
    prompt += " [mock:tokens=200,delay_ms=2]"
    r = await _create(client, stack, prompt)
    _, events = await read_sse(client, stack.url + r.json()["events_url"], headers=stack.headers)

    assert_exactly_once(events)  # from seq 1, contiguous: nothing was trimmed
    assert events[-1].event == "error" and events[-1].data["code"] == "stream_too_long"
    assert events[-1].seq <= 20
    [served] = await mock_requests(mock_url, prompt)
    assert served["closed_early"] and served["tokens_sent"] < 200  # the upstream call was closed


async def test_one_key_cannot_hold_more_event_streams_than_its_cap_and_others_still_connect(
    make_stack: MakeStack, client: httpx.AsyncClient
) -> None:
    stack = make_stack(TAILGATE_MAX_SSE_PER_KEY="3")
    await stack.agateway()  # no worker: streams stay queued, readers stay open
    other = {"Authorization": f"Bearer {OTHER_KEY}"}
    mine = (await _create(client, stack, "a")).json()
    theirs = (await client.post(f"{stack.url}/v1/streams", json={"prompt": "b"}, headers=other)).json()

    async with contextlib.AsyncExitStack() as held:
        for i in range(3):  # by key and by read token alike: both are the key's
            params = {"token": mine["read_token"]} if i else None
            headers = None if i else stack.headers
            r = await held.enter_async_context(
                client.stream("GET", stack.url + mine["events_url"], headers=headers, params=params)
            )
            assert r.status_code == 200
        async with client.stream("GET", stack.url + mine["events_url"], headers=stack.headers) as refused:
            assert refused.status_code == 429
            assert json.loads(await refused.aread())["error"]["code"] == "too_many_connections"
            assert refused.headers["retry-after"] == "1"
        # Another key is not held back.
        async with client.stream("GET", stack.url + theirs["events_url"], headers=other) as r:
            assert r.status_code == 200

    # Closed connections give their slots back.
    async def admitted() -> bool:
        async with client.stream("GET", stack.url + mine["events_url"], headers=stack.headers) as r:
            return r.status_code == 200

    await await_until(admitted, "a slot is free again", 10)


async def test_concurrent_creates_over_the_active_cap_admit_exactly_the_cap(
    make_stack: MakeStack, client: httpx.AsyncClient
) -> None:
    key = f"tg-cap-{secrets.token_hex(4)}"
    stack = make_stack(TAILGATE_MAX_ACTIVE_PER_KEY="3", TAILGATE_API_KEYS=key)
    await stack.agateway()  # no worker: admitted streams stay active
    headers = {"Authorization": f"Bearer {key}"}
    burst = [client.post(f"{stack.url}/v1/streams", json={"prompt": "a"}, headers=headers) for _ in range(40)]
    codes = sorted(r.status_code for r in await asyncio.gather(*burst))
    assert codes == [202] * 3 + [429] * 37


async def test_idempotent_duplicates_while_rate_limited_all_get_429_and_no_id(
    make_stack: MakeStack, client: httpx.AsyncClient
) -> None:
    key = f"tg-idem-{secrets.token_hex(4)}"
    stack = make_stack(TAILGATE_RATE_LIMIT_PER_MIN="1", TAILGATE_API_KEYS=key)
    await stack.agateway()
    headers = {"Authorization": f"Bearer {key}"}
    url = f"{stack.url}/v1/streams"
    assert (await client.post(url, json={"prompt": "first"}, headers=headers)).status_code == 202

    same = headers | {"Idempotency-Key": "retry-me"}
    answers = await asyncio.gather(*(client.post(url, json={"prompt": "b"}, headers=same) for _ in range(20)))
    assert {r.status_code for r in answers} == {429}
    assert {r.json()["error"]["code"] for r in answers} == {"rate_limited"}
    assert all("id" not in r.json() for r in answers)
