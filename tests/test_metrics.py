"""Prometheus metrics as a scraper reads them: each worker's on its ``--metrics-port``, the queue's depth
on the gateway's ``/metrics``, parsed with ``prometheus_client.parser``, after streams a test ran
through a stack of its own (counters are per process, so no other test's streams are in them)."""

from __future__ import annotations

import asyncio
import signal

import httpx
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from tailgate.dev.procs import RedisServer, await_until
from tailgate.dev.sse import Event, events, read_resuming, read_sse, text_of
from tests.harness import MakeStack, expected_answer, mock_requests, run_stream, takeover_stack, worker_of
from worker import metrics

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(client: httpx.AsyncClient, url: str) -> Samples:
    r = await client.get(url)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def finished(samples: Samples) -> dict[tuple[str, str], float]:
    """Every non-zero ``tailgate_streams_finished_total``, by (outcome, code)."""
    out = {}
    for (name, labels), v in samples.items():
        if name == "tailgate_streams_finished_total" and v:
            by = dict(labels)
            out[by["outcome"], by["code"]] = v
    return out


def deltas(events: list[Event]) -> int:
    return sum(e.event == "delta" for e in events)


async def test_worker_metrics_count_finished_streams_their_tokens_and_one_wait_and_first_token_each(
    client: httpx.AsyncClient, make_stack: MakeStack, mock_url: str, prompt: str
) -> None:
    s = make_stack()
    await s.agateway()
    worker = await s.aworker()
    prompts = [f"{prompt} {i}" for i in range(5)]
    streams = await asyncio.gather(*(run_stream(client, s, p) for p in prompts))
    assert all(events[-1].event == "done" for events in streams)

    m = await scrape(client, s.metrics_url(worker))
    sent = [r["tokens_sent"] for p in prompts for r in await mock_requests(mock_url, p)]
    assert finished(m) == {("done", ""): 5}
    assert value(m, "tailgate_tokens_total") == sum(sent) == sum(deltas(e) for e in streams)
    assert value(m, "tailgate_stream_queue_wait_seconds_count") == 5
    assert value(m, "tailgate_stream_queue_wait_seconds_bucket", le="+Inf") == 5
    assert 0 < value(m, "tailgate_stream_queue_wait_seconds_sum") < 5 * 10
    assert value(m, "tailgate_upstream_first_token_seconds_count") == 5
    # The mock's first token comes 5 ms after the request (tests/conftest.py): not before that.
    assert value(m, "tailgate_upstream_first_token_seconds_sum") >= 5 * 0.005
    assert value(m, "tailgate_streams_running") == 0
    assert value(m, "tailgate_takeovers_total", reason="worker_lost") == 0
    assert value(m, "process_cpu_seconds_total") > 0  # the process collectors are there too


async def test_worker_metrics_count_cancelled_streams_and_errors_by_their_code(
    client: httpx.AsyncClient, make_stack: MakeStack, prompt: str
) -> None:
    s = make_stack()
    await s.agateway()
    worker = await s.aworker(TAILGATE_STREAM_MAXLEN="40")  # the worker's appends enforce it

    r = await client.post(
        f"{s.url}/v1/streams", json={"prompt": prompt + " [mock:tokens=400,delay_ms=50]"}, headers=s.headers
    )
    assert r.status_code == 202, r.text
    cancelled: list[Event] = []
    async with client.stream("GET", s.url + r.json()["events_url"], headers=s.headers) as response:
        async for event in events(response):
            cancelled.append(event)
            if event.event == "delta" and deltas(cancelled) == 1:
                running = await scrape(client, s.metrics_url(worker))
                assert value(running, "tailgate_streams_running") == 1
                url = f"{s.url}/v1/streams/{r.json()['id']}/cancel"
                assert (await client.post(url, headers=s.headers)).status_code == 202
    assert cancelled[-1].event == "cancelled"
    refused = await run_stream(client, s, prompt + " auth [mock:status=401]")
    broken = await run_stream(client, s, prompt + " broken [mock:fail_after=3]")
    long = await run_stream(client, s, prompt + " long [mock:tokens=100,delay_ms=1]")
    codes = [e[-1].data["code"] for e in (refused, broken, long)]
    assert codes == ["upstream_auth", "upstream_error", "stream_too_long"]

    m = await scrape(client, s.metrics_url(worker))
    assert finished(m) == {
        ("cancelled", ""): 1,
        ("error", "upstream_auth"): 1,
        ("error", "upstream_error"): 1,
        ("error", "stream_too_long"): 1,
    }
    every = [cancelled, refused, broken, long]
    assert value(m, "tailgate_tokens_total") == sum(deltas(e) for e in every)
    assert value(m, "tailgate_stream_queue_wait_seconds_count") == 4
    assert value(m, "tailgate_upstream_first_token_seconds_count") == 3  # the 401 sent none


async def test_a_killed_workers_stream_counts_one_takeover_on_the_worker_that_finishes_it(
    client: httpx.AsyncClient, make_stack: MakeStack, mock_url: str, prompt: str
) -> None:
    s, url = await takeover_stack(make_stack)
    prompt += " [mock:tokens=100,delay_ms=20]"
    r = await client.post(f"{url}/v1/streams", json={"prompt": prompt}, headers=s.headers)
    assert r.status_code == 202, r.text
    path = r.json()["events_url"]
    _, first = await read_sse(client, url + path, headers=s.headers, limit=5)
    killed = await worker_of(s, r.json()["id"])
    [survivor] = [w for w in s.procs if w.name == "worker" and w is not killed]
    before = await scrape(client, s.metrics_url(survivor))
    assert value(before, "tailgate_takeovers_total", reason="worker_lost") == 0

    killed.signal(signal.SIGKILL)
    rest = await read_resuming(client, [url], path, s.headers | {"Last-Event-ID": first[-1].id})
    events = first + rest.events
    assert [e.data["reason"] for e in events if e.event == "reset"] == ["worker_lost"]
    assert text_of(events) == await expected_answer(mock_url, prompt)

    m = await scrape(client, s.metrics_url(survivor))
    assert value(m, "tailgate_takeovers_total", reason="worker_lost") == 1
    assert value(m, "tailgate_takeovers_total", reason="worker_shutdown") == 0
    assert finished(m) == {("done", ""): 1}
    # A takeover's wait is not a queue wait: the stream was claimed first by the killed worker.
    assert value(m, "tailgate_stream_queue_wait_seconds_count") == 0
    assert value(m, "tailgate_upstream_first_token_seconds_count") == 1


async def test_gateway_queue_depth_is_the_queued_jobs_and_falls_to_zero_once_a_worker_runs(
    client: httpx.AsyncClient, make_stack: MakeStack, prompt: str
) -> None:
    s = make_stack()
    url = await s.agateway()
    assert value(await scrape(client, f"{url}/metrics"), "tailgate_queue_depth") == 0
    for i in range(7):
        r = await client.post(f"{url}/v1/streams", json={"prompt": f"{prompt} {i}"}, headers=s.headers)
        assert r.status_code == 202, r.text

    async def depth_is(n: int) -> bool:
        return value(await scrape(client, f"{url}/metrics"), "tailgate_queue_depth") == n

    await await_until(lambda: depth_is(7), "queue depth 7 on the gateway")  # after the 1 s cache
    await s.aworker()
    await await_until(lambda: depth_is(0), "queue depth 0 once a worker took the jobs")


async def test_gateway_scrapes_within_a_second_read_the_queue_once(
    client: httpx.AsyncClient, make_stack: MakeStack, own_redis: RedisServer
) -> None:
    s = make_stack(redis_url=own_redis.url)
    url = await s.agateway()
    async with Redis.from_url(own_redis.url) as r:
        await r.config_resetstat()
        pages = await asyncio.gather(*(scrape(client, f"{url}/metrics") for _ in range(10)))
        stats = await r.info("commandstats")
    assert all(value(p, "tailgate_queue_depth") == 0 for p in pages)
    assert stats["cmdstat_zcard"]["calls"] == 1


async def test_gateway_metrics_answer_while_the_queue_redis_is_down(
    client: httpx.AsyncClient, make_stack: MakeStack, own_redis: RedisServer, prompt: str
) -> None:
    s = make_stack(redis_url=own_redis.url)
    url = await s.agateway()
    [gateway] = s.procs
    r = await client.post(f"{url}/v1/streams", json={"prompt": prompt}, headers=s.headers)
    assert r.status_code == 202, r.text
    assert value(await scrape(client, f"{url}/metrics"), "tailgate_queue_depth") == 1
    await own_redis.astop()

    pages: list[Samples] = []

    async def asked_redis() -> bool:  # once past the depth's cache, a scrape asks Redis again
        pages.append(await scrape(client, f"{url}/metrics"))
        return "queue depth unknown" in gateway.log()

    await await_until(asked_redis, "a scrape that found the queue Redis down")
    assert all(value(m, "tailgate_queue_depth") == 1 for m in pages)  # the last value read
    assert "tailgate_sse_connections" in {name for name, _ in pages[-1]}


def test_labels_stay_bounded_whatever_code_or_reason_comes() -> None:
    assert metrics.bounded("upstream_timeout", metrics.ERROR_CODES) == "upstream_timeout"
    assert metrics.bounded("something new", metrics.ERROR_CODES) == "other"
    assert metrics.bounded("worker_shutdown", metrics.TAKEOVER_REASONS) == "worker_shutdown"
    assert metrics.bounded("", metrics.TAKEOVER_REASONS) == "other"
