"""uvicorn's HTTP protocol (httptools) with the limits a server at the edge needs before any key is
checked: a slow or silent client cannot hold a socket, a huge head cannot grow memory, and one process
holds a bounded number of connections.

- **Request deadline.** A request's head and body must arrive within ``TAILGATE_REQUEST_TIMEOUT_S``
  of its first byte (of the connection's opening, for the first request). Otherwise 408 and close.
  uvicorn has no such deadline: its keep-alive timer restarts on every byte received, so a client
  sending one byte every few seconds, or nothing at all after connecting, holds the socket for ever.
  The deadline covers receiving the request only; a long SSE response is not cut.
- **Head size.** A request line plus headers over ``TAILGATE_MAX_HEADER_BYTES`` get 431 and close,
  counted as the bytes arrive (httptools would otherwise buffer one endless header line).
- **Connections.** Past ``TAILGATE_MAX_CONNECTIONS`` open connections, a new one gets 503 with
  ``Retry-After`` and is closed at once (uvicorn's ``limit_concurrency`` answers 503 only to a complete
  request, so it does not stop idle sockets).
- **Half-open connections.** TCP keepalive probes (and ``TCP_USER_TIMEOUT`` for unacknowledged data)
  close a connection whose peer vanished without a FIN, which an SSE response would otherwise keep
  writing keep-alives into for the kernel's default ~15 minutes.

The errors are the API's JSON shape, written by hand: no ASGI cycle exists yet for such a request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tailgate import tuning

log = logging.getLogger(__name__)

_REASONS = {408: "Request Timeout", 431: "Request Header Fields Too Large", 503: "Service Unavailable"}


def _error(status: int, code: str, message: str, retry_after: int | None = None) -> bytes:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = [
        f"HTTP/1.1 {status} {_REASONS[status]}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    if retry_after is not None:
        head.append(f"retry-after: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class GuardedProtocol(HttpToolsProtocol):
    """One connection. Configure the limits with :meth:`configured`, which returns a subclass that
    uvicorn's ``Config(http=...)`` takes as its protocol class."""

    request_timeout_s: ClassVar[float] = 15.0
    max_header_bytes: ClassVar[int] = 16384
    max_connections: ClassVar[int] = 10000

    @classmethod
    def configured(
        cls, *, request_timeout_s: float, max_header_bytes: int, max_connections: int
    ) -> type[GuardedProtocol]:
        limits = {
            "request_timeout_s": request_timeout_s,
            "max_header_bytes": max_header_bytes,
            "max_connections": max_connections,
        }
        return type("GuardedProtocol", (cls,), limits)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._in_head = True
        self._head_bytes = 0  # raw bytes while the head is incomplete (an upper bound)
        self._head_size = 0  # the parsed head: URL and header lines

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            log.warning("connection refused: %d open (TAILGATE_MAX_CONNECTIONS)", len(self.connections))
            message = "this gateway process holds its maximum of connections; retry shortly"
            self._refuse(_error(503, "unavailable", message, retry_after=1))
            return
        _probe_half_open(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)  # an upper bound: the body may start in the same chunk
        super().data_received(data)
        # Still in the head after this chunk: every byte so far was head.
        if self._in_head and self._head_bytes > self.max_header_bytes and not self.transport.is_closing():
            self._too_large()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:  # a later request on a kept-alive connection
            self._arm()

    def on_url(self, url: bytes) -> None:
        self._head_size += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4  # ": " and CRLF
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._head_size > self.max_header_bytes:
            self._too_large()  # a whole head that arrived at once; no ASGI task starts for it
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self.transport.is_closing():  # refused: the rest of this request is ignored
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self.transport.is_closing():
            return
        self._disarm()
        self._in_head, self._head_bytes, self._head_size = True, 0, 0  # the next request's head
        super().on_message_complete()

    def _too_large(self) -> None:
        message = f"request line and headers are over {self.max_header_bytes} bytes; send less"
        self._refuse(_error(431, "headers_too_large", message))

    def _arm(self) -> None:
        self._deadline = self.loop.call_later(self.request_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        # After the head, `cycle` is this request's (before it, a kept-alive connection's previous one).
        if not self._in_head and self.cycle is not None and self.cycle.response_started:
            self.transport.close()  # the app answered before the body was in; just hang up
            return
        message = f"the request did not arrive within {self.request_timeout_s:g}s; send it faster"
        self._refuse(_error(408, "request_timeout", message))

    def _refuse(self, response: bytes) -> None:
        self._disarm()
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # the app (waiting for a body) sees http.disconnect
            self.cycle.message_event.set()
        self.transport.write(response)
        self.transport.close()


def _probe_half_open(transport: asyncio.Transport) -> None:
    sock: socket.socket | None = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, tuning.TCP_KEEPIDLE_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, tuning.TCP_KEEPINTVL_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, tuning.TCP_KEEPCNT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, tuning.TCP_USER_TIMEOUT_MS)
