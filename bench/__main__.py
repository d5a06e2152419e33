"""``python -m bench [--quick]``: three setups side by side, on loopback, against the mock upstream.

    (a) clients straight to the mock upstream: the baseline every figure is compared with
    (b) the naive direct proxy of the original tutorial (``bench/naive_proxy.py``, under uvicorn)
    (c) tailgate: one gateway and one worker process, one Redis

Phases, each printing a line per step:

 1. warm-up            a few streams through each setup (imports, pools, scripts loaded)
 2. TTFT at 1 stream   one stream at a time, the setups interleaved; enqueue → start from the meta
 3. steady load        N concurrent streams (closed loop, 64–256 tokens 20 ms apart) per setup:
                       time to first token, per-chunk latency, CPU per token, enqueue → start
 4. saturation         ``redis-benchmark`` XADD, then many streams with 1 ms pacing: tokens/s
 5. sustained          rising levels of concurrent streams at 50 tokens/s until one does not hold
 6. idle connections   10,000 SSE connections to queued streams on a fresh gateway: RSS and
                       Redis connections

Results go to ``bench/results/`` (gitignored): ``<stamp>.json``, ``<stamp>.png``, ``<stamp>.md``,
and the processes' logs in ``logs/``. Every process started here is stopped at the end, on error and
on Ctrl-C too.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import psutil  # type: ignore[import-untyped]

from bench import report
from bench.procs import ROOT, Child, Procs, raise_fd_limit, redis_connections
from tailgate import keys
from tailgate.settings import Settings

RESULTS = ROOT / "bench" / "results"
STALL_MS = 200.0  # 10 × the 20 ms pacing
MOCK_TTFT_MS = 200


@dataclass(frozen=True)
class Plan:
    name: str
    ttft1_samples: int  # per setup
    ttft1_tokens: int
    steady_concurrency: int
    steady_tokens: tuple[int, int]
    steady_ramp_s: float
    steady_warmup_s: float
    steady_window_s: float
    sat_concurrency: int
    sat_tokens: int
    sat_warmup_s: float
    sat_window_s: float
    levels: tuple[int, ...]
    level_tokens: int
    level_ramp_s: float
    fan_in: int
    idle_connections: int
    idle_hold_s: float
    xadd_requests: int


FULL = Plan(
    name="full",
    ttft1_samples=20,
    ttft1_tokens=64,
    steady_concurrency=500,
    steady_tokens=(64, 256),
    steady_ramp_s=3.5,
    steady_warmup_s=5.0,
    steady_window_s=8.0,
    sat_concurrency=100,
    sat_tokens=200,
    sat_warmup_s=2.0,
    sat_window_s=6.0,
    levels=(50, 100, 150, 200, 300, 400, 500, 750, 1000, 1500, 2000),
    level_tokens=256,
    level_ramp_s=2.0,
    fan_in=1_000,
    idle_connections=10_000,
    idle_hold_s=20.0,
    xadd_requests=100_000,
)
QUICK = Plan(
    name="quick",
    ttft1_samples=3,
    ttft1_tokens=64,
    steady_concurrency=100,
    steady_tokens=(64, 128),
    steady_ramp_s=1.5,
    steady_warmup_s=2.0,
    steady_window_s=2.0,
    sat_concurrency=40,
    sat_tokens=100,
    sat_warmup_s=1.0,
    sat_window_s=2.0,
    levels=(50, 100, 200),
    level_tokens=64,
    level_ramp_s=1.0,
    fan_in=200,
    idle_connections=1_000,
    idle_hold_s=2.0,
    xadd_requests=20_000,
)

# Whose CPU time counts as the setup's cost per token. (a) has no server of its own: the mock's
# figure is shown for reference (it is the same in every setup).
SERVERS = {"a": ("mock",), "b": ("naive",), "c": ("gateway", "worker")}


class Bench:
    def __init__(self, plan: Plan, procs: Procs) -> None:
        self.plan = plan
        self.procs = procs
        self.t0 = time.monotonic()
        self.run_id = secrets.token_hex(3)
        self.raw: dict[str, dict[str, list[float]]] = {"ttft": {}, "latency": {}}
        self.r: dict[str, Any] = {
            "plan": asdict(plan),
            "cpus": os.cpu_count(),
            # The children get no TAILGATE_* from this environment (procs.Procs.base_env): defaults.
            "coalesce_ms": float(Settings.model_fields["coalesce_ms"].default),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def say(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {msg}", flush=True)

    # --- processes ---------------------------------------------------------------------------------

    def start(self) -> None:
        p = self.procs
        self.say("starting redis-server, mock upstream, naive proxy, gateway, worker, load client")
        p.start_redis()
        self.mock = p.start_mock()
        self.naive = p.start_naive()
        self.gateway = p.start_gateway()
        self.worker = p.start_worker()
        self.client = p.start_client()
        assert p.redis is not None
        self.redis_port = p.ports["redis"]
        self.accounted: dict[str, psutil.Process] = {
            "mock": self.mock.proc,
            "naive": self.naive.proc,
            "gateway": self.gateway.proc,
            "worker": self.worker.proc,
            "redis": p.redis.proc,
            "client": psutil.Process(self.client.popen.pid),
        }
        self.r["redis_version"] = _redis_version()
        self.r["code"] = _code_version()

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of each process the bench runs and of the bench itself; of the whole
        machine: time in tasks (``machine``), in interrupts (``irq``, mostly loopback networking) and
        taken by the hypervisor (``steal``). ``machine`` minus ours is what other processes took."""
        out = {}
        for name, proc in [*self.accounted.items(), ("bench", psutil.Process())]:
            t = proc.cpu_times()
            out[name] = float(t.user + t.system)
        m = psutil.cpu_times()
        out["machine"] = float(m.user + m.nice + m.system)
        out["irq"] = float(m.irq + m.softirq)
        out["steal"] = float(getattr(m, "steal", 0.0))
        return out

    def check_alive(self) -> None:
        assert self.procs.redis is not None
        for child in (self.procs.redis, self.mock, self.naive, self.gateway, self.worker):
            child.check()

    def settle(self, limit_s: float = 60.0) -> None:
        """Wait until the servers are idle (a setup's leftovers must not bill the next one)."""
        deadline = time.monotonic() + limit_s
        servers = ("mock", "naive", "gateway", "worker", "redis")
        last = sum(v for k, v in self.cpu().items() if k in servers)
        while time.monotonic() < deadline:
            time.sleep(0.3)
            now = sum(v for k, v in self.cpu().items() if k in servers)
            if (now - last) / 0.3 < 0.06:
                return
            last = now
        self.say(f"  (servers still busy after {limit_s:.0f}s; going on)")

    def port(self, setup: str) -> int:
        return self.procs.ports[{"a": "mock", "b": "naive", "c": "gateway"}[setup]]

    def streams(
        self, setup: str, tag: str, deadline_s: float, tick: Any = None, **spec: Any
    ) -> tuple[dict[str, Any], dict[str, float], float]:
        """One workload through the client; its answer, CPU seconds per process, wall seconds."""
        cmd = {
            "cmd": "streams",
            "setup": setup,
            "port": self.port(setup),
            "api_key": Procs.API_KEY,
            "tag": f"bench-{self.run_id}-{tag}-{setup}",
            "delay_ms": 20,
            "ttft_ms": MOCK_TTFT_MS,
            "deadline_s": deadline_s,
            **spec,
        }
        before, t = self.cpu(), time.monotonic()
        out = self.client.call(cmd, deadline_s + 60, tick)
        wall = time.monotonic() - t
        after = self.cpu()
        self.check_alive()
        used = {k: after[k] - before[k] for k in before}
        machine = used.pop("machine")
        ours = sum(v for k, v in used.items() if k not in ("irq", "steal"))
        used["other"] = max(machine - ours, 0.0)  # other processes on the machine: noise
        return out, used, wall

    def enqueue_to_start(self, ids: list[str]) -> list[float]:
        """``started_at − created_at`` in ms from each stream's meta hash."""
        r = self.procs.redis_client()
        try:
            pipe = r.pipeline(transaction=False)
            for stream_id in ids:
                pipe.hmget(keys.meta(stream_id), ["created_at", "started_at"])
            rows = pipe.execute()
        finally:
            r.close()
        return [float(s) - float(c) for c, s in rows if c and s]

    # --- phases ----------------------------------------------------------------------------------

    def warm_up(self) -> None:
        for s in "abc":
            out, _, _ = self.streams(
                s, "warm", 60, concurrency=50, count=100, tokens=[16, 16], ramp_s=0.5, samples=False
            )
            bad = [x["err"] for x in out["streams"] if not x["ok"]]
            if bad:
                raise RuntimeError(f"warm-up through ({s}) failed: {bad[:3]}")
        self.say("warm-up: 100 streams through each setup, all complete")

    def ttft_one(self) -> None:
        p = self.plan
        ttft: dict[str, list[float]] = {s: [] for s in "abc"}
        failed: dict[str, list[str]] = {s: [] for s in "abc"}
        ids, recs_c = [], []
        for i in range(p.ttft1_samples):
            for s in "abc":
                out, _, _ = self.streams(
                    s,
                    f"ttft1-{i}",
                    30,
                    concurrency=1,
                    count=1,
                    loop=False,
                    tokens=[p.ttft1_tokens] * 2,
                    samples=False,
                )
                rec = out["streams"][0]
                if not rec["ok"] or rec["ttft_ms"] is None:
                    failed[s].append(rec["err"])
                    continue
                ttft[s].append(rec["ttft_ms"])
                if s == "c":
                    ids.append(rec["id"])
                    recs_c.append(rec)
        res: dict[str, Any] = {
            "ttft": {s: report.summary(ttft[s]) for s in "abc"},
            "failed": {s: len(failed[s]) for s in "abc"},
            "errors": {s: failed[s][:3] for s in "abc"},
            "enqueue_start": report.summary(self.enqueue_to_start(ids)),
            "c_steps_ms": _steps(recs_c),
        }
        self.r["ttft1"] = res
        t = res["ttft"]
        self.say(
            f"TTFT at 1 stream, {p.ttft1_samples} each: p50 a {t['a']['p50']:.1f} / b {t['b']['p50']:.1f} / "
            f"c {t['c']['p50']:.1f} ms; enqueue → start p50 {res['enqueue_start']['p50']:.2f} ms"
        )

    def steady(self) -> None:
        p = self.plan
        res: dict[str, Any] = {}
        for s in "abc":
            self.settle()
            out, cpu, wall = self.streams(
                s,
                "steady",
                180,
                concurrency=p.steady_concurrency,
                tokens=list(p.steady_tokens),
                ramp_s=p.steady_ramp_s,
                warmup_s=p.steady_warmup_s,
                window_s=p.steady_window_s,
                loop=True,
                fill=True,
                samples=True,
            )
            recs = out["streams"]
            measured = [x for x in recs if x["measured"]]
            ttfts = [x["ttft_ms"] for x in measured if x["ttft_ms"] is not None]
            self.raw["ttft"][s], self.raw["latency"][s] = ttfts, out["latency_ms"]
            failed = [x for x in recs if not x["ok"]]
            res[s] = {
                "streams": len(recs),
                "measured": len(measured),
                "failed": len(failed),
                "errors": sorted({x["err"] for x in failed})[:3],
                "tokens": out["tokens"],
                "wall_s": wall,
                "deadline_hit": out["deadline_hit"],
                "ttft": report.summary(ttfts),
                "latency": report.summary(out["latency_ms"]),
                "gap": report.summary(out["gap_ms"]),
                "ttft_sketch": report.sketch(ttfts),
                "latency_sketch": report.sketch(out["latency_ms"]),
                "cpu_s": cpu,
                "cores_used": {k: v / wall for k, v in cpu.items()},
                "cpu_us_per_token": _per_token(cpu, out["tokens"]),
            }
            if s == "c":
                res[s]["enqueue_start"] = report.summary(
                    self.enqueue_to_start([x["id"] for x in measured if x["id"]])
                )
                res[s]["steps_ms"] = _steps(measured)
            q = res[s]
            self.say(
                f"{p.steady_concurrency} streams, ({s}): {q['streams']} streams ({q['measured']} measured, "
                f"{q['failed']} failed), TTFT p50/p99 {q['ttft']['p50']:.0f}/{q['ttft']['p99']:.0f} ms, "
                f"chunk latency p99 {q['latency']['p99']:.1f} ms, {q['tokens'] / wall:,.0f} tokens/s, "
                f"{_server_cpu(q['cpu_us_per_token'], s):.0f} µs CPU/token"
            )
        self.r["steady"] = {
            "ttft": {s: res[s]["ttft"] for s in "abc"},
            "latency": {s: res[s]["latency"] for s in "abc"},
            "enqueue_start": res["c"]["enqueue_start"],
            "setups": res,
        }

    def xadd(self) -> None:
        rps, how = redis_benchmark_xadd(self.redis_port, self.plan.xadd_requests)
        self.r["xadd_rps"], self.r["xadd_command"] = rps, how
        self.say(f"redis-benchmark XADD, 50 clients, unpipelined: {rps:,.0f} requests/s ({how})")

    def saturation(self) -> None:
        p = self.plan
        res: dict[str, Any] = {}
        for s in "abc":
            self.settle()
            out, cpu, wall = self.streams(
                s,
                "sat",
                120,
                concurrency=p.sat_concurrency,
                tokens=[p.sat_tokens] * 2,
                delay_ms=1,
                ttft_ms=0,
                ramp_s=0.5,
                warmup_s=p.sat_warmup_s,
                window_s=p.sat_window_s,
                loop=True,
                fill=False,
                samples=False,
            )
            failed = [x for x in out["streams"] if not x["ok"]]
            res[s] = {
                "tokens_per_s": out["window_tokens"] / out["window_s"],
                "streams": len(out["streams"]),
                "failed": len(failed),
                "errors": sorted({x["err"] for x in failed})[:3],
                "tokens": out["tokens"],
                "wall_s": wall,
                "cpu_s": cpu,
                "cores_used": {k: v / wall for k, v in cpu.items()},
                "cpu_us_per_token": _per_token(cpu, out["tokens"]),
            }
            q = res[s]
            self.say(
                f"saturation ({s}): {q['tokens_per_s']:,.0f} tokens/s delivered "
                f"({q['tokens_per_s'] / self.r['xadd_rps']:.2f}× XADD), {q['failed']} of {q['streams']} "
                f"streams failed, {_server_cpu(q['cpu_us_per_token'], s):.0f} µs CPU/token"
            )
        self.r["saturation"] = res

    def sustained(self) -> None:
        p = self.plan
        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in "abc"}
        live = {"max": 0, "clients": 0}

        def sample() -> None:
            try:
                conns = self.gateway.proc.net_connections(kind="tcp")
            except psutil.Error:
                return
            established = [c for c in conns if c.status == psutil.CONN_ESTABLISHED and c.raddr]
            to_redis = sum(1 for c in established if c.raddr.port == self.redis_port)
            clients = sum(1 for c in established if c.laddr.port == self.port("c"))
            if to_redis > live["max"] or (to_redis == live["max"] and clients > live["clients"]):
                live["max"], live["clients"] = to_redis, clients

        for s in "abc":
            for level in p.levels:
                self.settle()
                out, cpu, wall = self.streams(
                    s,
                    f"level{level}",
                    120,
                    tick=sample if s == "c" else None,
                    concurrency=level,
                    count=level,
                    loop=False,
                    ramp_s=p.level_ramp_s,
                    tokens=[p.level_tokens] * 2,
                    samples=True,
                )
                recs = out["streams"]
                lost = [x for x in recs if not x["ok"]]
                max_gap = max((x["max_gap_ms"] for x in recs), default=math.inf)
                late = max(((x["ttft_ms"] or math.inf) - MOCK_TTFT_MS for x in recs), default=math.inf)
                if lost or len(recs) < level:
                    first = lost[0]["err"] if lost else "not started"
                    why = f"{len(lost) + level - len(recs)} streams incomplete ({first})"
                elif max_gap > STALL_MS:
                    why = f"a {max_gap:,.0f} ms gap between chunks"
                else:
                    why = ""
                run = {
                    "level": level,
                    "held": not why,
                    # Stricter: the wait for the first token counts as a gap too.
                    "held_first_token": not why and late <= STALL_MS,
                    "why": why,
                    "streams": len(recs),
                    "incomplete": len(lost) + level - len(recs),
                    "max_gap_ms": max_gap,
                    "max_late_ms": late,
                    "ttft": report.summary([x["ttft_ms"] for x in recs if x["ttft_ms"] is not None]),
                    "latency": report.summary(out["latency_ms"]),
                    "tokens": out["tokens"],
                    "wall_s": wall,
                    "cores_used": {k: v / wall for k, v in cpu.items()},
                }
                runs[s].append(run)
                self.say(
                    f"sustained ({s}) {level:>5} streams at 50 tokens/s: "
                    + ("held" if not why else f"did not hold: {why}")
                    + f" (worst gap {max_gap:,.0f} ms; first token up to {late:,.0f} ms late)"
                )
                if why:
                    break
        held = {s: _top_level(runs[s], "held") for s in "abc"}
        held_strict = {s: _top_level(runs[s], "held_first_token") for s in "abc"}
        common = min(held_strict.values())
        at = {s: next((r for r in runs[s] if r["level"] == common), {}) for s in "abc"}
        self.r["sustained"] = {
            "levels": list(p.levels),
            "runs": runs,
            "held": held,
            "held_first_token": held_strict,
            # Latency where every setup still keeps up: the highest level all three held, first
            # tokens included.
            "common_level": common,
            "at_common": {s: {"ttft": at[s]["ttft"], "latency": at[s]["latency"]} for s in "abc"}
            if common
            else None,
        }
        self.r["redis_connections"] = {"live_max": live["max"], "live_clients": live["clients"]}

    def fan_in(self) -> None:
        """Redis connections of the main gateway while it serves ``fan_in`` live SSE clients: slow
        streams (10 tokens 500 ms apart), so the load stays far below what the worker can carry."""
        n = self.plan.fan_in
        seen = {"redis": 0, "clients": 0}

        def sample() -> None:
            try:
                conns = self.gateway.proc.net_connections(kind="tcp")
            except psutil.Error:
                return
            established = [c for c in conns if c.status == psutil.CONN_ESTABLISHED and c.raddr]
            clients = sum(1 for c in established if c.laddr.port == self.port("c"))
            to_redis = sum(1 for c in established if c.raddr.port == self.redis_port)
            seen["redis"] = max(seen["redis"], to_redis)
            seen["clients"] = max(seen["clients"], clients)

        self.settle()
        out, _, _ = self.streams(
            "c",
            "fanin",
            120,
            tick=sample,
            concurrency=n,
            count=n,
            loop=False,
            ramp_s=2.0,
            tokens=[10, 10],
            delay_ms=500,
            samples=False,
        )
        failed = sum(1 for x in out["streams"] if not x["ok"])
        self.r["redis_connections"] |= {"fan_in_clients": seen["clients"], "fan_in_max": seen["redis"]}
        self.say(
            f"live fan-in: {n:,} slow streams on the main gateway ({failed} failed), at most "
            f"{seen['clients']:,} client connections at once; gateway held {seen['redis']} Redis connections"
        )

    def idle(self) -> None:
        p = self.plan
        n = p.idle_connections
        self.say(f"idle connections: a fresh gateway on a queue no worker serves; creating {n:,} streams")
        g = self.procs.start_gateway("gateway-idle", TAILGATE_QUEUE_NAME=f"bench:idle:{self.run_id}")
        port = self.procs.ports["gateway-idle"]
        base = {"port": port, "api_key": Procs.IDLE_KEY}
        made = self.client.call(
            {
                "cmd": "create",
                **base,
                "count": n,
                "concurrency": 32,
                "tag": f"bench-{self.run_id}",
                "deadline_s": 600,
            },
            660,
        )
        if made["created"] != n:
            raise RuntimeError(f"created {made['created']} of {n} streams: {made['failures']}")
        time.sleep(1.0)
        rss0 = _rss(g)
        first = min(1000, n)
        h1 = self.client.call(
            {"cmd": "hold", **base, "from": 0, "count": first, "concurrency": 256, "deadline_s": 300}, 360
        )
        time.sleep(0.5)
        conns_1000 = redis_connections(g, self.redis_port)
        self.say(
            f"idle connections: {made['created']:,} streams created in {made['wall_s']:.1f}s; "
            f"{h1['held']:,} SSE connections held, gateway has {conns_1000} Redis connections"
        )
        h2 = h1
        if n > first:
            h2 = self.client.call(
                {
                    "cmd": "hold",
                    **base,
                    "from": first,
                    "count": n - first,
                    "concurrency": 256,
                    "deadline_s": 300,
                },
                360,
            )
        time.sleep(2.0)
        rss1 = _rss(g)
        conns_all = redis_connections(g, self.redis_port)
        held_now = self.client.call({"cmd": "check"}, 30)["held"]
        self.say(
            f"idle connections: {held_now:,} held; gateway RSS {rss0 / 2**20:.1f} → {rss1 / 2**20:.1f} MiB "
            f"({(rss1 - rss0) / max(held_now, 1) / 1024:.1f} KiB each), {conns_all} Redis connections; "
            f"holding {p.idle_hold_s:.0f}s"
        )
        time.sleep(p.idle_hold_s)
        held_after = self.client.call({"cmd": "check"}, 30)["held"]
        rss2 = _rss(g)
        self.client.call({"cmd": "release"}, 60)
        self.procs.stop(g)
        self.r["idle"] = {
            "connections": n,
            "create_s": made["wall_s"],
            "open_failures": h1["failed"] + (h2["failed"] if h2 is not h1 else 0),
            "held": held_now,
            "held_after": held_after,
            "held_after_s": p.idle_hold_s,
            "rss_before": rss0,
            "rss_after": rss1,
            "rss_end": rss2,
            "kib_per_connection": (rss1 - rss0) / n / 1024,
        }
        self.r["redis_connections"] |= {"idle_1000": conns_1000, "idle_all": conns_all}
        self.say(f"idle connections: {held_after:,} of {n:,} still held after {p.idle_hold_s:.0f}s; released")

    # --- the whole run -------------------------------------------------------------------------

    def run(self) -> None:
        self.start()
        self.warm_up()
        self.ttft_one()
        self.steady()
        self.xadd()
        self.saturation()
        self.sustained()
        self.fan_in()
        self.idle()
        self.r["wall_s"] = time.monotonic() - self.t0
        self.r["cpu_us_per_token"] = {
            "steady": {s: _server_cpu(self.r["steady"]["setups"][s]["cpu_us_per_token"], s) for s in "abc"},
            "saturation": {s: _server_cpu(self.r["saturation"][s]["cpu_us_per_token"], s) for s in "abc"},
        }
        self.r["cores_used"] = {
            "steady": {s: self.r["steady"]["setups"][s]["cores_used"] for s in "abc"},
            "saturation": {s: self.r["saturation"][s]["cores_used"] for s in "abc"},
        }


def _steps(recs: list[dict[str, Any]]) -> dict[str, Any]:
    """(c)'s time to first token in steps, from sending the POST: its answer, the `started` event
    (the worker has claimed the stream), then the first delta (the model's own TTFT inside)."""
    full = [x for x in recs if x["ok"] and x["posted_ms"] is not None and x["started_ms"] is not None]
    return {
        "posted": report.summary([x["posted_ms"] for x in full]),
        "started": report.summary([x["started_ms"] for x in full]),
        "started_to_token": report.summary([x["ttft_ms"] - x["started_ms"] for x in full]),
    }


def _top_level(runs: list[dict[str, Any]], flag: str) -> int:
    """The highest level such that it and every level below it held."""
    top = 0
    for run in runs:
        if not run[flag]:
            break
        top = run["level"]
    return top


def _per_token(cpu: dict[str, float], tokens: int) -> dict[str, float]:
    return {k: v / tokens * 1e6 if tokens else math.nan for k, v in cpu.items()}


def _server_cpu(per_token: dict[str, float], setup: str) -> float:
    return sum(per_token[p] for p in SERVERS[setup])


def _rss(child: Child) -> int:
    return child.rss()


def _redis_version() -> str:
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, check=False).stdout
    m = re.search(r"v=(\S+)", out)
    return m.group(1) if m else out.strip()


def _code_version() -> dict[str, Any]:
    """The commit measured and the product files that differed from it (read-only git)."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
            ).stdout.strip()
        except OSError:
            return ""

    changed = git("status", "--porcelain", "--", "gateway", "worker", "tailgate", "pyproject.toml")
    return {"commit": git("rev-parse", "--short", "HEAD"), "changed": changed.splitlines()}


def redis_benchmark_xadd(port: int, requests: int) -> tuple[float, str]:
    """XADD requests/s, 50 clients, unpipelined. ``-t xadd`` where this redis-benchmark has it,
    otherwise the same command given explicitly."""
    base = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-c", "50", "-n", str(requests), "-q"]
    for extra, how in (
        (["-t", "xadd"], "-t xadd"),
        (["XADD", "bench:xadd", "*", "f", "v"], "XADD bench:xadd * f v"),
    ):
        out = subprocess.run(base + extra, capture_output=True, text=True, timeout=300, check=False).stdout
        found = re.findall(r"([\d.]+) requests per second", out.replace("\r", "\n"))
        if found:
            return float(found[-1]), how
    raise RuntimeError(f"redis-benchmark printed no requests per second: {out[-500:]!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run in about 2 minutes")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    fds = raise_fd_limit()
    if fds < plan.idle_connections + 1000:
        print(
            f"bench: open-file limit is {fds}; the idle phase needs {plan.idle_connections + 1000}",
            file=sys.stderr,
        )
        return 2
    RESULTS.mkdir(parents=True, exist_ok=True)
    procs = Procs(RESULTS / "logs")
    bench = Bench(plan, procs)
    bench.say(f"tailgate bench, {plan.name} run, {os.cpu_count()} CPUs, logs in {procs.log_dir}")
    try:
        bench.run()
    except KeyboardInterrupt:
        bench.say("interrupted: stopping every process")
        return 130
    except Exception as exc:
        bench.say(f"failed: {type(exc).__name__}: {exc}")
        bench.say(f"process logs: {procs.log_dir}")
        return 1
    finally:
        procs.close()

    stamp = time.strftime("%Y%m%d-%H%M%S")
    r = bench.r
    md = report.table(r)
    notes = report.notes(r)
    json_path, png_path, md_path = (RESULTS / f"{stamp}-{plan.name}.{ext}" for ext in ("json", "png", "md"))
    report.write_json(r, json_path)
    md_path.write_text(md + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    report.plot(r, bench.raw, png_path)
    print()
    print(md)
    print()
    for n in notes:
        print(f"- {n}")
    print()
    print(f"results: {json_path.relative_to(ROOT)}, {md_path.relative_to(ROOT)}")
    print(f"plot:    {png_path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
