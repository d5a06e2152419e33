"""The pipeline end to end: gateway, ARQ worker, mock upstream through the real openai SDK, Redis
Stream, SSE over real HTTP. Where what the server sent byte for byte matters, tests read it raw
(``tailgate.dev.sse``); where a stream is only followed, through the Python client."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tailgate.client import AsyncClient, Unauthorized
from tailgate.dev.procs import arun, child_env
from tailgate.dev.sse import assert_exactly_once, read_sse, text_of
from tests.harness import MakeStack, Stack, expected_answer, mock_requests


@pytest.fixture
async def tg(stack: Stack) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(stack.url, stack.api_key) as c:
        yield c


async def create(client: httpx.AsyncClient, stack: Stack, body: dict[str, object]) -> dict[str, str]:
    r = await client.post(f"{stack.url}/v1/streams", json=body, headers=stack.headers)
    assert r.status_code == 202, r.text
    created: dict[str, str] = r.json()
    return created


async def test_deltas_assemble_exactly_the_upstream_answer(
    client: httpx.AsyncClient, stack: Stack, mock_url: str, prompt: str
) -> None:
    created = await create(client, stack, {"prompt": prompt})
    assert created["status"] == "queued"
    assert created["events_url"] == f"/v1/streams/{created['id']}/events"
    assert len(created["id"]) == 32

    response, events = await read_sse(client, stack.url + created["events_url"], headers=stack.headers)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert_exactly_once(events)
    assert [e.event for e in events[:2]] == ["queued", "started"]
    assert events[1].data == {"seq": 2, "attempt": 1, "model": "gpt-4o-mini"}
    assert {e.event for e in events[2:-1]} == {"delta"}
    assert events[-1].event == "done"
    assert events[-1].data["finish_reason"] == "stop"
    assert events[-1].data["usage"]["completion_tokens"] == 24
    assert text_of(events) == await expected_answer(mock_url, prompt)


async def test_upstream_lines_cut_across_reads_and_ending_in_crlf_give_the_same_text(
    client: httpx.AsyncClient, stack: Stack, mock_url: str
) -> None:
    prompt = "cut [mock:split=1,tokens=6,delay_ms=0]"
    created = await create(client, stack, {"prompt": prompt})
    _, events = await read_sse(client, stack.url + created["events_url"], headers=stack.headers)
    assert_exactly_once(events)
    assert events[-1].event == "done" and events[-1].data["usage"]["completion_tokens"] == 6
    assert text_of(events) == await expected_answer(mock_url, prompt)


async def test_create_answers_location_and_status_follows_the_stream(
    client: httpx.AsyncClient, tg: AsyncClient, stack: Stack, prompt: str
) -> None:
    r = await client.post(
        f"{stack.url}/v1/streams",
        json={
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": prompt}],
            "max_tokens": 5,
            "temperature": 0.5,
            "metadata": {"ticket": "T-1"},
        },
        headers=stack.headers,
    )
    assert r.status_code == 202
    stream_id = r.json()["id"]
    assert r.headers["location"] == f"/v1/streams/{stream_id}"
    events = [e async for e in tg.events(stream_id)]
    assert events[-1].finish_reason == "length"  # max_tokens reached the upstream

    status = (await client.get(f"{stack.url}/v1/streams/{stream_id}", headers=stack.headers)).json()
    assert status["status"] == "completed"
    assert status["attempt"] == 1
    assert status["events"] == len(events) == 2 + 5 + 1
    assert status["usage"]["completion_tokens"] == 5
    assert status["metadata"] == {"ticket": "T-1"}
    assert status["created_at"] <= status["started_at"] <= status["finished_at"]


@pytest.mark.parametrize("via", ["header", "query"])
async def test_resume_after_disconnect_delivers_each_event_once(
    client: httpx.AsyncClient, stack: Stack, mock_url: str, prompt: str, via: str
) -> None:
    prompt += " [mock:tokens=60,delay_ms=10]"
    created = await create(client, stack, {"prompt": prompt})
    url = stack.url + created["events_url"]

    _, first = await read_sse(client, url, headers=stack.headers, limit=6)
    assert len(first) == 6 and first[-1].event == "delta"
    cursor = first[-1].id
    assert cursor
    if via == "header":
        _, rest = await read_sse(client, url, headers=stack.headers | {"Last-Event-ID": cursor})
    else:
        _, rest = await read_sse(client, url, headers=stack.headers, params={"last_event_id": cursor})

    assert rest[0].data["seq"] == 7
    assert_exactly_once(first + rest)
    assert text_of(first + rest) == await expected_answer(mock_url, prompt)


async def test_header_cursor_wins_over_query(client: httpx.AsyncClient, stack: Stack, prompt: str) -> None:
    created = await create(client, stack, {"prompt": prompt + " [mock:tokens=4]"})
    url = stack.url + created["events_url"]
    _, events = await read_sse(client, url, headers=stack.headers)
    _, rest = await read_sse(
        client,
        url,
        headers=stack.headers | {"Last-Event-ID": events[2].id},
        params={"last_event_id": events[0].id},
    )
    assert [e.data["seq"] for e in rest] == [e.data["seq"] for e in events[3:]]


async def test_late_reader_gets_the_whole_stream_and_concurrent_readers_agree(
    client: httpx.AsyncClient, stack: Stack, mock_url: str, prompt: str
) -> None:
    prompt += " [mock:tokens=40,delay_ms=5]"
    created = await create(client, stack, {"prompt": prompt})
    url = stack.url + created["events_url"]

    readers = await asyncio.gather(*(read_sse(client, url, headers=stack.headers) for _ in range(3)))
    _, late = await read_sse(client, url, headers=stack.headers)

    sequences = [[(e.id, e.event, e.data) for e in events] for _, events in readers]
    assert sequences[0] == sequences[1] == sequences[2]
    assert [(e.id, e.event, e.data) for e in late] == sequences[0]
    assert_exactly_once(late)
    assert text_of(late) == await expected_answer(mock_url, prompt)


async def test_reconnect_after_the_terminal_event_gets_204(
    client: httpx.AsyncClient, stack: Stack, prompt: str
) -> None:
    created = await create(client, stack, {"prompt": prompt + " [mock:tokens=3]"})
    url = stack.url + created["events_url"]
    _, events = await read_sse(client, url, headers=stack.headers)
    assert events[-1].event == "done"

    response, again = await read_sse(client, url, headers=stack.headers | {"Last-Event-ID": events[-1].id})
    assert response.status_code == 204
    assert again == []
    # One event short of the end still gets that event.
    _, tail = await read_sse(client, url, headers=stack.headers | {"Last-Event-ID": events[-2].id})
    assert [e.event for e in tail] == ["done"]


async def test_cursor_of_no_entry_resets_to_the_start_never_a_gap(
    client: httpx.AsyncClient, stack: Stack, prompt: str
) -> None:
    created = await create(client, stack, {"prompt": prompt + " [mock:tokens=3]"})
    url = stack.url + created["events_url"]
    _, events = await read_sse(client, url, headers=stack.headers)
    future = "99999999999999-0"  # newer than the stream's end, as after a failover that lost its tail

    _, replay = await read_sse(client, url, headers=stack.headers | {"Last-Event-ID": future})

    assert replay[0].event == "reset"
    assert replay[0].data == {"seq": 0, "attempt": 1, "reason": "cursor_out_of_range"}
    assert [(e.id, e.data) for e in replay[1:]] == [(e.id, e.data) for e in events]


async def test_read_token_opens_only_its_own_stream(
    client: httpx.AsyncClient, stack: Stack, prompt: str
) -> None:
    created = await create(client, stack, {"prompt": prompt + " [mock:tokens=3]"})
    other = await create(client, stack, {"prompt": prompt + " other [mock:tokens=3]"})
    token = created["read_token"]

    async with AsyncClient(stack.url) as reader:  # no API key: the token alone
        events = [e async for e in reader.events(created["id"], token=token)]  # a 200, or it raises
        assert events[-1].type == "done"

        with pytest.raises(Unauthorized) as refused:
            [e async for e in reader.events(other["id"], token=token)]
    assert refused.value.status == 401
    assert refused.value.code == "invalid_token"


async def test_cancel_mid_stream_closes_the_upstream_and_ends_with_cancelled(
    client: httpx.AsyncClient, tg: AsyncClient, stack: Stack, mock_url: str, prompt: str
) -> None:
    prompt += " [mock:tokens=400,delay_ms=10]"
    created = await create(client, stack, {"prompt": prompt})
    events = []
    async for event in tg.events(created["id"]):
        events.append(event)
        if len(events) == 5:  # queued, started, 3 deltas
            r = await client.post(f"{stack.url}/v1/streams/{created['id']}/cancel", headers=stack.headers)
            assert r.status_code == 202
            assert r.json() == {"id": created["id"], "status": "running", "cancel_requested": True}

    assert_exactly_once(events)
    assert events[-1].type == "cancelled"
    deltas = [e for e in events if e.type == "delta"]
    assert events[-1].usage == {"completion_tokens": len(deltas)}
    assert len(deltas) < 400
    [served] = await mock_requests(mock_url, prompt)
    assert served["closed_early"] is True
    assert served["tokens_sent"] < 400

    again = await client.post(f"{stack.url}/v1/streams/{created['id']}/cancel", headers=stack.headers)
    assert again.status_code == 200
    assert again.json()["status"] == "cancelled"
    status = (await client.get(f"{stack.url}/v1/streams/{created['id']}", headers=stack.headers)).json()
    assert status["status"] == "cancelled"


async def test_idempotency_key_returns_the_same_stream_for_the_same_body(
    client: httpx.AsyncClient, stack: Stack, prompt: str
) -> None:
    body = {"prompt": prompt + " [mock:tokens=2]"}
    headers = stack.headers | {"Idempotency-Key": f"order-{prompt}"}
    first = await client.post(f"{stack.url}/v1/streams", json=body, headers=headers)
    second = await client.post(f"{stack.url}/v1/streams", json=body, headers=headers)
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]

    conflict = await client.post(f"{stack.url}/v1/streams", json={"prompt": "else"}, headers=headers)
    assert conflict.status_code == 409
    assert conflict.json()["error"]["code"] == "idempotency_conflict"


async def test_idle_reader_gets_keep_alive_comments(client: httpx.AsyncClient, make_stack: MakeStack) -> None:
    quiet = make_stack(TAILGATE_PING_S="0.2")
    url = await quiet.agateway()  # no worker: the stream stays queued and its reader idle
    created = (await client.post(f"{url}/v1/streams", json={"prompt": "wait"}, headers=quiet.headers)).json()
    lines: list[str] = []
    async with client.stream("GET", url + created["events_url"], headers=quiet.headers) as response:
        async for line in response.aiter_lines():
            lines.append(line)
            if lines.count(": ping") == 2:
                break
    assert lines[:2] == ["retry: 1000", ""]
    assert lines[2].startswith("id: ")
    assert lines[3:] == ["event: queued", 'data: {"seq":1,"position":1}', "", ": ping", "", ": ping"]


async def first_bytes(client: httpx.AsyncClient, request: httpx.Request) -> bytes:
    """The first chunk of a streamed answer (the status must be 200)."""
    response = await client.send(request, stream=True)
    try:
        assert response.status_code == 200, await response.aread()
        async for chunk in response.aiter_raw():
            return chunk
    finally:
        await response.aclose()
    raise AssertionError(f"{request.url} answered 200 with no body")


async def test_every_native_event_stream_starts_with_the_retry_hint(
    client: httpx.AsyncClient, stack: Stack, prompt: str
) -> None:
    created = await create(client, stack, {"prompt": prompt + " [mock:tokens=3]"})
    url = stack.url + created["events_url"]
    _, events = await read_sse(client, url, headers=stack.headers)
    token = created["read_token"]
    hint = b"retry: 1000\n\n"

    def get(headers: dict[str, str], params: dict[str, str] | None = None) -> httpx.Request:
        return client.build_request("GET", url, headers=stack.headers | headers, params=params)

    native = [
        get({}),  # from the start
        get({"Last-Event-ID": events[1].id}),  # resumed
        get({}, {"last_event_id": events[1].id, "token": token}),  # as a browser's EventSource reopens
        get({"Last-Event-ID": "99999999999999-0"}),  # out of range: reset, then the whole stream
    ]
    for request in native:
        first = await first_bytes(client, request)
        assert first.startswith(hint), (request.url, first[:80])
    ask = client.build_request(
        "POST", f"{stack.url}/ask_query", json={"prompt": prompt}, headers=stack.headers
    )
    assert b"retry:" not in await first_bytes(client, ask)  # JSON lines: no SSE field to carry it


async def test_the_readme_curl_script_runs_as_written(stack: Stack) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("\n## A curl session\n", 1)[1].split("\n## ", 1)[0]
    [script] = re.findall(r"```bash\n(.*?)```", section, re.S)
    env = child_env(TAILGATE_URL=stack.url, TAILGATE_API_KEY=stack.api_key)

    run = await arun(["bash", "-c", script], env=env)

    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["event:", "done", "204"]
