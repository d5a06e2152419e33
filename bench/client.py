"""The load client: its own process (uvloop and aiohttp), so that it is not the bottleneck.

It drives the three setups with the same workload and the same bookkeeping:

    a  straight to the mock upstream    POST /v1/chat/completions (stream), SSE `data:` chunks
    b  the naive proxy                  POST /ask_query, JSON lines
    c  tailgate                         POST /v1/streams, then GET its events_url

Every token the mock sends ends with ``@<send time in ns>``; each body chunk is stamped with
``time.time_ns()`` as aiohttp hands it over, so per-chunk latency is ``receive − send`` on one clock.
Stamps, ``seq`` and event types are picked out of the raw chunks with a regex: this is a load
generator, and a strict parse per event (``tailgate.dev.sse``, which the soak and the tests use) costs
it a multiple of the CPU. It still checks what it counts: ``seq`` in order, tokens in order and all there.

:class:`LoadClient` is the bench's end: one command (a dict) in, one answer (a dict) out, over a socket
pair; the client runs as ``python -m bench.client FD``, a child like any other (``bench/procs.py``).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import aiohttp

from tailgate.dev.procs import Child

MODEL = "gpt-4o-mini"
# (a) and (b): a token's send stamp, and what marks the end of a whole answer.
_TOKEN = {
    "a": (re.compile(rb'"content": ?"[^"]*@(\d+)"'), b"data: [DONE]"),
    "b": (re.compile(rb'"status": "processing", "data": "[^"]*@(\d+)"'), b'"status": "complete"'),
}
_SSE_EVENT = re.compile(rb'event: ([a-z]+)\r?\ndata: \{"seq":(\d+)(?:,"text":"[^"]*@(\d+)")?')


class HttpError(Exception):
    pass


@dataclass
class Totals:
    """What a workload gathers over all its streams."""

    window: tuple[int, int]  # ns: tokens received inside count towards throughput
    tokens: int = 0
    window_tokens: int = 0
    latencies: list[int] = field(default_factory=list)  # ns, measured streams only


@dataclass(slots=True)
class Stream:
    """Parse state and figures of one stream, fed with body chunks as they arrive."""

    setup: str
    expected: int
    measured: bool
    totals: Totals
    buf: bytes = b""
    err: str = ""
    id: str = ""
    t_send: int = 0
    posted_ns: int = 0  # (c): the POST's answer arrived
    started_ns: int = 0  # (c): the `started` event arrived (the worker has claimed the stream)
    first_ns: int = 0
    last_ns: int = 0
    last_stamp: int = 0
    max_gap: int = 0
    next_seq: int = 1
    terminal: str = ""
    tokens: int = 0

    def feed(self, data: bytes, now: int) -> None:
        buf = self.buf + data
        delim = b"\n" if self.setup == "b" else b"\n\n"
        end = buf.rfind(delim) + len(delim)
        if end < len(delim):
            self.buf = buf
            return
        region, self.buf = buf[:end], buf[end:]
        if self.setup == "c":
            stamps = []
            for kind, seq, stamp in _SSE_EVENT.findall(region):
                if int(seq) != self.next_seq:
                    self.err = self.err or f"seq {int(seq)} where {self.next_seq} was due"
                self.next_seq = int(seq) + 1
                if kind == b"delta":
                    stamps.append(int(stamp or 0))
                elif kind in (b"done", b"error", b"cancelled"):
                    self.terminal = kind.decode()
                elif kind == b"started":
                    self.started_ns = self.started_ns or now
                elif kind == b"reset":
                    self.err = self.err or "reset"
        else:
            token, end_mark = _TOKEN[self.setup]
            stamps = [int(s) for s in token.findall(region)]
            self.terminal = "done" if end_mark in region else self.terminal
            if self.setup == "a" and b'"error"' in region:
                self.err = self.err or "error frame"
        if stamps:
            self._tokens(stamps, now)

    def _tokens(self, stamps: list[int], now: int) -> None:
        t = self.totals
        if not all(stamps) or stamps[0] < self.last_stamp:
            self.err = self.err or "a token without a stamp, or out of order"
        self.last_stamp = stamps[-1]
        if self.first_ns:
            self.max_gap = max(self.max_gap, now - self.last_ns)
        self.first_ns = self.first_ns or now
        self.last_ns = now
        self.tokens += len(stamps)
        t.tokens += len(stamps)
        if t.window[0] <= now <= t.window[1]:
            t.window_tokens += len(stamps)
        if self.measured:
            t.latencies += [now - s for s in stamps]

    def _since_send(self, ns: int) -> float | None:
        return round((ns - self.t_send) / 1e6, 3) if ns and self.t_send else None

    def record(self) -> dict[str, Any]:
        """What the bench gets of a stream that has ended; ``ok`` only if it was delivered whole."""
        if self.terminal != "done":
            self.err = self.err or f"ended without done ({self.terminal or 'nothing'})"
        elif self.tokens != self.expected:
            self.err = self.err or f"{self.tokens} of {self.expected} tokens"
        return {
            "id": self.id,
            "measured": self.measured,
            "ttft_ms": self._since_send(self.first_ns),
            "posted_ms": self._since_send(self.posted_ns),
            "started_ms": self._since_send(self.started_ns),
            "max_gap_ms": round(self.max_gap / 1e6, 3),
            "ok": not self.err,
            "err": self.err,
        }


def _headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


async def run_stream(http: aiohttp.ClientSession, spec: dict[str, Any], st: Stream, text: str) -> None:
    base, key = f"http://127.0.0.1:{spec['port']}", spec.get("api_key")
    try:
        st.t_send = time.time_ns()
        if spec["setup"] == "c":
            async with http.post(f"{base}/v1/streams", json={"prompt": text}, headers=_headers(key)) as r:
                answer = await r.read()
            st.posted_ns = time.time_ns()
            if r.status != 202:
                raise HttpError(f"POST /v1/streams: {r.status} {answer[:200]!r}")
            created = json.loads(answer)
            st.id = created["id"]
            request = http.get(base + created["events_url"], headers=_headers(key))
        elif spec["setup"] == "a":
            body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "stream": True}
            request = http.post(f"{base}/v1/chat/completions", json=body, headers=_headers("sk-bench"))
        else:
            request = http.post(f"{base}/ask_query", json={"prompt": text})
        async with request as r:
            if r.status != 200:
                raise HttpError(f"{r.status} {(await r.read())[:200]!r}")
            async for data in r.content.iter_any():
                st.feed(data, time.time_ns())
    except (OSError, aiohttp.ClientError, HttpError, ValueError, KeyError) as exc:
        st.err = st.err or f"{type(exc).__name__}: {exc}"
    except asyncio.CancelledError:
        st.err = st.err or "deadline"
        raise


@dataclass(frozen=True)
class Load:
    """A workload against one setup: ``concurrency`` slots, slot i starting at ``i * ramp_s /
    concurrency``. With ``loop`` a slot starts a new stream when its last one ends, until ``count``
    streams, or until the measuring window (``warmup_s`` .. ``warmup_s + window_s``) has passed and no
    measured stream is left running (later ones are fillers that keep the load up; without ``fill``
    none starts after the window); without ``loop`` each slot runs one stream. Streams started inside
    the window are measured (with ``samples``): their per-chunk latencies and gaps are kept. Each
    stream asks the mock for ``tokens`` (a random count in that range) ``delay_ms`` apart."""

    concurrency: int
    tokens: tuple[int, int]
    count: int | None = None
    loop: bool = True
    fill: bool = True
    samples: bool = True
    ramp_s: float = 0.0
    warmup_s: float = 0.0
    window_s: float = 1e6
    delay_ms: int = 20
    ttft_ms: int = 200


async def streams(http: aiohttp.ClientSession, spec: dict[str, Any], idle: Idle) -> dict[str, Any]:
    """Runs ``spec["load"]`` against ``spec["setup"]``; every stream's record and the totals."""
    load: Load = spec["load"]
    rng = random.Random(1)
    t0 = time.time_ns()
    window = (t0 + int(load.warmup_s * 1e9), t0 + int((load.warmup_s + load.window_s) * 1e9))
    totals = Totals(window)
    directive = f"delay_ms={load.delay_ms},ttft_ms={load.ttft_ms},stamp=1"
    started: list[Stream] = []
    measured_running = 0

    async def slot(i: int) -> None:
        nonlocal measured_running
        await asyncio.sleep(i * load.ramp_s / load.concurrency)
        while load.count is None or len(started) < load.count:
            now = time.time_ns()
            if now > window[1] and (measured_running == 0 or not load.fill):
                return
            measured = load.samples and window[0] <= now <= window[1]
            st = Stream(spec["setup"], rng.randint(*load.tokens), measured, totals)
            started.append(st)
            measured_running += measured
            try:
                text = f"{spec['tag']} {len(started)} [mock:tokens={st.expected},{directive}]"
                await run_stream(http, spec, st, text)
            finally:
                measured_running -= measured
            if not load.loop:
                return

    tasks = [asyncio.create_task(slot(i)) for i in range(load.concurrency)]
    done, pending = await asyncio.wait(tasks, timeout=spec["deadline_s"])
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        task.result()  # a bug in the client: raise it
    return {
        "streams": [s.record() for s in started],
        "tokens": totals.tokens,
        "window_tokens": totals.window_tokens,
        "latency_ms": [round(x / 1e6, 3) for x in totals.latencies],
    }


@dataclass
class Idle:
    """Idle SSE connections: streams ``create``-d, then held open by ``hold`` until ``release``."""

    ids: list[str] = field(default_factory=list)
    held: list[aiohttp.ClientResponse] = field(default_factory=list)

    def count(self) -> int:
        return sum(1 for r in self.held if r.connection is not None and not r.connection.closed)


async def create(http: aiohttp.ClientSession, spec: dict[str, Any], idle: Idle) -> dict[str, Any]:
    """``count`` queued streams through the API, 32 requests at a time."""
    url, headers = f"http://127.0.0.1:{spec['port']}/v1/streams", _headers(spec["api_key"])
    gate, failures, t0 = asyncio.Semaphore(32), [], time.monotonic()

    async def one(i: int) -> None:
        async with gate, http.post(url, json={"prompt": f"{spec['tag']} idle {i}"}, headers=headers) as r:
            if r.status == 202:
                idle.ids.append((await r.json())["id"])
            else:
                failures.append(f"{r.status} {(await r.read())[:120]!r}")

    await asyncio.gather(*(one(i) for i in range(spec["count"])))
    return {"created": len(idle.ids), "failures": failures[:5], "wall_s": time.monotonic() - t0}


async def hold(http: aiohttp.ClientSession, spec: dict[str, Any], idle: Idle) -> dict[str, Any]:
    """An SSE connection to each of ``count`` created streams from ``start``, 256 opening at a time,
    held once its ``queued`` event has arrived."""
    base, headers = f"http://127.0.0.1:{spec['port']}/v1/streams", _headers(spec["api_key"])
    gate, failures = asyncio.Semaphore(256), []

    async def one(stream_id: str) -> None:
        async with gate:
            try:
                r = await http.get(f"{base}/{stream_id}/events", headers=headers)
                idle.held.append(r)
                seen = await r.content.readuntil(b"event: queued")
                if not seen.endswith(b"event: queued"):
                    raise HttpError(f"{r.status}, closed before a queued event: {seen[:120]!r}")
            except (OSError, aiohttp.ClientError, HttpError, ValueError) as exc:
                failures.append(f"{type(exc).__name__}: {exc}")

    await asyncio.gather(*(one(i) for i in idle.ids[spec["start"] : spec["start"] + spec["count"]]))
    return {"held": idle.count(), "failures": failures[:5]}


async def release(http: aiohttp.ClientSession, spec: dict[str, Any], idle: Idle) -> dict[str, Any]:
    """Closes every held connection; how many were still open."""
    held = idle.count()
    for r in idle.held:
        r.close()
    idle.held.clear()
    idle.ids.clear()
    await asyncio.sleep(0.2)
    return {"held": held}


COMMANDS = {"streams": streams, "create": create, "hold": hold, "release": release}


async def serve(conn: Connection) -> None:
    """Answers the bench's commands, one at a time, until it closes its end of ``conn``."""
    loop = asyncio.get_running_loop()
    idle = Idle()
    # No limit on connections: a workload sets its own concurrency, and the idle phase holds 10,000.
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        while True:
            try:
                spec: dict[str, Any] = await loop.run_in_executor(None, conn.recv)
            except EOFError:
                return
            try:
                out = await COMMANDS[spec["cmd"]](http, spec, idle)
            except Exception as exc:  # reported to the bench, which stops the run
                out = {"error": f"{type(exc).__name__}: {exc}"}
            conn.send(out)


class LoadClient:
    """The bench's end: ``call`` sends a command to the client process and waits for its answer."""

    def __init__(self, conn: Connection, child: Child) -> None:
        self.conn = conn
        self.child = child

    def call(
        self, cmd: str, timeout: float = 60, *, tick: Callable[[], None] | None = None, **args: Any
    ) -> dict[str, Any]:
        """The answer to ``cmd`` with ``args``; ``tick()`` is called every 0.25 s meanwhile."""
        self.conn.send({"cmd": cmd, **args})
        deadline = time.monotonic() + timeout
        while not self.conn.poll(0.25):
            self.child.check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"the load client did not answer within {timeout:.0f}s")
            if tick is not None:
                tick()
        out: dict[str, Any] = self.conn.recv()
        if "error" in out:
            raise RuntimeError(f"the load client failed: {out['error']}")
        return out


if __name__ == "__main__":  # started by ``Procs.start_client``, with its end of a socket pair
    import uvloop

    uvloop.run(serve(Connection(int(sys.argv[1]))))
