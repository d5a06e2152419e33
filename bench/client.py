"""The load client: its own process, raw asyncio protocols on uvloop, so it is not the bottleneck.

It speaks just enough HTTP/1.1 (a request, a content-length or chunked response) to drive the three
setups side by side, with the same workload and the same bookkeeping:

    a  straight to the mock upstream    POST /v1/chat/completions (stream), SSE `data:` chunks
    b  the naive proxy                  POST /ask_query, JSON lines
    c  tailgate                         POST /v1/streams, then GET events_url on the same connection

Every token the mock sends ends with ``@<send time in ns>``; the client stamps each read with
``time.time_ns()`` as it arrives, so per-chunk latency is ``receive - send`` on one clock. Parsing is
done inside ``data_received`` (no coroutine hop per chunk).

The parent (``python -m bench``) drives it with one JSON command per line on stdin and reads one JSON
answer per line on stdout: ``streams`` (a workload), ``create`` / ``hold`` / ``check`` / ``release``
(idle SSE connections), ``quit``.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

MODEL = "gpt-4o-mini"
TERMINAL = (b"done", b"error", b"cancelled")

_MOCK_TOKEN = re.compile(rb'"content": ?"[^"]*@(\d+)"')
_NAIVE_TOKEN = re.compile(rb'"status": "processing", "data": "[^"]*@(\d+)"')
_SSE_EVENT = re.compile(rb'event: ([a-z]+)\r?\ndata: \{"seq":(\d+)(?:,"text":"[^"]*@(\d+)")?')


class HttpError(Exception):
    pass


# --- HTTP/1.1 over a raw protocol ---------------------------------------------------------------


class Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: one request at a time; a streaming body goes to ``sink``
    as it arrives (de-chunked), a plain body is collected and returned."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.done: asyncio.Future[tuple[int, bytes]] | None = None
        self.sink: Callable[[bytes, int], None] | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.in_head = True
        self.chunked = False
        self.length = -1  # content-length; -1: until close (or chunked)
        self.chunk_left = 0
        self.need_crlf = False
        self.received = 0
        self.body = bytearray()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        if self.done is not None and not self.done.done():
            if not self.in_head and self.length == -1 and not self.chunked:
                self.done.set_result((self.status, bytes(self.body)))
            else:
                self.done.set_exception(HttpError(f"connection closed mid-response ({exc})"))

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()
        self.buf += data
        if self.in_head:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self._head(bytes(self.buf[:end]))
            del self.buf[: end + 4]
        if self.chunked:
            self._dechunk(now)
        else:
            self._emit(bytes(self.buf), now)
            self.buf.clear()
            if self.length >= 0 and self.received >= self.length:
                self._finish()

    def _head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        self.status = int(lines[0].split(b" ", 2)[1])
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                self.length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                self.chunked = True
        self.in_head = False
        if self.length == 0:
            self._finish()

    def _emit(self, data: bytes, now: int) -> None:
        if not data:
            return
        self.received += len(data)
        if self.sink is not None and self.status == 200:
            self.sink(data, now)
        else:
            self.body += data

    def _dechunk(self, now: int) -> None:
        buf, pos, out = self.buf, 0, []
        while True:
            if self.chunk_left:
                take = min(self.chunk_left, len(buf) - pos)
                if take <= 0:
                    break
                out.append(bytes(buf[pos : pos + take]))
                pos += take
                self.chunk_left -= take
                if self.chunk_left:
                    break
                self.need_crlf = True
            if self.need_crlf:
                if len(buf) - pos < 2:
                    break
                pos += 2
                self.need_crlf = False
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
            pos = eol + 2
            if size == 0:
                del buf[:pos]
                if out:
                    self._emit(b"".join(out), now)
                self._finish()
                return
            self.chunk_left = size
        del buf[:pos]
        if out:
            self._emit(b"".join(out), now)

    def _finish(self) -> None:
        result = (self.status, bytes(self.body))
        self._reset()
        self.buf.clear()  # nothing follows a response we did not ask for
        if self.done is not None and not self.done.done():
            self.done.set_result(result)

    # the client side
    async def send(
        self, request: bytes, sink: Callable[[bytes, int], None] | None = None
    ) -> tuple[int, bytes]:
        """Writes ``request``; returns (status, collected body) once the response has ended."""
        assert self.transport is not None
        self.sink = sink
        self.done = asyncio.get_running_loop().create_future()
        if self.transport.is_closing():
            raise HttpError("connection closed")
        self.transport.write(request)
        return await self.done

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def connect(port: int) -> Conn:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(Conn, "127.0.0.1", port)
    return conn


def http_request(method: str, port: int, path: str, body: bytes = b"", key: str | None = None) -> bytes:
    head = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    if key:
        head.append(f"Authorization: Bearer {key}")
    if method == "POST":
        head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    else:
        head.append("Accept: text/event-stream")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


# --- one stream -----------------------------------------------------------------------------------


@dataclass
class Totals:
    """What a workload gathers over all its streams."""

    t0: int  # ns, the workload's start
    window: tuple[int, int]  # ns: tokens received inside count towards throughput
    tokens: int = 0
    window_tokens: int = 0
    latencies: list[int] = field(default_factory=list)  # ns, measured streams only
    gaps: list[int] = field(default_factory=list)  # ns between consecutive token reads, measured only


class Stream:
    """Parse state and figures of one stream, fed by the connection as bytes arrive."""

    __slots__ = (
        "buf",
        "err",
        "expected",
        "first_ns",
        "id",
        "last_ns",
        "last_stamp",
        "max_gap",
        "measured",
        "next_seq",
        "posted_ns",
        "setup",
        "start_ns",
        "started_ns",
        "t_send",
        "terminal",
        "tokens",
        "totals",
    )

    def __init__(self, setup: str, expected: int, measured: bool, totals: Totals) -> None:
        self.setup = setup
        self.expected = expected
        self.measured = measured
        self.totals = totals
        self.buf = b""
        self.err = ""
        self.id = ""
        self.start_ns = time.time_ns()
        self.t_send = 0
        self.posted_ns = 0  # (c): the POST's answer arrived
        self.started_ns = 0  # (c): the `started` event arrived (the worker has claimed the stream)
        self.first_ns = 0
        self.last_ns = 0
        self.last_stamp = 0
        self.max_gap = 0
        self.next_seq = 1
        self.terminal = ""
        self.tokens = 0

    def feed(self, data: bytes, now: int) -> None:
        buf = self.buf + data
        delim = b"\n" if self.setup == "b" else b"\n\n"
        end = buf.rfind(delim)
        if end < 0:
            self.buf = buf
            return
        end += len(delim)
        region, self.buf = buf[:end], buf[end:]
        if self.setup == "c":
            stamps = []
            for kind, seq, stamp in _SSE_EVENT.findall(region):
                n = int(seq)
                if n != self.next_seq and not self.err:
                    self.err = f"seq {n} where {self.next_seq} was due"
                self.next_seq = n + 1
                if kind == b"delta":
                    if stamp:
                        stamps.append(int(stamp))
                    elif not self.err:
                        self.err = "delta without a stamp"
                elif kind in TERMINAL:
                    self.terminal = kind.decode()
                elif kind == b"started" and not self.started_ns:
                    self.started_ns = now
                elif kind == b"reset" and not self.err:
                    self.err = "reset"
        elif self.setup == "a":
            stamps = [int(s) for s in _MOCK_TOKEN.findall(region)]
            if b"data: [DONE]" in region:
                self.terminal = "done"
            elif b'"error"' in region and not self.err:
                self.err = "error frame"
        else:
            stamps = [int(s) for s in _NAIVE_TOKEN.findall(region)]
            if b'"status": "complete"' in region:
                self.terminal = "done"
        if stamps:
            self._tokens(stamps, now)

    def _tokens(self, stamps: list[int], now: int) -> None:
        t = self.totals
        if stamps[0] < self.last_stamp and not self.err:
            self.err = "tokens out of order"
        self.last_stamp = stamps[-1]
        if self.first_ns == 0:
            self.first_ns = now
        else:
            gap = now - self.last_ns
            if gap > self.max_gap:
                self.max_gap = gap
            if self.measured:
                t.gaps.append(gap)
                t.gaps.extend([0] * (len(stamps) - 1))
        self.last_ns = now
        self.tokens += len(stamps)
        t.tokens += len(stamps)
        if t.window[0] <= now <= t.window[1]:
            t.window_tokens += len(stamps)
        if self.measured:
            t.latencies.extend([now - s for s in stamps])

    def verdict(self) -> None:
        """Sets ``err`` if the stream was not delivered whole."""
        if self.err:
            return
        if self.terminal != "done":
            self.err = f"ended without done ({self.terminal or 'nothing'})"
        elif self.tokens != self.expected:
            self.err = f"{self.tokens} of {self.expected} tokens"

    def _since_send(self, ns: int) -> float | None:
        return round((ns - self.t_send) / 1e6, 3) if ns and self.t_send else None

    def record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "start_s": round((self.start_ns - self.totals.t0) / 1e9, 4),
            "measured": self.measured,
            "ttft_ms": self._since_send(self.first_ns),
            "posted_ms": self._since_send(self.posted_ns),
            "started_ms": self._since_send(self.started_ns),
            "tokens": self.tokens,
            "expected": self.expected,
            "max_gap_ms": round(self.max_gap / 1e6, 3),
            "ok": not self.err,
            "err": self.err,
        }


def prompt(tag: str, i: int, tokens: int, delay_ms: int, ttft_ms: int) -> str:
    return f"{tag} {i} [mock:tokens={tokens},delay_ms={delay_ms},ttft_ms={ttft_ms},stamp=1]"


async def run_stream(spec: dict[str, Any], st: Stream, text: str) -> None:
    setup, port, key = spec["setup"], spec["port"], spec.get("api_key")
    conn: Conn | None = None
    try:
        conn = await connect(port)
        if setup == "a":
            body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "stream": True}
            req = http_request("POST", port, "/v1/chat/completions", json.dumps(body).encode(), "sk-bench")
            st.t_send = time.time_ns()
            status, rest = await conn.send(req, st.feed)
        elif setup == "b":
            req = http_request("POST", port, "/ask_query", json.dumps({"prompt": text}).encode())
            st.t_send = time.time_ns()
            status, rest = await conn.send(req, st.feed)
        else:
            req = http_request("POST", port, "/v1/streams", json.dumps({"prompt": text}).encode(), key)
            st.t_send = time.time_ns()
            status, rest = await conn.send(req)
            st.posted_ns = time.time_ns()
            if status != 202:
                raise HttpError(f"POST /v1/streams: {status} {rest[:200]!r}")
            created = json.loads(rest)
            st.id = created["id"]
            status, rest = await conn.send(http_request("GET", port, created["events_url"], key=key), st.feed)
        if status != 200:
            raise HttpError(f"{status} {rest[:200]!r}")
        st.verdict()
    except (OSError, HttpError, ValueError, KeyError) as exc:
        st.err = st.err or f"{type(exc).__name__}: {exc}"
    except asyncio.CancelledError:
        st.err = st.err or "deadline"
        raise
    finally:
        if conn is not None:
            conn.abort() if st.err else conn.close()


# --- workloads ------------------------------------------------------------------------------------


async def streams(spec: dict[str, Any]) -> dict[str, Any]:
    """A workload of streams against one setup.

    ``concurrency`` slots, slot i starting at ``i * ramp_s / concurrency``. With ``loop`` a slot starts
    a new stream when its last one ends, until ``count`` streams, or until the measuring window
    (``warmup_s`` .. ``warmup_s + window_s``) has passed and no measured stream is left running (later
    ones are fillers that keep the load up; without ``fill`` none starts after the window); without
    ``loop`` each slot runs one stream. Streams started inside the window are measured (with
    ``samples``): their per-chunk latencies and gaps are kept.
    """
    rng = random.Random(spec.get("seed", 1))
    lo, hi = spec["tokens"]
    t0 = time.time_ns()
    warm_ns = int(spec.get("warmup_s", 0) * 1e9)
    window_ns = int(spec.get("window_s", 1e6) * 1e9)
    totals = Totals(t0, (t0 + warm_ns, t0 + warm_ns + window_ns))
    concurrency, ramp = spec["concurrency"], spec.get("ramp_s", 0.0)
    count = spec.get("count")
    fill, samples = spec.get("fill", True), spec.get("samples", True)
    started: list[Stream] = []
    measured_running = 0
    all_measured_done = asyncio.Event()

    async def slot(i: int) -> None:
        nonlocal measured_running
        await asyncio.sleep(i * ramp / concurrency)
        while True:
            if count is not None and len(started) >= count:
                return
            now = time.time_ns()
            if now > totals.window[1] and (measured_running == 0 or not fill):
                return
            measured = samples and totals.window[0] <= now <= totals.window[1]
            n = rng.randint(lo, hi)
            st = Stream(spec["setup"], n, measured, totals)
            started.append(st)
            text = prompt(spec["tag"], len(started), n, spec["delay_ms"], spec["ttft_ms"])
            if measured:
                measured_running += 1
            try:
                await run_stream(spec, st, text)
            finally:
                if measured:
                    measured_running -= 1
                    if measured_running == 0 and time.time_ns() > totals.window[1]:
                        all_measured_done.set()
            if not spec.get("loop", True):
                return

    tasks = [asyncio.create_task(slot(i)) for i in range(concurrency)]
    done, pending = await asyncio.wait(tasks, timeout=spec["deadline_s"])
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        if task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    wall = (time.time_ns() - t0) / 1e9
    return {
        "streams": [s.record() for s in started],
        "tokens": totals.tokens,
        "window_tokens": totals.window_tokens,
        "window_s": window_ns / 1e9,
        "wall_s": wall,
        "deadline_hit": bool(pending),
        "latency_ms": [round(x / 1e6, 3) for x in totals.latencies],
        "gap_ms": [round(x / 1e6, 3) for x in totals.gaps],
    }


@dataclass
class Idle:
    """Idle SSE connections held open by ``hold`` until ``release``."""

    ids: list[str] = field(default_factory=list)
    conns: list[Conn] = field(default_factory=list)


async def create(spec: dict[str, Any], idle: Idle) -> dict[str, Any]:
    """``count`` queued streams through the API, over ``concurrency`` keep-alive connections."""
    port, key, count = spec["port"], spec["api_key"], spec["count"]
    failures: list[str] = []
    next_i = 0

    async def creator() -> None:
        nonlocal next_i
        conn = await connect(port)
        try:
            while next_i < count:
                next_i += 1
                body = json.dumps({"prompt": f"{spec['tag']} idle {next_i}"}).encode()
                status, rest = await conn.send(http_request("POST", port, "/v1/streams", body, key))
                if status == 202:
                    idle.ids.append(json.loads(rest)["id"])
                else:
                    failures.append(f"{status} {rest[:120]!r}")
        finally:
            conn.close()

    t0 = time.monotonic()
    await asyncio.wait_for(
        asyncio.gather(*(creator() for _ in range(spec["concurrency"]))), spec["deadline_s"]
    )
    return {"created": len(idle.ids), "failures": failures[:5], "wall_s": time.monotonic() - t0}


async def hold(spec: dict[str, Any], idle: Idle) -> dict[str, Any]:
    """An SSE connection to each created stream, held once its ``queued`` event has arrived."""
    port, key = spec["port"], spec["api_key"]
    gate = asyncio.Semaphore(spec["concurrency"])
    failures: list[str] = []
    ids = idle.ids[spec.get("from", 0) : spec.get("from", 0) + spec["count"]]

    async def one(stream_id: str) -> None:
        async with gate:
            got: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            def sink(data: bytes, now: int) -> None:
                if b"event: queued" in data and not got.done():
                    got.set_result(None)

            try:
                conn = await connect(port)
            except OSError as exc:
                failures.append(f"connect: {exc}")
                return
            idle.conns.append(conn)
            response = asyncio.ensure_future(
                conn.send(http_request("GET", port, f"/v1/streams/{stream_id}/events", key=key), sink)
            )
            response.add_done_callback(_retrieve)  # ends with an error when `release` aborts it
            waiters: set[asyncio.Future[Any]] = {got, response}
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            if not got.done():
                failures.append(f"no queued event: {response.result() if not response.exception() else ''}")
                got.cancel()

    t0 = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(one(i) for i in ids)), spec["deadline_s"])
    held = sum(1 for c in idle.conns if not c.closed.done())
    return {
        "held": held,
        "opened": len(idle.conns),
        "failures": failures[:5],
        "failed": len(failures),
        "wall_s": time.monotonic() - t0,
    }


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def check(idle: Idle) -> dict[str, Any]:
    return {"held": sum(1 for c in idle.conns if not c.closed.done()), "opened": len(idle.conns)}


async def release(idle: Idle) -> dict[str, Any]:
    for conn in idle.conns:
        conn.abort()
    n = len(idle.conns)
    idle.conns.clear()
    idle.ids.clear()
    await asyncio.sleep(0.2)
    return {"released": n}


# --- the command loop -------------------------------------------------------------------------------


async def main() -> None:
    loop = asyncio.get_running_loop()
    idle = Idle()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        spec = json.loads(line)
        cmd = spec["cmd"]
        try:
            if cmd == "streams":
                out = await streams(spec)
            elif cmd == "create":
                out = await create(spec, idle)
            elif cmd == "hold":
                out = await hold(spec, idle)
            elif cmd == "check":
                out = check(idle)
            elif cmd == "release":
                out = await release(idle)
            elif cmd == "quit":
                return
            else:
                out = {"error": f"unknown command {cmd!r}"}
        except Exception as exc:  # reported to the parent, which stops the run
            out = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


def run() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


if __name__ == "__main__":
    run()
