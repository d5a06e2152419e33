"""Fixtures: a real redis-server on a free port, the mock upstream, gateways and workers as real
processes. Each fixture that starts something stops it."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from tailgate.dev.procs import RedisServer, child_env
from tests.harness import MakeStack, Stack, start_mock

API_KEY = "tg-test-key-one"
OTHER_KEY = "tg-test-key-two"


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def mock_url(log_dir: Path) -> Iterator[str]:
    child, url = start_mock(log_dir, "mock", "--tokens", "24", "--delay-ms", "3", "--ttft-ms", "5")
    yield url
    child.stop()


@pytest.fixture(scope="session")
def make_stack(redis_server: RedisServer, mock_url: str, log_dir: Path) -> Iterator[MakeStack]:
    """A factory of stacks with their own queue; every process they start is stopped at the end."""
    stacks: list[Stack] = []

    def make(redis_url: str | None = None, **env: str) -> Stack:
        base = child_env(
            TAILGATE_REDIS_URL=redis_url or redis_server.url,
            TAILGATE_QUEUE_NAME=f"tg:queue:{secrets.token_hex(4)}",
            TAILGATE_API_KEYS=f"{API_KEY},{OTHER_KEY}",
            TAILGATE_LOG_FORMAT="text",
            TAILGATE_DRAIN_S="0",  # no load balancer here; the drain test sets its own
            TAILGATE_SHUTDOWN_GRACE_S="5",
            TAILGATE_UPSTREAM_IDLE_TIMEOUT_S="2",
            TAILGATE_RATE_LIMIT_PER_MIN="1000000",
            TAILGATE_MAX_ACTIVE_PER_KEY="100000",
            OPENAI_API_KEY="sk-test",
            OPENAI_BASE_URL=f"{mock_url}/v1",
        )
        stack = Stack(base | env, log_dir, API_KEY)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.close()


@pytest.fixture(scope="session")
def stack(make_stack: MakeStack) -> Stack:
    """One gateway and one worker, shared by the tests that do not kill anything."""
    s = make_stack()
    s.gateway()
    s.worker()
    return s


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0)) as c:
        yield c


@pytest.fixture
def prompt() -> str:
    """A prompt no other test sends, so the mock's answer and its request log are this test's."""
    return f"tell me about streams {secrets.token_hex(6)}"
