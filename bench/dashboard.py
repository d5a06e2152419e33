"""``python -m bench.dashboard [PATH] [--redraw SERIES_JSON]`` (``scripts/dashboard``):
``docs/dashboard.png``, the Grafana dashboard of ``deploy/grafana-dashboard.json`` drawn from real
data, since no Grafana runs here.

It starts a Redis, the mock upstream, two gateways and three workers (each capped at ``CAP`` streams,
its metrics on a port of its own), and Debian's Prometheus scraping all of them every ``SCRAPE_S``
with ``deploy/prometheus-rules.yml`` loaded. Then a little over two minutes of load through both
gateways: ``LANES`` streams at once, of which one in 20 ends in each of three upstream faults, one in
20 is cancelled and one in 10 has a slow first token; a worker SIGKILLed mid-stream (its streams
taken over); a burst of ``BURST`` streams more than the two survivors have room for (a queue, and
its wait); a rolling update (a new worker, then SIGTERM to an old one, which hands its streams
back). Last, every panel's queries over the run go to Prometheus's ``query_range`` and
``bench/grafana.py`` draws them, with the steps as annotations. About three minutes in all.

A line per step, with the seconds since the start. Logs, Prometheus's config and the series drawn
(``series.json``: ``--redraw`` draws it again, starting nothing) go to ``bench/results/logs/
dashboard-*``. Every process started is stopped at the end, on error and on Ctrl-C too.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

from bench import grafana, report
from bench.procs import Procs
from tailgate.client import AsyncClient, TailgateError
from tailgate.dev.procs import Child, child_env, wait_until

DASHBOARD = report.ROOT / "deploy" / "grafana-dashboard.json"
RULES = report.ROOT / "deploy" / "prometheus-rules.yml"
SCRAPE_S = 1
# Grafana's $__rate_interval would be 4 s here (four scrapes, with the data source told of the 1 s
# scrape interval): 15 s draws the same load with less noise.
RATE_INTERVAL = "15s"
LANES = 24  # streams at once, each followed over SSE to its end, then the next
TOKENS = 150  # a lane's stream, give or take a third: about 3 s at the mock's 20 ms a token
CAP = 16  # TAILGATE_CONCURRENCY: three workers hold the lanes with room to spare, two hold no burst
BURST, BURST_TOKENS = 80, 300
# By a stream's number modulo 20: one in 20 of each upstream fault (an error mid-stream, a rate limit
# after the SDK's retries, a bad request), one cancelled after its first delta, and one in 10 with a
# slow first token.
FAULTS = {3: "[mock:fail_after=5]", 9: "[mock:status=429]", 15: "[mock:status=400]"}
CANCEL = 12
SLOW_START = (1, 11)
SLOW_TTFT_MS = 1200


class Stack(Procs):
    """The bench's processes, the workers' metrics on ports of their own, and a Prometheus."""

    def __init__(self, log_dir: Path) -> None:
        # Heartbeats every 0.5 s, takeovers after 2 s of silence (the defaults take 6 s or more); a
        # gateway's drain on SIGTERM, 1 s (5 s by default; nobody reads by then).
        env = {"TAILGATE_HEARTBEAT_S": "0.5", "TAILGATE_TAKEOVER_AFTER_S": "2", "TAILGATE_DRAIN_S": "1"}
        super().__init__(log_dir, None, TAILGATE_CONCURRENCY=str(CAP), **env)
        self.tsdb = tempfile.TemporaryDirectory(prefix="tailgate-prometheus-")
        self.gateways = [f"gateway{i}" for i in (1, 2)]
        self.workers = [f"worker{i}" for i in (1, 2, 3, 4)]  # worker4 comes with the rolling update
        self.urls = [f"http://127.0.0.1:{self.port(g)}" for g in self.gateways]
        self.prometheus = f"http://127.0.0.1:{self.port('prometheus')}"

    def start_worker(self, name: str = "worker", processes: int = 1, **env: str) -> Child:
        metrics = self.port(f"{name}-metrics")
        return super().start_worker(name, processes, TAILGATE_METRICS_PORT=metrics, **env)

    def start_prometheus(self) -> Child:
        """Prometheus scraping every gateway's and worker's metrics (the ones not started yet are
        down until they are), each target named by its ``instance`` label."""

        def job(name: str, names: list[str], suffix: str) -> dict[str, object]:
            targets = [
                {"targets": [f"127.0.0.1:{self.port(n + suffix)}"], "labels": {"instance": n}} for n in names
            ]
            return {"job_name": name, "static_configs": targets}

        interval = f"{SCRAPE_S}s"
        config = {
            "global": {
                "scrape_interval": interval,
                "scrape_timeout": interval,
                "evaluation_interval": interval,
            },
            "rule_files": [str(RULES)],
            "scrape_configs": [
                job("tailgate-gateway", self.gateways, ""),
                job("tailgate-worker", self.workers, "-metrics"),
            ],
        }
        path = self.log_dir / "prometheus.yml"
        path.write_text(json.dumps(config, indent=2))  # YAML is a superset of JSON
        binary = shutil.which("prometheus")
        if binary is None:
            raise SystemExit("no prometheus on the PATH: apt-get install prometheus (scripts/dashboard does)")
        argv = [binary, f"--config.file={path}", f"--storage.tsdb.path={self.tsdb.name}"]
        argv.append(f"--web.listen-address=127.0.0.1:{self.port('prometheus')}")
        return self.spawn("prometheus", argv, child_env(), "/-/ready")

    def api(self, path: str, **params: str) -> Any:
        r = httpx.get(f"{self.prometheus}/api/v1/{path}", params=params, timeout=10)
        r.raise_for_status()
        return r.json()["data"]

    def scraping(self) -> set[str]:
        """The instances Prometheus scraped last time round."""
        targets = self.api("targets")["activeTargets"]
        return {t["labels"]["instance"] for t in targets if t["health"] == "up"}

    def value(self, expr: str) -> float:
        """An instant query's one value (0 for none)."""
        result = self.api("query", query=expr)["result"]
        return float(result[0]["value"][1]) if result else 0.0

    def check(self) -> None:
        """:class:`NotReady` if a process exited unasked: the picture would not be of this stack."""
        for child in self.children.values():
            child.check()

    def close(self) -> None:
        super().close()
        self.tsdb.cleanup()


class Load:
    """Streams through the gateways in turn, each followed to its end; what they ended with."""

    def __init__(self, urls: list[str]) -> None:
        self.clients = [AsyncClient(url, Procs.API_KEY) for url in urls]
        self.ended: Counter[str] = Counter()
        self.numbers = itertools.count(1)
        self.lanes_on = True

    async def stream(self, tokens: int) -> None:
        n = next(self.numbers)
        tg, cancel = self.clients[n % len(self.clients)], n % 20 == CANCEL
        mock = f"tokens={tokens * (2 + n % 3) // 3}"  # lanes fall out of step
        mock += f",ttft_ms={SLOW_TTFT_MS}" if n % 20 in SLOW_START else ""
        try:
            created = await tg.create(f"dashboard {n} [mock:{mock}] {FAULTS.get(n % 20, '')}")
            async for event in tg.events(created.id):
                if cancel and event.type == "delta":
                    cancel = False
                    await tg.cancel(created.id)
                if event.terminal:
                    self.ended[event.code or event.type] += 1
        except TailgateError as exc:  # counted and shown: the picture is of the servers, not the client
            self.ended[f"client {type(exc).__name__}"] += 1

    async def lane(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        while self.lanes_on:
            await self.stream(TOKENS)

    async def aclose(self) -> None:
        for tg in self.clients:
            await tg.aclose()


class Run:
    """The steps, each a line with the seconds since the start, and the annotations they leave."""

    def __init__(self, stack: Stack) -> None:
        self.stack, self.t0 = stack, time.monotonic()
        self.annotations: list[tuple[float, str]] = []  # (unix time, what)

    def say(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {msg}", flush=True)

    def step(self, msg: str) -> None:
        """The next step's line, once every process is known to run still."""
        self.stack.check()
        self.say(msg)

    def mark(self, what: str) -> None:
        self.annotations.append((time.time(), what))

    def start(self) -> None:
        s = self.stack
        self.say(
            "starting redis-server, the mock upstream, 2 gateways, 3 workers (metrics ports), prometheus"
        )
        s.redis.start()
        s.start_mock()
        for name in s.gateways:
            s.start_gateway(name)
        for name in s.workers[:3]:
            s.start_worker(name)
        s.start_prometheus()
        up = set(s.gateways + s.workers[:3])
        wait_until(lambda: up <= s.scraping(), f"prometheus scraping {sorted(up)}", 30)
        loaded = sum(len(g["rules"]) for g in s.api("rules")["groups"])
        self.say(
            f"prometheus {s.prometheus} scrapes {len(up)} targets every {SCRAPE_S} s; {loaded} alert rules"
        )

    def ended(self, load: Load) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(load.ended.items())) or "none yet"

    async def load(self) -> tuple[float, float]:
        """The load, step by step; the range to draw (unix times)."""
        s, load = self.stack, Load(self.stack.urls)
        begin = time.time() - 10  # a little of the idle stack before
        self.step(f"load: {LANES} streams at once of {TOKENS} tokens, through both gateways")
        self.mark("load starts")
        lanes = [asyncio.create_task(load.lane(3 * i / LANES)) for i in range(LANES)]  # over 3 s
        try:
            await asyncio.sleep(35)
            running = s.value("sum(tailgate_streams_running)")
            await asyncio.to_thread(s.stop, "worker1", kill=True)
            self.mark("worker1 SIGKILL")
            self.step(f"SIGKILLed worker1 ({running:.0f} streams running); ended so far: {self.ended(load)}")
            await asyncio.sleep(25)
            taken = s.value('sum(tailgate_takeovers_total{reason="worker_lost"})')
            self.step(f"{taken:.0f} streams of worker1 taken over; a burst: {BURST} × {BURST_TOKENS} tokens")
            self.mark(f"burst of {BURST}")
            burst = [asyncio.create_task(load.stream(BURST_TOKENS)) for _ in range(BURST)]
            await asyncio.sleep(5)
            self.step(
                f"queue depth {s.value('max(tailgate_queue_depth)'):.0f} with 2 workers at {CAP} streams each"
            )
            await asyncio.gather(*burst)
            self.step(f"burst done; ended so far: {self.ended(load)}")
            await asyncio.sleep(10)
            self.step("rolling update: worker4 starts, worker2 gets SIGTERM and hands its streams back")
            await asyncio.to_thread(s.start_worker, "worker4")
            self.mark("worker2 SIGTERM")
            await asyncio.to_thread(s.stop, "worker2")
            await asyncio.sleep(25)
        finally:
            load.lanes_on = False
            await asyncio.gather(*lanes)
            await load.aclose()
        self.mark("load ends")
        self.step(f"load stopped; streams ended: {self.ended(load)}")
        await asyncio.sleep(10)  # the stack idle again
        return begin, time.time()

    def query(self, begin: float, end: float) -> dict[str, Any]:
        """Every panel's series over ``begin``..``end`` and the annotations: what :func:`draw` draws.
        Kept as ``series.json`` beside the logs, for ``--redraw``."""
        panels = grafana.panels(json.loads(DASHBOARD.read_text()), RATE_INTERVAL)
        series = [grafana.query(self.stack.prometheus, p, begin, end, SCRAPE_S) for p in panels]
        saved = [[asdict(s) for s in ss] for ss in series]
        run = {"begin": begin, "annotations": self.annotations, "series": saved}
        (self.stack.log_dir / "series.json").write_text(json.dumps(run))
        return run


def draw(run: dict[str, Any], out: Path) -> None:
    """The dashboard's panels with the series of a run (:meth:`Run.query`) as a PNG at ``out``."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = grafana.panels(dashboard, RATE_INTERVAL)
    series = [[grafana.Series(**s) for s in ss] for ss in run["series"]]
    note = (
        f"deploy/grafana-dashboard.json's own queries ($__rate_interval = {RATE_INTERVAL}) against a real "
        f"Prometheus scraping a real stack (2 gateways, 3 workers) every {SCRAPE_S} s under load; series "
        "that stay 0 left out; drawn by scripts/dashboard with matplotlib, not a Grafana screenshot"
    )
    drawn = list(zip(panels, series, strict=True))
    grafana.draw(dashboard["title"], note, drawn, run["annotations"], run["begin"], SCRAPE_S, out)
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB)")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.dashboard", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", type=Path, default=report.ROOT / "docs" / "dashboard.png")
    parser.add_argument(
        "--redraw", type=Path, metavar="SERIES_JSON", help="draw a past run's series.json; start nothing"
    )
    args = parser.parse_args()
    if args.redraw:
        draw(json.loads(args.redraw.read_text()), args.out)
        return
    stack = Stack(report.RESULTS / "logs" / f"dashboard-{time.strftime('%Y%m%d-%H%M%S')}")
    run = Run(stack)
    try:
        run.start()
        run_series = run.query(*asyncio.run(run.load()))
    except KeyboardInterrupt:
        sys.exit("dashboard: interrupted; every process was stopped")
    finally:
        run.say(f"stopping every process (logs: {stack.log_dir})")
        stack.close()
    draw(run_series, args.out)


if __name__ == "__main__":
    main()
