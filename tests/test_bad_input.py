"""Malformed input of every kind gets a 4xx JSON error, never a 5xx: property tests of the parsers
against a real Redis, and the inputs that once answered 500, over HTTP."""

from __future__ import annotations

import httpx
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tailgate.dev.procs import RedisServer, arun, child_env, tailgate_command
from tailgate.dev.sse import read_sse
from tailgate.events import CursorError, parse_cursor
from tests.harness import MakeStack, Stack

# Cursor-like text: digits of every script, dashes, whitespace, and very long numbers.
cursorish = st.one_of(
    st.text(alphabet=st.sampled_from("0123456789-١²\n \t"), max_size=45),
    st.tuples(st.integers(0, 2**70), st.integers(0, 2**70)).map(lambda t: f"{t[0]}-{t[1]}"),
    st.text(max_size=30),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=cursorish)
def test_every_cursor_the_parser_accepts_is_one_redis_accepts(redis_server: RedisServer, raw: str) -> None:
    try:
        cursor = parse_cursor(raw)
    except CursorError:
        return
    if cursor is None:
        assert raw == ""
        return
    with redis.Redis.from_url(redis_server.url) as r:
        r.xrange("tg:{property}:events", min=f"({cursor}", count=1)  # raises if Redis refuses it


@pytest.mark.parametrize(
    ("where", "value"),
    [
        ("header", "18446744073709551616-0"),  # one past Redis's largest id part
        ("query", "\u0661-0"),  # ARABIC-INDIC DIGIT ONE: `\d` matched it
        ("query", "1-0\n"),  # `$` let a trailing newline through
        ("query", "1-0 "),
        ("header", "-1-0"),
        ("query", "18446744073709551615-18446744073709551615"),  # the largest id: nothing comes after it
    ],
)
async def test_a_malformed_cursor_is_a_400_bad_cursor(stack: Stack, where: str, value: str) -> None:
    async with httpx.AsyncClient() as client:
        r = await client.post(f"{stack.url}/v1/streams", json={"prompt": "hi"}, headers=stack.headers)
        path = stack.url + r.json()["events_url"]
        if where == "header":
            r = await client.get(path, headers=stack.headers | {"Last-Event-ID": value})
        else:
            r = await client.get(path, headers=stack.headers, params={"last_event_id": value})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "bad_cursor"


async def test_an_empty_idempotency_key_is_a_400(stack: Stack) -> None:
    async with httpx.AsyncClient() as client:
        for value in ("",):  # (the HTTP client refuses to send a blank-only value)
            r = await client.post(
                f"{stack.url}/v1/streams",
                json={"prompt": "hi"},
                headers=stack.headers | {"Idempotency-Key": value},
            )
            assert r.status_code == 400
            assert r.json()["error"]["code"] == "bad_idempotency_key"


async def test_content_parts_with_any_json_numbers_are_accepted_and_generated(stack: Stack) -> None:
    # Content parts are the client's JSON: an integer past 64 bits is legal there (and once gave a 500).
    parts: list[dict[str, object]] = [{"type": "text", "text": "big", "n": 2**70, "x": -3.5e300}]
    async with httpx.AsyncClient() as client:
        r = await client.post(
            f"{stack.url}/v1/streams",
            json={"messages": [{"role": "user", "content": parts}]},
            headers=stack.headers,
        )
        assert r.status_code == 202, r.text
        _, events = await read_sse(client, stack.url + r.json()["events_url"], headers=stack.headers)
    assert [e.event for e in events[:2]] == ["queued", "started"] and events[-1].event == "done"


@pytest.mark.parametrize(
    "metadata",
    [{"k": "v" * 513}, {"k" * 65: "v"}, {"": "v"}, {f"k{i}": "v" for i in range(17)}],
)
async def test_metadata_over_its_caps_is_a_422(stack: Stack, metadata: dict[str, str]) -> None:
    async with httpx.AsyncClient() as client:
        r = await client.post(
            f"{stack.url}/v1/streams", json={"prompt": "hi", "metadata": metadata}, headers=stack.headers
        )
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "invalid_request"
    assert "metadata" in r.json()["error"]["message"]


async def test_only_allowed_models_and_max_tokens_under_the_ceiling_reach_the_upstream(
    make_stack: MakeStack, mock_url: str, prompt: str
) -> None:
    stack = make_stack(TAILGATE_MODELS="gpt-4o-mini,small", TAILGATE_MAX_TOKENS="5")
    await stack.agateway()
    await stack.aworker()
    url = f"{stack.url}/v1/streams"
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.post(url, json={"prompt": prompt, "model": "gpt-5-expensive"}, headers=stack.headers)
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "model_not_allowed"
        assert "gpt-4o-mini, small" in r.json()["error"]["message"]

        r = await client.post(url, json={"prompt": prompt, "max_tokens": 6}, headers=stack.headers)
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "max_tokens_too_large"

        # Without max_tokens, the ceiling is what the upstream is asked for.
        r = await client.post(url, json={"prompt": prompt, "model": "small"}, headers=stack.headers)
        assert r.status_code == 202
        _, events = await read_sse(client, stack.url + r.json()["events_url"], headers=stack.headers)
    assert [e.event for e in events].count("delta") == 5
    assert events[-1].event == "done" and events[-1].data["finish_reason"] == "length"


async def test_a_redis_outage_answers_503_without_saying_where_redis_is(make_stack: MakeStack) -> None:
    own = await RedisServer().astart()
    try:
        stack = make_stack(own.url)
        await stack.agateway()
        await own.astop()
        async with httpx.AsyncClient(timeout=30) as client:
            ready = await client.get(f"{stack.url}/readyz")
            created = await client.post(
                f"{stack.url}/v1/streams", json={"prompt": "hi"}, headers=stack.headers
            )
    finally:
        own.close()
    assert (ready.status_code, ready.json()["error"]["code"]) == (503, "not_ready")
    assert (created.status_code, created.json()["error"]["code"]) == (503, "unavailable")
    for r in (ready, created):
        assert str(own.port) not in r.text and "127.0.0.1" not in r.text, r.text


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        (
            ["worker", "--processes", "0"],
            {},
            ["tailgate: --processes=0: Input should be greater than or equal to 1"],
        ),
        (
            ["gateway", "--workers", "0"],
            {"TAILGATE_CONCURRENCY": "many"},
            [
                "tailgate: --workers=0: Input should be greater than or equal to 1",
                "tailgate: TAILGATE_CONCURRENCY=many: Input should be a valid integer, unable to parse "
                "string as an integer",
            ],
        ),
    ],
)
async def test_a_bad_setting_or_flag_exits_2_naming_each_one_to_fix(
    argv: list[str], env: dict[str, str], expected: list[str]
) -> None:
    done = await arun(tailgate_command(*argv), child_env(**env), within=30)
    assert (done.returncode, done.stderr.splitlines(), done.stdout) == (2, expected, "")
