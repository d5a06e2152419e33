"""``tailgate top`` against a running stack, live in a real terminal (tmux: a pseudo-terminal and a
terminal emulator, ``tailgate.dev.terminal``) and once as plain text. A frame is read off the screen
as a person reads it, and every number on it is compared with what Redis holds."""

from __future__ import annotations

import json
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from redis.asyncio import Redis

from tailgate import keys
from tailgate.dev.procs import arun, await_until, free_port, tailgate_command
from tailgate.dev.sse import read_sse
from tailgate.dev.terminal import Terminal
from tests.harness import FAST_TAKEOVER, MakeStack, Stack

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="no tmux: apt-get install tmux")

# "name value" pairs as the frame shows them.
_PAIR = re.compile(
    r"(queued|oldest|running|awaiting takeover|completed|failed|cancelled|created|tokens/s|total|"
    r"takeovers|handed back) (\d+\.\d s|\d+|-)(?:\s|$)"
)


def pairs(screen: str) -> dict[str, str]:
    """The named numbers of a frame (the workers' table aside)."""
    top = screen.split("\nworker ")[0]
    return dict(_PAIR.findall(top))


def failures(screen: str) -> dict[str, int]:
    [line] = [line for line in screen.splitlines() if line.startswith("failures")]
    return {code: int(n) for code, n in re.findall(r"(\w+) (\d+)", line.removeprefix("failures"))}


def worker_rows(screen: str) -> dict[str, list[str]]:
    """The workers' table: worker id -> host, pid, running, heartbeat age, and ``silent`` if shown."""
    rows = screen.split("\nworker ", 1)[1].splitlines()[1:]
    return {cells[0]: cells[1:] for row in rows if (cells := row.split())}


async def create(client: httpx.AsyncClient, url: str, stack: Stack, prompt: str) -> str:
    r = await client.post(f"{url}/v1/streams", json={"prompt": prompt}, headers=stack.headers)
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


Top = Callable[[dict[str, str], list[str]], Terminal]


@pytest.fixture
def terminals() -> Iterator[Top]:
    """Starts ``tailgate top`` with ``args`` and an environment (a stack's) in a terminal of its own;
    closes them all."""
    started: list[Terminal] = []

    def start(env: dict[str, str], args: list[str]) -> Terminal:
        term = Terminal(tailgate_command("top", *args), env, width=120, height=30).start()
        started.append(term)
        return term

    yield start
    for term in started:
        term.close()


async def frame(term: Terminal, ready: Callable[[str], bool], what: str) -> str:
    """The screen, once a whole frame on it satisfies ``ready``."""
    shown = ""

    def drawn() -> bool:
        nonlocal shown
        shown = term.screen()
        return "\nworker " in shown and ready(shown)  # the table's header: the last line drawn first

    await await_until(drawn, what, blocking=True)
    return shown


async def test_top_in_a_terminal_shows_running_streams_failures_and_a_stopped_workers_queue_as_redis_has_them(
    client: httpx.AsyncClient,
    make_stack: MakeStack,
    prompt: str,
    terminals: Top,
) -> None:
    """One scenario in two acts on one stack, hence its length: the second (the worker stopped, new
    streams queued behind it) is only what it is after the first (a failure, two streams running,
    their tokens counted), and each act checks a whole frame against what Redis has."""
    s = make_stack(**FAST_TAKEOVER)
    url = await s.agateway()
    worker = await s.aworker()
    r = Redis.from_url(s.redis_url, decode_responses=True)
    try:
        failed = await create(client, url, s, prompt + " fails [mock:fail_after=2]")
        _, events = await read_sse(client, f"{url}/v1/streams/{failed}/events", headers=s.headers)
        assert events[-1].data["code"] == "upstream_error"
        for i in range(2):  # 30 s each: they run through the whole test
            await create(client, url, s, prompt + f" long {i} [mock:tokens=3000,delay_ms=10]")

        async def both_running() -> bool:
            registry = [json.loads(v) for v in (await r.hgetall(keys.WORKERS)).values()]
            return await r.zcard(keys.RUNNING) == 2 and [w["running"] for w in registry] == [2]

        await await_until(both_running, "two streams running, and the worker's heartbeat saying so")
        [worker_id] = await r.hkeys(keys.WORKERS)
        tokens_before = int(await r.hget(keys.STATS, "tokens") or 0)
        term = terminals(s.env, ["--interval", "0.2"])

        shown = await frame(term, lambda sc: pairs(sc).get("tokens/s", "-") != "-", "a second frame")

        stats = {k: int(v) for k, v in (await r.hgetall(keys.STATS)).items()}
        got = pairs(shown)
        assert {k: got[k] for k in ("queued", "oldest", "running", "awaiting takeover")} == {
            "queued": str(await r.zcard(s.env["TAILGATE_QUEUE_NAME"])),  # 0: the worker takes every job
            "oldest": "-",
            "running": str(await r.zcard(keys.RUNNING)),  # 2
            "awaiting takeover": "0",
        }
        assert {k: int(got[k]) for k in ("completed", "failed", "cancelled", "created", "takeovers")} == {
            "completed": 0,
            "failed": stats["failed"],  # 1
            "cancelled": 0,
            "created": stats["created"],  # 3
            "takeovers": 0,
        }
        assert failures(shown) == {"upstream_error": stats["failed:upstream_error"]} == {"upstream_error": 1}
        assert tokens_before <= int(got["total"]) <= stats["tokens"]
        assert 0 < int(got["tokens/s"]) < 400  # two streams of 100 tokens/s, measured over 0.2 s
        assert "workers 1" in shown and "silent" not in shown
        _, pid, running, *_ = worker_rows(shown)[worker_id]
        assert (int(pid), int(running)) == (worker.pid, 2)

        worker.signal(signal.SIGSTOP)  # its streams stop heartbeating; new jobs wait in the queue
        stopped_at = time.time()
        for i in range(3):
            await create(client, url, s, prompt + f" queued {i}")

        def stalled(sc: str) -> bool:
            got = pairs(sc)
            return got["queued"] == "3" and got["awaiting takeover"] == "2" and "silent" in sc

        shown = await frame(term, stalled, "the queue and the stale streams of a stopped worker")

        got = pairs(shown)
        assert got["queued"] == str(await r.zcard(s.env["TAILGATE_QUEUE_NAME"])) == "3"
        stale_before = time.time() * 1000 - float(FAST_TAKEOVER["TAILGATE_TAKEOVER_AFTER_S"]) * 1000
        assert got["awaiting takeover"] == str(await r.zcount(keys.RUNNING, "-inf", stale_before)) == "2"
        assert got["running"] == str(await r.zcard(keys.RUNNING)) == "2"
        assert 0 < float(got["oldest"].removesuffix(" s")) <= time.time() - stopped_at + 0.05  # to 0.1 s
        assert got["tokens/s"] == "0"
        assert "workers 1   silent 1" in shown
        assert worker_rows(shown)[worker_id][-1] == "silent"

        term.send("q")
        await await_until(lambda: term.exit_status() == 0, "top to exit 0 on q", blocking=True)
    finally:
        worker.signal(signal.SIGKILL)  # stopped, it would not answer the stack's SIGTERM
        await r.aclose()


async def test_top_exits_cleanly_on_ctrl_c(stack: Stack, terminals: Top) -> None:
    term = terminals(stack.env, [])
    await frame(term, lambda sc: "workers 1" in sc, "a frame")

    term.send("C-c")

    await await_until(lambda: term.exit_status() == 0, "top to exit 0 on Ctrl-C", blocking=True)
    assert "Traceback" not in term.screen()


async def test_top_says_redis_is_unreachable_and_keeps_trying(stack: Stack, terminals: Top) -> None:
    nowhere = stack.env | {"TAILGATE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    term = terminals(nowhere, ["--interval", "0.2"])
    shown = ""

    def says_so() -> bool:
        nonlocal shown
        shown = term.screen()
        return "Redis unreachable" in shown

    await await_until(says_so, "the frame to say Redis is unreachable", blocking=True)
    assert term.exit_status() is None  # still running, still trying
    term.send("q")
    await await_until(lambda: term.exit_status() == 0, "top to exit 0 on q", blocking=True)

    once = await arun(tailgate_command("top", "--once"), nowhere)
    assert once.returncode == 1 and once.stdout == ""
    assert once.stderr.startswith("tailgate top: Redis unreachable (redis 127.0.0.1:")


async def test_top_once_prints_one_frame_with_the_counters_in_redis(
    client: httpx.AsyncClient, make_stack: MakeStack, prompt: str
) -> None:
    stack = make_stack()
    url = await stack.agateway()
    await stack.aworker()
    gone = {"pid": 1, "host": "elsewhere", "running": 3, "beat_ms": time.time() * 1000 - 3600_000}
    async with Redis.from_url(stack.redis_url) as r:  # a worker killed an hour ago: forgotten
        await r.hset(keys.WORKERS, "long-gone", json.dumps(gone))
    for tail in (" [mock:tokens=2]", " [mock:tokens=3]", " [mock:status=400]"):
        created = await create(client, url, stack, prompt + tail)
        await read_sse(client, f"{url}/v1/streams/{created}/events", headers=stack.headers)

    top = await arun(tailgate_command("top", "--once"), stack.env)

    assert top.returncode == 0, top.stderr
    async with Redis.from_url(stack.redis_url, decode_responses=True) as r:
        stats = {k: int(v) for k, v in (await r.hgetall(keys.STATS)).items()}
        [worker_id] = [w for w in await r.hkeys(keys.WORKERS) if w != "long-gone"]
    got = pairs(top.stdout)
    counted = ("completed", "failed", "cancelled", "created", "takeovers", "handed back")
    assert {k: int(got[k]) for k in counted} == {k: stats.get(k.replace(" ", "_"), 0) for k in counted}
    assert (stats["completed"], stats["failed"], stats["created"]) == (2, 1, 3)
    assert int(got["total"]) == stats["tokens"] == 5
    assert failures(top.stdout) == {"upstream_bad_request": 1}
    assert (got["queued"], got["running"], got["tokens/s"]) == ("0", "0", "-")  # one frame: no rate
    assert list(worker_rows(top.stdout)) == [worker_id]
    assert "\x1b" not in top.stdout  # plain text
