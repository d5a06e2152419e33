"""Real processes for the tests: gateway and worker as `python -m tailgate ...` children, and an SSE
reader over a real HTTP connection (httpx streaming, never an in-process transport)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai

from tailgate.dev.procs import free_port, stop_process

MODEL = "gpt-4o-mini"  # the gateway's default model, which the worker sends upstream


class Proc:
    """A child process whose output goes to a log file; stopped by the fixture that started it."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "tailgate", *args], env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.popen.returncode}:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no {text!r} within {timeout}s:\n{self.log()[-3000:]}")
            time.sleep(0.02)

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        code = stop_process(self.popen, timeout)
        self._log.close()
        return code


def wait_http(url: str, proc: Proc, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited {proc.popen.returncode}:\n{proc.log()[-3000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not ready:\n{proc.log()[-3000:]}")
        time.sleep(0.02)


@dataclass
class Stack:
    """Gateways and workers sharing one environment (one Redis, one queue, one upstream)."""

    env: dict[str, str]
    log_dir: Path
    api_key: str
    procs: list[Proc] = field(default_factory=list)
    gateways: list[str] = field(default_factory=list)

    def gateway(self, **env: str) -> str:
        port = free_port()
        proc = Proc(
            "gateway", ["gateway", "--host", "127.0.0.1", "--port", str(port)], self.env | env, self.log_dir
        )
        self.procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/readyz", proc)
        self.gateways.append(url)
        return url

    def worker(self, **env: str) -> Proc:
        proc = Proc("worker", ["worker"], self.env | env, self.log_dir)
        self.procs.append(proc)
        proc.wait_for_log(" ready (concurrency")
        return proc

    @property
    def url(self) -> str:
        return self.gateways[0]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def close(self) -> None:
        for proc in self.procs:
            proc.signal(signal.SIGTERM)  # all at once, then wait for each
        for proc in reversed(self.procs):
            proc.stop()


@dataclass
class Event:
    id: str | None
    event: str
    data: dict[str, Any]


async def sse_events(response: httpx.Response, retries: list[str] | None = None) -> AsyncIterator[Event]:
    """Parse an SSE body as it arrives. ``retries`` collects the ``retry:`` hints the server sent."""
    fields: dict[str, str] = {}
    async for line in response.aiter_lines():
        if line == "":
            if "data" in fields:
                yield Event(fields.get("id"), fields.get("event", "message"), json.loads(fields["data"]))
            fields = {}
        elif line.startswith("retry:"):
            if retries is not None:
                retries.append(line[6:].strip())
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value


async def read_sse(
    client: httpx.AsyncClient,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
    limit: int | None = None,
    retries: list[str] | None = None,
) -> tuple[httpx.Response, list[Event]]:
    """Read an SSE response until the server closes it, or until ``limit`` events (then disconnect)."""
    events: list[Event] = []
    async with client.stream("GET", url, headers=headers, params=params) as response:
        if response.status_code != 200:
            await response.aread()
            return response, events
        async for event in sse_events(response, retries):
            events.append(event)
            if limit is not None and len(events) >= limit:
                break
    return response, events


async def read_resuming(
    client: httpx.AsyncClient, urls: list[str], path: str, headers: dict[str, str], *, deadline_s: float = 90
) -> tuple[list[Event], int]:
    """Read a stream to its end the way EventSource does: on a dropped connection or an error status,
    reconnect (to the next of ``urls``) with ``Last-Event-ID``. Returns the events and the reconnects."""
    events: list[Event] = []
    reconnects = -1
    give_up = time.monotonic() + deadline_s
    while time.monotonic() < give_up:
        reconnects += 1
        url = urls[reconnects % len(urls)]
        cursor = {"Last-Event-ID": events[-1].id} if events and events[-1].id else {}
        try:
            async with client.stream("GET", url + path, headers=headers | cursor) as response:
                if response.status_code == 204:
                    return events, reconnects
                if response.status_code != 200:
                    await response.aread()
                    await asyncio.sleep(0.2)
                    continue
                async for event in sse_events(response):
                    events.append(event)
        except httpx.TransportError:
            await asyncio.sleep(0.1)
        if events and events[-1].event in ("done", "error", "cancelled"):
            return events, reconnects
    raise TimeoutError(f"stream did not end within {deadline_s}s; {len(events)} events read")


def assert_exactly_once(events: list[Event]) -> None:
    """What a client can prove: seq 1..n, each once, every event with an id; one terminal event, last."""
    assert [e.data["seq"] for e in events] == list(range(1, len(events) + 1))
    terminals = [e for e in events if e.event in ("done", "error", "cancelled")]
    assert terminals == [events[-1]]
    assert all(e.id for e in events)


def text_of(events: list[Event]) -> str:
    """The answer a client assembles: deltas after the last reset."""
    text = ""
    for e in events:
        if e.event == "reset":
            text = ""
        elif e.event == "delta":
            text += e.data["text"]
    return text


async def expected_answer(mock_url: str, prompt: str, **kwargs: Any) -> str:
    """Ask the mock directly, with the real SDK, what it answers for this request."""
    async with openai.AsyncOpenAI(base_url=f"{mock_url}/v1", api_key="sk-test") as api:
        reply = await api.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], **kwargs
        )
    return reply.choices[0].message.content or ""


async def mock_requests(mock_url: str, prompt: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient() as client:
        served = (await client.get(f"{mock_url}/mock/requests")).json()
    return [r for r in served if r["prompt"] == prompt and r["stream"]]


def iter_env() -> Iterator[tuple[str, str]]:
    """The parent's environment minus anything that would point the children elsewhere."""
    for k, v in os.environ.items():
        if not k.startswith(("TAILGATE_", "OPENAI_")):
            yield k, v
