"""Limits that hold under concurrency: the worker's concurrency cap, the per-key caps on active
streams and SSE connections, the rate limit, idempotency while rejected, and the stream length cap."""

from __future__ import annotations

import asyncio
import secrets

import httpx

from tailgate.dev.sse import assert_exactly_once, read_sse
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
