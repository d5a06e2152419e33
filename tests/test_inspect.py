"""``tailgate inspect`` against a running stack: after a stream that completed, one that was
cancelled, one whose upstream failed, and one whose worker was SIGKILLed and taken over. The JSON is
compared whole with what Redis holds; the table is read as a person would read it."""

from __future__ import annotations

import json
import signal
import subprocess
from typing import Any

import httpx
from redis.asyncio import Redis

from tailgate import keys
from tailgate.dev.procs import arun, tailgate_command
from tailgate.dev.sse import Event, assert_exactly_once, read_resuming, read_sse, text_of
from tailgate.store import iso
from tests.harness import (
    MODEL,
    MakeStack,
    Stack,
    expected_answer,
    streams_redis,
    takeover_stack,
    worker_of,
)


async def create(client: httpx.AsyncClient, url: str, stack: Stack, prompt: str) -> str:
    r = await client.post(f"{url}/v1/streams", json={"prompt": prompt}, headers=stack.headers)
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


async def follow(client: httpx.AsyncClient, url: str, stack: Stack, stream_id: str) -> list[Event]:
    _, events = await read_sse(client, f"{url}/v1/streams/{stream_id}/events", headers=stack.headers)
    assert_exactly_once(events)
    return events


async def inspect(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return await arun(tailgate_command("inspect", *args), stack.env)


async def inspect_json(stack: Stack, stream_id: str) -> dict[str, Any]:
    done = await inspect(stack, stream_id, "--json")
    assert done.returncode == 0, done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


async def raw_meta(stack: Stack, stream_id: str) -> dict[str, str]:
    async with streams_redis(stack) as r:
        meta: dict[str, str] = await r.hgetall(keys.meta(stream_id))  # type: ignore[misc]
    return meta


async def worker_ids(stack: Stack) -> dict[int, str]:
    """The stack's workers' ids (host-pid-random) by pid, from their registry."""
    async with Redis.from_url(stack.redis_url, decode_responses=True) as r:
        registry: dict[str, str] = await r.hgetall(keys.WORKERS)
    return {json.loads(info)["pid"]: worker for worker, info in registry.items()}


def ms(later: str, earlier: str) -> float:
    return round(float(later) - float(earlier), 1)


def expected(
    stream_id: str, meta: dict[str, str], events: list[Event], attempts: list[dict[str, Any]]
) -> dict[str, Any]:
    """What ``inspect --json`` must answer: the meta's own values, the events the client read, and the
    attempts as the test knows them (number, worker, reason, code); each attempt's times are the
    meta's record of them."""
    recorded = json.loads(meta["attempts"])
    assert [(a["attempt"], a["worker"]) for a in recorded] == [(a["attempt"], a["worker"]) for a in attempts]
    firsts = [a["first_token_at"] for a in recorded if "first_token_at" in a]
    rows = []
    for want, got in zip(attempts, recorded, strict=True):
        first = got.get("first_token_at")
        rows.append(
            {
                **want,
                "started_at": iso(got["started_at"]),
                "first_token_at": iso(first),
                "ended_at": iso(got["ended_at"]),
                "last_heartbeat_at": iso(got.get("last_heartbeat_at")),
                "first_token_ms": ms(first, got["started_at"]) if first else None,
                "duration_ms": ms(got["ended_at"], got["started_at"]),
            }
        )
    last = events[-1]
    usage = last.data.get("usage") if last.event in ("done", "cancelled") else None
    return {
        "id": stream_id,
        "status": {"done": "completed", "error": "failed", "cancelled": "cancelled"}[last.event],
        "model": MODEL,
        "owner": meta["owner"],
        "created_at": iso(meta["created_at"]),
        "started_at": iso(meta["started_at"]),
        "finished_at": iso(meta["finished_at"]),
        "timings_ms": {
            "queue_wait": ms(meta["started_at"], meta["created_at"]),
            "first_token": ms(min(firsts, key=float), meta["created_at"]) if firsts else None,
            "duration": ms(meta["finished_at"], meta["created_at"]),
        },
        "attempts": rows,
        "events": {
            "count": len(events),
            "first": {"seq": 1, "id": events[0].id, "type": "queued"},
            "last": {"seq": len(events), "id": last.id, "type": last.event},
        },
        "usage": usage,
        "error": {k: last.data[k] for k in ("code", "message")} if last.event == "error" else None,
        "cancel_requested": last.event == "cancelled",
    }


async def check(stack: Stack, stream_id: str, events: list[Event], attempts: list[dict[str, Any]]) -> None:
    answer = await inspect_json(stack, stream_id)
    expires = answer.pop("expires_in_s")
    assert answer == expected(stream_id, await raw_meta(stack, stream_id), events, attempts)
    assert 0 < expires <= 24 * 3600  # TAILGATE_RETENTION_S, from the end
    t = answer["timings_ms"]
    assert 0 <= t["queue_wait"] <= t["duration"]
    assert t["first_token"] is None or t["queue_wait"] <= t["first_token"] <= t["duration"]


def attempt(number: int, worker: str, reason: str, code: str | None = None) -> dict[str, Any]:
    return {"attempt": number, "worker": worker, "reason": reason, "code": code}


async def the_worker(stack: Stack) -> str:
    [worker] = (await worker_ids(stack)).values()
    return worker


async def test_inspect_a_completed_stream_shows_its_one_attempt_timings_events_and_usage(
    client: httpx.AsyncClient, stack: Stack, prompt: str
) -> None:
    stream_id = await create(client, stack.url, stack, prompt + " [mock:tokens=5]")
    events = await follow(client, stack.url, stack, stream_id)
    assert [e.event for e in events] == ["queued", "started", *["delta"] * 5, "done"]
    worker = await the_worker(stack)

    await check(stack, stream_id, events, [attempt(1, worker, "done")])

    table = await inspect(stack, stream_id)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0] == f"stream       {stream_id}"
    assert lines[1].startswith(f"status       completed    model {MODEL}    owner ")
    assert f"events       8    seq 1-8    ids {events[0].id} .. {events[-1].id}    last: done" in lines
    usage = events[-1].data["usage"]
    assert "usage        " + "    ".join(f"{k} {v}" for k, v in usage.items()) in lines
    header = lines.index(next(line for line in lines if line.startswith("attempt")))
    assert lines[header].split() == ["attempt", "worker", "started", "first", "token", "ended", "ran", "end"]
    [row] = lines[header + 1 :]
    assert row.split()[:2] == ["1", worker] and row.endswith("  done")


async def test_inspect_a_cancelled_stream_says_its_attempt_was_cancelled(
    client: httpx.AsyncClient, stack: Stack, prompt: str
) -> None:
    stream_id = await create(client, stack.url, stack, prompt + " [mock:tokens=400,delay_ms=10]")
    url = f"{stack.url}/v1/streams/{stream_id}/events"
    _, first = await read_sse(client, url, headers=stack.headers, limit=4)  # queued, started, 2 deltas
    r = await client.post(f"{stack.url}/v1/streams/{stream_id}/cancel", headers=stack.headers)
    assert r.status_code == 202
    _, rest = await read_sse(client, url, headers=stack.headers | {"Last-Event-ID": first[-1].id})
    events = first + rest
    assert_exactly_once(events)
    assert events[-1].event == "cancelled"

    await check(stack, stream_id, events, [attempt(1, await the_worker(stack), "cancelled")])
    table = await inspect(stack, stream_id)
    assert "cancel       requested" in table.stdout.splitlines()
    assert table.stdout.rstrip().endswith("  cancelled")


async def test_inspect_a_failed_stream_shows_the_error_and_its_code_on_the_attempt(
    client: httpx.AsyncClient, stack: Stack, prompt: str
) -> None:
    stream_id = await create(client, stack.url, stack, prompt + " [mock:fail_after=3]")
    events = await follow(client, stack.url, stack, stream_id)
    assert events[-1].event == "error" and events[-1].data["code"] == "upstream_error"

    await check(stack, stream_id, events, [attempt(1, await the_worker(stack), "error", "upstream_error")])
    table = (await inspect(stack, stream_id)).stdout.splitlines()
    assert f"error        upstream_error: {events[-1].data['message']}" in table
    assert table[-1].endswith("  error upstream_error")


async def test_inspect_after_a_worker_sigkill_shows_two_attempts_taken_over_then_done(
    client: httpx.AsyncClient, make_stack: MakeStack, mock_url: str, prompt: str
) -> None:
    s, url = await takeover_stack(make_stack)
    prompt += " [mock:tokens=60,delay_ms=20]"
    stream_id = await create(client, url, s, prompt)
    path = f"/v1/streams/{stream_id}/events"
    _, first = await read_sse(client, url + path, headers=s.headers, limit=6)
    ids = await worker_ids(s)
    doomed = await worker_of(s, stream_id)
    [survivor] = [worker for pid, worker in ids.items() if pid != doomed.pid]
    doomed.signal(signal.SIGKILL)
    rest = await read_resuming(client, [url], path, s.headers | {"Last-Event-ID": first[-1].id})
    events = first + rest.events
    assert_exactly_once(events)
    [reset] = [e for e in events if e.event == "reset"]
    assert (reset.data["attempt"], reset.data["reason"]) == (2, "worker_lost")
    assert events[-1].event == "done"
    assert text_of(events) == await expected_answer(mock_url, prompt)  # the new attempt's, whole

    lost = attempt(1, ids[doomed.pid], "taken_over")
    await check(s, stream_id, events, [lost, attempt(2, survivor, "done")])
    answer = await inspect_json(s, stream_id)
    one, two = answer["attempts"]
    # The lost worker's last heartbeat came before the takeover, which is where attempt 2 starts.
    assert one["last_heartbeat_at"] < one["ended_at"] == two["started_at"]
    assert one["first_token_at"] is not None  # it had streamed before it was killed

    rows = (await inspect(s, stream_id)).stdout.splitlines()[-2:]
    assert rows[0].split()[:2] == ["1", ids[doomed.pid]]
    assert f"  taken over (last heartbeat {one['last_heartbeat_at'][11:23]})" in rows[0]
    assert rows[1].split()[:2] == ["2", survivor] and rows[1].endswith("  done")


async def test_inspect_of_an_unknown_or_malformed_id_exits_1_with_a_message(stack: Stack) -> None:
    unknown = "0" * 32
    done = await inspect(stack, unknown)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith(f"tailgate inspect: no stream {unknown} in Redis: it never existed")
    bad = await inspect(stack, "not-an-id", "--json")
    assert bad.returncode == 1 and bad.stdout == ""
    assert (
        bad.stderr
        == "tailgate inspect: 'not-an-id' is not a stream id (32 hex digits, from POST /v1/streams)\n"
    )


async def test_inspect_takes_the_openai_surfaces_ids_of_a_stream(
    client: httpx.AsyncClient, stack: Stack, prompt: str
) -> None:
    stream_id = await create(client, stack.url, stack, prompt + " [mock:tokens=2]")
    await follow(client, stack.url, stack, stream_id)
    native = await inspect_json(stack, stream_id)
    for other in (f"chatcmpl-{stream_id}", f"resp_{stream_id}"):
        answer = await inspect_json(stack, other)
        assert answer | {"expires_in_s": 0} == native | {"expires_in_s": 0}
