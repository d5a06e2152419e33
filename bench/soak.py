"""``python -m bench.soak [--streams N] [--minutes M] [--quick]``: the chaos soak.

N concurrent clients run streams for M minutes through two gateways and two workers, all on one
Redis (AOF, ``appendfsync always``) reached through a TCP fault proxy, while a chaos loop, every few
seconds, does one of ``ACTIONS`` (SIGKILL or SIGTERM a worker or a gateway, SIGKILL and restart
Redis, reset every Redis connection) and brings back what it stopped a moment later. Clients behave
like ``EventSource`` (``tailgate.dev.sse.read_resuming``): on a dropped connection or an error status
they reconnect to a random gateway with their ``Last-Event-ID``.

Each stream is checked the way a client can check it: every ``seq`` from 1 to the last, once (a
missing one is a lost event, a repeated one a duplicate), exactly one terminal event, and the text
after the last ``reset`` equal to the mock's answer for the same request. A takeover is the silence a
client saw before a `worker_lost` reset. Progress prints every 5 s; at the end a table, JSON and a
PNG go to ``bench/results/``. Every process started is stopped at the end, on error and on Ctrl-C too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench import report
from bench.procs import Procs, raise_fd_limit
from tailgate.dev.faultproxy import FaultProxy
from tailgate.dev.mock_upstream import tokens_for
from tailgate.dev.procs import RedisServer
from tailgate.dev.sse import ProtocolError, delivery_of, read_resuming, text_of
from tailgate.events import id_key

MODEL = "gpt-4o-mini"
HEADERS = {"Authorization": f"Bearer {Procs.API_KEY}"}
ACTIONS = ("kill_worker", "term_worker", "kill_gateway", "term_gateway", "restart_redis", "cut_redis")
COUNTS = (
    "started done ended_with_error text_exact text_wrong lost duplicated extra_terminals resets reconnects"
)


@dataclass
class Tally:
    """What the clients saw: the ``COUNTS`` (and ``create_retries``) summed over every stream, the
    errors by kind, the takeovers (s), when streams finished and when chaos struck."""

    count: Counter[str] = field(default_factory=lambda: Counter(dict.fromkeys(COUNTS.split(), 0)))
    errors: Counter[str] = field(default_factory=Counter)
    takeovers: list[float] = field(default_factory=list)
    finished_at: list[float] = field(default_factory=list)
    chaos: list[tuple[float, str]] = field(default_factory=list)


class Cluster(Procs):
    """The bench's processes with Redis (AOF) behind a fault proxy, two gateways and two workers."""

    def __init__(self, log_dir: Path) -> None:
        self.proxy = FaultProxy(0)
        env = {"TAILGATE_LOG_LEVEL": "INFO", "TAILGATE_DRAIN_S": "1", "TAILGATE_SHUTDOWN_GRACE_S": "3"}
        super().__init__(log_dir, RedisServer(appendonly=True), **env)
        self.urls = [f"http://127.0.0.1:{self.port(f'gateway{i}')}" for i in range(2)]

    async def start(self) -> None:
        self.proxy.target_port = (await self.redis.astart()).port
        self.overrides["TAILGATE_REDIS_URL"] = (await self.proxy.start()).url
        await asyncio.to_thread(self.start_mock)
        kinds = {"gateway": self.start_gateway, "worker": self.start_worker}
        await asyncio.gather(
            *(asyncio.to_thread(start, f"{k}{i}") for k, start in kinds.items() for i in range(2))
        )

    async def chaos(self, action: str, rng: random.Random) -> str:
        if action == "cut_redis":
            return f"{action} ({self.proxy.cut()} connections)"
        if action == "restart_redis":
            await self.redis.astop(kill=True)
            await asyncio.sleep(rng.uniform(0.5, 2.0))
            await self.redis.astart()
            return action
        kind, i = action.split("_")[1], rng.randrange(2)
        await asyncio.to_thread(self.stop, f"{kind}{i}", kill=action.startswith("kill"))
        await asyncio.sleep(rng.uniform(0.5, 3.0) if kind == "worker" else rng.uniform(0.2, 2.0))
        await asyncio.to_thread(self.start_worker if kind == "worker" else self.start_gateway, f"{kind}{i}")
        return f"{action} {i}"


async def run_stream(
    http: httpx.AsyncClient, urls: list[str], tally: Tally, rng: random.Random, n: int
) -> None:
    unique, tokens = rng.random(), rng.randint(60, 200)
    prompt = f"soak {n} {unique} [mock:tokens={tokens}]"
    while True:
        with contextlib.suppress(httpx.HTTPError):
            r = await http.post(f"{rng.choice(urls)}/v1/streams", json={"prompt": prompt}, headers=HEADERS)
            if r.status_code == 202:
                break
        tally.count["create_retries"] += 1
        await asyncio.sleep(0.2)
    tally.count["started"] += 1
    try:
        got = await read_resuming(
            http, urls, r.json()["events_url"], HEADERS, pick=rng.choice, deadline_s=300
        )
    except (ProtocolError, TimeoutError, httpx.HTTPError) as exc:
        tally.errors[f"not read to its end: {type(exc).__name__}: {str(exc)[:80]}"] += 1
        return
    events, delivery = got.events, delivery_of(got.events)
    tally.count.update(
        reconnects=got.reconnects,
        lost=len(delivery.lost),
        duplicated=delivery.duplicated,
        extra_terminals=max(0, delivery.terminals - 1),
        resets=sum(e.event == "reset" for e in events),
    )
    for before, e in itertools.pairwise(events):
        if e.event == "reset" and e.data.get("reason") == "worker_lost":
            tally.takeovers.append((id_key(e.id)[0] - id_key(before.id)[0]) / 1000)
    if not (terminals := [e for e in events if e.terminal]):
        tally.errors["no terminal event"] += 1
    elif terminals[-1].event == "error":
        tally.count["ended_with_error"] += 1
        tally.errors[terminals[-1].data.get("code", "?")] += 1
    else:
        tally.count["done"] += 1
        tally.finished_at.append(time.monotonic())
        answer = "".join(tokens_for(MODEL, [{"role": "user", "content": prompt}], tokens))  # the mock's
        tally.count["text_exact" if text_of(events) == answer else "text_wrong"] += 1


async def soak(streams: int, minutes: float, seed: int) -> dict[str, Any]:
    raise_fd_limit()
    stamp, t0, numbers = time.strftime("%Y%m%d-%H%M%S"), time.monotonic(), itertools.count(1)
    rng, tally, cluster = random.Random(seed), Tally(), Cluster(report.RESULTS / "logs" / f"soak-{stamp}")

    async def lane(http: httpx.AsyncClient) -> None:
        while time.monotonic() < end:
            await run_stream(http, cluster.urls, tally, rng, next(numbers))

    async def chaos() -> None:
        await asyncio.sleep(3)
        while time.monotonic() < end - 10:
            tally.chaos.append((time.monotonic() - t0, await cluster.chaos(rng.choice(ACTIONS), rng)))
            await asyncio.sleep(rng.uniform(3, 8))

    async def progress() -> None:
        while True:
            await asyncio.sleep(5)
            c, last = tally.count, tally.chaos[-1][1] if tally.chaos else "-"
            print(
                f"[{time.monotonic() - t0:5.0f}s] done {c['done']} (exact {c['text_exact']}), error "
                f"{c['ended_with_error']}, lost {c['lost']}, duplicated {c['duplicated']}, resets "
                f"{c['resets']}, reconnects {c['reconnects']}; chaos {len(tally.chaos)} (last: {last})",
                flush=True,
            )

    try:
        print("soak: starting Redis (AOF) behind a fault proxy, the mock, 2 gateways, 2 workers", flush=True)
        await cluster.start()
        end = time.monotonic() + minutes * 60
        limits = httpx.Limits(max_connections=4 * streams, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=httpx.Timeout(30.0), limits=limits) as http:
            reporter = asyncio.create_task(progress())
            try:
                await asyncio.gather(chaos(), *(lane(http) for _ in range(streams)))
            finally:
                reporter.cancel()
    finally:
        print("soak: stopping every process", flush=True)
        await asyncio.to_thread(cluster.close)
        await cluster.proxy.close()
    result = {"streams": streams, "minutes": minutes, "seed": seed, "wall_s": time.monotonic() - t0}
    return result | {"stamp": stamp, "t0": t0} | vars(tally)


def table(r: dict[str, Any]) -> str:
    c, takeovers = r["count"], r["takeovers"] or [0.0]
    kinds = sorted(Counter(what.split()[0] for _, what in r["chaos"]).items())
    takeover = f"{report.pct(takeovers, 50):.1f} s / {max(takeovers):.1f} s"
    rows = [
        ("streams completed (`done`)", f"{c['done']} of {c['started']} started"),
        ("text exact after the last `reset`", f"{c['text_exact']} of {c['done']}"),
        ("events lost (a `seq` never received)", str(c["lost"])),
        ("events duplicated (a `seq` received twice)", str(c["duplicated"])),
        ("streams with more than one terminal event", str(c["extra_terminals"])),
        ("streams ended with `error`", f"{c['ended_with_error']} {dict(r['errors']) or ''}".strip()),
        ("resets seen by clients", str(c["resets"])),
        ("takeover (silence before a `worker_lost` reset), p50 / worst", takeover),
        ("client reconnects", str(c["reconnects"])),
        ("faults injected", f"{len(r['chaos'])}: " + ", ".join(f"{k} ×{v}" for k, v in kinds)),
    ]
    head = f"Chaos soak: {r['streams']} concurrent streams for {r['minutes']:g} min, 2 gateways, 2 workers"
    return f"{head}\n\n{report.markdown(['figure', 'value'], rows)}\n"


def plot(r: dict[str, Any], path: Path) -> None:
    with report.figure(path, 1, 2, (13, 4.5)) as (_, (ax1, ax2)):
        done = sorted(t - r["t0"] for t in r["finished_at"])
        ax1.plot(done, range(1, len(done) + 1), color="tab:green", label="streams completed")
        for t, what in r["chaos"]:
            ax1.axvline(t, color="tab:red", alpha=0.35, lw=1)
            ax1.text(t, 0, what.split()[0], rotation=90, fontsize=7, va="bottom", color="tab:red")
        ax1.set(xlabel="s", ylabel="streams completed", title="completed streams, faults in red")
        ax2.hist(r["takeovers"] or [0], bins=20, color="tab:blue")
        xlabel = "s of silence before a `worker_lost` reset"
        ax2.set(xlabel=xlabel, ylabel="resets", title="takeover time seen by clients")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=40, help="concurrent client streams")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="20 streams for 1 minute")
    args = parser.parse_args()
    try:
        streams, minutes = (20, 1.0) if args.quick else (args.streams, args.minutes)
        result = asyncio.run(soak(streams, minutes, args.seed))
    except KeyboardInterrupt:
        sys.exit("soak: interrupted; every process was stopped")
    base, text = report.RESULTS / f"soak-{result['stamp']}", table(result)
    base.with_suffix(".md").write_text(text)
    base.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(result, base.with_suffix(".png"))
    print(f"\n{text}\ntable, JSON and plot: {base}.{{md,json,png}}")
    c, unread = result["count"], any(k.startswith("not read") for k in result["errors"])
    sys.exit(1 if c["lost"] or c["duplicated"] or c["text_wrong"] or unread else 0)


if __name__ == "__main__":
    main()
