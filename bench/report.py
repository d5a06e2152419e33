"""Figures from the raw measurements: percentiles, the markdown table, the JSON file and the plot.

Every latency figure of (b) and (c) is shown as a difference against (a), the clients straight to
the mock upstream, measured in the same run; throughput as a ratio to (a) and to ``redis-benchmark``.
The table is a list of row functions (``ROWS``), each with the phases it reads (a run with ``--only``
shows the rows of its phases); under it, issue #11's ``GOALS``, each met or missed. The soak
(``bench/soak.py``) shares the percentiles, the markdown and the figure.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tailgate import tuning

R = dict[str, Any]
Rows = Iterator[tuple[str, ...]]
SETUPS = {"a": "(a) direct to mock", "b": "(b) naive proxy", "c": "(c) tailgate"}
_LABELS = {"other": "other processes", "bench": "bench parent"}  # the rest by their own names
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks; NaN for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(values: Sequence[float]) -> dict[str, float | int]:
    """How many ``values`` there are, their p50, p90, p99 and p99.9, and the largest (the 100th)."""
    qs = {"p50": 50, "p90": 90, "p99": 99, "p999": 99.9, "max": 100}
    return {"n": len(values)} | {k: pct(values, q) for k, q in qs.items()}


def _ms(x: float, digits: int = 1) -> str:
    if math.isnan(x):
        return "n/a"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.{digits}f}"


def _signed(x: float) -> str:
    return "n/a" if math.isnan(x) else ("+" if x >= 0 else "−") + _ms(abs(x))


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def p50_99(t: R, digits: int = 1) -> str:
    return f"{_ms(t['p50'], digits)} / {_ms(t['p99'], digits)} ms"


def added(res: R, figure: str, q: str = "p99") -> dict[str, float]:
    """Each setup's ``figure`` (a summary) at percentile ``q``, minus (a)'s."""
    return {s: res[s][figure][q] - res["a"][figure][q] for s in "abc"}


def _top_level(runs: list[R], flag: str) -> int:
    """The highest level of the sustained phase such that it and every level below it held."""
    return max((run["level"] for run in itertools.takewhile(lambda run: run[flag], runs)), default=0)


def _n(r: R) -> int:
    return int(r["plan"]["steady"]["concurrency"])


def _ttft_added(res: R) -> tuple[dict[str, str], bool]:
    """(b)'s and (c)'s time to first token added to (a)'s, p50 / p99, and whether (c) adds ≤ 5 / ≤ 15 ms."""
    p50, p99 = added(res, "ttft", "p50"), added(res, "ttft")
    return {s: f"**{_signed(p50[s])} / {_signed(p99[s])}**" for s in "bc"}, p50["c"] <= 5 and p99["c"] <= 15


def _ttft(label: str, res: R) -> Rows:
    add, ok = _ttft_added(res)
    a, b, c = (p50_99(res[s]["ttft"]) + (f" ({add[s]})" if s in add else "") for s in "abc")
    yield f"time to first token at {label}", "added ≤ 5 / ≤ 15 ms", a, b, c, _verdict(ok)


def _enqueue(r: R) -> Rows:
    n, e1, en = _n(r), r["peer"]["1"]["c"]["enqueue_start"], r["steady"]["c"]["enqueue_start"]
    ok1, okn = (_verdict(e["p50"] <= 3 and e["p99"] <= 10) for e in (e1, en))
    label = f"enqueue → job start (meta `started_at − created_at`), p50 / p99, at 1 / at {n} streams"
    yield label, "≤ 3 / ≤ 10 ms", "—", "—", f"{p50_99(e1, 2)}; {p50_99(en, 2)}", f"{ok1} at 1, {okn} at {n}"


def _latency(r: R) -> Rows:
    steady, most = r["steady"], r["coalesce_ms"] + 10
    add = added(steady, "latency")
    b, c = (f"{p50_99(steady[s]['latency'], 2)} (**{_signed(add[s])}**)" for s in "bc")
    label = f"per-chunk latency (mock's send stamp → client), p50 / p99, at {_n(r)} streams; added = p99"
    goal = f"added ≤ coalescing {r['coalesce_ms']:g} + 10 = {most:g} ms"
    yield f"{label} difference", goal, p50_99(steady["a"]["latency"], 2), b, c, _verdict(add["c"] <= most)


def _within_capacity(r: R) -> Rows:
    """Latency where every setup still keeps up: the highest level all three held, first tokens too."""
    runs, most = r["sustained"]["runs"], r["coalesce_ms"] + 10
    if not (common := min(_top_level(runs[s], "held_first_token") for s in "abc")):
        return
    at = {s: next(x for x in runs[s] if x["level"] == common) for s in "abc"}
    (ttft, ok), lat = _ttft_added(at), added(at, "latency")
    label = (
        "within capacity: time to first token p50 / p99 and per-chunk latency p99 at "
        f"{common:,} streams, {r['plan']['level']['tokens'][0]} tokens each (the most all three "
        "sustained with first tokens ≤ 200 ms late)"
    )
    a = f"{p50_99(at['a']['ttft'])}; {_ms(at['a']['latency']['p99'], 2)} ms"
    b, c = (f"{ttft[s]}; **{_signed(lat[s])}** ms" for s in "bc")
    yield label, f"added ≤ 5 / ≤ 15 ms; ≤ {most:g} ms", a, b, c, _verdict(ok and lat["c"] <= most)


def _saturation(r: R) -> Rows:
    xadd, tps = r["xadd_rps"], {s: r["saturation"][s]["tokens_per_s"] for s in "abc"}
    label = (
        f"delivered tokens/s at saturation ({r['plan']['sat']['concurrency']} streams, 1 ms pacing); "
        f"ratio to (a) and to `redis-benchmark` XADD ({xadd:,.0f}/s, 50 clients)"
    )
    b, c = (f"{tps[s]:,.0f} ({tps[s] / tps['a']:.2f}× a, **{tps[s] / xadd:.2f}× XADD**)" for s in "bc")
    a = f"{tps['a']:,.0f} ({tps['a'] / xadd:.2f}× XADD)"
    yield label, "(c) ≥ 0.3 × XADD", a, b, c, _verdict(tps["c"] / xadd >= 0.3)


def _sustained(r: R) -> Rows:
    runs, held, cells = r["sustained"]["runs"], {}, []
    for s in "abc":
        held[s], fail = _top_level(runs[s], "held"), next((x for x in runs[s] if not x["held"]), None)
        text = f"**{held[s]:,}**" if held[s] else "**none**"
        if fail is not None:
            text += f" (at {fail['level']:,}: {fail['why']})"
        elif held[s] == max(r["sustained"]["levels"]):
            text += " (highest level tried)"
        strict = _top_level(runs[s], "held_first_token")
        cells.append(f"{text}; {strict:,} with the first token ≤ 200 ms late too")
    label = "concurrent streams sustained at 50 tokens/s (every token once and in order, no gap between"
    ok = _verdict(held["c"] >= 1000 and held["c"] >= held["b"])
    yield f"{label} chunks > 10 × pacing = 200 ms)", "(c) ≥ 1,000 and ≥ (b)", *cells, ok


def _cpu(r: R) -> Rows:
    n, cpu = _n(r), {s: [r[p][s]["server_us_per_token"] for p in ("steady", "saturation")] for s in "abc"}
    label = "CPU µs per delivered token, server processes ((b) proxy; (c) gateway + worker), at"
    a, b, c = (f"{cpu[s][0]:.0f} / {cpu[s][1]:.0f}" for s in "abc")
    met = [_verdict(cpu["c"][i] <= cpu["b"][i]) for i in (0, 1)]
    label, ok = f"{label} {n} streams / at saturation", f"{met[0]} at {n}, {met[1]} at saturation"
    yield label, "(c) ≤ (b)", f"mock alone: {a}", b, c, ok


def _idle(r: R) -> Rows:
    idle, rc = r["idle"], r["redis_connections"]
    per, n, held = idle["kib_per_connection"], idle["connections"], idle["held_after"]
    label = f"memory per idle SSE connection, {n:,} idle resumable connections on one gateway process"
    c = f"{per:.1f} KiB; {held:,} of {n:,} held"
    ok = _verdict(per <= 40 and held == n)
    yield f"{label} (RSS after − before)", "≤ 40 KiB, all held", "—", "—", c, ok
    if not {"fan_in_max", "live_max"} <= rc.keys():
        return  # fanin and sustained did not run
    label = f"Redis connections per gateway process: {rc['fan_in_clients']:,} live SSE clients / idle gateway"
    c = f"{rc['fan_in_max']} / {rc['idle_1000']} / {rc['idle_all']}; {rc['live_max']}"
    most = tuning.GATEWAY_STREAMS_POOL + tuning.GATEWAY_QUEUE_POOL + 1  # the pools and the hub's subscriber
    ok = _verdict(max(rc["fan_in_max"], rc["idle_1000"], rc["idle_all"], rc["live_max"]) <= most)
    label += f" with 1,000 / with {n:,}; most seen during the sustained phase"
    yield label, f"≤ {most}", "—", "—", c, ok


def _fair(r: R) -> Rows:
    f, n = r["fair"], r["plan"]["fair_samples"]
    label = (
        f"fair scheduling: key B's enqueue → start p50 / p99 ({n} streams one after another) beside key "
        f"A's backlog ({f['ahead']:,} queued, a worker capped at 50), and alone"
    )
    c = f"**{p50_99(f['beside'])}**; alone {p50_99(f['alone'])}"
    yield label, "(c) p99 ≤ 2,000 ms", "—", "—", c, _verdict(f["beside"]["p99"] <= 2000)


# The figures issue #11's goals hold (c) to, from a peer level's results.
FIGURES: dict[str, Callable[[R], float]] = {
    "ttft_p50": lambda q: added(q, "ttft", "p50")["c"],
    "ttft_p99": lambda q: added(q, "ttft")["c"],
    "cpu": lambda q: q["c"]["server_us_per_token"],  # gateway + worker
    "ratio": lambda q: q["c"]["tokens_per_s"] / q["a"]["tokens_per_s"],
}
# Issue #11's goals: the peer level each is measured at ("long": 512-token streams at 200), what,
# the figure, the limit (an upper one, or a lower one with "≥") and its unit.
GOALS = (
    ("1", "added time to first token at 1 stream, p50", "ttft_p50", "≤ 3 ms"),
    ("1", "added time to first token at 1 stream, p99", "ttft_p99", "≤ 6 ms"),
    ("200", "CPU per delivered token, gateway + worker, 64-token streams at 200", "cpu", "≤ 100 µs"),
    ("long", "CPU per delivered token, gateway + worker, 512-token streams at 200", "cpu", "≤ 50 µs"),
    ("400", "delivered tokens/s at 400 concurrent 64-token streams, ratio to (a)", "ratio", "≥ 0.9"),
    ("400", "added time to first token at 400 concurrent 64-token streams, p99", "ttft_p99", "≤ 200 ms"),
)


def _met(figure: str, limit: str, res: R | None) -> tuple[str, str]:
    """The ``figure`` in a peer level's results (``None``: not measured) in the unit of ``limit``,
    and whether it is within that limit: met or missed."""
    if res is None:
        return "not measured in this run", "—"
    value, bound = FIGURES[figure](res), float(limit.split()[1])
    ok = value >= bound if limit.startswith("≥") else value <= bound
    return f"{value:,.2f} {' '.join(limit.split()[2:])}".strip(), _verdict(ok)


def _peer(r: R) -> Rows:
    """Issue #11's shape, a row per level and one for 512-token streams, with the goals measured there."""
    long = r["plan"]["peer_long"]
    for key, res in r["peer"].items():
        at = f"{key} × 64 tokens" if key != "long" else f"{long['concurrency']} × {long['tokens'][0]} tokens"
        goals = [(limit, _met(figure, limit, res)[1]) for at, _, figure, limit in GOALS if at == key]
        (ttft, _), cpu = _ttft_added(res), res["c"]["cpu_us_per_token"]
        tps, us = ({s: res[s][k] for s in "abc"} for k in ("tokens_per_s", "server_us_per_token"))
        cells = [f"{p50_99(res['a']['ttft'])}; {tps['a']:,.0f}/s; mock {us['a']:.0f} µs"]
        cells += [f"{ttft[s]} ms; {tps[s] / tps['a']:.2f}×; {us[s]:.0f} µs" for s in "bc"]
        cells[-1] += f" ({cpu['gateway']:.0f} + {cpu['worker']:.0f})"
        goal, verdict = "; ".join(g for g, _ in goals), "; ".join(v for _, v in goals)
        yield f"peer shape (#11), {at}: TTFT; tokens/s; CPU µs per token", goal or "—", *cells, verdict or "—"


def goals(r: R) -> str:
    """Issue #11's goals, each with its limit, the figure measured and met or missed."""
    rows = [(what, limit, *_met(figure, limit, r["peer"].get(key))) for key, what, figure, limit in GOALS]
    return markdown(["goal (issue #11)", "limit", "(c) tailgate, measured", "verdict"], rows)


# Each row function with the phases it reads, in the table's order.
ROWS: tuple[tuple[tuple[str, ...], Callable[[R], Rows]], ...] = (
    (("peer",), _peer),
    (("peer",), lambda r: _ttft("1 stream, p50 / p99 (client: request sent → first token)", r["peer"]["1"])),
    (("steady",), lambda r: _ttft(f"{_n(r)} concurrent streams, p50 / p99", r["steady"])),
    (("peer", "steady"), _enqueue),
    (("steady",), _latency),
    (("sustained",), _within_capacity),
    (("saturation", "xadd_rps"), _saturation),
    (("sustained",), _sustained),
    (("steady", "saturation"), _cpu),
    (("idle", "redis_connections"), _idle),
    (("fair",), _fair),
)


def table(r: R) -> str:
    """The markdown table of the figures and goals of the phases that ran, then issue #11's goals."""
    rows = [row for needs, f in ROWS if all(k in r for k in needs) for row in f(r)]
    parts = [markdown(["figure", "goal", *SETUPS.values(), "verdict"], rows)] if rows else []
    parts += [goals(r)] if "peer" in r else []
    parts += [sizing(r)] if "scale" in r else []
    return "\n\n".join(parts + ([cluster(r)] if "cluster" in r else []))


ROLES = ("gateway", "worker", "redis")
PACE = 50  # tokens/s of a sustained level's streams
TARGETS = (10_000, 100_000)  # the concurrent streams the sizing guide plans for


def _top_run(runs: list[R]) -> R | None:
    """The run of the highest level held (every level below it held too)."""
    top = _top_level(runs, "held")
    return next((x for x in runs if x["level"] == top), None)


def sizing(r: R) -> str:
    """The scale phase (issue #10's sizing guide): per count of gateway × worker processes, the
    streams sustained at 50 tokens/s and, at the highest level held, each role's busy cores and CPU
    per token, and how the next level failed; then, from one of each at its highest level held, what
    one busy core of each role sustains and the cores 10,000 and 100,000 streams need."""
    rows, cpus = [], r["cpus"]
    for config, runs in r["scale"].items():
        top, fail = _top_run(runs), next((x for x in runs if not x["held"]), None)
        held = f"**{_top_level(runs, 'held'):,}**; {_top_level(runs, 'held_first_token'):,}"
        if top is None:
            rows.append([config.replace("x", " × "), held, "—", "—", "—"])
            continue
        busy, us = top["cores_used"], top["cpu_us_per_token"]
        cores = " / ".join(f"{busy[k]:.2f}" for k in ROLES) + f" / {busy['machine']:.2f} of {cpus}"
        per = " / ".join(f"{us[k]:.0f}" for k in ROLES)
        why = (
            "—"
            if fail is None
            else f"{fail['level']:,}: {fail['why']}; machine {fail['cores_used']['machine']:.2f}"
        )
        rows.append([config.replace("x", " × "), held, cores, per, why])
    head = [
        "gateway × worker processes",
        "streams sustained at 50 tokens/s; with first token ≤ 200 ms late too",
        "at the highest level held: cores busy, gateway / worker / Redis / machine",
        "CPU µs per token there: gateway / worker / Redis",
        "next level: why it failed; machine cores busy",
    ]
    out = markdown(head, rows)
    if (base := _top_run(r["scale"].get("1x1", []))) is None:
        return out
    guide = []
    for k in ROLES:
        us = base["cpu_us_per_token"][k]
        need = " / ".join(f"{n * PACE * us / 1e6:,.1f}" for n in TARGETS)
        guide.append([k, f"{us:.0f}", f"{1e6 / (us * PACE):,.0f}", need])
    head = [
        f"per role, from 1 × 1 at {base['level']:,} streams",
        "CPU µs per token",
        "streams per busy core at 50 tokens/s",
        " / ".join(f"cores for {n:,} streams" for n in TARGETS),
    ]
    spent = base["redis_us_per_token"]
    why = (
        "Redis's time inside commands per token at that level (`INFO commandstats`, wall-clock µs): "
        f"`evalsha` (the store's scripts, with the commands they run) {spent.get('evalsha', 0):.1f}, "
        f"`xrange` (readers catching up) {spent.get('xrange', 0):.1f}."
    )
    return out + "\n\n" + markdown(head, guide) + "\n\n" + why


def cluster_us(q: R) -> dict[str, Any]:
    """A cluster run's Redis CPU µs per token: its masters' sum and each one's share of it, and its
    replicas' sum (``redis``, the bench's own, holds the queue and the store's bookkeeping)."""
    us = q["cpu_us_per_token"]
    masters = [v for k, v in sorted(us.items()) if k.startswith("master")]
    replicas = sum(v for k, v in us.items() if k.startswith("replica"))
    return {"masters": sum(masters), "shares": [v / sum(masters) for v in masters], "replicas": replicas}


def cluster(r: R) -> str:
    """The cluster phase: (c) at one level with the streams on the bench's Redis, then on a cluster;
    under it, Redis's time in each command per token (the top 4 of each Redis)."""
    c, rows = r["cluster"], []
    s, q = c["single"], c["cluster"]
    for where, x in (("one Redis", s), ("cluster, 3 masters + 3 replicas", q)):
        us, held = x["cpu_us_per_token"], "held" if x["held"] else f"did not hold: {x['why']}"
        held += f" (roles changed: {', '.join(x['roles_changed'])})" if x.get("roles_changed") else ""
        held += f"; first token up to {x['max_late_ms']:,.0f} ms late; {x['tokens_per_s']:,.0f} tokens/s"
        cells = [f"{us['redis']:.1f}", "—", "—", "(the same)", f"{us['redis']:.1f}"]
        if x is q:
            k = cluster_us(q)
            shares, books = " / ".join(f"{v:.0%}" for v in k["shares"]), us["redis"]
            cells = [f"{k['masters']:.1f}", shares, f"{k['replicas']:.1f}", f"{books:.1f}"]
            cells.append(f"{k['masters'] + k['replicas'] + books:.1f}")
        cpu = f"{us['gateway']:.0f} / {us['worker']:.0f}; {x['cores_used']['machine']:.2f} of {r['cpus']}"
        rows.append([where, held, *cells, cpu])
    head = ["streams on", f"{c['level']:,} streams × {r['plan']['level']['tokens'][0]} tokens at 50 tokens/s"]
    head += ["Redis CPU µs per token: the streams' Redis (cluster: its masters)", "each master's share"]
    head += ["replicas", "queue and bookkeeping Redis", "all Redis", "gateway / worker µs/token; cores busy"]
    spent = {"one Redis": s["redis_us_per_token"], "the cluster's masters": q["masters_redis_us_per_token"]}
    spent["the queue and bookkeeping Redis beside them"] = q["redis_us_per_token"]
    tops = {where: sorted(us.items(), key=lambda kv: -kv[1])[:4] for where, us in spent.items()}
    top = "; ".join(f"{where}: " + ", ".join(f"`{k}` {v:.1f}" for k, v in us) for where, us in tops.items())
    why = "Redis's time inside commands per token (`INFO commandstats`, µs; `evalsha` counts its scripts"
    return f"{markdown(head, rows)}\n\n{why}' commands, which are counted on their own too): {top}."


def markdown(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(row) + " |" for row in [head, *rows]]
    return "\n".join([lines[0], "|" + "---|" * len(head), *lines[1:]])


def notes(r: R) -> list[str]:
    """Context printed under the table: what bounded the figures on this machine."""
    code, peer = r["code"], r.get("peer", {})
    dirty = f", with uncommitted changes to {len(code['changed'])} product files" if code["changed"] else ""
    out = [
        f"{r['plan']['name']} run, {r['cpus']} CPUs, wall {r['wall_s']:.0f} s, "
        f"every process on 127.0.0.1; mock TTFT 200 ms, deltas 20 ms apart.",
        f"code measured: commit {code['commit']}{dirty}.",
    ]
    for label, res in (("1 stream", peer.get("1")), (f"{_n(r)} streams", r.get("steady"))):
        if res and "steps_ms" in (c := res["c"]):
            step = c["steps_ms"]
            out.append(
                f"(c) at {label}, p50 from sending the POST: its answer {step['posted']['p50']:.1f} ms, the "
                f"`started` event {step['started']['p50']:.1f} ms (enqueue → job start "
                f"{c['enqueue_start']['p50']:.1f} ms), the first token {step['started_to_token']['p50']:.1f} "
                "ms after that (the mock's TTFT is 200 ms)."
            )
    if (one := peer.get("1")) and "to_model" in one["a"]:
        way = {s: (one[s]["to_model"]["p50"], one[s]["from_model"]["p50"]) for s in "abc"}
        added = {s: f"+{way[s][0] - way['a'][0]:.1f} / +{way[s][1] - way['a'][1]:.1f} ms" for s in "bc"}
        out.append(
            "added time to first token at 1 stream, p50, split at the mock (its send stamp of the token): "
            f"request sent → the mock's TTFT begins / the mock sends it → the client has it, added to (a)'s "
            f"{way['a'][0]:.1f} / {way['a'][1]:.1f} ms: (b) {added['b']}, (c) {added['c']}."
        )
    if (short := peer.get("200")) and (long := peer.get("long")):
        out.append(_per_stream(short["c"], long["c"], r["plan"]["peer_long"]["tokens"][0]))
    if peer:
        rounds = ", ".join(f"{n:,} × {k}" for n, k in r["plan"]["peer"])
        out.append(
            "peer shape rows: (a) TTFT p50 / p99, delivered tokens/s, the mock's CPU per token; (b), (c): "
            "TTFT added to (a)'s, tokens/s as a ratio to (a)'s, CPU µs per delivered token of the "
            f"setup's servers ((c): gateway + worker). Streams per level × rounds per setup: {rounds}."
        )
    for phase, res in (("peer at 400", peer.get("400")), *((k, r.get(k)) for k in ("steady", "saturation"))):
        if res:
            used = {s: {k: v for k, v in res[s]["cores_used"].items() if k != "machine"} for s in "abc"}
            ranked = {s: sorted(used[s].items(), key=lambda kv: -kv[1]) for s in "abc"}
            busy = "; ".join(
                f"{s}: " + ", ".join(f"{_LABELS.get(k, k)} {v:.2f}" for k, v in ranked[s] if v >= 0.05)
                for s in "abc"
            )
            out.append(f"cores busy during {phase} ({busy})")
    if profiles := r.get("profiles"):
        out.append(f"py-spy recorded the peer levels {', '.join(profiles)} (their figures include its cost).")
    out.append(
        "\"other processes\" is the machine's busy time minus the bench's processes (another tenant, "
        'noise); "irq" is interrupt time, mostly the loopback traffic itself.'
    )
    return out


def _per_stream(short: R, long: R, n: int) -> str:
    """(c)'s CPU per token at 200 streams of 64 and of ``n`` tokens, solved for a cost per stream and
    one per token: ``per_token + per_stream / tokens`` fits both."""
    split = []
    for who in ("gateway", "worker"):
        a, b = short["cpu_us_per_token"][who], long["cpu_us_per_token"][who]
        stream = (a - b) / (1 / 64 - 1 / n)
        split.append(f"{who} {stream / 1000:.2f} ms per stream + {a - stream / 64:.0f} µs per token")
    return f"(c)'s CPU at 200 streams, from its 64- and {n}-token runs: " + "; ".join(split) + "."


def write(r: R, raw: R, base: Path) -> str:
    """``base``.json, .md and .png; returns what to print: the table, the notes and where they went."""
    text = table(r) + "\n\n" + "\n".join(f"- {n}" for n in notes(r)) + "\n"
    base.with_suffix(".json").write_text(json.dumps(r, indent=1, default=float))
    base.with_suffix(".md").write_text(text)
    plot(r, raw, base.with_suffix(".png"))
    rel = base.relative_to(ROOT)
    return f"{text}\nresults: {rel}.json, {rel}.md\nplot:    {rel}.png"


@contextlib.contextmanager
def figure(path: Path, rows: int, cols: int, size: tuple[float, float]) -> Iterator[tuple[Any, Any]]:
    """A matplotlib figure of ``rows`` × ``cols`` axes, saved to ``path`` as the block ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=size)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


COLORS = {"a": "#4c72b0", "b": "#dd8452", "c": "#55a868"}
Panel = Callable[[Any, R, R], None]


def _cdf(key: str, what: str) -> Panel:
    def panel(ax: Any, r: R, raw: R) -> None:
        for s in "abc":
            values = sorted(raw["steady"][s][key])
            ys = [i / max(len(values) - 1, 1) for i in range(len(values))]
            ax.plot([max(v, 0.01) for v in values], ys, color=COLORS[s], label=SETUPS[s])
        ax.set(xscale="log", xlabel="ms (log)", ylabel="fraction ≤ x", title=f"{what} at {_n(r)} streams")
        ax.axhline(0.99, color="grey", lw=0.5, ls=":")
        ax.legend(loc="lower right")

    return panel


def _saturation_bars(ax: Any, r: R, raw: R) -> None:
    tps = [r["saturation"][s]["tokens_per_s"] for s in "abc"]
    ax.bar_label(ax.bar(list(SETUPS.values()), tps, color=list(COLORS.values())), [f"{v:,.0f}" for v in tps])
    goal, n = 0.3 * r["xadd_rps"], r["plan"]["sat"]["concurrency"]
    ax.axhline(goal, color="red", ls="--", lw=1, label=f"0.3 × redis-benchmark XADD = {goal:,.0f}/s")
    ax.set(ylabel="delivered tokens/s", title=f"throughput at saturation ({n} streams, 1 ms pacing)")
    ax.legend(loc="upper right")


def _sustained_levels(ax: Any, r: R, raw: R) -> None:
    lines = (
        ("max_gap_ms", "o-", "worst gap between chunks"),
        ("max_late_ms", "x:", "first token, most late"),
    )
    for s, (key, style, what) in itertools.product("abc", lines):
        runs = r["sustained"]["runs"][s]
        ys = [max(x[key], 0.1) for x in runs]
        ax.plot([x["level"] for x in runs], ys, style, color=COLORS[s], label=f"{SETUPS[s]}: {what}")
    ax.axhline(200, color="red", ls="--", lw=1, label="stall: 10 × pacing = 200 ms")
    xlabel = "concurrent streams at 50 tokens/s (each level until one fails)"
    ax.set(yscale="log", ylabel="ms (log)", title="streams sustained", xlabel=xlabel)
    ax.legend(loc="lower right", fontsize="small")


def _peer_levels(title: str, unit: str, figure: Callable[[R], float], setups: str) -> Panel:
    """A figure of issue #11's shape by level, for each of ``setups``."""

    def panel(ax: Any, r: R, raw: R) -> None:
        levels = [k for k in r["peer"] if k != "long"]
        for s in setups:
            ys = [figure(r["peer"][k][s]) for k in levels]
            ax.plot([int(k) for k in levels], ys, "o-", color=COLORS[s], label=SETUPS[s])
        ax.set(xscale="log", yscale="log", xlabel="concurrent 64-token streams", ylabel=f"{unit} (log)")
        ax.set_title(f"peer shape: {title}")
        ax.legend(loc="upper left")

    return panel


def _fair_bars(ax: Any, r: R, raw: R) -> None:
    f = r["fair"]
    for i, (q, shade) in enumerate((("p50", 0.55), ("p99", 1.0))):
        values = [f[k][q] for k in ("alone", "beside")]
        xs = [x + i * 0.4 for x in range(2)]
        bars = ax.bar(xs, values, 0.4, color=COLORS["c"], alpha=shade, label=q)
        ax.bar_label(bars, [f"{v:,.0f}" for v in values])
    ax.set_xticks([0.2, 1.2], ["alone", f"beside {f['ahead']:,} of key A queued"])
    ax.axhline(2000, color="red", ls="--", lw=1, label="goal: p99 ≤ 2,000 ms")
    ax.set(ylabel="ms", title="fair scheduling: key B's enqueue → start")
    ax.legend(loc="upper left")


def _scale_bars(ax: Any, r: R, raw: R) -> None:
    configs = list(r["scale"])
    held = [_top_level(r["scale"][c], "held") for c in configs]
    labels = [c.replace("x", " gw × ") + " wk" for c in configs]
    ax.bar_label(ax.bar(labels, held, color=COLORS["c"]), [f"{v:,}" for v in held])
    ax.set(ylabel="streams sustained at 50 tokens/s", title=f"processes: gateway × worker ({r['cpus']} CPUs)")


# The plot's panels, row by row, each with the phase it draws (left blank when that phase did not run).
PANELS = (
    ("steady", _cdf("ttft", "time to first token")),
    ("steady", _cdf("latency", "per-chunk latency (send stamp → client)")),
    ("peer", _peer_levels("time to first token, p99", "ms", lambda q: q["ttft"]["p99"], "abc")),
    ("saturation", _saturation_bars),
    ("sustained", _sustained_levels),
    ("peer", _peer_levels("server CPU per delivered token", "µs", lambda q: q["server_us_per_token"], "bc")),
    ("fair", _fair_bars),
    ("scale", _scale_bars),
)


def plot(r: R, raw: R, path: Path) -> None:
    with figure(path, 2, 4, (25, 9)) as (fig, axes):
        fig.suptitle(f"tailgate bench ({r['plan']['name']} run, {r['cpus']} CPUs, loopback, mock upstream)")
        for ax, (phase, panel) in zip(axes.flat, PANELS, strict=True):
            if phase in r:
                panel(ax, r, raw)
                ax.grid(True, which="both", alpha=0.3, axis="both" if panel is not _saturation_bars else "y")
            else:
                ax.axis("off")
