"""More than one process per pod: ``tailgate worker --processes N`` and ``tailgate gateway --workers N``
(``tailgate.supervisor``), as real processes: streams run on every process, a SIGTERM to the
supervisor shuts each down in order, a process that dies stops the rest, and ``/metrics`` is the sum
over the processes (``tailgate.prometheus``)."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
from pathlib import Path

import httpx
from prometheus_client.multiprocess import MultiProcessCollector
from redis.asyncio import Redis

from tailgate import keys
from tailgate.dev.procs import Child, await_until
from tailgate.dev.sse import Event, Extras, Resumed, assert_exactly_once, read_resuming, read_sse, text_of
from tests.harness import FAST_TAKEOVER, MakeStack, Stack, expected_answer
from tests.test_metrics import deltas, finished, scrape, value

LONG = " [mock:tokens=200,delay_ms=15]"  # 3 s: still running when the test acts


async def create(client: httpx.AsyncClient, url: str, stack: Stack, prompt: str) -> str:
    """Create a stream, on a connection of its own (so a gateway's processes share the creates);
    its events path."""
    r = await client.post(
        f"{url}/v1/streams", json={"prompt": prompt}, headers=stack.headers | {"Connection": "close"}
    )
    assert r.status_code == 202, r.text
    return str(r.json()["events_url"])


async def follow(
    client: httpx.AsyncClient, url: str, stack: Stack, prompts: list[str]
) -> tuple[list[str], list[asyncio.Task[Resumed]]]:
    """Create a stream for each prompt and follow each to its end, resuming: their paths, readers."""
    paths = [await create(client, url, stack, p) for p in prompts]
    return paths, [asyncio.create_task(read_resuming(client, [url], p, stack.headers)) for p in paths]


async def workers_of(stack: Stack, paths: list[str], seq: int = 1) -> list[str] | None:
    """The worker id running each stream, once each has stored its event ``seq``; else None."""
    async with Redis.from_url(stack.redis_url, decode_responses=True) as r:
        metas = [await r.hgetall(keys.meta(p.split("/")[3])) for p in paths]
    if any(int(m.get("seq", 0)) < seq or m.get("status") != "running" for m in metas):
        return None
    return [m["worker"] for m in metas]


async def running_on_two(stack: Stack, paths: list[str]) -> list[str]:
    """Wait until every stream runs with a few events written; the worker id of each."""
    found: list[str] = []

    async def running() -> bool:
        found[:] = await workers_of(stack, paths, seq=5) or []
        return bool(found)

    await await_until(running, f"{len(paths)} streams running")
    return found


async def both_processes_full(
    client: httpx.AsyncClient, make_stack: MakeStack, prompt: str, per_process: int
) -> tuple[Child, list[str], list[asyncio.Task[Resumed]], list[str]]:
    """A gateway and a supervisor of two worker processes, each capped at ``per_process``, running
    twice that many long streams, then a spare worker with room for all of them (started after
    them, so it ran none: it resumes them). The supervisor, the prompts, their readers, and the
    worker id running each stream."""
    s = make_stack(TAILGATE_CONCURRENCY=str(per_process), TAILGATE_SHUTDOWN_GRACE_S="0.5", **FAST_TAKEOVER)
    url = await s.agateway()
    supervisor = await s.aworker(2)
    prompts = [f"{prompt} {i}{LONG}" for i in range(2 * per_process)]
    paths, readers = await follow(client, url, s, prompts)
    ran = await running_on_two(s, paths)
    await s.aworker(TAILGATE_CONCURRENCY=str(2 * per_process))
    return supervisor, prompts, readers, ran


def pid_of(worker_id: str) -> int:
    return int(worker_id.rsplit("-", 2)[1])  # host-pid-random


async def registered_pids(stack: Stack) -> set[int]:
    async with Redis.from_url(stack.redis_url, decode_responses=True) as r:
        registry = await r.hgetall(keys.WORKERS)
    return {json.loads(v)["pid"] for v in registry.values()}


def resets(events: list[Event]) -> list[str]:
    return [e.data["reason"] for e in events if e.event == "reset"]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_a_worker_of_two_processes_runs_streams_on_both_and_serves_their_summed_metrics(
    client: httpx.AsyncClient, make_stack: MakeStack, mock_url: str, prompt: str
) -> None:
    s = make_stack(TAILGATE_CONCURRENCY="3")  # per process: six streams need both
    url = await s.agateway()
    supervisor = await s.aworker(2)
    prompts = [f"{prompt} {i}{LONG}" for i in range(6)]
    paths, readers = await follow(client, url, s, prompts)

    ran = await running_on_two(s, paths)
    assert sorted(collections.Counter(ran).values()) == [3, 3]  # each process at its own cap
    pids = {pid_of(w) for w in ran}
    assert pids == await registered_pids(s) and supervisor.pid not in pids

    async def running(n: int) -> bool:
        return value(await scrape(client, s.metrics_url(supervisor)), "tailgate_streams_running") == n

    await await_until(lambda: running(6), "six streams running, summed over the two processes")
    results = [r.events for r in await asyncio.gather(*readers)]
    for events, p in zip(results, prompts, strict=True):
        assert_exactly_once(events)
        assert resets(events) == []
        assert text_of(events) == await expected_answer(mock_url, p)

    m = await scrape(client, s.metrics_url(supervisor))
    assert finished(m) == {("done", ""): 6}
    assert value(m, "tailgate_tokens_total") == sum(deltas(e) for e in results)
    assert value(m, "tailgate_stream_queue_wait_seconds_count") == 6
    assert value(m, "tailgate_upstream_first_token_seconds_count") == 6
    assert value(m, "tailgate_streams_running") == 0
    assert value(m, "tailgate_takeovers_total", reason="worker_lost") == 0


async def test_sigterm_to_the_worker_supervisor_stops_both_processes_in_order_and_another_worker_finishes(
    client: httpx.AsyncClient, make_stack: MakeStack, mock_url: str, prompt: str
) -> None:
    supervisor, prompts, readers, ran = await both_processes_full(client, make_stack, prompt, 2)
    assert len(set(ran)) == 2

    supervisor.signal(signal.SIGTERM)
    results = [r.events for r in await asyncio.gather(*readers)]

    assert await supervisor.await_exit(30) == 0
    assert all(gone(pid_of(w)) for w in ran)
    log = await asyncio.to_thread(supervisor.log)
    assert log.count("hands back 2 streams") == 2  # each process, in its ordered shutdown
    for events, p in zip(results, prompts, strict=True):
        assert_exactly_once(events)
        assert resets(events) == ["worker_shutdown"]
        assert events[-1].event == "done"
        assert text_of(events) == await expected_answer(mock_url, p)


async def test_a_worker_process_that_dies_stops_the_other_and_the_supervisor_exits_1(
    client: httpx.AsyncClient, make_stack: MakeStack, mock_url: str, prompt: str
) -> None:
    supervisor, prompts, readers, (killed, other) = await both_processes_full(client, make_stack, prompt, 1)

    os.kill(pid_of(killed), signal.SIGKILL)
    assert await supervisor.await_exit(30) == 1  # so the orchestrator restarts the pod
    assert gone(pid_of(other))
    assert f"process {pid_of(killed)} exited unasked" in await asyncio.to_thread(supervisor.log)
    results = [r.events for r in await asyncio.gather(*readers)]
    assert [resets(e) for e in results] == [["worker_lost"], ["worker_shutdown"]]
    for events, p in zip(results, prompts, strict=True):
        assert_exactly_once(events)
        assert text_of(events) == await expected_answer(mock_url, p)


def created_by_process(directory: Path) -> dict[int, float]:
    """Each process's own ``tailgate_streams_created_total``, from its file in the metrics directory."""
    out = {}
    for path in directory.glob("counter_*.db"):
        for metric in MultiProcessCollector.merge([str(path)]):  # type: ignore[no-untyped-call]
            for sample in metric.samples:
                if sample.name == "tailgate_streams_created_total":
                    out[int(path.stem.split("_")[1])] = sample.value
    return out


async def test_a_gateway_of_two_processes_serves_and_resumes_streams_and_sums_its_metrics(
    client: httpx.AsyncClient, make_stack: MakeStack, mock_url: str, prompt: str, tmp_path: Path
) -> None:
    s = make_stack(PROMETHEUS_MULTIPROC_DIR=str(tmp_path))  # set, so the test can read each process's
    url = await s.agateway(2)
    worker = await s.aworker(PROMETHEUS_MULTIPROC_DIR="")  # one process: metrics of its own
    prompts = [f"{prompt} {i}" for i in range(20)]
    paths = await asyncio.gather(*(create(client, url, s, p) for p in prompts))

    by_process = created_by_process(tmp_path)
    assert len(by_process) == 2 and all(by_process.values()), by_process
    assert sum(by_process.values()) == 20
    for _ in range(4):  # whichever process answers a scrape serves the sum
        async with httpx.AsyncClient() as own:
            assert value(await scrape(own, f"{url}/metrics"), "tailgate_streams_created_total") == 20

    async def read_in_two(path: str) -> list[Event]:
        async with httpx.AsyncClient(timeout=30) as first, httpx.AsyncClient(timeout=30) as second:
            _, head = await read_sse(first, url + path, headers=s.headers, limit=3)
            rest = await read_resuming(second, [url], path, s.headers | {"Last-Event-ID": head[-1].id})
        return head + rest.events

    results = await asyncio.gather(*(read_in_two(p) for p in paths))
    for events, p in zip(results, prompts, strict=True):
        assert_exactly_once(events)
        assert events[-1].event == "done"
        assert text_of(events) == await expected_answer(mock_url, p)
    m = await scrape(client, f"{url}/metrics")
    assert value(m, "tailgate_sse_connections") == 0
    assert value(m, "tailgate_queue_depth") == 0
    # Set but empty is unset: no metric files of the worker's in its working directory.
    assert not list(Path.cwd().glob(f"*_{worker.pid}.db"))


async def test_sigterm_to_a_gateway_of_two_processes_drains_both_and_sends_readers_elsewhere(
    client: httpx.AsyncClient, make_stack: MakeStack, mock_url: str, prompt: str
) -> None:
    s = make_stack(TAILGATE_DRAIN_S="1")
    leaving = await s.agateway(2)
    staying = await s.agateway()
    supervisor: Child = s.procs[0]
    await s.aworker()
    prompts = [f"{prompt} {i}{LONG}" for i in range(6)]
    paths = [await create(client, leaving, s, p) for p in prompts]
    extras = [Extras() for _ in paths]
    readers = [
        asyncio.create_task(read_sse(client, leaving + p, headers=s.headers, extras=x))
        for p, x in zip(paths, extras, strict=True)
    ]
    await running_on_two(s, paths)

    async def connections(n: int) -> bool:
        async with httpx.AsyncClient() as own:
            return value(await scrape(own, f"{leaving}/metrics"), "tailgate_sse_connections") == n

    await await_until(lambda: connections(6), "six SSE readers counted over both processes")

    async def not_ready() -> bool:
        async with httpx.AsyncClient() as own:  # a new connection: either process may answer
            return (await own.get(f"{leaving}/readyz")).status_code == 503

    supervisor.signal(signal.SIGTERM)
    await await_until(not_ready, "the draining gateway's /readyz answering 503", within=5)
    firsts = await asyncio.gather(*readers)

    for (response, first), x, p, prompt_ in zip(firsts, extras, paths, prompts, strict=True):
        assert response.status_code == 200
        assert x.retries == [1000, 500]  # the stream's hint, then the shutdown's
        assert first[-1].event == "delta"
        rest = await read_resuming(client, [staying], p, s.headers | {"Last-Event-ID": first[-1].id})
        events = first + rest.events
        assert_exactly_once(events)
        assert resets(events) == []
        assert text_of(events) == await expected_answer(mock_url, prompt_)
    assert await supervisor.await_exit(30) == 0
    assert (await asyncio.to_thread(supervisor.log)).count("Application shutdown complete") == 2
