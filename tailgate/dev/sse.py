"""Reading tailgate's SSE as a client does, strictly, for the tests, the benchmark and the soak.

Built on ``httpx-sse`` (a decoder that follows the SSE spec to the letter) over real HTTP connections,
and on :mod:`tailgate.client`'s checks: every event must carry an ``id`` and a JSON object with an
integer ``seq`` (and fields of the right types), else :class:`ProtocolError`. Unlike the client,
these readers keep what the server sent as it sent it (duplicates too, and no resume of their own
unless asked), so a test can prove what the server did; ``retry:`` hints and keep-alive comments are
collected, not hidden. The checks here (:func:`assert_exactly_once`, :func:`text_of`, …) take the
client's events as well.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import httpx
from httpx_sse import EventSource

from tailgate import client
from tailgate.client import TERMINAL, ProtocolError

__all__ = [
    "TERMINAL",
    "Delivery",
    "Event",
    "Extras",
    "ProtocolError",
    "Resumed",
    "assert_exactly_once",
    "delivery_of",
    "events",
    "exactly_once_problems",
    "read_resuming",
    "read_sse",
    "text_of",
]


class Event(client.Event):
    """:class:`tailgate.client.Event`, which the tests also know by its SSE field name ``event``."""

    __slots__ = ()

    @property
    def event(self) -> str:
        return self.type


@dataclass(slots=True)
class Extras:
    """What a stream carried besides events: ``retry:`` hints (in ms), in order."""

    retries: list[int] = field(default_factory=list)


async def events(response: httpx.Response, extras: Extras | None = None) -> AsyncIterator[Event]:
    """The events of one SSE response as they arrive."""
    async for sse in EventSource(response).aiter_sse():
        if sse.retry is not None and extras is not None:
            extras.retries.append(sse.retry)
        if not sse.data:
            continue  # a `retry:`-only block
        yield Event.decode(sse.id, sse.event, sse.data)


async def read_sse(
    client: httpx.AsyncClient,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
    limit: int | None = None,
    extras: Extras | None = None,
) -> tuple[httpx.Response, list[Event]]:
    """Read one SSE response until the server closes it, or until ``limit`` events (then disconnect).
    A non-200 answer is returned read, with no events."""
    out: list[Event] = []
    async with client.stream("GET", url, headers=headers, params=params) as response:
        if response.status_code != 200:
            await response.aread()
            return response, out
        async for event in events(response, extras):
            out.append(event)
            if limit is not None and len(out) >= limit:
                break
    return response, out


@dataclass(slots=True)
class Resumed:
    events: list[Event]
    reconnects: int


async def read_resuming(
    client: httpx.AsyncClient,
    urls: Sequence[str],
    path: str,
    headers: dict[str, str],
    *,
    pick: Callable[[Sequence[str]], str] | None = None,
    deadline_s: float = 90.0,
) -> Resumed:
    """Read a stream to its end the way ``EventSource`` does: on a dropped connection or an error
    status, reconnect (to the next of ``urls``, or to ``pick(urls)``) with ``Last-Event-ID``; stop at
    a terminal event or a 204. Events are returned as received, duplicates included, so the caller
    can prove there were none. A ``Last-Event-ID`` in ``headers`` is where the first request resumes."""
    got: list[Event] = []
    reconnects = -1
    give_up = time.monotonic() + deadline_s
    while time.monotonic() < give_up:
        reconnects += 1
        base = pick(urls) if pick is not None else urls[reconnects % len(urls)]
        cursor = {"Last-Event-ID": got[-1].id} if got else {}
        try:
            async with client.stream("GET", base + path, headers=headers | cursor) as response:
                if response.status_code == 204:
                    return Resumed(got, reconnects)
                if response.status_code != 200:
                    await response.aread()
                    await asyncio.sleep(0.2)
                    continue
                async for event in events(response):
                    got.append(event)
        except httpx.TransportError:
            await asyncio.sleep(0.1)
        if got and got[-1].terminal:
            return Resumed(got, reconnects)
    raise TimeoutError(f"stream did not end within {deadline_s}s; {len(got)} events read")


@dataclass(frozen=True, slots=True)
class Delivery:
    """What a client can count of a stream read to its end: ``seq`` never received (below the highest
    seen), ``seq`` received more than once (each extra copy counts), terminal events, and whether the
    only terminal event is the last event."""

    lost: list[int]
    duplicated: int
    terminals: int
    ends_with_terminal: bool


def delivery_of(events: Sequence[client.Event]) -> Delivery:
    seqs = [e.seq for e in events]
    seen = set(seqs)
    lost = [s for s in range(1, max(seqs, default=0) + 1) if s not in seen]
    terminals = [e for e in events if e.terminal]
    return Delivery(
        lost, len(seqs) - len(seen), len(terminals), bool(terminals) and terminals[-1] is events[-1]
    )


def exactly_once_problems(events: Sequence[client.Event]) -> list[str]:
    """What a client can prove, as a list of problems (empty: none): seq 1..n, each once; exactly
    one terminal event, and it is last."""
    problems = []
    d = delivery_of(events)
    if [e.seq for e in events] != list(range(1, len(events) + 1)):
        problems.append(f"seq not contiguous: lost {d.lost[:10]}, {d.duplicated} duplicated")
    if d.terminals != 1 or not d.ends_with_terminal:
        last = events[-1].type if events else None
        problems.append(f"{d.terminals} terminal events; the last event is {last}")
    return problems


def assert_exactly_once(events: Sequence[client.Event]) -> None:
    problems = exactly_once_problems(events)
    assert not problems, "; ".join(problems)


def text_of(events: Sequence[client.Event]) -> str:
    """The answer a client assembles: deltas after the last reset."""
    text = ""
    for e in events:
        if e.type == "reset":
            text = ""
        elif e.type == "delta":
            text += e.text
    return text
