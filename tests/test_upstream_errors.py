"""Every upstream failure ends the stream with one `error` event whose code says what happened, and
the worker goes on serving the next job."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tailgate.dev.procs import free_port
from tailgate.dev.sse import text_of
from tests.harness import MakeStack, Stack, expected_answer, mock_requests, run_stream, start_mock


@pytest.fixture
def strict_mock(log_dir: Path) -> Iterator[str]:
    """A mock upstream of its own that accepts only the key ``sk-right``; its URL."""
    child, url = start_mock(log_dir, "mock-strict", "--api-key", "sk-right")
    yield url
    child.stop()


@pytest.mark.parametrize(
    ("directive", "code", "says", "requests"),
    [
        ("status=401", "upstream_auth", "upstream answered 401", 1),  # a bad key is never retried
        ("status=400", "upstream_bad_request", "upstream answered 400", 1),
        ("status=500", "upstream_error", "upstream answered 500", 3),  # the SDK's two retries, then give up
        ("status=429", "upstream_rate_limited", "upstream answered 429", 3),
    ],
)
async def test_upstream_refusal_ends_with_error_and_the_worker_serves_the_next_job(
    client: httpx.AsyncClient,
    stack: Stack,
    mock_url: str,
    prompt: str,
    directive: str,
    code: str,
    says: str,
    requests: int,
) -> None:
    failing = f"{prompt} [mock:{directive}]"
    events = await run_stream(client, stack, failing)

    assert [e.event for e in events] == ["queued", "started", "error"]
    assert events[-1].data["code"] == code
    assert says in events[-1].data["message"]
    assert len(await mock_requests(mock_url, failing)) == requests

    healthy = await run_stream(client, stack, prompt)
    assert healthy[-1].event == "done"
    assert text_of(healthy) == await expected_answer(mock_url, prompt)


async def test_upstream_that_fails_once_then_succeeds_gives_one_clean_stream(
    client: httpx.AsyncClient, stack: Stack, mock_url: str, prompt: str
) -> None:
    prompt += " [mock:status=429,times=1]"
    events = await run_stream(client, stack, prompt)
    assert events[-1].event == "done"
    assert [e.event for e in events].count("started") == 1
    assert "reset" not in [e.event for e in events]
    assert text_of(events) == await expected_answer(mock_url, prompt)


@pytest.mark.parametrize(
    ("directive", "code"),
    [
        ("fail_after=3", "upstream_error"),  # an error frame inside the stream
        ("drop_after=3", "upstream_unreachable"),  # the connection is cut
        ("stall_after=3", "upstream_timeout"),  # silence past the idle timeout (2 s in the tests)
    ],
)
async def test_failure_mid_stream_keeps_the_text_so_far_and_ends_with_error(
    client: httpx.AsyncClient, stack: Stack, prompt: str, directive: str, code: str
) -> None:
    events = await run_stream(client, stack, f"{prompt} [mock:{directive}]")
    assert [e.event for e in events] == ["queued", "started", "delta", "delta", "delta", "error"]
    assert events[-1].data["code"] == code


async def test_refused_connection_ends_with_upstream_unreachable(
    client: httpx.AsyncClient, make_stack: MakeStack, prompt: str
) -> None:
    nowhere = make_stack(
        OPENAI_BASE_URL=f"http://127.0.0.1:{free_port()}/v1", TAILGATE_UPSTREAM_MAX_RETRIES="0"
    )
    await nowhere.agateway()
    worker = await nowhere.aworker()
    for attempt in range(2):
        events = await run_stream(client, nowhere, f"{prompt} {attempt}")
        assert [e.event for e in events] == ["queued", "started", "error"]
        assert events[-1].data["code"] == "upstream_unreachable"
        assert "cannot reach the upstream" in events[-1].data["message"]
    assert not worker.exited()


async def test_wrong_upstream_key_ends_with_upstream_auth_without_retries(
    client: httpx.AsyncClient, make_stack: MakeStack, strict_mock: str, prompt: str
) -> None:
    wrong = make_stack(OPENAI_BASE_URL=f"{strict_mock}/v1", OPENAI_API_KEY="sk-wrong")
    await wrong.agateway()
    await wrong.aworker()
    events = await run_stream(client, wrong, prompt)
    log: list[dict[str, Any]] = (await client.get(f"{strict_mock}/mock/requests")).json()
    served = [r for r in log if r["prompt"] == prompt]

    assert [e.event for e in events] == ["queued", "started", "error"]
    assert events[-1].data["code"] == "upstream_auth"
    assert "Incorrect API key" in events[-1].data["message"]
    assert [r["status"] for r in served] == [401]  # a bad key is not retried
