"""What the tests share beyond the kit (``tailgate.dev.procs`` starts and waits for processes,
``tailgate.dev.sse`` reads SSE): a stack of gateway and worker processes on one queue, and what the
mock upstream answers and was asked."""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import openai

from tailgate.dev.procs import Child, child_env, free_port, tailgate_command

MODEL = "gpt-4o-mini"  # the gateway's default model, which the worker sends upstream


@dataclass
class Stack:
    """Gateways and workers sharing one environment (one Redis, one queue, one upstream). Each start
    waits until the process is ready; ``gateway`` and ``worker`` block, ``agateway`` and ``aworker``
    are for async tests."""

    env: dict[str, str]
    log_dir: Path
    api_key: str
    procs: list[Child] = field(default_factory=list)
    gateways: list[str] = field(default_factory=list)

    def gateway(self, **env: str) -> str:
        """Start a gateway on a free port; its base URL once ``/readyz`` answers 200."""
        port = free_port()
        child = self._start("gateway", ["--host", "127.0.0.1", "--port", str(port)], env)
        url = f"http://127.0.0.1:{port}"
        child.wait_http(f"{url}/readyz")
        self.gateways.append(url)
        return url

    def worker(self, **env: str) -> Child:
        """Start a worker; the process, once it says it is ready."""
        child = self._start("worker", [], env)
        child.wait_for_log(" ready (concurrency")
        return child

    async def agateway(self, **env: str) -> str:
        return await asyncio.to_thread(self.gateway, **env)

    async def aworker(self, **env: str) -> Child:
        return await asyncio.to_thread(self.worker, **env)

    def _start(self, command: str, args: list[str], env: dict[str, str]) -> Child:
        child = Child(command, tailgate_command(command, *args), self.env | env, self.log_dir)
        self.procs.append(child)
        return child

    @property
    def url(self) -> str:
        return self.gateways[0]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def close(self) -> None:
        for child in self.procs:
            child.signal(signal.SIGTERM)  # all at once, then wait for each
        for child in reversed(self.procs):
            child.stop()


class MakeStack(Protocol):
    """The ``make_stack`` fixture: a new stack with its own queue, on ``redis_url`` (default: the
    session's Redis), with ``env`` over the tests' defaults."""

    def __call__(self, redis_url: str | None = None, **env: str) -> Stack: ...


def start_mock(log_dir: Path, name: str, *args: str) -> tuple[Child, str]:
    """Start a mock upstream on a free port (``args`` go to ``tailgate mock-upstream``); it and its
    URL, once it answers. Whoever starts it stops it."""
    port = free_port()
    child = Child(name, tailgate_command("mock-upstream", "--port", str(port), *args), child_env(), log_dir)
    url = f"http://127.0.0.1:{port}"
    child.wait_http(f"{url}/v1/models")
    return child, url


async def expected_answer(mock_url: str, prompt: str, **kwargs: Any) -> str:
    """Ask the mock directly, with the real SDK, what it answers for this request."""
    async with openai.AsyncOpenAI(base_url=f"{mock_url}/v1", api_key="sk-test") as api:
        reply = await api.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], **kwargs
        )
    return reply.choices[0].message.content or ""


async def mock_requests(mock_url: str, prompt: str) -> list[dict[str, Any]]:
    """The streaming requests the mock served for ``prompt``, as its request log records them."""
    async with httpx.AsyncClient() as client:
        served: list[dict[str, Any]] = (await client.get(f"{mock_url}/mock/requests")).json()
    return [r for r in served if r["prompt"] == prompt and r["stream"]]
