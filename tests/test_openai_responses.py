"""The Responses API in background mode through the openai SDK, unmodified: create, drop, resume by
`starting_after` with every `sequence_number` once; retrieve in every status; cancel; the SDK's error
classes; a worker killed mid-answer."""

from __future__ import annotations

import asyncio
import json
import signal
from typing import Any

import httpx
import openai
import pytest
from httpx_sse import EventSource
from openai.types.responses import Response, ResponseStreamEvent

from tailgate.dev.procs import await_until
from tailgate.dev.sse import assert_exactly_once, read_sse, text_of
from tests.harness import MODEL, MakeStack, Stack, expected_answer, mock_requests, takeover_stack, worker_of
from tests.openai_support import expected_for, has_stored, sdk, stored


async def raw_events(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], response_id: str
) -> list[dict[str, Any]]:
    """A response's events from the start, read as plain SSE."""
    path = f"{url}/v1/responses/{response_id}"
    async with client.stream("GET", path, params={"stream": "true"}, headers=headers) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = []
        async for sse in EventSource(r).aiter_sse():
            events.append(json.loads(sse.data))
            assert events[-1]["type"] == sse.event
        return events


def text_in(events: list[ResponseStreamEvent]) -> str:
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


async def until_status(api: openai.AsyncOpenAI, response_id: str, *statuses: str) -> Response:
    """The response, once it is in one of ``statuses``."""
    found: list[Response] = []

    async def reached() -> bool:
        found.append(await api.responses.retrieve(response_id))
        return found[-1].status in statuses

    await await_until(reached, f"{response_id} {' or '.join(statuses)}")
    return found[-1]


async def test_stream_dropped_and_resumed_by_starting_after_gets_every_event_once(
    stack: Stack, mock_url: str, prompt: str
) -> None:
    prompt += " [mock:tokens=60,delay_ms=10]"
    async with sdk(stack.url, stack.api_key) as api:
        first: list[ResponseStreamEvent] = []
        stream = await api.responses.create(model=MODEL, input=prompt, background=True, stream=True)
        async for event in stream:
            first.append(event)
            if len(text_in(first).split()) == 5:
                break  # the connection drops here
        await stream.close()
        assert first[0].type == "response.created"
        response_id = first[0].response.id
        starting_after = first[-1].sequence_number
        rest = [
            e
            async for e in await api.responses.retrieve(
                response_id, stream=True, starting_after=starting_after
            )
        ]
        final = await api.responses.retrieve(response_id)

    events = first + rest
    expected = await expected_answer(mock_url, prompt)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:5]] == [
        "response.created",
        "response.queued",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert [e.type for e in events[-4:]] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert text_in(events) == expected
    assert final.status == "completed" and final.output_text == expected
    assert final.id == response_id and final.background is True
    assert final.usage is not None and final.usage.output_tokens == 60
    assert len(await mock_requests(mock_url, prompt)) == 1


async def test_a_late_reader_and_a_resumed_one_see_the_same_events(stack: Stack, prompt: str) -> None:
    async with sdk(stack.url, stack.api_key) as api:
        created = await api.responses.create(model=MODEL, input=prompt + " [mock:tokens=5]", background=True)
        assert created.status == "queued" and created.output == []
        await until_status(api, created.id, "completed")
        whole = [e.model_dump() async for e in await api.responses.retrieve(created.id, stream=True)]
        tail = [
            e.model_dump()
            async for e in await api.responses.retrieve(created.id, stream=True, starting_after=6)
        ]
    assert len(whole) == 3 + 2 + 5 + 3 + 1
    assert tail == whole[7:]


async def test_input_messages_and_instructions_reach_the_model_and_show_in_the_response(
    stack: Stack, mock_url: str, prompt: str
) -> None:
    async with sdk(stack.url, stack.api_key) as api:
        created = await api.responses.create(
            model=MODEL,
            instructions="be brief",
            input=[
                {"role": "user", "content": "hello"},
                {  # an earlier answer, passed back as the API gave it
                    "id": "msg_1",
                    "type": "message",
                    "role": "assistant",
                    "status": "completed",
                    "content": [{"type": "output_text", "text": "hi", "annotations": []}],
                },
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": prompt}]},
            ],
            max_output_tokens=6,
            temperature=0.5,
            metadata={"ticket": "T-1"},
            background=True,
        )
        final = await until_status(api, created.id, "incomplete")

    expected = await expected_for(
        mock_url,
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi"},
            {"role": "user", "content": prompt},
        ],
        max_tokens=6,
    )
    assert final.output_text == expected
    assert final.incomplete_details is not None and final.incomplete_details.reason == "max_output_tokens"
    assert final.instructions == "be brief" and final.max_output_tokens == 6
    assert final.temperature == 0.5 and final.metadata == {"ticket": "T-1"}


async def test_retrieve_reports_queued_running_and_each_way_a_response_ends(
    stack: Stack, make_stack: MakeStack, prompt: str
) -> None:
    idle = make_stack()  # no worker: what it queues stays queued
    async with sdk(await idle.agateway(), idle.api_key) as api:
        waiting = await api.responses.create(model=MODEL, input=prompt, background=True)
        assert (await api.responses.retrieve(waiting.id)).status == "queued"
        assert (await api.responses.cancel(waiting.id)).status == "cancelled"
        assert (await api.responses.retrieve(waiting.id)).status == "cancelled"

    async with sdk(stack.url, stack.api_key) as api:
        running = await api.responses.create(
            model=MODEL, input=prompt + " [mock:tokens=300,delay_ms=10]", background=True
        )
        await until_status(api, running.id, "in_progress")
        failing = await api.responses.create(
            model=MODEL, input=prompt + " [mock:status=400]", background=True
        )
        failed = await until_status(api, failing.id, "failed", "completed")
        done = await until_status(api, running.id, "completed")

    assert failed.status == "failed" and failed.error is not None
    assert "upstream_bad_request" in failed.error.message
    assert done.output[0].type == "message" and done.output[0].status == "completed"


async def test_cancel_stops_a_long_response_and_closes_the_upstream_early(
    stack: Stack, mock_url: str, prompt: str
) -> None:
    prompt += " [mock:tokens=400,delay_ms=10]"
    async with sdk(stack.url, stack.api_key) as api:
        created = await api.responses.create(model=MODEL, input=prompt, background=True)

        async def some_text() -> bool:
            return len((await api.responses.retrieve(created.id)).output_text.split()) >= 5

        await await_until(some_text, "some text generated")
        cancelled = await api.responses.cancel(created.id)
        again = await api.responses.cancel(created.id)  # idempotent
        final = await api.responses.retrieve(created.id)

    assert cancelled.status == again.status == final.status == "cancelled"
    assert final.output[0].type == "message" and final.output[0].status == "incomplete"
    assert final.usage is not None and 5 <= final.usage.output_tokens < 400
    [served] = await mock_requests(mock_url, prompt)
    assert served["closed_early"] is True and served["tokens_sent"] < 400


async def test_sdk_raises_openais_error_classes(stack: Stack, prompt: str) -> None:
    async with sdk(stack.url, "not-a-key", max_retries=0) as stranger:
        with pytest.raises(openai.AuthenticationError):
            await stranger.responses.create(model=MODEL, input=prompt, background=True)
    async with sdk(stack.url, stack.api_key, max_retries=0) as api:
        for unknown in (f"resp_{'0' * 32}", "resp_nope"):
            with pytest.raises(openai.NotFoundError) as not_found:
                await api.responses.retrieve(unknown)
            assert not_found.value.code == "not_found"
        with pytest.raises(openai.NotFoundError):
            await api.responses.cancel(f"resp_{'0' * 32}")
        with pytest.raises(openai.BadRequestError) as foreground:
            await api.responses.create(model=MODEL, input=prompt)
        assert "background: true" in foreground.value.message
        with pytest.raises(openai.BadRequestError) as invalid:
            await api.responses.create(model=MODEL, input=prompt, background=True, max_output_tokens=0)
        assert invalid.value.param == "max_output_tokens"
    async with sdk(stack.url, "tg-test-key-two", max_retries=0) as other:
        mine = await other.responses.create(model=MODEL, input=prompt + " [mock:tokens=2]", background=True)
    async with sdk(stack.url, stack.api_key, max_retries=0) as api:
        with pytest.raises(openai.NotFoundError):  # another key's response: not found, never forbidden
            await api.responses.retrieve(mine.id)


async def test_a_stream_that_is_not_a_response_is_not_found_as_one(
    client: httpx.AsyncClient, stack: Stack, prompt: str
) -> None:
    r = await client.post(f"{stack.url}/v1/streams", json={"prompt": prompt}, headers=stack.headers)
    r = await client.get(f"{stack.url}/v1/responses/resp_{r.json()['id']}", headers=stack.headers)
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "invalid_request_error"


async def test_worker_killed_after_text_fails_the_response_with_an_error_the_sdk_raises(
    client: httpx.AsyncClient, make_stack: MakeStack, mock_url: str, prompt: str
) -> None:
    s, url = await takeover_stack(make_stack)
    prompt += " [mock:tokens=200,delay_ms=10]"
    expected = await expected_answer(mock_url, prompt)
    seen: list[ResponseStreamEvent] = []
    async with sdk(url, s.api_key) as api:
        stream = await api.responses.create(model=MODEL, input=prompt, background=True, stream=True)
        stream_id = stream.response.headers["x-tailgate-stream-id"]
        with pytest.raises(openai.APIError) as reset:
            async for event in stream:
                seen.append(event)
                if len(text_in(seen).split()) == 5 and event.type == "response.output_text.delta":
                    (await worker_of(s, stream_id)).signal(signal.SIGKILL)
        assert seen[0].type == "response.created"
        response_id = seen[0].response.id
        failed = await api.responses.retrieve(response_id)
    replay = await raw_events(client, url, s.headers, response_id)  # the SDK would raise at the error

    assert reset.value.code == "stream_reset"
    assert response_id == f"resp_{stream_id}"
    assert expected.startswith(text_in(seen)) and text_in(seen) != expected  # never spliced
    assert failed.status == "failed" and failed.output == []  # the text so far is void
    assert failed.error is not None and failed.error.code == "server_error"
    # Re-read, the response tells the same story: the same events, then the error and the failure.
    assert [(e["type"], e["sequence_number"]) for e in replay[: len(seen)]] == [
        (e.type, e.sequence_number) for e in seen
    ]
    error, end = replay[len(seen) :]
    assert error["type"] == "error" and error["code"] == error["error"]["code"] == "stream_reset"
    assert end["type"] == "response.failed" and end["response"]["status"] == "failed"
    assert [e["sequence_number"] for e in replay] == list(range(len(replay)))
    # The generation went on: the native stream holds the whole new answer.
    _, events = await read_sse(client, f"{url}/v1/streams/{stream_id}/events", headers=s.headers)
    assert_exactly_once(events)
    assert events[-1].event == "done" and text_of(events) == expected


async def test_worker_killed_before_any_text_is_invisible_to_the_response(
    make_stack: MakeStack, mock_url: str, prompt: str
) -> None:
    s, url = await takeover_stack(make_stack)
    prompt += " [mock:tokens=20,ttft_ms=1500]"
    async with sdk(url, s.api_key) as api:
        stream = await api.responses.create(model=MODEL, input=prompt, background=True, stream=True)
        stream_id = stream.response.headers["x-tailgate-stream-id"]
        await await_until(lambda: has_stored(s.redis_url, stream_id, 2), "attempt 1 started")
        (await worker_of(s, stream_id)).signal(signal.SIGKILL)  # before its first token
        events = [e async for e in stream]
        final = await api.responses.retrieve(f"resp_{stream_id}")

    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events].count("response.in_progress") == 1
    assert events[-1].type == "response.completed"
    assert text_in(events) == final.output_text == await expected_answer(mock_url, prompt)
    assert (await stored(s.redis_url, stream_id))["attempt"] == "2"


async def test_concurrent_resumes_from_every_point_agree(stack: Stack, prompt: str) -> None:
    async with sdk(stack.url, stack.api_key) as api:
        created = await api.responses.create(
            model=MODEL, input=prompt + " [mock:tokens=12,delay_ms=5]", background=True
        )

        async def after(n: int) -> list[dict[str, Any]]:
            stream = await api.responses.retrieve(created.id, stream=True, starting_after=n)
            return [e.model_dump() async for e in stream]

        whole = await after(-1)
        tails = await asyncio.gather(*(after(n) for n in range(len(whole))))
    for n, tail in enumerate(tails):
        assert tail == whole[n + 1 :]
