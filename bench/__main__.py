"""``python -m bench [--quick] [--only PHASE,...] [--profile]``: (a) clients straight to the mock
upstream, the baseline every figure is compared with, (b) the original tutorial's naive proxy
(``bench/naive_proxy.py``) and (c) tailgate (one gateway, one worker), side by side on loopback.
The phases (``PHASES``, each printing a line per step after a warm-up) and what they measure are in
the README's Performance section.

Every workload goes through :meth:`Bench.run` and :meth:`Bench.figures`, which give the same figures
for each (the JSON keeps them all); ``bench/report.py`` makes the table, the goals, the notes and the
plot. Results go to ``bench/results/`` (gitignored), the processes' logs to
``bench/results/logs/``. Every process started here is stopped at the end, on error and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import math
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import aiohttp
import psutil  # type: ignore[import-untyped]
import redis

from bench import report
from bench.client import Load, body, session
from bench.procs import Procs, raise_fd_limit
from tailgate import keys
from tailgate.dev.procs import Child, RedisCluster, RedisServer
from tailgate.settings import Settings

STALL_MS = 200.0  # 10 × the 20 ms pacing
MOCK_TTFT_MS = 200
XADD = "XADD bench:xadd * f v"  # given explicitly: not every redis-benchmark has `-t xadd`
# Each setup's server, and whose CPU time counts as its cost per token. (a) has no server of its
# own: the mock's figure is shown for reference (it is the same in every setup).
SETUPS = {"a": ("mock", "mock"), "b": ("naive", "naive"), "c": ("gateway", "gateway", "worker")}
Records = list[dict[str, Any]]
Raw = dict[str, list[float]]
PHASES = ("peer", "steady", "saturation", "sustained", "fanin", "idle", "fair", "scale", "cluster")
# The scale phase's (gateway processes, worker processes), in order.
SCALE = ((1, 1), (2, 1), (1, 2), (2, 2))
PEER = Load(0, (64, 64), loop=False, ramp_s=1.0)  # issue #11: a level's streams start over 1 s
PROFILED = (200, 400)  # the peer levels ``--profile`` records
WARM = Load(50, (16, 16), count=100, ramp_s=0.5, samples=False)
PY_SPY = os.path.join(os.path.dirname(sys.executable), "py-spy")


@dataclass(frozen=True)
class Plan:
    """The sizes of a run: the full one (the defaults), or ``QUICK`` for a smoke run."""

    name: str = "full"
    # (concurrent streams, rounds per setup) of each peer level; 1 runs one at a time
    peer: tuple[tuple[int, int], ...] = ((1, 100), (50, 3), (200, 3), (400, 3))
    steady: Load = Load(500, (64, 256), ramp_s=3.5, warmup_s=5.0, window_s=8.0)
    sat: Load = Load(
        100, (200, 200), delay_ms=1, ttft_ms=0, ramp_s=0.5, warmup_s=2.0, window_s=6.0, samples=False
    )
    levels: tuple[int, ...] = (50, 100, 150, 200, 300, 400, 500, 750, 1000, 1500, 2000)
    level: Load = Load(0, (256, 256), loop=False, ramp_s=2.0)  # a sustained level's count is the level
    fan_in: int = 1_000
    idle_connections: int = 10_000
    idle_hold_s: float = 20.0
    xadd_requests: int = 100_000
    peer_long: Load = Load(200, (512, 512), count=200, loop=False, ramp_s=1.0)  # issue #11's 2nd CPU goal
    fair_backlog: int = 5_000  # key A's queued streams in the fair phase (issue #10)
    fair_samples: int = 40  # key B's streams, one after another, alone and beside that backlog
    cluster_level: int = 200  # streams of ``level`` in the cluster phase: the sizing guide's 1 × 1 level


QUICK = Plan(
    name="quick",
    peer=((1, 10), (50, 1), (200, 1), (400, 1)),
    steady=Load(100, (64, 128), ramp_s=1.5, warmup_s=2.0, window_s=2.0),
    sat=replace(Plan.sat, concurrency=40, tokens=(100, 100), warmup_s=1.0, window_s=2.0),
    levels=(50, 100, 200),
    level=Load(0, (64, 64), loop=False, ramp_s=1.0),
    fan_in=200,
    idle_connections=1_000,
    idle_hold_s=2.0,
    xadd_requests=20_000,
    fair_backlog=500,
    fair_samples=15,
    cluster_level=100,
)


class Bench:
    def __init__(self, plan: Plan, procs: Procs, stamp: str, profile: bool = False) -> None:
        self.plan, self.procs, self.t0, self.run_id = plan, procs, time.monotonic(), secrets.token_hex(3)
        self.stamp, self.profile = stamp, profile
        self.raw: dict[str, dict[str, Raw]] = {}  # by workload and setup; the plot draws steady's
        self.r: dict[str, Any] = {
            "plan": asdict(plan),
            "cpus": os.cpu_count(),
            # The children get no TAILGATE_* from this environment (``child_env``): defaults.
            "coalesce_ms": float(Settings.model_fields["coalesce_ms"].default),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "code": _code_version(),
            "redis_connections": {},  # the main gateway's in sustained and fanin, the idle one's in idle
        }

    def say(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {msg}", flush=True)

    def start(self) -> None:
        p = self.procs
        self.say("starting redis-server, mock upstream, naive proxy, gateway, worker, load client")
        with redis.Redis.from_url(p.redis.start().url) as r:
            self.r["redis_version"] = r.info("server")["redis_version"]
        for server in (p.start_mock, p.start_naive, p.start_gateway, p.start_worker):
            server()
        self.client = p.start_client()

    def settle(self, limit_s: float = 60.0) -> None:
        """Wait until the servers are idle (a setup's leftovers must not bill the next one)."""
        deadline, last = time.monotonic() + limit_s, 0.0
        while time.monotonic() < deadline:
            now = sum(self.procs.cpu()[k] for k in ("mock", "naive", "gateway", "worker", "redis"))
            if last and (now - last) / 0.3 < 0.06:
                return
            last = now
            time.sleep(0.3)
        self.say(f"  (servers still busy after {limit_s:.0f}s; going on)")

    def run(
        self, setup: str, tag: str, load: Load, deadline_s: float = 120, *, settle: bool = True, **kw: Any
    ) -> dict[str, Any]:
        """One workload through ``setup``, once the servers are idle (``settle``): what the load client
        measured (see :func:`bench.client.streams`), ``cpu_s``, each process's CPU seconds meanwhile,
        and ``redis_usec``, the µs Redis spent in each command meanwhile (``INFO commandstats``).
        ``kw`` goes to :meth:`LoadClient.run` (a ``tick``)."""
        if settle:
            self.settle()
        port, tag = self.procs.ports[SETUPS[setup][0]], f"bench-{self.run_id}-{tag}-{setup}"
        spec: dict[str, Any] = {
            "setup": setup,
            "port": port,
            "load": load,
            "tag": tag,
            "deadline_s": deadline_s,
        }
        before, commands = self.procs.cpu(), self.procs.redis_commands()
        out = self.client.run(deadline_s + 60, **kw, **spec, api_key=Procs.API_KEY)
        after = self.procs.cpu()
        out["redis_usec"] = {k: v - commands.get(k, 0) for k, v in self.procs.redis_commands().items()}
        for child in self.procs.children.values():
            child.check()
        cpu = {k: after[k] - before[k] for k in before}
        machine = cpu.pop("machine")
        cpu["other"] = max(machine - sum(v for k, v in cpu.items() if k not in ("irq", "steal")), 0.0)
        cpu["machine"] = machine
        return out | {"cpu_s": cpu}

    def figures(self, setup: str, load: Load, runs: list[dict[str, Any]]) -> tuple[dict[str, Any], Raw]:
        """The figures of ``runs`` of ``load`` through ``setup`` taken together, and the raw values of
        two: the TTFTs (ms from sending the request) of the measured streams delivered whole, and the
        per-chunk latencies (ms) of the measured streams."""
        recs = [x for run in runs for x in run["streams"]]
        tokens, wall = sum(run["tokens"] for run in runs), sum(run["wall_s"] for run in runs)
        cpu = {k: sum(run["cpu_s"][k] for run in runs) for k in runs[0]["cpu_s"]}
        per_token = {k: v / tokens * 1e6 if tokens else math.nan for k, v in cpu.items()}
        failed, measured = [x["err"] for x in recs if not x["ok"]], [x for x in recs if x["measured"]]
        raw = {"ttft": [x["ttft_ms"] for x in measured if x["ok"]]}
        raw["latency"] = [x for run in runs for x in run["latency_ms"]]
        q = {"streams": len(recs), "measured": len(measured), "failed": len(failed), "tokens": tokens}
        q |= {"errors": sorted(set(failed))[:3], "wall_s": wall} | {
            k: report.summary(v) for k, v in raw.items()
        }
        # The first token's way, split at the mock (its send stamp): request sent → the mock's TTFT
        # began (stamp − TTFT), and the mock sent it → the client has it.
        whole = [x for x in measured if x["ok"] and x["first_sent_ms"] is not None]
        q["to_model"] = report.summary([x["first_sent_ms"] - load.ttft_ms for x in whole])
        q["from_model"] = report.summary([x["ttft_ms"] - x["first_sent_ms"] for x in whole])
        inside = sum(min(load.window_s, run["wall_s"]) for run in runs)
        q["tokens_per_s"] = sum(run["window_tokens"] for run in runs) / inside  # inside the window
        q["max_gap_ms"] = max((x["max_gap_ms"] for x in recs), default=math.inf)
        q["max_late_ms"] = max(((x["ttft_ms"] or math.inf) - MOCK_TTFT_MS for x in recs), default=math.inf)
        q |= {"cores_used": {k: v / wall for k, v in cpu.items()}, "cpu_us_per_token": per_token}
        q["server_us_per_token"] = sum(per_token[p] for p in SETUPS[setup][1:])
        usec = {k: sum(run["redis_usec"].get(k, 0) for run in runs) for k in runs[-1]["redis_usec"]}
        q["redis_us_per_token"] = {k: v / tokens for k, v in usec.items() if v and tokens}
        if setup == "c" and measured:
            q |= self.c_steps(measured)
        return q, raw

    def load(self, setup: str, tag: str, load: Load, deadline_s: float = 120, **kw: Any) -> dict[str, Any]:
        """The figures of one workload through ``setup`` (see :meth:`run`)."""
        return self.figures(setup, load, [self.run(setup, tag, load, deadline_s, **kw)])[0]

    def c_steps(self, recs: Records) -> dict[str, Any]:
        """(c)'s time to first token in steps, from sending the POST: its answer, the `started` event
        (the worker has claimed the stream), then the first delta (the model's own TTFT inside); and
        enqueue → job start, ``started_at − created_at`` in ms from each stream's meta hash."""
        with redis.Redis.from_url(self.procs.redis.url, decode_responses=True) as r, r.pipeline() as pipe:
            for x in recs:
                pipe.hmget(keys.meta(x["id"]), ["created_at", "started_at"])
            rows = pipe.execute()
        full = [x for x in recs if x["ok"] and x["posted_ms"] is not None and x["started_ms"] is not None]
        steps = {"posted": [x["posted_ms"] for x in full], "started": [x["started_ms"] for x in full]}
        steps["started_to_token"] = [x["ttft_ms"] - x["started_ms"] for x in full]
        return {
            "enqueue_start": report.summary([float(s) - float(c) for c, s in rows if c and s]),
            "steps_ms": {k: report.summary(v) for k, v in steps.items()},
        }

    def watch_gateway(self) -> tuple[Callable[[], None], list[tuple[int, int]]]:
        """A ``tick`` that samples the main gateway's (Redis, client) connections, and the samples."""
        seen: list[tuple[int, int]] = [(0, 0)]
        return lambda: seen.append(self.procs.connections("gateway")), seen

    # --- phases ----------------------------------------------------------------------------------

    def warm_up(self) -> None:
        for s in SETUPS:
            if (q := self.load(s, "warm", WARM, 60, settle=False))["failed"]:
                raise RuntimeError(f"warm-up through ({s}) failed: {q['errors']}")
        self.say("warm-up: 100 streams through each setup, all complete")

    def rounds(self, tag: str, load: Load, rounds: int = 1, *, settle: bool = True) -> dict[str, Any]:
        """``load`` through (a), (b) and (c) in turn, ``rounds`` times, a progress line each setup: the
        setups' figures (and (c)'s steps), each over all its rounds; their raw values in ``raw[tag]``."""
        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SETUPS}
        for i, s in ((i, s) for i in range(rounds) for s in SETUPS):
            runs[s].append(self.run(s, f"{tag}-{i}", load, settle=settle))
        res, raw = {}, self.raw.setdefault(tag, {})
        for s in SETUPS:
            res[s], raw[s] = self.figures(s, load, runs[s])
            q, t = res[s], res[s]["ttft"]
            line = f"{q['streams']} streams ({q['measured']} measured, {q['failed']} failed)"
            if q["measured"]:
                line += (
                    f", TTFT p50/p99 {t['p50']:.0f}/{t['p99']:.0f} ms, chunk p99 {q['latency']['p99']:.1f} ms"
                )
            line += f", {q['tokens_per_s']:,.0f} tokens/s, {q['server_us_per_token']:.0f} µs CPU/token"
            self.say(f"{tag} ({s}): {line}")
        return res

    def peer(self) -> None:
        """Issue #11's shape at each level of the plan, the setups interleaved round by round: one
        stream at a time at level 1 (no settling between them, as from one client), the level's
        streams staggered over 1 s above it; then 512-token streams at 200."""
        self.settle()
        res = self.r["peer"] = {}
        for level, rounds in self.plan.peer:
            with self.profiling(level):
                load = replace(PEER, concurrency=level, count=level)
                res[str(level)] = self.rounds(f"peer{level}", load, rounds, settle=level > 1)
        res["long"] = self.rounds("peer-long", self.plan.peer_long)

    @contextlib.contextmanager
    def profiling(self, level: int) -> Iterator[None]:
        """With ``--profile``, at the levels in ``PROFILED``: ``py-spy record`` of the gateway and of the
        worker meanwhile (not pausing them), a flame graph each in ``bench/results/``."""
        spies = {}
        for name in ("gateway", "worker") if self.profile and level in PROFILED else ():
            svg, pid = report.RESULTS / f"{self.stamp}-{name}-{level}.svg", self.procs.children[name].pid
            argv = [PY_SPY, "record", "--nonblocking", "-f", "flamegraph", "-o", str(svg), "-p", str(pid)]
            spies[svg] = Child(svg.stem, argv, None, self.procs.log_dir, own_session=True)
        try:
            yield
        finally:
            for svg, spy in spies.items():
                spy.signal(signal.SIGINT)  # py-spy writes its flame graph, then exits
                spy.wait_exit(60)
                spy.stop()
                path = str(svg.relative_to(report.ROOT))
                if svg.exists():
                    self.r.setdefault("profiles", []).append(path)
                self.say(f"py-spy: {path}" if svg.exists() else f"py-spy wrote no {path}: {spy.tail(300)}")

    def steady(self) -> None:
        self.r["steady"] = self.rounds("steady", self.plan.steady)

    def saturation(self) -> None:
        xadd = self.r["xadd_rps"] = redis_benchmark_xadd(self.procs.redis.port, self.plan.xadd_requests)
        self.say(f"redis-benchmark XADD, 50 clients, unpipelined: {xadd:,.0f} requests/s ({XADD})")
        res = self.r["saturation"] = self.rounds("saturation", self.plan.sat)
        self.say("saturation: " + ", ".join(f"{s} {res[s]['tokens_per_s'] / xadd:.2f}× XADD" for s in SETUPS))

    def sustained(self) -> None:
        """Each setup at rising levels (:meth:`climb`)."""
        tick, seen = self.watch_gateway()
        runs = {s: self.climb(s, "sustained", tick=tick if s == "c" else None) for s in SETUPS}
        self.r["sustained"] = {"levels": list(self.plan.levels), "runs": runs}
        self.r["redis_connections"]["live_max"] = max(seen)[0]

    def climb(self, setup: str, phase: str, levels: tuple[int, ...] = (), **kw: Any) -> Records:
        """``setup`` at rising ``levels`` (the plan's) until a level does not hold: every stream whole,
        no gap between chunks over ``STALL_MS``; stricter, ``held_first_token``: nor a first token later
        than that. Each level's figures, a progress line each."""
        runs: Records = []
        for level in levels or self.plan.levels:
            load = replace(self.plan.level, concurrency=level, count=level)
            q = self.load(setup, f"{phase}{level}", load, **kw)
            why = f"a {q['max_gap_ms']:,.0f} ms gap between chunks" if q["max_gap_ms"] > STALL_MS else ""
            if lost := q["failed"] + level - q["streams"]:
                why = f"{lost} streams incomplete ({(q['errors'] or ['not started'])[0]})"
            strict = not why and q["max_late_ms"] <= STALL_MS
            runs.append(q | {"level": level, "held": not why, "held_first_token": strict, "why": why})
            held = f"did not hold: {why}" if why else "held"
            self.say(
                f"{phase} ({setup}) {level:>5} streams at 50 tokens/s: {held} (worst gap "
                f"{q['max_gap_ms']:,.0f} ms; first token up to {q['max_late_ms']:,.0f} ms late; machine "
                f"{q['cores_used']['machine']:.2f} of {os.cpu_count()} cores busy)"
            )
            if why:
                break
        return runs

    def scale(self) -> None:
        """Sizing (issue #10): (c) at rising levels (:meth:`climb`) with 1 and 2 gateway processes and
        1 and 2 worker processes (``--workers``, ``--processes``); then one of each again."""
        res = self.r["scale"] = {}
        for gateways, workers in (*SCALE, (1, 1)):
            self.restart(gateways, workers)
            if (gateways, workers) in SCALE:
                self.say(f"scale: {gateways} gateway and {workers} worker processes")
                res[f"{gateways}x{workers}"] = self.climb("c", f"scale{gateways}x{workers}-")

    def restart(self, gateways: int = 1, workers: int = 1, **env: str) -> None:
        """(c)'s gateway and worker started again: ``gateways`` and ``workers`` processes, ``env``."""
        self.procs.stop("gateway")
        self.procs.stop("worker")
        self.procs.start_gateway(processes=gateways, **env)
        self.procs.start_worker(processes=workers, **env)

    def cluster(self) -> None:
        """What the streams cost Redis on a Redis Cluster: (c) at one sustained level (``cluster_level``
        streams), the streams on the bench's Redis, then on a fresh cluster of 3 masters and 3 replicas
        (``TAILGATE_STREAMS_REDIS_URL``; the queue and the bookkeeping stay on the bench's Redis; node
        timeout 15 s, Redis's default, so that no busy master is failed over), each time with a fresh
        gateway and worker, warmed up. The CPU per token of every Redis, the cluster's nodes named by
        their roles at the start (``master0``, its replica ``replica0``, …), and the masters' time in
        each command per token (``INFO commandstats``)."""
        n, p = self.plan.cluster_level, self.procs
        self.restart()
        self.load("c", "warm", WARM, 60, settle=False)
        res: dict[str, Any] = {"level": n, "single": self.climb("c", "cluster-single-", (n,))[0]}
        with RedisCluster(node_timeout_ms=15_000) as cluster:
            nodes = {f"{('master', 'replica')[i // 3]}{i % 3}": x for i, x in enumerate(cluster.nodes)}
            self.say(f"cluster: {', '.join(f'{k} on :{x.port}' for k, x in nodes.items())}")
            try:
                self.restart(TAILGATE_STREAMS_REDIS_URL=cluster.url)
                self.load("c", "warm", WARM, 60, settle=False)
                p.watched = {k: x.pid for k, x in nodes.items() if x.pid is not None}
                before = _commands(p, cluster.nodes[:3])
                q = res["cluster"] = self.climb("c", "cluster-", (n,))[0]
                spent = _commands(p, cluster.nodes[:3]) - before
                q["masters_redis_us_per_token"] = {k: v / q["tokens"] for k, v in spent.items()}
                q["roles_changed"] = [k for k, x in nodes.items() if (_role(x) == "master") != (k[0] == "m")]
            finally:
                p.watched = {}
            self.restart()  # off the cluster before it stops
        self.r["cluster"], us = res, report.cluster_us(q)
        self.say(
            f"cluster: Redis CPU µs per token, one Redis {res['single']['cpu_us_per_token']['redis']:.1f}; "
            f"cluster masters {us['masters']:.1f} ({' / '.join(f'{x:.0%}' for x in us['shares'])}), replicas "
            f"{us['replicas']:.1f}, queue and bookkeeping {q['cpu_us_per_token']['redis']:.1f}; roles "
            f"changed: {', '.join(q['roles_changed']) or 'none'}"
        )

    def fanin(self) -> None:
        """Redis connections of the main gateway while it serves ``fan_in`` live SSE clients: slow
        streams (10 tokens 500 ms apart), so the load stays far below what the worker can carry."""
        n, (tick, seen) = self.plan.fan_in, self.watch_gateway()
        slow = Load(n, (10, 10), count=n, loop=False, ramp_s=2.0, delay_ms=500, samples=False)
        q = self.load("c", "fanin", slow, tick=tick)
        most_redis, most_clients = (max(column) for column in zip(*seen, strict=True))
        self.r["redis_connections"] |= {"fan_in_clients": most_clients, "fan_in_max": most_redis}
        self.say(
            f"live fan-in: {n:,} slow streams on the main gateway ({q['failed']} failed), at most "
            f"{most_clients:,} client connections at once; gateway held {most_redis} Redis connections"
        )

    def idle(self) -> None:
        """A fresh gateway, on a queue no worker serves, holding ``idle_connections`` SSE connections
        to queued streams: its RSS and Redis connections, and whether all are still held later. This
        process opens them itself: holding them costs no CPU worth keeping apart in the load client."""
        n, queue = self.plan.idle_connections, f"bench:idle:{self.run_id}"
        self.say(f"idle connections: a fresh gateway on a queue no worker serves; creating {n:,} streams")
        gateway = psutil.Process(self.procs.start_gateway("gateway-idle", TAILGATE_QUEUE_NAME=queue).pid)
        try:
            asyncio.run(self.hold_idle(n, gateway, f"http://127.0.0.1:{self.procs.ports['gateway-idle']}"))
        finally:
            self.procs.stop("gateway-idle")

    async def hold_idle(self, n: int, gateway: psutil.Process, base: str) -> None:
        headers, first = {"Authorization": f"Bearer {Procs.IDLE_KEY}"}, min(1000, n)
        hold_s: float = self.plan.idle_hold_s
        ids: list[str] = []
        held: list[aiohttp.ClientResponse] = []

        async def create(i: int) -> None:
            prompt = {"prompt": f"bench-{self.run_id} idle {i}"}
            async with http.post(f"{base}/v1/streams", json=prompt, headers=headers) as r:
                ids.append(json.loads(await body(r, 202))["id"])

        async def hold(stream_id: str) -> None:
            held.append(r := await http.get(f"{base}/v1/streams/{stream_id}/events", headers=headers))
            if not (seen := await r.content.readuntil(b"event: queued")).endswith(b"event: queued"):
                raise ValueError(f"{r.status}, closed before a queued event: {seen[:120]!r}")

        def still_open() -> int:
            return sum(1 for r in held if r.connection is not None and not r.connection.closed)

        async with session() as http:
            t, failures = time.monotonic(), await _each(32, list(range(n)), create)
            if len(ids) != n:
                raise RuntimeError(f"created {len(ids)} of {n} streams: {failures}")
            create_s = time.monotonic() - t
            await asyncio.sleep(1.0)
            rss0, failures = gateway.memory_info().rss, await _each(256, ids[:first], hold)
            await asyncio.sleep(0.5)
            conns_1000 = self.procs.connections("gateway-idle")[0]
            self.say(
                f"idle connections: {n:,} streams created in {create_s:.1f}s; {still_open():,} SSE "
                f"connections held, gateway has {conns_1000} Redis connections"
            )
            failures += await _each(256, ids[first:], hold)
            await asyncio.sleep(2.0)
            rss1, opened = gateway.memory_info().rss, still_open()
            conns_all = self.procs.connections("gateway-idle")[0]
            self.say(
                f"idle connections: {opened:,} held; gateway RSS {rss0 / 2**20:.1f} → {rss1 / 2**20:.1f} "
                f"MiB ({(rss1 - rss0) / max(opened, 1) / 1024:.1f} KiB each), {conns_all} Redis "
                f"connections; holding {hold_s:.0f}s"
            )
            await asyncio.sleep(hold_s)
            held_after = still_open()
            for r in held:
                r.close()
        idle = {"connections": n, "create_s": create_s, "open_failures": failures, "held": opened}
        idle |= {"held_after": held_after, "rss_before": rss0, "rss_after": rss1}
        self.r["idle"] = idle | {"kib_per_connection": (rss1 - rss0) / n / 1024}
        self.r["redis_connections"] |= {"idle_1000": conns_1000, "idle_all": conns_all}
        self.say(f"idle connections: {held_after:,} of {n:,} still held after {hold_s:.0f}s; released")

    def fair(self) -> None:
        """Fair scheduling: a fresh gateway and a worker capped at 50 on a queue of their own. Key B
        starts ``fair_samples`` streams one after another, first on an empty queue, then while key A
        holds ``fair_backlog`` queued: each one's enqueue → start (its meta's ``created_at`` →
        ``started_at``: the gateway's clock, then the worker's, on one machine)."""
        n, queue, p = self.plan.fair_backlog, f"bench:fair:{self.run_id}", self.procs
        self.say(f"fair scheduling: key B alone, then beside {n:,} queued of key A; a worker capped at 50")
        p.start_gateway("gateway-fair", TAILGATE_QUEUE_NAME=queue)
        p.start_worker("worker-fair", TAILGATE_QUEUE_NAME=queue, TAILGATE_CONCURRENCY="50")
        try:
            f = self.r["fair"] = asyncio.run(
                self.fair_waits(queue, f"http://127.0.0.1:{p.ports['gateway-fair']}")
            )
        finally:
            p.stop("worker-fair", kill=True)  # key A's backlog is left unrun
            p.stop("gateway-fair")
        self.say(
            f"fair scheduling: key B's enqueue → start p50 / p99 {report.p50_99(f['alone'])} alone, "
            f"{report.p50_99(f['beside'])} beside key A's {f['ahead']:,} queued"
        )

    async def fair_waits(self, queue: str, base: str) -> dict[str, Any]:
        a, b = ({"Authorization": f"Bearer {k}"} for k in (Procs.API_KEY, Procs.IDLE_KEY))
        prompt = f"bench-{self.run_id} fair [mock:tokens=64,delay_ms=20,ttft_ms={MOCK_TTFT_MS}]"

        async def create(headers: dict[str, str], text: str) -> str:
            async with http.post(f"{base}/v1/streams", json={"prompt": text}, headers=headers) as r:
                return str(json.loads(await body(r, 202))["id"])

        async def waits(tag: str) -> list[float]:
            out = []
            for i in range(self.plan.fair_samples):
                stream_id = await create(b, f"{prompt} b-{tag}-{i}")
                async with http.get(f"{base}/v1/streams/{stream_id}/events", headers=b) as r:
                    await r.content.readuntil(b"event: started")
                created, started = await rs.hmget(keys.meta(stream_id), "created_at", "started_at")
                out.append(float(started) - float(created))
            return out

        async def backlog(i: int) -> None:
            await create(a, f"{prompt} a-{i}")

        async with session() as http, redis.asyncio.Redis.from_url(self.procs.redis.url) as rs:
            alone = await waits("alone")
            await _each(64, list(range(self.plan.fair_backlog)), backlog)
            ahead = await rs.zcard(queue)
            beside = await waits("beside")
        return {"ahead": ahead, "alone": report.summary(alone), "beside": report.summary(beside)}

    def phases(self, names: list[str]) -> None:
        self.start()
        self.warm_up()
        for name in names:
            getattr(self, name)()
        self.r["wall_s"] = time.monotonic() - self.t0


async def _each(n: int, items: list[Any], one: Callable[[Any], Awaitable[None]]) -> list[str]:
    """``one(item)`` for every item, ``n`` at a time; the first failures, as text."""
    gate, failures = asyncio.Semaphore(n), []

    async def gated(item: Any) -> None:
        async with gate:
            try:
                await one(item)
            except (OSError, aiohttp.ClientError, ValueError, KeyError) as exc:
                failures.append(f"{type(exc).__name__}: {exc}")

    await asyncio.gather(*(gated(item) for item in items))
    return failures[:5]


def _role(node: RedisServer) -> str:
    with redis.Redis(port=node.port, decode_responses=True) as r:
        return str(r.role()[0])


def _commands(procs: Procs, nodes: list[RedisServer]) -> collections.Counter[str]:
    """µs ``nodes`` have spent in each command, together (:meth:`Procs.redis_commands`)."""
    return sum((collections.Counter(procs.redis_commands(x.url)) for x in nodes), start=collections.Counter())


def _run(*argv: str, timeout: float = 10) -> str:
    try:
        return subprocess.run(argv, cwd=report.ROOT, capture_output=True, text=True, timeout=timeout).stdout
    except OSError:
        return ""


def _code_version() -> dict[str, Any]:
    """The commit measured and the product files that differed from it (read-only git)."""
    changed = _run("git", "status", "--porcelain", "--", "gateway", "worker", "tailgate", "pyproject.toml")
    return {"commit": _run("git", "rev-parse", "--short", "HEAD").strip(), "changed": changed.splitlines()}


def redis_benchmark_xadd(port: int, requests: int) -> float:
    """XADD requests/s, 50 clients, unpipelined."""
    args = ["-h", "127.0.0.1", "-p", str(port), "-c", "50", "-n", str(requests), "-q", *XADD.split()]
    out = _run("redis-benchmark", *args, timeout=300)
    if not (found := re.findall(r"([\d.]+) requests per second", out.replace("\r", "\n"))):
        raise RuntimeError(f"redis-benchmark printed no requests per second: {out[-500:]!r}")
    return float(found[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description="tailgate's benchmark")
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run in about 5 minutes")
    only = f"run only these phases of {', '.join(PHASES)}"
    parser.add_argument("--only", metavar="PHASE[,PHASE]", type=lambda v: v.split(","), help=only)
    parser.add_argument("--profile", action="store_true", help="py-spy flame graphs of the peer phase")
    args = parser.parse_args(argv)
    plan, names = QUICK if args.quick else Plan(), args.only or list(PHASES)
    if unknown := set(names) - set(PHASES):
        parser.error(f"no phase {', '.join(sorted(unknown))}; phases: {', '.join(PHASES)}")
    if args.profile and not os.path.exists(PY_SPY):
        parser.error(f"--profile needs py-spy ({PY_SPY}): the bench extra installs it")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # as Ctrl-C: stop every process in order
    if (fds := raise_fd_limit()) < plan.idle_connections + 1000 and "idle" in names:
        sys.exit(f"bench: open-file limit is {fds}; the idle phase needs {plan.idle_connections + 1000}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    bench = Bench(plan, procs := Procs(report.RESULTS / "logs"), stamp, args.profile)
    bench.say(
        f"tailgate bench, {plan.name} run: {', '.join(names)}; {os.cpu_count()} CPUs, logs in {procs.log_dir}"
    )
    try:
        bench.phases(names)
    except KeyboardInterrupt:
        bench.say("interrupted: stopping every process")
        return 130
    except Exception as exc:
        bench.say(f"failed: {type(exc).__name__}: {exc}; process logs: {procs.log_dir}")
        return 1
    finally:
        procs.close()
    print("\n" + report.write(bench.r, bench.raw, report.RESULTS / f"{stamp}-{plan.name}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
