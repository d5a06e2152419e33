"""Fixtures: a real redis-server on a free port, the mock upstream, gateways and workers as real
processes. Each fixture that starts something stops it.

Isolation: every stack runs on a Redis database of its own (``tests.harness.Databases``), and a
stack made by ``make_stack`` stops when its test ends, so no test's worker can take over, count or
serve another test's streams. The one stack that lives for the session, ``stack``, has its database
to itself too.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from tailgate.dev.procs import RedisServer, child_env
from tests.harness import Databases, MakeStack, Stack, Stacks, start_mock

API_KEY = "tg-test-key-one"
OTHER_KEY = "tg-test-key-two"
# Databases of the session's redis-server: one per stack alive at once (the session's, a module's,
# a test's few) and one per test_store test; database 0 is left to tests that use the server directly.
DATABASES = 32


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(extra=["--databases", str(DATABASES)]).start()
    yield server
    server.close()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis of this test's own, to kill and restart; append-only, so a restart keeps every
    acknowledged write (appendfsync always). Ask for it before ``make_stack``: fixtures stop in
    reverse order, so the stack's processes stop before their Redis does."""
    server = RedisServer(appendonly=True).start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def databases(redis_server: RedisServer) -> Databases:
    return Databases(redis_server, DATABASES)


@pytest.fixture
def redis_db(databases: Databases) -> Iterator[str]:
    """The URL of an empty database of this test's own on the session's Redis."""
    url = databases.lend()
    yield url
    databases.give_back(url)


@pytest.fixture(scope="session")
def mock_url(log_dir: Path) -> Iterator[str]:
    child, url = start_mock(log_dir, "mock", "--tokens", "24", "--delay-ms", "3", "--ttft-ms", "5")
    yield url
    child.stop()


@pytest.fixture(scope="session")
def stacks(databases: Databases, mock_url: str, log_dir: Path) -> Stacks:
    """Builds stacks with the tests' defaults (``make_stack``, and fixtures of a wider scope)."""
    env = child_env(
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
    return Stacks(databases, env, log_dir, API_KEY)


@pytest.fixture
def make_stack(stacks: Stacks) -> Iterator[MakeStack]:
    """A factory of stacks, each with its own queue and database; every process they start is
    stopped when the test ends (all at once)."""
    made: list[Stack] = []

    def make(redis_url: str | None = None, **env: str) -> Stack:
        stack = stacks.make(redis_url, **env)
        made.append(stack)
        return stack

    yield make
    stacks.stop(made)


@pytest.fixture(scope="session")
def stack(stacks: Stacks) -> Iterator[Stack]:
    """One gateway and one worker on a database of their own, shared by the tests that do not kill
    anything."""
    with stacks.running() as s:
        s.gateway()
        s.worker()
        yield s


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0)) as c:
        yield c


@pytest.fixture
def prompt() -> str:
    """A prompt no other test sends, so the mock's answer and its request log are this test's."""
    return f"tell me about streams {secrets.token_hex(6)}"
