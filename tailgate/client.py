"""A Python client for tailgate: create a stream, follow it to its end through dropped connections and
worker failures, read its status, cancel it.

Two faces, one protocol: :class:`Client` (blocking, on ``httpx.Client``) and :class:`AsyncClient`
(asyncio, on ``httpx.AsyncClient``) have the same methods. Everything but the I/O is theirs in common:
:class:`_Protocol` builds the requests and reads the answers, :class:`_Follower` knows where a reader
stands in a stream and judges each event. ::

    with Client("http://localhost:8000", api_key=key) as tg:
        stream = tg.create(prompt="Tell me about rivers")
        for event in tg.events(stream.id):
            ...

Following a stream (``events``, ``resume``, ``text``) promises:

- each event once, in ``seq`` order. After a dropped connection, a 5xx or a 503 it reconnects with
  ``Last-Event-ID`` (the last event it yielded). An event it already has is dropped; a gap in ``seq``
  is a :class:`ProtocolError` (the server never leaves one);
- a ``reset`` is yielded, not hidden: the text so far is void and a new attempt starts from scratch
  (``text()`` starts over too). A ``reset`` with ``seq`` 0 means the cursor was not in the stream: the
  whole stream follows again from ``seq`` 1;
- it stops after the terminal event (``done``, ``error``, ``cancelled``), or at a 204 (the reader
  already had the end).

Errors::

    TailgateError
     ├── APIError(status, code, message, retry_after)   the gateway's error answer
     │    ├── Unauthorized          401: no API key, an unknown one, or a bad read token
     │    ├── NotFound              404: no such stream for this key
     │    ├── Conflict              409: the Idempotency-Key was used with another body
     │    ├── RateLimited           429: over a limit; ``retry_after`` says when to try again
     │    └── Unavailable           5xx, still after the retries of :class:`Backoff`
     ├── Unreachable                no connection, or connections that brought nothing new, still
     │                              after the retries of :class:`Backoff`
     ├── ProtocolError              the server broke the contract: an event without id or seq, a gap
     └── StreamError(code, message, text, usage)   ``text()``: the stream ended with ``error``
          └── StreamCancelled       ``text()``: the stream was cancelled

Deliberate oddities:

- ``create`` always sends an ``Idempotency-Key`` (yours, else a random one), so a create retried after
  a lost answer cannot start a second generation.
- Retries count connection attempts, not seconds: a connection that waited quietly for minutes (a
  queued stream) and then dropped is one failed attempt. A connection that brought a new event
  starts the count over, and its successor connects at once.
- The server's ``retry:`` hint is for browsers' ``EventSource``; this client backs off by itself.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple, Self, TypedDict, Unpack, cast

import httpx
import stamina
from httpx_sse import EventSource, ServerSentEvent

__all__ = [
    "DEFAULT_TIMEOUT",
    "APIError",
    "AsyncClient",
    "Backoff",
    "Client",
    "Conflict",
    "Created",
    "Event",
    "NotFound",
    "Options",
    "ProtocolError",
    "RateLimited",
    "Status",
    "StreamCancelled",
    "StreamError",
    "TailgateError",
    "Unauthorized",
    "Unavailable",
    "Unreachable",
]

TERMINAL = frozenset({"done", "error", "cancelled"})
START = "0-0"  # the cursor before the first event
# The gateway sends a keep-alive comment every 15 s: three missed ones and the connection is dead.
DEFAULT_TIMEOUT = httpx.Timeout(10.0, read=45.0)
# What a lost connection raises; worth another try. (Not httpx-sse's SSEError: a wrong content type.)
_NETWORK = (httpx.NetworkError, httpx.TimeoutException, httpx.RemoteProtocolError)
# The type of each field an event may carry, checked once, so Event's properties can trust them.
# (null is allowed: a stream cancelled while queued has "usage": null.)
_FIELDS: dict[str, type] = {
    "text": str, "attempt": int, "reason": str, "model": str, "position": int,
    "finish_reason": str, "usage": dict, "code": str, "message": str,
}  # fmt: skip


class TailgateError(Exception):
    """Everything this client raises."""


class APIError(TailgateError):
    """The gateway answered with an error: its HTTP ``status`` and the ``code`` and ``message`` of its
    body; ``retry_after`` (seconds) when it said when to try again."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


class Unauthorized(APIError):
    """401: no API key, an unknown one, or a read token that is expired or for another stream."""


class NotFound(APIError):
    """404: no such stream, or another key's (the gateway does not tell which)."""


class Conflict(APIError):
    """409: this Idempotency-Key was already used with another body."""


class RateLimited(APIError):
    """429: over a limit (creations per minute, active streams, open event streams, queue size)."""


class Unavailable(APIError):
    """5xx: the gateway is not ready or cannot reach Redis; raised once the retries are spent."""


class Unreachable(TailgateError):
    """The gateway could not be reached, or kept closing connections before anything new arrived,
    until the retries were spent."""


class ProtocolError(TailgateError):
    """The server sent what a tailgate client cannot accept: an event without an id or a ``seq``, a
    field of the wrong type, a gap in ``seq``, a stream that ends without a terminal event."""


class StreamError(TailgateError):
    """``text()``: the stream ended with ``error`` (``code``, ``message``). ``text`` is what the
    last attempt wrote before it; ``usage`` as the server counted it, when it did."""

    def __init__(self, code: str, message: str, text: str, usage: dict[str, int] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.text = text
        self.usage = usage


class StreamCancelled(StreamError):
    """``text()``: the stream was cancelled; ``text`` is what was written before."""


@dataclass(frozen=True, slots=True)
class Event:
    """One event: its cursor ``id``, its ``type`` and its ``data`` as sent (a JSON object with ``seq``).
    The typed properties read ``data``; each is ``""`` or ``None`` on events that do not carry it (or
    carry a null)."""

    id: str
    type: str
    data: dict[str, Any]

    @classmethod
    def decode(cls, event_id: str, event_type: str, data: str) -> Self:
        """An event from its SSE fields, checked; :class:`ProtocolError` if it is not one."""
        try:
            parsed = json.loads(data)
        except ValueError:
            raise ProtocolError(f"data is not JSON: {data[:200]!r}") from None
        if not event_id or not isinstance(parsed, dict) or type(parsed.get("seq")) is not int:
            raise ProtocolError(f"an event needs an id and an integer seq: {event_type} {data[:200]!r}")
        for name, kind in _FIELDS.items():
            if parsed.get(name) is not None and not isinstance(parsed[name], kind):
                raise ProtocolError(f"{event_type} {name} is not a {kind.__name__}: {data[:200]!r}")
        if event_type == "delta" and not isinstance(parsed.get("text"), str):
            raise ProtocolError(f"a delta without text: {data[:200]!r}")
        return cls(event_id, event_type, parsed)

    @property
    def seq(self) -> int:
        return cast(int, self.data["seq"])

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL

    @property
    def text(self) -> str:
        """``delta``: the text it adds."""
        return cast(str, self.data.get("text") or "")

    @property
    def attempt(self) -> int | None:
        """``started``, ``reset``: the attempt that starts."""
        return cast(int | None, self.data.get("attempt"))

    @property
    def reason(self) -> str | None:
        """``reset``: why (``worker_lost``, ``worker_shutdown``, ``cursor_out_of_range``)."""
        return cast(str | None, self.data.get("reason"))

    @property
    def model(self) -> str | None:
        return cast(str | None, self.data.get("model"))

    @property
    def position(self) -> int | None:
        """``queued``: the place in the queue, when known."""
        return cast(int | None, self.data.get("position"))

    @property
    def finish_reason(self) -> str | None:
        return cast(str | None, self.data.get("finish_reason"))

    @property
    def usage(self) -> dict[str, int] | None:
        """``done``, ``cancelled``: token counts."""
        return cast(dict[str, int] | None, self.data.get("usage"))

    @property
    def code(self) -> str | None:
        """``error``: what went wrong (``upstream_timeout``, ``worker_lost``, …)."""
        return cast(str | None, self.data.get("code"))

    @property
    def message(self) -> str | None:
        return cast(str | None, self.data.get("message"))


@dataclass(frozen=True, slots=True)
class Created:
    """A queued stream: its id, its URLs, and a read token for a browser's ``EventSource``."""

    id: str
    status: str
    events_url: str
    status_url: str
    read_token: str


@dataclass(frozen=True, slots=True)
class Status:
    """A stream's state (``queued``, ``running``, ``completed``, ``failed``, ``cancelled``) and life."""

    id: str
    status: str
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    model: str | None
    attempt: int
    events: int
    usage: dict[str, int] | None
    error: dict[str, str] | None
    metadata: dict[str, str] | None

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "failed", "cancelled")


@dataclass(frozen=True, slots=True)
class Backoff:
    """How requests and reconnections are retried (through ``stamina``, so ``stamina.set_testing``
    applies): up to ``attempts`` tries in a row, waiting ``first_s``, doubling up to ``max_s``, plus up
    to ``jitter_s`` at random. The defaults ride out about 30 s of a gateway that is down."""

    attempts: int = 12
    first_s: float = 0.1
    max_s: float = 5.0
    jitter_s: float = 0.5


class Options(TypedDict, total=False):
    """What ``create`` takes besides (or instead of) ``prompt``: as the HTTP API's body, and the
    ``Idempotency-Key``."""

    messages: Sequence[Mapping[str, Any]]
    model: str
    max_tokens: int
    temperature: float
    metadata: Mapping[str, str]
    idempotency_key: str


class _Call(NamedTuple):
    method: str
    url: str
    json: dict[str, Any] | None = None
    headers: dict[str, str] | None = None
    params: dict[str, str] | None = None


class _Protocol:
    """What both faces send and how they read the answers."""

    def __init__(self, base_url: str, api_key: str | None, backoff: Backoff) -> None:
        self.base_url = base_url.rstrip("/")
        self.auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.backoff = backoff

    def retrying(self) -> Any:  # stamina's iterator of attempts, for `for` and `async for`
        b = self.backoff
        return stamina.retry_context(
            on=(Unreachable, Unavailable),
            attempts=b.attempts,
            timeout=None,  # a connection may rightly wait for minutes (see the module's docstring)
            wait_initial=b.first_s,
            wait_max=b.max_s,
            wait_jitter=b.jitter_s,
        )

    def create(self, prompt: str | None, options: Options) -> _Call:
        body: dict[str, Any] = {"prompt": prompt} if prompt is not None else {}
        body |= options
        if ("prompt" in body) == ("messages" in body):
            raise ValueError("create takes a prompt or messages: one of them")
        key = body.pop("idempotency_key", None) or uuid.uuid4().hex
        if "messages" in body:
            body["messages"] = [dict(m) for m in body["messages"]]
        if "metadata" in body:
            body["metadata"] = dict(body["metadata"])
        return _Call("POST", f"{self.base_url}/v1/streams", body, self.auth | {"Idempotency-Key": key})

    def status(self, stream_id: str) -> _Call:
        return _Call("GET", f"{self.base_url}/v1/streams/{stream_id}", headers=self.auth)

    def cancel(self, stream_id: str) -> _Call:
        return _Call("POST", f"{self.base_url}/v1/streams/{stream_id}/cancel", headers=self.auth)

    def events(self, follower: _Follower, token: str | None) -> _Call:
        auth: dict[str, str] = {} if token is not None else self.auth
        headers = auth | {"Accept": "text/event-stream"} | follower.resume_headers()
        params = {"token": token} if token is not None else None
        return _Call("GET", f"{self.base_url}/v1/streams/{follower.stream_id}/events", None, headers, params)

    @staticmethod
    def unreachable(call: _Call, exc: Exception) -> Unreachable:
        return Unreachable(f"{call.method} {call.url}: {type(exc).__name__}: {exc}")


def _checked(response: httpx.Response) -> httpx.Response:
    """``response`` if it is a success (read, unless a 200 streams); else its error, raised."""
    if response.is_success:
        return response
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        code, message = f"http_{response.status_code}", response.text[:200] or response.reason_phrase
    retry_after = response.headers.get("retry-after")
    after = float(retry_after) if retry_after and retry_after.isdigit() else None
    kind = {401: Unauthorized, 404: NotFound, 409: Conflict, 429: RateLimited}.get(response.status_code)
    if kind is None:
        kind = Unavailable if response.status_code >= 500 else APIError
    raise kind(response.status_code, code, message, after)


def _created(response: httpx.Response) -> Created:
    body = response.json()
    return Created(body["id"], body["status"], body["events_url"], body["status_url"], body["read_token"])


def _status(response: httpx.Response) -> Status:
    b = response.json()
    at = {
        k: datetime.fromisoformat(b[k]) if b.get(k) else None
        for k in ("created_at", "started_at", "finished_at")
    }
    return Status(
        b["id"], b["status"], at["created_at"], at["started_at"], at["finished_at"], b.get("model"),
        b["attempt"], b["events"], b.get("usage"), b.get("error"), b.get("metadata"),
    )  # fmt: skip


class _Follower:
    """A reader's place in one stream, and the judge of each event it is sent."""

    def __init__(self, stream_id: str, after: str | Event | None) -> None:
        self.stream_id = stream_id
        self.cursor = after.id if isinstance(after, Event) else after or START
        # The seq at the cursor: known from an Event or at the start; after a bare cursor, the first
        # event sets it.
        self.seq: int | None = after.seq if isinstance(after, Event) else 0 if self.cursor == START else None
        self.over = False

    def resume_headers(self) -> dict[str, str]:
        """The headers of the next connection: where to resume."""
        return {} if self.cursor == START else {"Last-Event-ID": self.cursor}

    def opened(self, response: httpx.Response) -> bool:
        """Whether to read events from ``response`` (a 200); a 204 ends the stream. Errors are raised
        (a 5xx as :class:`Unavailable`, retried); an error's body must have been read."""
        if response.status_code == 204:
            self.over = True
            return False
        _checked(response)
        if response.status_code != 200 or "text/event-stream" not in response.headers.get("content-type", ""):
            raise ProtocolError(f"{response.status_code} {response.headers.get('content-type')}, not events")
        return True

    def accept(self, sse: ServerSentEvent) -> Event | None:
        """The event to hand over, or ``None`` if there is none (a replay, a ``retry:``-only block)."""
        if not sse.data:
            return None
        event = Event.decode(sse.id, sse.event, sse.data)
        if event.type == "reset" and event.seq == 0:
            self.seq = 0  # the cursor was not in the stream: it all comes again, from seq 1
        elif self.seq is not None and event.seq <= self.seq:
            return None
        elif self.seq is not None and event.seq != self.seq + 1:
            raise ProtocolError(f"stream {self.stream_id}: seq {event.seq} after {self.seq}, a gap")
        else:
            self.seq = event.seq
        self.cursor = event.id
        self.over = event.terminal
        return event

    def fruitless(self, exc: Exception | None) -> Unreachable:
        """What a connection that ended before anything new arrived raises (then retried)."""
        why = f"{type(exc).__name__}: {exc}" if exc is not None else "closed"
        return Unreachable(f"stream {self.stream_id}: the connection ended with nothing new ({why})")


class _Answer:
    """The text a stream ends with: the deltas after the last reset, and how it ended."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.end: Event | None = None

    def add(self, event: Event) -> None:
        if event.type == "reset":
            self.parts.clear()
        elif event.type == "delta":
            self.parts.append(event.text)
        elif event.terminal:
            self.end = event

    def result(self) -> str:
        text, end = "".join(self.parts), self.end
        if end is None:
            raise ProtocolError("the stream ended without a terminal event")
        if end.type == "error":
            raise StreamError(end.code or "error", end.message or "", text, end.usage)
        if end.type == "cancelled":
            raise StreamCancelled("cancelled", "the stream was cancelled", text, end.usage)
        return text


class _Opened(NamedTuple):
    """A connection that has brought a new event, and the rest of its events."""

    response: httpx.Response
    rest: Any  # the SSE iterator (sync or async) the first event came from
    first: Event


class Client:
    """The blocking face, on ``httpx.Client``. ``api_key`` authenticates every call; without one, a
    stream can still be read with its ``read_token`` (``events(..., token=...)``). ``http``: an
    ``httpx.Client`` of your own (proxies, transports, hooks), which this one does not close; give it
    a read timeout above the 15 s keep-alive, as :data:`DEFAULT_TIMEOUT` has."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        backoff: Backoff = Backoff(),
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        http: httpx.Client | None = None,
    ) -> None:
        self._p = _Protocol(base_url, api_key, backoff)
        self._own = http is None
        self._http = http if http is not None else httpx.Client(timeout=timeout)

    def __repr__(self) -> str:
        return f"<Client {self._p.base_url}>"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._own:
            self._http.close()

    def create(self, prompt: str | None = None, **options: Unpack[Options]) -> Created:
        """Queue a generation from ``prompt`` or ``messages=[...]``, with optional ``model``,
        ``max_tokens``, ``temperature``, ``metadata``; returns at once. The same ``idempotency_key`` with
        the same body gives the same stream (with another body: :class:`Conflict`)."""
        return _created(self._send(self._p.create(prompt, options)))

    def status(self, stream_id: str) -> Status:
        return _status(self._send(self._p.status(stream_id)))

    def cancel(self, stream_id: str) -> str:
        """Stop the generation (idempotent). Returns the stream's status: ``running`` means it ends
        with ``cancelled`` once its worker stops; else it had already ended (and says how)."""
        return str(self._send(self._p.cancel(stream_id)).json()["status"])

    def events(
        self, stream_id: str, after: str | Event | None = None, *, token: str | None = None
    ) -> Iterator[Event]:
        """The stream's events, each once, to its end, resuming by itself (see the module's docstring):
        from the start, or after ``after`` (an event's ``id``, or the event: then the first one after it
        is checked too). ``token``: the stream's read token, instead of the API key."""
        return self._follow(_Follower(stream_id, after), token)

    def resume(self, stream_id: str, after: str | Event, *, token: str | None = None) -> Iterator[Event]:
        """The events after ``after``: where a reader that stopped (in another process, say) left off."""
        return self.events(stream_id, after, token=token)

    def text(self, stream_id: str, *, token: str | None = None) -> str:
        """Follow the stream to its end; its final text (after the last ``reset``). A stream that ends
        with ``error`` raises :class:`StreamError`, a cancelled one :class:`StreamCancelled`."""
        answer = _Answer()
        for event in self.events(stream_id, token=token):
            answer.add(event)
        return answer.result()

    def _send(self, call: _Call) -> httpx.Response:
        for attempt in self._p.retrying():
            with attempt:
                try:
                    response = self._http.request(call.method, call.url, json=call.json, headers=call.headers)
                except _NETWORK as exc:
                    raise self._p.unreachable(call, exc) from exc
                return _checked(response)
        raise AssertionError("stamina raises once it gives up")

    def _follow(self, follower: _Follower, token: str | None) -> Iterator[Event]:
        while not follower.over:
            opened = self._open(follower, token)
            if opened is None:
                return
            try:
                yield opened.first
                if not follower.over:
                    for sse in opened.rest:
                        if (event := follower.accept(sse)) is not None:
                            yield event
                            if follower.over:
                                return
            except _NETWORK:
                pass  # it brought something new: reconnect at once
            finally:
                opened.response.close()

    def _open(self, follower: _Follower, token: str | None) -> _Opened | None:
        for attempt in self._p.retrying():
            with attempt:
                return self._connect(follower, token)
        raise AssertionError("stamina raises once it gives up")

    def _connect(self, follower: _Follower, token: str | None) -> _Opened | None:
        """A connection, read up to its first new event; ``None`` at a 204."""
        call = self._p.events(follower, token)
        request = self._http.build_request(call.method, call.url, headers=call.headers, params=call.params)
        try:
            response = self._http.send(request, stream=True)
        except _NETWORK as exc:
            raise self._p.unreachable(call, exc) from exc
        try:
            if response.status_code != 200:
                response.read()
            if follower.opened(response):
                rest = EventSource(response).iter_sse()
                for sse in rest:
                    if (event := follower.accept(sse)) is not None:
                        return _Opened(response, rest, event)
        except _NETWORK as exc:
            response.close()
            raise follower.fruitless(exc) from exc
        except BaseException:
            response.close()
            raise
        response.close()
        if follower.over:
            return None
        raise follower.fruitless(None)


class AsyncClient:
    """The asyncio face, on ``httpx.AsyncClient``: :class:`Client`'s methods, awaited; ``events`` and
    ``resume`` are async iterators (close one you leave early: ``contextlib.aclosing``)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        backoff: Backoff = Backoff(),
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self._p = _Protocol(base_url, api_key, backoff)
        self._own = http is None
        self._http = http if http is not None else httpx.AsyncClient(timeout=timeout)

    def __repr__(self) -> str:
        return f"<AsyncClient {self._p.base_url}>"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._own:
            await self._http.aclose()

    async def create(self, prompt: str | None = None, **options: Unpack[Options]) -> Created:
        """As :meth:`Client.create`."""
        return _created(await self._send(self._p.create(prompt, options)))

    async def status(self, stream_id: str) -> Status:
        return _status(await self._send(self._p.status(stream_id)))

    async def cancel(self, stream_id: str) -> str:
        """As :meth:`Client.cancel`."""
        return str((await self._send(self._p.cancel(stream_id))).json()["status"])

    def events(
        self, stream_id: str, after: str | Event | None = None, *, token: str | None = None
    ) -> AsyncIterator[Event]:
        """As :meth:`Client.events`."""
        return self._follow(_Follower(stream_id, after), token)

    def resume(self, stream_id: str, after: str | Event, *, token: str | None = None) -> AsyncIterator[Event]:
        """As :meth:`Client.resume`."""
        return self.events(stream_id, after, token=token)

    async def text(self, stream_id: str, *, token: str | None = None) -> str:
        """As :meth:`Client.text`."""
        answer = _Answer()
        async for event in self.events(stream_id, token=token):
            answer.add(event)
        return answer.result()

    async def _send(self, call: _Call) -> httpx.Response:
        async for attempt in self._p.retrying():
            with attempt:
                try:
                    response = await self._http.request(
                        call.method, call.url, json=call.json, headers=call.headers
                    )
                except _NETWORK as exc:
                    raise self._p.unreachable(call, exc) from exc
                return _checked(response)
        raise AssertionError("stamina raises once it gives up")

    async def _follow(self, follower: _Follower, token: str | None) -> AsyncIterator[Event]:
        while not follower.over:
            opened = await self._open(follower, token)
            if opened is None:
                return
            try:
                yield opened.first
                if not follower.over:
                    async for sse in opened.rest:
                        if (event := follower.accept(sse)) is not None:
                            yield event
                            if follower.over:
                                return
            except _NETWORK:
                pass  # it brought something new: reconnect at once
            finally:
                await opened.rest.aclose()
                await opened.response.aclose()

    async def _open(self, follower: _Follower, token: str | None) -> _Opened | None:
        async for attempt in self._p.retrying():
            with attempt:
                return await self._connect(follower, token)
        raise AssertionError("stamina raises once it gives up")

    async def _connect(self, follower: _Follower, token: str | None) -> _Opened | None:
        """As :meth:`Client._connect`."""
        call = self._p.events(follower, token)
        request = self._http.build_request(call.method, call.url, headers=call.headers, params=call.params)
        try:
            response = await self._http.send(request, stream=True)
        except _NETWORK as exc:
            raise self._p.unreachable(call, exc) from exc
        rest = None
        try:
            if response.status_code != 200:
                await response.aread()
            if follower.opened(response):
                rest = EventSource(response).aiter_sse()
                async for sse in rest:
                    if (event := follower.accept(sse)) is not None:
                        return _Opened(response, rest, event)
        except _NETWORK as exc:
            await response.aclose()
            raise follower.fruitless(exc) from exc
        except BaseException:
            if rest is not None:
                await rest.aclose()
            await response.aclose()
            raise
        await response.aclose()
        if follower.over:
            return None
        raise follower.fruitless(None)
