"""Malformed input of every kind gets a 4xx JSON error, never a 5xx: property tests of the parsers
against a real Redis, and the inputs that once answered 500, over HTTP."""

from __future__ import annotations

import httpx
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tailgate.dev.procs import RedisServer
from tailgate.events import CursorError, parse_cursor
from tests.harness import Stack

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
