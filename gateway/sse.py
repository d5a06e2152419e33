"""Event streams on the wire: framing, keep-alive, the shutdown hint and the response class.

A route that streams hands :func:`respond` what it reads (``Hub.tail``'s :class:`Batch` and
:class:`Idle`) and a :class:`Wire` format; nothing else in the gateway writes bytes to a stream.
Each format is one render function of stored events: :func:`native` (SSE frames) and
:func:`tutorial` (the tutorial's JSON lines). A new format (OpenAI's chunks, say) is one more
function, or a callable object where it must remember something between batches.

Every native response starts with a ``retry:`` hint (``TAILGATE_SSE_RETRY_MS``): without one, a browser
whose replica dies waits its own default (~3 s in Chromium) before it reconnects.

Deliberate oddities:
- :class:`SSEResponse` runs two of sse-starlette's four tasks per connection (see its docstring):
  ~40 KiB per idle connection depends on it.
- The tutorial's format has no comment syntax, so it gets no keep-alive, no ``retry:`` hint and no
  shutdown hint either: its readers cannot resume, so the hub leaves them to finish (``Hub.release``).
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import anyio
from prometheus_client import Counter, Gauge
from sse_starlette import EventSourceResponse
from sse_starlette.sse import SendTimeoutError
from starlette.types import Message, Receive, Scope, Send

from gateway.hub import Idle, Tailed
from tailgate.events import Entry

KEEP_ALIVE = b": ping\n\n"
# A reader ended by shutdown gets this, then the connection closes; EventSource reconnects after it.
SHUTDOWN_HINT = b"retry: 500\n\n"

SSE_OPEN = Gauge(
    "tailgate_sse_connections", "Open SSE responses on this gateway", multiprocess_mode="livesum"
)
EVENTS_SENT = Counter("tailgate_events_sent_total", "Events written to SSE clients")

Render = Callable[[Sequence[Entry]], bytes]


def native(entries: Sequence[Entry]) -> bytes:
    """Stored events as SSE frames, several in one write: the cursor as ``id``, the type as ``event``."""
    return "".join(f"id: {e.id}\nevent: {e.type}\ndata: {e.data}\n\n" for e in entries).encode()


def tutorial(entries: Sequence[Entry]) -> bytes:
    """Stored events as the tutorial's JSON lines ``{"status", "data"}``; events it has no word for
    (``queued``, ``started``, ``reset``) are left out."""
    lines = []
    for e in entries:
        if e.type == "delta":
            status, text = "processing", json.loads(e.data)["text"]
        elif e.type == "done":
            status, text = "complete", "Stream finished"
        elif e.type == "error":
            status, text = "error", json.loads(e.data)["message"]
        elif e.type == "cancelled":
            status, text = "cancelled", "Stream cancelled"
        else:
            continue
        lines.append(json.dumps({"status": status, "data": text}, ensure_ascii=False) + "\n")
    return "".join(lines).encode()


@dataclass(frozen=True, slots=True)
class Wire:
    """A wire format: how events are rendered, what is written first (``b""``: nothing), when nothing
    happens, and when the reader ends without a terminal event (the process is shutting down)."""

    render: Render
    keep_alive: bytes = b""
    goodbye: bytes = b""
    hello: bytes = b""


@functools.cache
def native_wire(retry_ms: int) -> Wire:
    """The native format, whose responses start with ``retry: <retry_ms>`` (``0``: no hint)."""
    hello = f"retry: {retry_ms}\n\n".encode() if retry_ms > 0 else b""
    return Wire(native, keep_alive=KEEP_ALIVE, goodbye=SHUTDOWN_HINT, hello=hello)


TUTORIAL = Wire(tutorial)


def respond(
    events: AsyncGenerator[Tailed, None],
    wire: Wire,
    *,
    stream_id: str,
    send_timeout: float,
    first: Sequence[Entry] = (),
    on_close: Callable[[], None] | None = None,
) -> SSEResponse:
    """The response that writes ``events`` (after ``first``, events that are not in the stream, such
    as a ``reset``) in ``wire``'s format; a reader that does not read for ``send_timeout`` is dropped.
    ``on_close`` runs once the response is over, however it ends."""
    return SSEResponse(
        _body(events, wire, first),
        send_timeout=send_timeout,
        headers={"X-Tailgate-Stream-Id": stream_id},
        on_close=on_close,
    )


async def _body(
    events: AsyncGenerator[Tailed, None], wire: Wire, first: Sequence[Entry]
) -> AsyncIterator[bytes]:
    SSE_OPEN.inc()
    ended = False
    try:
        # Closed here, not left to the garbage collector: a reader dropped after a send timeout is
        # closed at a `yield`, and its subscription must go at once.
        async with aclosing(events):
            if wire.hello:
                yield wire.hello  # at once: the hint holds even if the connection dies before an event
            if first:
                yield wire.render(first)
            async for item in events:
                if isinstance(item, Idle):
                    if wire.keep_alive:
                        yield wire.keep_alive
                    continue
                EVENTS_SENT.inc(len(item.entries))
                ended = item.entries[-1].terminal
                if out := wire.render(item.entries):
                    yield out
        if not ended and wire.goodbye:
            yield wire.goodbye  # this replica is going away: reconnect (elsewhere) soon
    finally:
        SSE_OPEN.dec()


class SSEResponse(EventSourceResponse):
    """sse-starlette's response running two of its four tasks per connection: the stream and the
    disconnect listener. Keep-alive comments come from the stream itself (the hub wakes an idle
    reader every ``TAILGATE_PING_S`` anyway) and shutdown is the hub's (``Hub.release``, which ends
    readers with a retry hint). That saves ~12 KiB per idle connection, a quarter of the total.

    The send timeout is one ``asyncio.Timeout`` per connection, armed around each send and disarmed
    after it, instead of sse-starlette's new anyio cancel scope per send: that scope cost about a
    tenth of a gateway's CPU per event."""

    def __init__(self, *args: Any, on_close: Callable[[], None] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_close = on_close
        self._deadline: asyncio.Timeout | None = None

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        deadline, timeout = self._deadline, self.send_timeout
        if deadline is None or timeout is None:  # HEAD is served by sse-starlette's own __call__
            return await super()._send_with_timeout(send, message)
        deadline.reschedule(asyncio.get_running_loop().time() + timeout)
        await send(message)
        deadline.reschedule(None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._serve(scope, receive, send)
        finally:
            if self._on_close is not None:
                self._on_close()

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] == "HEAD":
            return await super().__call__(scope, receive, send)
        async with anyio.create_task_group() as tasks:

            async def stream() -> None:
                try:
                    async with asyncio.timeout(None) as self._deadline:
                        await self._stream_response(send)
                except TimeoutError:
                    raise SendTimeoutError() from None  # as sse-starlette's own timeout does
                tasks.cancel_scope.cancel()

            async def disconnect() -> None:
                await self._listen_for_disconnect(receive)
                tasks.cancel_scope.cancel()

            tasks.start_soon(stream)
            tasks.start_soon(disconnect)
