"""Bad input gets the right status and a JSON error saying what to fix, and writes nothing."""

from __future__ import annotations

import secrets

import httpx
import pytest
from redis.asyncio import Redis

from tailgate.dev.procs import arun, tailgate_command
from tailgate.dev.sse import assert_exactly_once, read_sse, text_of
from tests.conftest import OTHER_KEY
from tests.harness import MakeStack, Stack

UNKNOWN = "0" * 32


def error_of(response: httpx.Response) -> dict[str, str]:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert body["error"]["message"]
    error: dict[str, str] = body["error"]
    return error


@pytest.mark.parametrize(
    "path", [f"/v1/streams/{UNKNOWN}", f"/v1/streams/{UNKNOWN}/events", "/v1/streams/not-an-id/events"]
)
async def test_unknown_stream_is_404_with_json_error(
    client: httpx.AsyncClient, stack: Stack, path: str
) -> None:
    r = await client.get(stack.url + path, headers=stack.headers)
    assert r.status_code == 404
    assert error_of(r)["code"] == "not_found"


async def test_stream_of_another_key_is_404_not_403(
    client: httpx.AsyncClient, stack: Stack, prompt: str
) -> None:
    created = await client.post(f"{stack.url}/v1/streams", json={"prompt": prompt}, headers=stack.headers)
    stream_id = created.json()["id"]
    other = {"Authorization": f"Bearer {OTHER_KEY}"}
    for method, path in [
        ("GET", f"/v1/streams/{stream_id}"),
        ("GET", f"/v1/streams/{stream_id}/events"),
        ("POST", f"/v1/streams/{stream_id}/cancel"),
    ]:
        r = await client.request(method, stack.url + path, headers=other)
        assert r.status_code == 404, path
        assert error_of(r)["code"] == "not_found"
    r = await client.get(f"{stack.url}/v1/streams/{stream_id}", headers=stack.headers)
    assert r.json()["status"] != "cancelled"


@pytest.mark.parametrize("cursor", ["abc", "12", "1-2-3", "-1-0", "1732400000000-0;DROP"])
async def test_malformed_cursor_is_400(
    client: httpx.AsyncClient, stack: Stack, prompt: str, cursor: str
) -> None:
    created = (
        await client.post(f"{stack.url}/v1/streams", json={"prompt": prompt}, headers=stack.headers)
    ).json()
    url = stack.url + created["events_url"]
    r = await client.get(url, headers=stack.headers | {"Last-Event-ID": cursor})
    assert r.status_code == 400
    assert error_of(r)["code"] == "bad_cursor"
    r = await client.get(url, headers=stack.headers, params={"last_event_id": cursor})
    assert r.status_code == 400


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({}, "exactly one of `messages` or `prompt`"),
        ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "exactly one"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": 3}, "prompt"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "a", "temperature": 3}, "temperature"),
        ({"prompt": "a", "promt": "typo"}, "promt"),
    ],
)
async def test_invalid_body_is_422_and_creates_nothing(
    client: httpx.AsyncClient, stack: Stack, body: dict[str, object], says: str
) -> None:
    before = await _stream_keys(stack.redis_url)
    r = await client.post(f"{stack.url}/v1/streams", json=body, headers=stack.headers)
    assert r.status_code == 422
    error = error_of(r)
    assert error["code"] == "invalid_request"
    assert says in error["message"]
    assert await _stream_keys(stack.redis_url) == before


async def test_body_that_is_not_json_is_422(client: httpx.AsyncClient, stack: Stack) -> None:
    r = await client.post(
        f"{stack.url}/v1/streams",
        content=b"{not json",
        headers=stack.headers | {"Content-Type": "application/json"},
    )
    assert r.status_code == 422
    assert error_of(r)["code"] == "invalid_request"


async def test_body_over_the_limit_is_413(client: httpx.AsyncClient, stack: Stack) -> None:
    r = await client.post(f"{stack.url}/v1/streams", json={"prompt": "x" * (1 << 20)}, headers=stack.headers)
    assert r.status_code == 413
    assert error_of(r)["code"] == "body_too_large"


@pytest.mark.parametrize("auth", [None, "Bearer", "Bearer wrong-key", "Basic dXNlcjpwYXNz"])
async def test_missing_or_unknown_key_is_401(
    client: httpx.AsyncClient, stack: Stack, auth: str | None
) -> None:
    headers = {"Authorization": auth} if auth else {}
    r = await client.post(f"{stack.url}/v1/streams", json={"prompt": "hi"}, headers=headers)
    assert r.status_code == 401
    assert error_of(r)["code"] == "unauthorized"
    r = await client.get(f"{stack.url}/v1/streams/{UNKNOWN}/events", headers=headers)
    assert r.status_code == 401


async def test_key_added_in_redis_by_the_cli_is_accepted(client: httpx.AsyncClient, stack: Stack) -> None:
    added = await arun(tailgate_command("keys", "add", "ci"), stack.env)
    assert added.returncode == 0, added.stderr
    key = added.stdout.strip()
    headers = {"Authorization": f"Bearer {key}"}
    r = await client.post(f"{stack.url}/v1/streams", json={"prompt": "hi [mock:tokens=1]"}, headers=headers)
    assert r.status_code == 202
    revoked = await arun(tailgate_command("keys", "revoke", key), stack.env)
    assert revoked.returncode == 0, revoked.stderr
    r = await client.post(f"{stack.url}/v1/streams", json={"prompt": "hi"}, headers=headers)
    assert r.status_code == 401


async def test_limits_per_key_answer_429_with_retry_after(
    client: httpx.AsyncClient, make_stack: MakeStack
) -> None:
    key = f"tg-limited-{secrets.token_hex(4)}"  # counters are per key: start from zero
    limited = make_stack(
        TAILGATE_MAX_ACTIVE_PER_KEY="2", TAILGATE_RATE_LIMIT_PER_MIN="4", TAILGATE_API_KEYS=key
    )
    await limited.agateway()  # no worker: streams stay queued, so they count as active
    url, headers = f"{limited.url}/v1/streams", {"Authorization": f"Bearer {key}"}

    ids = [(await client.post(url, json={"prompt": "a"}, headers=headers)).json()["id"] for _ in range(2)]
    r = await client.post(url, json={"prompt": "a"}, headers=headers)
    assert r.status_code == 429
    assert error_of(r)["code"] == "too_many_streams"
    assert r.headers["retry-after"] == "1"

    cancelled = await client.post(f"{url}/{ids[0]}/cancel", headers=headers)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    third = await client.post(url, json={"prompt": "a"}, headers=headers)
    assert third.status_code == 202  # 3rd this minute
    await client.post(f"{url}/{ids[1]}/cancel", headers=headers)
    # 4th this minute: the refused request used no quota.
    assert (await client.post(url, json={"prompt": "a"}, headers=headers)).status_code == 202

    await client.post(f"{url}/{third.json()['id']}/cancel", headers=headers)
    r = await client.post(url, json={"prompt": "a"}, headers=headers)
    assert r.status_code == 429
    assert error_of(r)["code"] == "rate_limited"
    assert 1 <= int(r.headers["retry-after"]) <= 60


async def test_cancel_of_a_queued_stream_ends_it_at_once(
    client: httpx.AsyncClient, make_stack: MakeStack
) -> None:
    idle = make_stack()
    await idle.agateway()  # no worker
    created = (await client.post(f"{idle.url}/v1/streams", json={"prompt": "a"}, headers=idle.headers)).json()
    r = await client.post(f"{idle.url}/v1/streams/{created['id']}/cancel", headers=idle.headers)
    assert r.status_code == 200
    _, events = await read_sse(client, idle.url + created["events_url"], headers=idle.headers)
    assert [(e.event, e.data) for e in events] == [
        ("queued", {"seq": 1, "position": 1}),  # no worker: first in its queue
        ("cancelled", {"seq": 2, "usage": None}),
    ]


async def test_health_and_readiness(client: httpx.AsyncClient, stack: Stack) -> None:
    assert (await client.get(f"{stack.url}/healthz")).json() == {"status": "ok"}
    assert (await client.get(f"{stack.url}/readyz")).json() == {"status": "ready"}
    metrics = (await client.get(f"{stack.url}/metrics")).text
    assert "tailgate_streams_created_total" in metrics


async def _stream_keys(url: str) -> set[str]:
    async with Redis.from_url(url, decode_responses=True) as r:
        return {key async for key in r.scan_iter("tg:{*")}


async def test_a_full_queue_answers_429_queue_full(client: httpx.AsyncClient, make_stack: MakeStack) -> None:
    full = make_stack(TAILGATE_MAX_QUEUED="2")
    await full.agateway()  # no worker: jobs stay queued
    url = f"{full.url}/v1/streams"
    for _ in range(2):
        assert (await client.post(url, json={"prompt": "a"}, headers=full.headers)).status_code == 202
    r = await client.post(url, json={"prompt": "a"}, headers=full.headers)
    assert r.status_code == 429
    assert error_of(r)["code"] == "queue_full"
    assert r.headers["retry-after"] == "1"


INJECTION = 'hi\n\nevent: done\ndata: {"seq": 99}\n\nid: 1-0\nretry: 1\n: comment\r\n\r\nbye'


async def test_sse_control_text_in_prompts_metadata_and_model_output_stays_inside_its_event(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    # The mock echoes the prompt back as the model's output ([mock:echo=1]).
    body = {"prompt": INJECTION + " [mock:echo=1]", "metadata": {"note": INJECTION}}
    created = (await client.post(f"{stack.url}/v1/streams", json=body, headers=stack.headers)).json()
    _, events = await read_sse(client, stack.url + created["events_url"], headers=stack.headers)

    assert_exactly_once(events)  # the strict reader: every event has an id and a JSON seq
    kinds = [e.event for e in events]
    assert kinds[:2] == ["queued", "started"] and kinds[-1] == "done"
    assert set(kinds[2:-1]) == {"delta"}
    assert text_of(events) == INJECTION + " "
    status = (await client.get(stack.url + created["status_url"], headers=stack.headers)).json()
    assert status["metadata"] == {"note": INJECTION}
