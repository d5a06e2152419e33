"""The load client: its own process (uvloop and aiohttp), so that it is not the bottleneck.

It drives the three setups with the same workload and the same bookkeeping: (a) ``POST
/v1/chat/completions`` straight to the mock, SSE ``data:`` chunks; (b) ``POST /ask_query`` to the
naive proxy, JSON lines; (c) ``POST /v1/streams`` to tailgate, then ``GET`` its ``events_url``.

Every token the mock sends ends with ``@<send time in ns>``; each body chunk is stamped with
``time.time_ns()`` as aiohttp hands it over, so per-chunk latency is ``receive − send`` on one clock.
Stamps, ``seq`` and event types are picked out of the raw chunks with a regex: a strict parse per
event (``tailgate.dev.sse``, which the soak and the tests use) would cost this load generator a
multiple of the CPU. It still checks what it counts: ``seq`` in order, tokens in order and all there.

The bench talks to it through :class:`LoadClient`: a workload (a dict) in, its figures (a dict) out,
over a socket pair; the client runs as ``python -m bench.client FD``, a kit ``Child``.
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
_STAMP = re.compile(rb'@(\d+)"')  # a token's send stamp, in every setup's framing
_EVENT = re.compile(rb'event: ([a-z]+)\r?\ndata: \{"seq":(\d+)')  # (c)
_END = {"a": b"data: [DONE]", "b": b'"status": "complete"', "c": b"event: done"}  # a whole answer
_ERRORS = (OSError, aiohttp.ClientError, ValueError, KeyError)


@dataclass(frozen=True)
class Load:
    """A workload against one setup: ``concurrency`` slots, slot i starting at ``i * ramp_s /
    concurrency``. With ``loop`` a slot starts a new stream when its last one ends, until ``count``
    streams, or until the measuring window (``warmup_s`` .. ``warmup_s + window_s``) has passed and no
    measured stream is left running (later ones are fillers that keep the load up); without ``loop``
    each slot runs one stream. Streams started inside the window are measured (with ``samples``):
    their per-chunk latencies are kept. Each stream asks the mock for ``tokens`` (a random count in
    that range) ``delay_ms`` apart, the first after ``ttft_ms``."""

    concurrency: int
    tokens: tuple[int, int]
    count: int | None = None
    loop: bool = True
    samples: bool = True
    ramp_s: float = 0.0
    warmup_s: float = 0.0
    window_s: float = 1e6
    delay_ms: int = 20
    ttft_ms: int = 200


@dataclass(slots=True)
class Stream:
    """Parse state and figures of one stream, fed with body chunks as they arrive."""

    setup: str
    expected: int
    measured: bool
    window: tuple[int, int]  # the workload's measuring window (ns): tokens received inside it count
    latencies: list[int] = field(default_factory=list)  # ns, of each token if ``measured``
    buf: bytes = b""
    err: str = ""
    id: str = ""
    t_send: int = 0
    posted_ns: int = 0  # (c): the POST's answer arrived
    started_ns: int = 0  # (c): the `started` event arrived (the worker has claimed the stream)
    first_ns: int = 0
    first_stamp: int = 0  # the mock's send stamp of the first token
    last_ns: int = 0
    last_stamp: int = 0
    max_gap: int = 0
    next_seq: int = 1
    done: bool = False
    tokens: int = 0
    window_tokens: int = 0

    def feed(self, data: bytes, now: int) -> None:
        """Take the whole frames (lines for (b), events otherwise) out of what has arrived so far."""
        buf, delim = self.buf + data, b"\n" if self.setup == "b" else b"\n\n"
        end = buf.rfind(delim) + len(delim)
        if end < len(delim):
            self.buf = buf
            return
        region, self.buf = buf[:end], buf[end:]
        for kind, seq in _EVENT.findall(region) if self.setup == "c" else ():
            if int(seq) != self.next_seq:
                self.fail(f"seq {int(seq)} where {self.next_seq} was due")
            self.next_seq = int(seq) + 1
            if kind == b"started":
                self.started_ns = self.started_ns or now
            elif kind in (b"reset", b"error", b"cancelled"):
                self.fail(kind.decode())
        if self.setup == "a" and b'"error"' in region:
            self.fail("error frame")
        self.done = self.done or _END[self.setup] in region
        if stamps := [int(x) for x in _STAMP.findall(region)]:
            self._tokens(stamps, now)

    def _tokens(self, stamps: list[int], now: int) -> None:
        if stamps[0] < self.last_stamp:
            self.fail("tokens out of order")
        if self.first_ns:
            self.max_gap = max(self.max_gap, now - self.last_ns)
        self.first_stamp = self.first_stamp or stamps[0]
        self.last_stamp, self.first_ns, self.last_ns = stamps[-1], self.first_ns or now, now
        self.tokens += len(stamps)
        self.window_tokens += len(stamps) if self.window[0] <= now <= self.window[1] else 0
        if self.measured:
            self.latencies += [now - s for s in stamps]

    def fail(self, why: str) -> None:
        self.err = self.err or why

    def _since_send(self, ns: int) -> float | None:
        return round((ns - self.t_send) / 1e6, 3) if ns and self.t_send else None

    def record(self) -> dict[str, Any]:
        """What the bench gets of a stream that has ended; ``ok`` only if it was delivered whole."""
        if not self.done:
            self.fail("ended without done")
        elif self.tokens != self.expected:
            self.fail(f"{self.tokens} of {self.expected} tokens")
        return {
            "id": self.id,
            "measured": self.measured,
            "ttft_ms": self._since_send(self.first_ns),
            "first_sent_ms": self._since_send(self.first_stamp),
            "posted_ms": self._since_send(self.posted_ns),
            "started_ms": self._since_send(self.started_ns),
            "max_gap_ms": round(self.max_gap / 1e6, 3),
            "ok": not self.err,
            "err": self.err,
        }


async def body(r: aiohttp.ClientResponse, status: int = 200) -> bytes:
    """The whole body of a response that answered ``status``; ``ValueError`` for another."""
    body = await r.read()
    if r.status != status:
        raise ValueError(f"{r.method} {r.url.path}: {r.status} {body[:200]!r}")
    return body


async def run_stream(http: aiohttp.ClientSession, spec: dict[str, Any], st: Stream, text: str) -> None:
    """``text`` through the setup of ``spec``, into ``st``; every setup gets the key (the mock takes any)."""
    base, auth = f"http://127.0.0.1:{spec['port']}", {"Authorization": f"Bearer {spec['api_key']}"}
    try:
        st.t_send = time.time_ns()
        if spec["setup"] == "c":
            async with http.post(f"{base}/v1/streams", json={"prompt": text}, headers=auth) as r:
                created = json.loads(await body(r, 202))
            st.posted_ns, st.id = time.time_ns(), created["id"]
            request = http.get(base + created["events_url"], headers=auth)
        elif spec["setup"] == "a":
            chat = {"model": MODEL, "messages": [{"role": "user", "content": text}], "stream": True}
            request = http.post(f"{base}/v1/chat/completions", json=chat, headers=auth)
        else:
            request = http.post(f"{base}/ask_query", json={"prompt": text})
        async with request as r:
            if r.status != 200:
                await body(r)
            async for data in r.content.iter_any():
                st.feed(data, time.time_ns())
    except _ERRORS as exc:
        st.fail(f"{type(exc).__name__}: {exc}")
    except asyncio.CancelledError:
        st.fail("deadline")
        raise


async def streams(http: aiohttp.ClientSession, spec: dict[str, Any]) -> dict[str, Any]:
    """Runs ``spec["load"]`` against ``spec["setup"]``; every stream's record and the totals."""
    load: Load = spec["load"]
    rng, t0 = random.Random(1), time.time_ns()
    window = (t0 + int(load.warmup_s * 1e9), t0 + int((load.warmup_s + load.window_s) * 1e9))
    directive = f"delay_ms={load.delay_ms},ttft_ms={load.ttft_ms},stamp=1"
    started: list[Stream] = []
    measured_running = 0

    async def slot(i: int) -> None:
        nonlocal measured_running
        await asyncio.sleep(i * load.ramp_s / load.concurrency)
        while load.count is None or len(started) < load.count:
            now = time.time_ns()
            if now > window[1] and measured_running == 0:
                return
            measured = load.samples and window[0] <= now <= window[1]
            st = Stream(spec["setup"], rng.randint(*load.tokens), measured, window)
            started.append(st)
            measured_running += measured
            try:
                await run_stream(
                    http, spec, st, f"{spec['tag']} {len(started)} [mock:tokens={st.expected},{directive}]"
                )
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
        "wall_s": (time.time_ns() - t0) / 1e9,
        "streams": [s.record() for s in started],
        "tokens": sum(s.tokens for s in started),
        "window_tokens": sum(s.window_tokens for s in started),
        "latency_ms": [round(x / 1e6, 3) for s in started for x in s.latencies],
    }


def session() -> aiohttp.ClientSession:
    """A session without a limit on connections (a workload sets its own) and without a total timeout."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None, sock_connect=30)
    )


async def serve(conn: Connection) -> None:
    """Runs the bench's workloads, one at a time, until it closes its end of ``conn``."""
    loop = asyncio.get_running_loop()
    async with session() as http:
        while True:
            try:
                spec: dict[str, Any] = await loop.run_in_executor(None, conn.recv)
            except EOFError:
                return
            try:
                conn.send(await streams(http, spec))
            except Exception as exc:  # reported to the bench, which stops the run
                conn.send({"error": f"{type(exc).__name__}: {exc}"})


class LoadClient:
    """The bench's end: ``run`` sends a workload to the client process and waits for its figures."""

    def __init__(self, conn: Connection, child: Child) -> None:
        self.conn, self.child = conn, child

    def run(self, timeout: float, tick: Callable[[], None] | None = None, **spec: Any) -> dict[str, Any]:
        """The answer to :func:`streams` of ``spec``; ``tick()`` is called every 0.25 s meanwhile."""
        self.conn.send(spec)
        deadline = time.monotonic() + timeout
        while not self.conn.poll(0.25):
            self.child.check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"the load client did not answer within {timeout:.0f}s")
            if tick is not None:
                tick()
        if "error" in (out := self.conn.recv()):
            raise RuntimeError(f"the load client failed: {out['error']}")
        return dict(out)


if __name__ == "__main__":  # started by ``Procs.start_client``, with its end of a socket pair
    import uvloop

    uvloop.run(serve(Connection(int(sys.argv[1]))))
