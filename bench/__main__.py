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
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import psutil  # type: ignore[import-untyped]
import redis

from bench import report
from bench.client import Load
from bench.procs import RESULTS, ROOT, Procs, connections, raise_fd_limit
from tailgate import keys
from tailgate.settings import Settings

STALL_MS = 200.0  # 10 × the 20 ms pacing
MOCK_TTFT_MS = 200
PORTS = {"a": "mock", "b": "naive", "c": "gateway"}
# Whose CPU time counts as the setup's cost per token. (a) has no server of its own: the mock's
# figure is shown for reference (it is the same in every setup).
SERVERS = {"a": ("mock",), "b": ("naive",), "c": ("gateway", "worker")}


@dataclass(frozen=True)
class Plan:
    """The sizes of a run: ``FULL``, or ``QUICK`` for a smoke run."""

    name: str
    ttft1_samples: int  # per setup
    steady: Load
    sat: Load
    levels: tuple[int, ...]
    level: Load  # a level of the sustained phase; its concurrency and count are the level
    fan_in: int
    idle_connections: int
    idle_hold_s: float
    xadd_requests: int


SAT = Load(0, (0, 0), delay_ms=1, ttft_ms=0, ramp_s=0.5, fill=False, samples=False)
FULL = Plan(
    name="full",
    ttft1_samples=20,
    steady=Load(500, (64, 256), ramp_s=3.5, warmup_s=5.0, window_s=8.0),
    sat=replace(SAT, concurrency=100, tokens=(200, 200), warmup_s=2.0, window_s=6.0),
    levels=(50, 100, 150, 200, 300, 400, 500, 750, 1000, 1500, 2000),
    level=Load(0, (256, 256), loop=False, ramp_s=2.0),
    fan_in=1_000,
    idle_connections=10_000,
    idle_hold_s=20.0,
    xadd_requests=100_000,
)
QUICK = Plan(
    name="quick",
    ttft1_samples=3,
    steady=Load(100, (64, 128), ramp_s=1.5, warmup_s=2.0, window_s=2.0),
    sat=replace(SAT, concurrency=40, tokens=(100, 100), warmup_s=1.0, window_s=2.0),
    levels=(50, 100, 200),
    level=Load(0, (64, 64), loop=False, ramp_s=1.0),
    fan_in=200,
    idle_connections=1_000,
    idle_hold_s=2.0,
    xadd_requests=20_000,
)


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
            # The children get no TAILGATE_* from this environment (``child_env``): defaults.
            "coalesce_ms": float(Settings.model_fields["coalesce_ms"].default),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def say(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {msg}", flush=True)

    def start(self) -> None:
        p = self.procs
        self.say("starting redis-server, mock upstream, naive proxy, gateway, worker, load client")
        p.start_redis()
        servers = {"mock": p.start_mock(), "naive": p.start_naive(), "gateway": p.start_gateway()}
        servers["worker"] = p.start_worker()
        self.client = p.start_client()
        self.redis_port = p.redis.port
        pids = {name: child.pid for name, child in servers.items()} | {"client": self.client.pid}
        self.accounted = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.accounted["redis"] = psutil.Process(p.redis.pid)
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

    def settle(self, limit_s: float = 60.0) -> None:
        """Wait until the servers are idle (a setup's leftovers must not bill the next one)."""
        servers = ("mock", "naive", "gateway", "worker", "redis")
        deadline = time.monotonic() + limit_s
        last = sum(self.cpu()[k] for k in servers)
        while time.monotonic() < deadline:
            time.sleep(0.3)
            now = sum(self.cpu()[k] for k in servers)
            if (now - last) / 0.3 < 0.06:
                return
            last = now
        self.say(f"  (servers still busy after {limit_s:.0f}s; going on)")

    def streams(
        self,
        setup: str,
        tag: str,
        load: Load,
        deadline_s: float = 120,
        tick: Callable[[], None] | None = None,
    ) -> tuple[dict[str, Any], dict[str, float], float]:
        """One workload through the client; its answer, CPU seconds per process, wall seconds."""
        port, tag = self.procs.ports[PORTS[setup]], f"bench-{self.run_id}-{tag}-{setup}"
        before, t = self.cpu(), time.monotonic()
        at = {"setup": setup, "port": port, "api_key": Procs.API_KEY, "tag": tag}
        out = self.client.call("streams", deadline_s + 60, tick=tick, load=load, deadline_s=deadline_s, **at)
        wall, after = time.monotonic() - t, self.cpu()
        for child in self.procs.children.values():
            child.check()
        used = {k: after[k] - before[k] for k in before}
        machine = used.pop("machine")
        ours = sum(v for k, v in used.items() if k not in ("irq", "steal"))
        used["other"] = max(machine - ours, 0.0)  # other processes on the machine: noise
        return out, used, wall

    def load(self, setup: str, tag: str, load: Load, deadline_s: float) -> dict[str, Any]:
        """:meth:`streams` after :meth:`settle`, summed up: what steady load and saturation share."""
        self.settle()
        out, cpu, wall = self.streams(setup, tag, load, deadline_s)
        failed = [x for x in out["streams"] if not x["ok"]]
        per_token = {k: v / out["tokens"] * 1e6 if out["tokens"] else math.nan for k, v in cpu.items()}
        return {
            "out": out,
            "streams": len(out["streams"]),
            "failed": len(failed),
            "errors": sorted({x["err"] for x in failed})[:3],
            "tokens": out["tokens"],
            "wall_s": wall,
            "cpu_s": cpu,
            "cores_used": {k: v / wall for k, v in cpu.items()},
            "cpu_us_per_token": per_token,
        }

    def gateway_watch(self) -> tuple[Callable[[], None], list[tuple[int, int]]]:
        """A ``tick`` that samples the main gateway's (Redis, client) connections, and the samples."""
        seen: list[tuple[int, int]] = [(0, 0)]
        pid, port = self.procs.children["gateway"].pid, self.procs.ports["gateway"]
        return lambda: seen.append(connections(pid, self.redis_port, port)), seen

    def enqueue_to_start(self, ids: list[str]) -> dict[str, float | int]:
        """``started_at − created_at`` in ms from each stream's meta hash, summed up."""
        with redis.Redis.from_url(self.procs.redis.url, decode_responses=True) as r:
            pipe = r.pipeline(transaction=False)
            for stream_id in ids:
                pipe.hmget(keys.meta(stream_id), ["created_at", "started_at"])
            rows = pipe.execute()
        return report.summary([float(s) - float(c) for c, s in rows if c and s])

    # --- phases ----------------------------------------------------------------------------------

    def warm_up(self) -> None:
        for s in "abc":
            out, _, _ = self.streams(s, "warm", Load(50, (16, 16), count=100, ramp_s=0.5, samples=False), 60)
            bad = [x["err"] for x in out["streams"] if not x["ok"]]
            if bad:
                raise RuntimeError(f"warm-up through ({s}) failed: {bad[:3]}")
        self.say("warm-up: 100 streams through each setup, all complete")

    def ttft_one(self) -> None:
        p = self.plan
        recs: dict[str, list[dict[str, Any]]] = {s: [] for s in "abc"}
        one = Load(1, (64, 64), count=1, loop=False, samples=False)
        for i in range(p.ttft1_samples):
            for s in "abc":
                recs[s] += self.streams(s, f"ttft1-{i}", one, 30)[0]["streams"]
        ok = {s: [x for x in recs[s] if x["ok"] and x["ttft_ms"] is not None] for s in "abc"}
        failed = {s: [x["err"] for x in recs[s] if x not in ok[s]] for s in "abc"}
        res = self.r["ttft1"] = {
            "ttft": {s: report.summary([x["ttft_ms"] for x in ok[s]]) for s in "abc"},
            "failed": {s: len(failed[s]) for s in "abc"},
            "errors": {s: failed[s][:3] for s in "abc"},
            "enqueue_start": self.enqueue_to_start([x["id"] for x in ok["c"]]),
            "c_steps_ms": _steps(ok["c"]),
        }
        t = res["ttft"]
        self.say(
            f"TTFT at 1 stream, {p.ttft1_samples} each: p50 a {t['a']['p50']:.1f} / b {t['b']['p50']:.1f} / "
            f"c {t['c']['p50']:.1f} ms; enqueue → start p50 {res['enqueue_start']['p50']:.2f} ms"
        )

    def steady(self) -> None:
        p = self.plan
        res: dict[str, Any] = {}
        for s in "abc":
            q = res[s] = self.load(s, "steady", p.steady, 180)
            out = q.pop("out")
            measured = [x for x in out["streams"] if x["measured"]]
            ttfts = [x["ttft_ms"] for x in measured if x["ttft_ms"] is not None]
            self.raw["ttft"][s], self.raw["latency"][s] = ttfts, out["latency_ms"]
            q |= {"measured": len(measured), "deadline_hit": out["deadline_hit"]}
            q |= {"ttft": report.summary(ttfts), "latency": report.summary(out["latency_ms"])}
            q |= {"gap": report.summary(out["gap_ms"]), "ttft_sketch": report.sketch(ttfts)}
            q["latency_sketch"] = report.sketch(out["latency_ms"])
            if s == "c":
                q["enqueue_start"] = self.enqueue_to_start([x["id"] for x in measured if x["id"]])
                q["steps_ms"] = _steps(measured)
            self.say(
                f"{p.steady.concurrency} streams, ({s}): {q['streams']} streams ({q['measured']} measured, "
                f"{q['failed']} failed), TTFT p50/p99 {q['ttft']['p50']:.0f}/{q['ttft']['p99']:.0f} ms, "
                f"chunk latency p99 {q['latency']['p99']:.1f} ms, {q['tokens'] / q['wall_s']:,.0f} tokens/s, "
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
            q = res[s] = self.load(s, "sat", p.sat, 120)
            out = q.pop("out")
            q["tokens_per_s"] = out["window_tokens"] / out["window_s"]
            self.say(
                f"saturation ({s}): {q['tokens_per_s']:,.0f} tokens/s delivered "
                f"({q['tokens_per_s'] / self.r['xadd_rps']:.2f}× XADD), {q['failed']} of {q['streams']} "
                f"streams failed, {_server_cpu(q['cpu_us_per_token'], s):.0f} µs CPU/token"
            )
        self.r["saturation"] = res

    def sustained(self) -> None:
        p = self.plan
        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in "abc"}
        tick, seen = self.gateway_watch()
        for s in "abc":
            for level in p.levels:
                self.settle()
                load = replace(p.level, concurrency=level, count=level)
                out, cpu, wall = self.streams(s, f"level{level}", load, tick=tick if s == "c" else None)
                recs = out["streams"]
                lost = [x for x in recs if not x["ok"]]
                max_gap = max((x["max_gap_ms"] for x in recs), default=math.inf)
                late = max(((x["ttft_ms"] or math.inf) - MOCK_TTFT_MS for x in recs), default=math.inf)
                why = ""
                if lost or len(recs) < level:
                    first = lost[0]["err"] if lost else "not started"
                    why = f"{len(lost) + level - len(recs)} streams incomplete ({first})"
                elif max_gap > STALL_MS:
                    why = f"a {max_gap:,.0f} ms gap between chunks"
                runs[s].append(
                    {
                        "level": level,
                        "held": not why,
                        # Stricter: the wait for the first token counts as a gap too.
                        "held_first_token": not why and late <= STALL_MS,
                        "why": why,
                        "max_gap_ms": max_gap,
                        "max_late_ms": late,
                        "ttft": report.summary([x["ttft_ms"] for x in recs if x["ttft_ms"] is not None]),
                        "latency": report.summary(out["latency_ms"]),
                        "cores_used": {k: v / wall for k, v in cpu.items()},
                    }
                )
                self.say(
                    f"sustained ({s}) {level:>5} streams at 50 tokens/s: "
                    + (f"did not hold: {why}" if why else "held")
                    + f" (worst gap {max_gap:,.0f} ms; first token up to {late:,.0f} ms late)"
                )
                if why:
                    break
        held = {s: _top_level(runs[s], "held") for s in "abc"}
        held_strict = {s: _top_level(runs[s], "held_first_token") for s in "abc"}
        # Latency where every setup still keeps up: the highest level all three held, first tokens included.
        common = min(held_strict.values())
        at = {s: next((r for r in runs[s] if r["level"] == common), {}) for s in "abc"}
        self.r["sustained"] = {
            "levels": list(p.levels),
            "runs": runs,
            "held": held,
            "held_first_token": held_strict,
            "common_level": common,
            "at_common": {s: {"ttft": at[s]["ttft"], "latency": at[s]["latency"]} for s in "abc"}
            if common
            else None,
        }
        live_max, live_clients = max(seen)
        self.r["redis_connections"] = {"live_max": live_max, "live_clients": live_clients}

    def fan_in(self) -> None:
        """Redis connections of the main gateway while it serves ``fan_in`` live SSE clients: slow
        streams (10 tokens 500 ms apart), so the load stays far below what the worker can carry."""
        n = self.plan.fan_in
        tick, seen = self.gateway_watch()
        self.settle()
        slow = Load(n, (10, 10), count=n, loop=False, ramp_s=2.0, delay_ms=500, samples=False)
        out, _, _ = self.streams("c", "fanin", slow, tick=tick)
        failed = sum(1 for x in out["streams"] if not x["ok"])
        most_redis, most_clients = max(r for r, _ in seen), max(c for _, c in seen)
        self.r["redis_connections"] |= {"fan_in_clients": most_clients, "fan_in_max": most_redis}
        self.say(
            f"live fan-in: {n:,} slow streams on the main gateway ({failed} failed), at most "
            f"{most_clients:,} client connections at once; gateway held {most_redis} Redis connections"
        )

    def idle(self) -> None:
        p, n = self.plan, self.plan.idle_connections
        self.say(f"idle connections: a fresh gateway on a queue no worker serves; creating {n:,} streams")
        g = self.procs.start_gateway("gateway-idle", TAILGATE_QUEUE_NAME=f"bench:idle:{self.run_id}")
        at: dict[str, Any] = {"port": self.procs.ports["gateway-idle"], "api_key": Procs.IDLE_KEY}
        made = self.client.call("create", 660, count=n, tag=f"bench-{self.run_id}", **at)
        if made["created"] != n:
            raise RuntimeError(f"created {made['created']} of {n} streams: {made['failures']}")

        def rss() -> int:
            return int(psutil.Process(g.pid).memory_info().rss)

        time.sleep(1.0)
        rss0, first = rss(), min(1000, n)
        h1 = self.client.call("hold", 360, start=0, count=first, **at)
        time.sleep(0.5)
        conns_1000 = connections(g.pid, self.redis_port)[0]
        self.say(
            f"idle connections: {made['created']:,} streams created in {made['wall_s']:.1f}s; "
            f"{h1['held']:,} SSE connections held, gateway has {conns_1000} Redis connections"
        )
        h2 = self.client.call("hold", 360, start=first, count=n - first, **at) if n > first else {"failed": 0}
        time.sleep(2.0)
        rss1, conns_all, held_now = (
            rss(),
            connections(g.pid, self.redis_port)[0],
            self.client.call("check")["held"],
        )
        self.say(
            f"idle connections: {held_now:,} held; gateway RSS {rss0 / 2**20:.1f} → {rss1 / 2**20:.1f} MiB "
            f"({(rss1 - rss0) / max(held_now, 1) / 1024:.1f} KiB each), {conns_all} Redis connections; "
            f"holding {p.idle_hold_s:.0f}s"
        )
        time.sleep(p.idle_hold_s)
        held_after, rss2 = self.client.call("check")["held"], rss()
        self.client.call("release")
        self.procs.stop("gateway-idle")
        self.r["idle"] = {
            "connections": n,
            "create_s": made["wall_s"],
            "open_failures": h1["failed"] + h2["failed"],
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

    def run(self) -> None:
        self.start()
        phases = (self.warm_up, self.ttft_one, self.steady, self.xadd, self.saturation, self.sustained)
        for phase in (*phases, self.fan_in, self.idle):
            phase()
        self.r["wall_s"] = time.monotonic() - self.t0
        loads = {"steady": self.r["steady"]["setups"], "saturation": self.r["saturation"]}
        self.r["cpu_us_per_token"] = {
            name: {s: _server_cpu(res[s]["cpu_us_per_token"], s) for s in "abc"}
            for name, res in loads.items()
        }
        self.r["cores_used"] = {name: {s: res[s]["cores_used"] for s in "abc"} for name, res in loads.items()}


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


def _server_cpu(per_token: dict[str, float], setup: str) -> float:
    return sum(per_token[p] for p in SERVERS[setup])


def _run(*argv: str, timeout: float = 10) -> str:
    try:
        return subprocess.run(
            argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
        ).stdout
    except OSError:
        return ""


def _redis_version() -> str:
    out = _run("redis-server", "--version")
    m = re.search(r"v=(\S+)", out)
    return m.group(1) if m else out.strip()


def _code_version() -> dict[str, Any]:
    """The commit measured and the product files that differed from it (read-only git)."""
    changed = _run("git", "status", "--porcelain", "--", "gateway", "worker", "tailgate", "pyproject.toml")
    return {"commit": _run("git", "rev-parse", "--short", "HEAD").strip(), "changed": changed.splitlines()}


def redis_benchmark_xadd(port: int, requests: int) -> tuple[float, str]:
    """XADD requests/s, 50 clients, unpipelined. ``-t xadd`` where this redis-benchmark has it,
    otherwise the same command given explicitly."""
    base = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-c", "50", "-n", str(requests), "-q"]
    out = ""
    for how in ("-t xadd", "XADD bench:xadd * f v"):
        out = _run(*base, *how.split(), timeout=300)
        found = re.findall(r"([\d.]+) requests per second", out.replace("\r", "\n"))
        if found:
            return float(found[-1]), how
    raise RuntimeError(f"redis-benchmark printed no requests per second: {out[-500:]!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run in about 2 minutes")
    plan = QUICK if parser.parse_args(argv).quick else FULL

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # as Ctrl-C: stop every process in order
    fds = raise_fd_limit()
    if fds < plan.idle_connections + 1000:
        print(
            f"bench: open-file limit is {fds}; the idle phase needs {plan.idle_connections + 1000}",
            file=sys.stderr,
        )
        return 2
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
    print("\n" + report.write(bench.r, bench.raw, RESULTS / f"{stamp}-{plan.name}", ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
