"""`POST /v1/chat/completions` through the openai SDK, unmodified: OpenAI's chunks and whole
completions, the stream id header, a client that drops, re-reading, the SDK's error classes, and a
worker killed mid-answer."""

from __future__ import annotations

import asyncio
import json
import signal

import httpx
import openai
import pytest
from httpx_sse import EventSource
from openai.types.chat import ChatCompletionMessageParam

from tailgate.dev.procs import await_until
from tailgate.dev.sse import assert_exactly_once, read_sse, text_of
from tailgate.events import id_key
from tests.harness import (
    FAST_TAKEOVER,
    MODEL,
    MakeStack,
    Stack,
    expected_answer,
    mock_requests,
    takeover_stack,
    worker_of,
)
from tests.openai_support import has_stored, sdk


def ask(prompt: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": prompt}]


async def test_sdk_stream_is_openais_chunks_with_the_models_answer(
    stack: Stack, mock_url: str, prompt: str
) -> None:
    async with sdk(stack.url, stack.api_key) as api:
        stream = await api.chat.completions.create(
            model=MODEL, messages=ask(prompt), stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]

    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    first, *middle, last_choice, usage = chunks
    assert first.choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in [first, *middle]] == [None] * (1 + len(middle))
    assert last_choice.choices[0].finish_reason == "stop"
    assert usage.choices == [] and usage.usage is not None and usage.usage.completion_tokens == 24
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == await expected_answer(mock_url, prompt)


async def test_sdk_whole_completion_waits_for_the_answer(stack: Stack, mock_url: str, prompt: str) -> None:
    async with sdk(stack.url, stack.api_key) as api:
        completion = await api.chat.completions.create(
            model=MODEL, messages=ask(prompt), max_completion_tokens=7, temperature=0.2, seed=1
        )

    assert completion.object == "chat.completion"
    [choice] = completion.choices
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "length"  # max_completion_tokens reached the upstream
    assert choice.message.content == await expected_answer(mock_url, prompt, max_tokens=7)
    assert completion.usage is not None and completion.usage.completion_tokens == 7


async def test_raw_response_names_the_native_stream_which_holds_the_same_answer(
    client: httpx.AsyncClient, stack: Stack, mock_url: str, prompt: str
) -> None:
    async with sdk(stack.url, stack.api_key) as api:
        raw = await api.chat.completions.with_raw_response.create(model=MODEL, messages=ask(prompt))
    stream_id = raw.headers["X-Tailgate-Stream-Id"]
    completion = raw.parse()

    assert completion.id == f"chatcmpl-{stream_id}"
    _, events = await read_sse(client, f"{stack.url}/v1/streams/{stream_id}/events", headers=stack.headers)
    assert text_of(events) == completion.choices[0].message.content == await expected_answer(mock_url, prompt)


async def test_every_frame_has_the_streams_cursor_as_id_and_the_last_is_done(
    client: httpx.AsyncClient, stack: Stack, prompt: str
) -> None:
    body = {"model": MODEL, "messages": ask(prompt), "stream": True}
    async with client.stream(
        "POST", f"{stack.url}/v1/chat/completions", json=body, headers=stack.headers
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        stream_id = r.headers["x-tailgate-stream-id"]
        frames = [sse async for sse in EventSource(r).aiter_sse()]

    _, native = await read_sse(client, f"{stack.url}/v1/streams/{stream_id}/events", headers=stack.headers)
    cursors = [e.id for e in native]
    assert frames[-1].data == "[DONE]"
    assert all(f.id in cursors for f in frames)
    assert [f.id for f in frames] == sorted((f.id for f in frames), key=id_key)
    assert frames[-1].id == frames[-2].id == cursors[-1]  # the finish chunk and [DONE]: the `done` event


async def test_client_that_drops_mid_stream_does_not_stop_the_generation(
    client: httpx.AsyncClient, stack: Stack, mock_url: str, prompt: str
) -> None:
    prompt += " [mock:tokens=80,delay_ms=10]"
    async with sdk(stack.url, stack.api_key) as api:
        stream = await api.chat.completions.create(model=MODEL, messages=ask(prompt), stream=True)
        stream_id = stream.response.headers["x-tailgate-stream-id"]
        seen = ""
        async for chunk in stream:
            seen += chunk.choices[0].delta.content or ""
            if len(seen.split()) >= 4:
                break
        await stream.close()  # the client goes away after a few chunks

    _, events = await read_sse(client, f"{stack.url}/v1/streams/{stream_id}/events", headers=stack.headers)
    expected = await expected_answer(mock_url, prompt)
    assert_exactly_once(events)
    assert events[-1].event == "done"
    assert text_of(events) == expected and expected.startswith(seen)
    [served] = await mock_requests(mock_url, prompt)
    assert served["completed"] is True and served["closed_early"] is False


async def test_same_idempotency_key_re_reads_the_same_stream_and_last_event_id_resumes_it(
    client: httpx.AsyncClient, stack: Stack, mock_url: str, prompt: str
) -> None:
    prompt += " [mock:tokens=30,delay_ms=5]"
    body = {"model": MODEL, "messages": ask(prompt), "stream": True}
    headers = stack.headers | {"Idempotency-Key": f"chat-{prompt}"}
    url = f"{stack.url}/v1/chat/completions"

    async def frames(extra: dict[str, str]) -> tuple[str, list[tuple[str, str]]]:
        async with client.stream("POST", url, json=body, headers=headers | extra) as r:
            assert r.status_code == 200, await r.aread()
            return r.headers["x-tailgate-stream-id"], [
                (s.id, s.data) async for s in EventSource(r).aiter_sse()
            ]

    first_id, whole = await frames({})
    again_id, again = await frames({})
    cut = 6
    resumed_id, rest = await frames({"Last-Event-ID": whole[cut - 1][0]})

    assert first_id == again_id == resumed_id
    assert again == whole  # a re-read, not a new generation
    assert rest == whole[cut:]
    text = "".join(
        c["choices"][0]["delta"].get("content", "") for _, d in whole[:-1] if (c := json.loads(d))["choices"]
    )
    assert text == await expected_answer(mock_url, prompt)
    assert len(await mock_requests(mock_url, prompt)) == 1


async def test_sdk_raises_openais_error_classes(
    client: httpx.AsyncClient, stack: Stack, make_stack: MakeStack, prompt: str
) -> None:
    async with sdk(stack.url, "not-a-key", max_retries=0) as stranger:
        with pytest.raises(openai.AuthenticationError) as unauthorized:
            await stranger.chat.completions.create(model=MODEL, messages=ask(prompt))
    assert unauthorized.value.status_code == 401 and unauthorized.value.code == "unauthorized"

    async with sdk(stack.url, stack.api_key, max_retries=0) as api:
        with pytest.raises(openai.BadRequestError) as invalid:
            await api.chat.completions.create(model=MODEL, messages=ask(prompt), temperature=5)
        assert invalid.value.status_code == 400  # a body that does not validate: 400, as OpenAI's
        assert invalid.value.type == "invalid_request_error" and invalid.value.param == "temperature"
        with pytest.raises(openai.BadRequestError) as unknown:
            await api.chat.completions.create(model=MODEL, messages=ask(prompt), extra_body={"tools_x": 1})
        assert unknown.value.message.endswith("Unrecognized request argument supplied: tools_x")
        with pytest.raises(openai.BadRequestError):
            await api.chat.completions.create(model=MODEL, messages=[])

    allowlisted = make_stack(TAILGATE_MODELS=MODEL)
    async with sdk(await allowlisted.agateway(), stack.api_key, max_retries=0) as api:
        with pytest.raises(openai.NotFoundError) as not_found:
            await api.chat.completions.create(model="no-such-model", messages=ask(prompt))
    assert not_found.value.code == "model_not_found" and not_found.value.param == "model"

    full = make_stack(TAILGATE_MAX_QUEUED="0")
    async with sdk(await full.agateway(), stack.api_key, max_retries=0) as api:
        with pytest.raises(openai.RateLimitError) as limited:
            await api.chat.completions.create(model=MODEL, messages=ask(prompt), stream=True)
    assert limited.value.response.headers["retry-after"] == "1"
    assert limited.value.body == {
        "message": "the queue is full; retry shortly",
        "type": "rate_limit_error",
        "code": "queue_full",
        "param": None,
    }


async def test_worker_killed_after_text_ends_the_chunks_with_an_error_the_sdk_raises(
    client: httpx.AsyncClient, make_stack: MakeStack, mock_url: str, prompt: str
) -> None:
    s, url = await takeover_stack(make_stack)
    prompt += " [mock:tokens=200,delay_ms=10]"
    expected = await expected_answer(mock_url, prompt)
    seen = ""
    async with sdk(url, s.api_key) as api:
        stream = await api.chat.completions.create(model=MODEL, messages=ask(prompt), stream=True)
        stream_id = stream.response.headers["x-tailgate-stream-id"]
        with pytest.raises(openai.APIError) as reset:
            async for chunk in stream:
                seen += chunk.choices[0].delta.content or ""
                if len(seen.split()) == 5:
                    (await worker_of(s, stream_id)).signal(signal.SIGKILL)

    assert reset.value.code == "stream_reset"
    assert f"/v1/streams/{stream_id}/events" in reset.value.message
    assert expected.startswith(seen) and seen != expected  # the first attempt's text, never spliced
    # The generation went on: the native stream shows the reset and holds the whole new answer.
    _, events = await read_sse(client, f"{url}/v1/streams/{stream_id}/events", headers=s.headers)
    assert_exactly_once(events)
    assert [e.data["reason"] for e in events if e.event == "reset"] == ["worker_lost"]
    assert events[-1].event == "done" and text_of(events) == expected


async def test_worker_killed_before_any_text_is_invisible_to_chat_clients(
    client: httpx.AsyncClient, make_stack: MakeStack, mock_url: str, prompt: str
) -> None:
    s, url = await takeover_stack(make_stack)
    prompt += " [mock:tokens=20,ttft_ms=1500]"
    async with sdk(url, s.api_key) as api:
        stream = await api.chat.completions.create(model=MODEL, messages=ask(prompt), stream=True)
        stream_id = stream.response.headers["x-tailgate-stream-id"]
        await await_until(lambda: has_stored(s.redis_url, stream_id, 2), "attempt 1 started")
        (await worker_of(s, stream_id)).signal(signal.SIGKILL)  # before its first token
        chunks = [chunk async for chunk in stream]

    assert [c.choices[0].delta.role for c in chunks].count("assistant") == 1
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == await expected_answer(
        mock_url, prompt
    )
    assert chunks[-1].choices[0].finish_reason == "stop"
    _, events = await read_sse(client, f"{url}/v1/streams/{stream_id}/events", headers=s.headers)
    assert [e.event for e in events[:4]] == ["queued", "started", "reset", "started"]  # the client saw none


async def test_whole_completion_survives_a_worker_killed_mid_answer(
    make_stack: MakeStack, mock_url: str, prompt: str
) -> None:
    s = make_stack(**FAST_TAKEOVER)
    url = await s.agateway()
    doomed = await s.aworker()
    prompt += " [mock:tokens=200,delay_ms=10]"
    async with sdk(url, s.api_key) as api:
        whole = asyncio.create_task(api.chat.completions.create(model=MODEL, messages=ask(prompt)))
        stream_id = (await doomed.await_match(r"stream ([0-9a-f]{32}) attempt 1 started"))[1]
        await await_until(lambda: has_stored(s.redis_url, stream_id, 20), "text streamed")
        await s.aworker()
        doomed.signal(signal.SIGKILL)
        completion = await whole

    assert completion.id == f"chatcmpl-{stream_id}"
    assert completion.choices[0].message.content == await expected_answer(mock_url, prompt)
    assert len(await mock_requests(mock_url, prompt)) == 2
