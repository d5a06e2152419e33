"""Figures from the raw measurements: percentiles, the markdown table, the JSON file and the plot.

Every latency figure of (b) and (c) is shown as a difference against (a), the clients straight to
the mock upstream, measured in the same run; throughput as a ratio to (a) and to ``redis-benchmark``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_LABELS = {"other": "other processes", "irq": "irq", "steal": "steal", "bench": "bench parent"}
SETUPS = {"a": "(a) direct to mock", "b": "(b) naive proxy", "c": "(c) tailgate"}


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks; NaN for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(values: Sequence[float]) -> dict[str, float | int]:
    qs = {"p50": 50, "p90": 90, "p99": 99, "p999": 99.9}
    return (
        {"n": len(values)}
        | {k: pct(values, q) for k, q in qs.items()}
        | {"max": max(values, default=math.nan)}
    )


def sketch(values: Sequence[float], points: int = 200) -> list[float]:
    """Quantiles at ``points`` evenly spaced ranks: enough to redraw a distribution from the JSON."""
    s = sorted(values)
    return [s[round(i * (len(s) - 1) / (points - 1))] for i in range(points)] if s else []


def _ms(x: float, digits: int = 1) -> str:
    if math.isnan(x):
        return "n/a"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.{digits}f}"


def _signed(x: float, digits: int = 1) -> str:
    return "n/a" if math.isnan(x) else ("+" if x >= 0 else "−") + _ms(abs(x), digits)


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def _p50_99(t: dict[str, Any], digits: int = 1) -> str:
    return f"{_ms(t['p50'], digits)} / {_ms(t['p99'], digits)} ms"


def table(r: dict[str, Any]) -> str:
    """The markdown table of the issue's figures and goals."""
    plan, n, coalesce, xadd = r["plan"], r["plan"]["steady"]["concurrency"], r["coalesce_ms"], r["xadd_rps"]
    sus, rc, idle, cpu = r["sustained"], r["redis_connections"], r["idle"], r["cpu_us_per_token"]
    rows: list[tuple[str, ...]] = []

    def ttft(label: str, t: dict[str, Any]) -> None:
        d = {s: (_signed(t[s]["p50"] - t["a"]["p50"]), _signed(t[s]["p99"] - t["a"]["p99"])) for s in "bc"}
        b, c = (f"{_p50_99(t[s])} (**{d[s][0]} / {d[s][1]}**)" for s in "bc")
        ok = t["c"]["p50"] - t["a"]["p50"] <= 5 and t["c"]["p99"] - t["a"]["p99"] <= 15
        rows.append((label, "added ≤ 5 / ≤ 15 ms", _p50_99(t["a"]), b, c, _verdict(ok)))

    ttft(
        "time to first token at 1 stream, p50 / p99 (client: request sent → first token)", r["ttft1"]["ttft"]
    )
    ttft(f"time to first token at {n} concurrent streams, p50 / p99", r["steady"]["ttft"])

    e1, en = r["ttft1"]["enqueue_start"], r["steady"]["enqueue_start"]
    label = f"enqueue → job start (meta `started_at − created_at`), p50 / p99, at 1 / at {n} streams"
    ok1, okn = (_verdict(e["p50"] <= 3 and e["p99"] <= 10) for e in (e1, en))
    rows.append(
        (label, "≤ 3 / ≤ 10 ms", "—", "—", f"{_p50_99(e1, 2)}; {_p50_99(en, 2)}", f"{ok1} at 1, {okn} at {n}")
    )

    lat = r["steady"]["latency"]
    add = {s: lat[s]["p99"] - lat["a"]["p99"] for s in "bc"}
    label = (
        f"per-chunk latency (mock's send stamp → client), p50 / p99, at {n} streams; added = p99 difference"
    )
    goal = f"added ≤ coalescing {coalesce:g} + 10 = {coalesce + 10:g} ms"
    b, c = (f"{_p50_99(lat[s], 2)} (**{_signed(add[s])}**)" for s in "bc")
    rows.append((label, goal, _p50_99(lat["a"], 2), b, c, _verdict(add["c"] <= coalesce + 10)))

    if sus["at_common"]:
        at = {
            s: (v["ttft"]["p50"], v["ttft"]["p99"], v["latency"]["p99"]) for s, v in sus["at_common"].items()
        }
        d = {s: [x - y for x, y in zip(at[s], at["a"], strict=True)] for s in "bc"}
        label = (
            "within capacity: time to first token p50 / p99 and per-chunk latency p99 at "
            f"{sus['common_level']:,} streams, {plan['level']['tokens'][0]} tokens each (the most all three "
            "sustained with first tokens ≤ 200 ms late)"
        )
        a = f"{_ms(at['a'][0])} / {_ms(at['a'][1])} ms; {_ms(at['a'][2], 2)} ms"
        b, c = (f"**{_signed(d[s][0])} / {_signed(d[s][1])}**; **{_signed(d[s][2])}** ms" for s in "bc")
        ok = d["c"][0] <= 5 and d["c"][1] <= 15 and d["c"][2] <= coalesce + 10
        rows.append((label, f"added ≤ 5 / ≤ 15 ms; ≤ {coalesce + 10:g} ms", a, b, c, _verdict(ok)))

    tps = {s: r["saturation"][s]["tokens_per_s"] for s in "abc"}
    label = (
        f"delivered tokens/s at saturation ({plan['sat']['concurrency']} streams, 1 ms pacing); "
        f"ratio to (a) and to `redis-benchmark` XADD ({xadd:,.0f}/s, 50 clients)"
    )
    b, c = (f"{tps[s]:,.0f} ({tps[s] / tps['a']:.2f}× a, **{tps[s] / xadd:.2f}× XADD**)" for s in "bc")
    a = f"{tps['a']:,.0f} ({tps['a'] / xadd:.2f}× XADD)"
    rows.append((label, "(c) ≥ 0.3 × XADD", a, b, c, _verdict(tps["c"] / xadd >= 0.3)))

    held, strict = sus["held"], sus["held_first_token"]

    def level(s: str) -> str:
        fail = next((lv for lv in sus["runs"][s] if not lv["held"]), None)
        text = f"**{held[s]:,}**" if held[s] else "**none**"
        if fail is not None:
            text += f" (at {fail['level']:,}: {fail['why']})"
        elif held[s] == max(sus["levels"]):
            text += " (highest level tried)"
        return text + f"; {strict[s]:,} with the first token ≤ 200 ms late too"

    label = (
        "concurrent streams sustained at 50 tokens/s (every token once and in order, "
        "no gap between chunks > 10 × pacing = 200 ms)"
    )
    ok = held["c"] >= 1000 and held["c"] >= held["b"]
    rows.append((label, "(c) ≥ 1,000 and ≥ (b)", level("a"), level("b"), level("c"), _verdict(ok)))

    steady, sat = cpu["steady"], cpu["saturation"]
    label = (
        "CPU µs per delivered token, server processes ((b) proxy; (c) gateway + worker), "
        f"at {n} streams / at saturation"
    )
    b, c = (f"{steady[s]:.0f} / {sat[s]:.0f}" for s in "bc")
    ok = f"{_verdict(steady['c'] <= steady['b'])} at {n}, {_verdict(sat['c'] <= sat['b'])} at saturation"
    rows.append((label, "(c) ≤ (b)", f"mock alone: {steady['a']:.0f} / {sat['a']:.0f}", b, c, ok))

    per, total = idle["kib_per_connection"], idle["connections"]
    label = (
        f"memory per idle SSE connection, {total:,} idle resumable connections "
        "on one gateway process (RSS after − before)"
    )
    c = f"{per:.1f} KiB; {idle['held_after']:,} of {total:,} held"
    rows.append(
        (label, "≤ 40 KiB, all held", "—", "—", c, _verdict(per <= 40 and idle["held_after"] == total))
    )

    label = (
        f"Redis connections per gateway process: {rc['fan_in_clients']:,} live SSE clients / idle "
        f"gateway with 1,000 / with {total:,}; most seen during the sustained phase"
    )
    c = f"{rc['fan_in_max']} / {rc['idle_1000']} / {rc['idle_all']}; {rc['live_max']}"
    worst = max(rc["fan_in_max"], rc["idle_1000"], rc["idle_all"], rc["live_max"])
    rows.append((label, "≤ 4", "—", "—", c, _verdict(worst <= 4)))

    return markdown(["figure", "goal", *SETUPS.values(), "verdict"], rows)


def markdown(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(row) + " |" for row in [head, *rows]]
    return "\n".join([lines[0], "|" + "---|" * len(head), *lines[1:]])


def notes(r: dict[str, Any]) -> list[str]:
    """Context printed under the table: what bounded the figures on this machine."""
    out = [
        f"{r['plan']['name']} run, {r['cpus']} CPUs, wall {r['wall_s']:.0f} s, "
        f"every process on 127.0.0.1; mock TTFT 200 ms, deltas 20 ms apart.",
    ]
    if code := r.get("code"):
        dirty = (
            f", with uncommitted changes to {len(code['changed'])} product files" if code["changed"] else ""
        )
        out.append(f"code measured: commit {code['commit']}{dirty}.")
    n = r["plan"]["steady"]["concurrency"]
    for label, steps, enq in (
        ("1 stream", r["ttft1"]["c_steps_ms"], r["ttft1"]["enqueue_start"]),
        (f"{n} streams", r["steady"]["setups"]["c"]["steps_ms"], r["steady"]["enqueue_start"]),
    ):
        out.append(
            f"(c) at {label}, p50 from sending the POST: its answer {steps['posted']['p50']:.1f} ms, the "
            f"`started` event {steps['started']['p50']:.1f} ms (enqueue → job start {enq['p50']:.1f} ms), "
            f"the first token {steps['started_to_token']['p50']:.1f} ms after that "
            "(the mock's TTFT is 200 ms)."
        )
    for phase, busy in r["cores_used"].items():
        parts = []
        for s in "abc":
            ranked = sorted(busy[s].items(), key=lambda kv: -kv[1])
            parts.append(f"{s}: " + ", ".join(f"{_LABELS.get(k, k)} {v:.2f}" for k, v in ranked if v >= 0.05))
        out.append(f"cores busy during {phase} ({'; '.join(parts)})")
    out.append(
        "\"other processes\" is the machine's busy time minus the bench's processes (another tenant, "
        'noise); "irq" is interrupt time, mostly the loopback traffic itself.'
    )
    return out


def write(r: dict[str, Any], raw: dict[str, Any], base: Path, root: Path) -> str:
    """``base``.json, .md and .png; returns what to print: the table, the notes and where they went."""
    text = table(r) + "\n\n" + "\n".join(f"- {n}" for n in notes(r)) + "\n"
    base.with_suffix(".json").write_text(json.dumps(r, indent=1, default=float))
    base.with_suffix(".md").write_text(text)
    plot(r, raw, base.with_suffix(".png"))
    rel = base.relative_to(root)
    return f"{text}\nresults: {rel}.json, {rel}.md\nplot:    {rel}.png"


def plot(r: dict[str, Any], raw: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"a": "#4c72b0", "b": "#dd8452", "c": "#55a868"}
    n = r["plan"]["steady"]["concurrency"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    fig.suptitle(f"tailgate bench ({r['plan']['name']} run, {r['cpus']} CPUs, loopback, mock upstream)")

    for ax, key, title in (
        (axes[0][0], "ttft", f"time to first token at {n} concurrent streams"),
        (axes[0][1], "latency", f"per-chunk latency (send stamp → client) at {n} streams"),
    ):
        for s in "abc":
            values = sorted(raw[key][s])
            ys = [i / max(len(values) - 1, 1) for i in range(len(values))]
            ax.plot([max(v, 0.01) for v in values], ys, color=colors[s], label=SETUPS[s])
        ax.set(xscale="log", xlabel="ms (log)", ylabel="fraction ≤ x", title=title)
        ax.axhline(0.99, color="grey", lw=0.5, ls=":")
        ax.legend(loc="lower right")
        ax.grid(True, which="both", alpha=0.3)

    ax = axes[1][0]
    tps = [r["saturation"][s]["tokens_per_s"] for s in "abc"]
    bars = ax.bar(list(SETUPS.values()), tps, color=list(colors.values()))
    ax.bar_label(bars, [f"{v:,.0f}" for v in tps])
    goal = 0.3 * r["xadd_rps"]
    ax.axhline(goal, color="red", ls="--", lw=1, label=f"0.3 × redis-benchmark XADD = {goal:,.0f}/s")
    ax.set(ylabel="delivered tokens/s")
    ax.set_title(f"throughput at saturation ({r['plan']['sat']['concurrency']} streams, 1 ms pacing)")
    ax.legend(loc="upper right")

    ax = axes[1][1]
    for s in "abc":
        runs = r["sustained"]["runs"][s]
        levels = [lv["level"] for lv in runs]
        gaps, late = [max(lv["max_gap_ms"], 0.1) for lv in runs], [max(lv["max_late_ms"], 0.1) for lv in runs]
        ax.plot(levels, gaps, marker="o", color=colors[s], label=f"{SETUPS[s]}: worst gap between chunks")
        ax.plot(
            levels, late, marker="x", ls=":", color=colors[s], label=f"{SETUPS[s]}: first token, most late"
        )
    ax.axhline(200, color="red", ls="--", lw=1, label="stall: 10 × pacing = 200 ms")
    ax.set(
        yscale="log",
        xlabel="concurrent streams at 50 tokens/s (each level until one fails)",
        ylabel="ms (log)",
    )
    ax.set_title("streams sustained")
    ax.legend(loc="lower right", fontsize="small", framealpha=0.8)
    ax.grid(True, which="both", alpha=0.3)

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
