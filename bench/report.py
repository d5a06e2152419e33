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
    return {
        "n": len(values),
        "p50": pct(values, 50),
        "p90": pct(values, 90),
        "p99": pct(values, 99),
        "p999": pct(values, 99.9),
        "max": max(values) if values else math.nan,
    }


def sketch(values: Sequence[float], points: int = 200) -> list[float]:
    """Quantiles at ``points`` evenly spaced ranks: enough to redraw a distribution from the JSON."""
    if not values:
        return []
    s = sorted(values)
    return [s[round(i * (len(s) - 1) / (points - 1))] for i in range(points)]


def _ms(x: float, digits: int = 1) -> str:
    if math.isnan(x):
        return "n/a"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def _signed(x: float, digits: int = 1) -> str:
    if math.isnan(x):
        return "n/a"
    return ("+" if x >= 0 else "−") + _ms(abs(x), digits)


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**missed**")


def table(r: dict[str, Any]) -> str:
    """The markdown table of the issue's figures and goals."""
    plan = r["plan"]
    n = plan["steady_concurrency"]
    coalesce = r["coalesce_ms"]
    rows: list[list[str]] = []
    head = ["figure", "goal", SETUPS["a"], SETUPS["b"], SETUPS["c"], "verdict"]

    def ttft_row(label: str, key: str) -> None:
        t = r[key]["ttft"]
        a = t["a"]
        added = {s: (t[s]["p50"] - a["p50"], t[s]["p99"] - a["p99"]) for s in "bc"}
        ok = added["c"][0] <= 5 and added["c"][1] <= 15
        rows.append(
            [
                label,
                "added ≤ 5 / ≤ 15 ms",
                f"{_ms(a['p50'])} / {_ms(a['p99'])} ms",
                *(
                    f"{_ms(t[s]['p50'])} / {_ms(t[s]['p99'])} ms "
                    f"(**{_signed(added[s][0])} / {_signed(added[s][1])}**)"
                    for s in "bc"
                ),
                _verdict(ok),
            ]
        )

    ttft_row("time to first token at 1 stream, p50 / p99 (client: request sent → first token)", "ttft1")
    ttft_row(f"time to first token at {n} concurrent streams, p50 / p99", "steady")

    e1, en = r["ttft1"]["enqueue_start"], r["steady"]["enqueue_start"]
    ok1 = e1["p50"] <= 3 and e1["p99"] <= 10
    okn = en["p50"] <= 3 and en["p99"] <= 10
    rows.append(
        [
            f"enqueue → job start (meta `started_at − created_at`), p50 / p99, at 1 / at {n} streams",
            "≤ 3 / ≤ 10 ms",
            "—",
            "—",
            f"{_ms(e1['p50'], 2)} / {_ms(e1['p99'], 2)} ms; {_ms(en['p50'], 2)} / {_ms(en['p99'], 2)} ms",
            f"{_verdict(ok1)} at 1, {_verdict(okn)} at {n}",
        ]
    )

    lat = r["steady"]["latency"]
    add_lat = {s: lat[s]["p99"] - lat["a"]["p99"] for s in "bc"}
    rows.append(
        [
            f"per-chunk latency (mock's send stamp → client), p50 / p99, at {n} streams; "
            "added = p99 difference",
            f"added ≤ coalescing {coalesce:g} + 10 = {coalesce + 10:g} ms",
            f"{_ms(lat['a']['p50'], 2)} / {_ms(lat['a']['p99'], 2)} ms",
            *(
                f"{_ms(lat[s]['p50'], 2)} / {_ms(lat[s]['p99'], 2)} ms (**{_signed(add_lat[s])}**)"
                for s in "bc"
            ),
            _verdict(add_lat["c"] <= coalesce + 10),
        ]
    )

    sus = r["sustained"]
    if sus["at_common"]:
        at, lv = sus["at_common"], sus["common_level"]
        d_ttft = {
            s: (at[s]["ttft"]["p50"] - at["a"]["ttft"]["p50"], at[s]["ttft"]["p99"] - at["a"]["ttft"]["p99"])
            for s in "bc"
        }
        d_lat = {s: at[s]["latency"]["p99"] - at["a"]["latency"]["p99"] for s in "bc"}
        ok = d_ttft["c"][0] <= 5 and d_ttft["c"][1] <= 15 and d_lat["c"] <= coalesce + 10
        rows.append(
            [
                f"within capacity: time to first token p50 / p99 and per-chunk latency p99 at {lv:,} "
                f"streams, {plan['level_tokens']} tokens each (the most all three sustained with first "
                "tokens ≤ 200 ms late)",
                f"added ≤ 5 / ≤ 15 ms; ≤ {coalesce + 10:g} ms",
                f"{_ms(at['a']['ttft']['p50'])} / {_ms(at['a']['ttft']['p99'])} ms; "
                f"{_ms(at['a']['latency']['p99'], 2)} ms",
                *(
                    f"**{_signed(d_ttft[s][0])} / {_signed(d_ttft[s][1])}**; **{_signed(d_lat[s])}** ms"
                    for s in "bc"
                ),
                _verdict(ok),
            ]
        )

    sat, xadd = r["saturation"], r["xadd_rps"]
    tps = {s: sat[s]["tokens_per_s"] for s in "abc"}
    rows.append(
        [
            f"delivered tokens/s at saturation ({plan['sat_concurrency']} streams, 1 ms pacing); "
            f"ratio to (a) and to `redis-benchmark` XADD ({xadd:,.0f}/s, 50 clients)",
            "(c) ≥ 0.3 × XADD",
            f"{tps['a']:,.0f} ({tps['a'] / xadd:.2f}× XADD)",
            *(f"{tps[s]:,.0f} ({tps[s] / tps['a']:.2f}× a, **{tps[s] / xadd:.2f}× XADD**)" for s in "bc"),
            _verdict(tps["c"] / xadd >= 0.3),
        ]
    )

    held, strict = r["sustained"]["held"], r["sustained"]["held_first_token"]
    tried = r["sustained"]["levels"]

    def level(s: str) -> str:
        top = held[s]
        fail = next((lv for lv in r["sustained"]["runs"][s] if not lv["held"]), None)
        text = f"**{top:,}**" if top else "**none**"
        if fail is not None:
            text += f" (at {fail['level']:,}: {fail['why']})"
        elif top == max(tried):
            text += " (highest level tried)"
        return text + f"; {strict[s]:,} with the first token ≤ 200 ms late too"

    rows.append(
        [
            "concurrent streams sustained at 50 tokens/s (every token once and in order, "
            "no gap between chunks > 10 × pacing = 200 ms)",
            "(c) ≥ 1,000 and ≥ (b)",
            level("a"),
            level("b"),
            level("c"),
            _verdict(held["c"] >= 1000 and held["c"] >= held["b"]),
        ]
    )

    cpu = r["cpu_us_per_token"]
    rows.append(
        [
            f"CPU µs per delivered token, server processes ((b) proxy; (c) gateway + worker), "
            f"at {n} streams / at saturation",
            "(c) ≤ (b)",
            f"mock alone: {cpu['steady']['a']:.0f} / {cpu['saturation']['a']:.0f}",
            *(f"{cpu['steady'][s]:.0f} / {cpu['saturation'][s]:.0f}" for s in "bc"),
            f"{_verdict(cpu['steady']['c'] <= cpu['steady']['b'])} at {n}, "
            f"{_verdict(cpu['saturation']['c'] <= cpu['saturation']['b'])} at saturation",
        ]
    )

    idle = r["idle"]
    per = idle["kib_per_connection"]
    rows.append(
        [
            f"memory per idle SSE connection, {idle['connections']:,} idle resumable connections "
            "on one gateway process (RSS after − before)",
            "≤ 40 KiB, all held",
            "—",
            "—",
            f"{per:.1f} KiB; {idle['held_after']:,} of {idle['connections']:,} held",
            _verdict(per <= 40 and idle["held_after"] == idle["connections"]),
        ]
    )

    rc = r["redis_connections"]
    worst = max(rc["fan_in_max"], rc["idle_1000"], rc["idle_all"], rc["live_max"])
    rows.append(
        [
            f"Redis connections per gateway process: {rc['fan_in_clients']:,} live SSE clients / idle "
            f"gateway with 1,000 / with {idle['connections']:,}; most seen during the sustained phase",
            "≤ 4",
            "—",
            "—",
            f"{rc['fan_in_max']} / {rc['idle_1000']} / {rc['idle_all']}; {rc['live_max']}",
            _verdict(worst <= 4),
        ]
    )

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def notes(r: dict[str, Any]) -> list[str]:
    """Context printed under the table: what bounded the figures on this machine."""
    out = [
        f"{r['plan']['name']} run, {r['cpus']} CPUs, wall {r['wall_s']:.0f} s, "
        f"every process on 127.0.0.1; mock TTFT 200 ms, deltas 20 ms apart.",
    ]
    code = r.get("code", {})
    if code:
        dirty = (
            f", with uncommitted changes to {len(code['changed'])} product files" if code["changed"] else ""
        )
        out.append(f"code measured: commit {code['commit']}{dirty}.")
    n = r["plan"]["steady_concurrency"]
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
    busy = r["cores_used"]
    for phase in ("steady", "saturation"):
        parts = []
        for s in "abc":
            used = busy[phase][s]
            ranked = sorted(used.items(), key=lambda kv: -kv[1])
            top = ", ".join(f"{_LABELS.get(k, k)} {v:.2f}" for k, v in ranked if v >= 0.05)
            parts.append(f"{s}: {top}")
        out.append(f"cores busy during {phase} ({'; '.join(parts)})")
    out.append(
        "\"other processes\" is the machine's busy time minus the bench's processes (another tenant, "
        'noise); "irq" is interrupt time, mostly the loopback traffic itself.'
    )
    return out


def write_json(r: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(r, indent=1, default=float))


def plot(r: dict[str, Any], raw: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"a": "#4c72b0", "b": "#dd8452", "c": "#55a868"}
    n = r["plan"]["steady_concurrency"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    fig.suptitle(f"tailgate bench ({r['plan']['name']} run, {r['cpus']} CPUs, loopback, mock upstream)")

    def cdf(ax: Any, key: str, title: str) -> None:
        for s in "abc":
            values = sorted(raw[key][s])
            if not values:
                continue
            ys = [i / max(len(values) - 1, 1) for i in range(len(values))]
            ax.plot([max(v, 0.01) for v in values], ys, color=colors[s], label=SETUPS[s])
        ax.set_xscale("log")
        ax.set_xlabel("ms (log)")
        ax.set_ylabel("fraction ≤ x")
        ax.set_title(title)
        ax.axhline(0.99, color="grey", lw=0.5, ls=":")
        ax.legend(loc="lower right")
        ax.grid(True, which="both", alpha=0.3)

    cdf(axes[0][0], "ttft", f"time to first token at {n} concurrent streams")
    cdf(axes[0][1], "latency", f"per-chunk latency (send stamp → client) at {n} streams")

    ax = axes[1][0]
    tps = [r["saturation"][s]["tokens_per_s"] for s in "abc"]
    bars = ax.bar([SETUPS[s] for s in "abc"], tps, color=[colors[s] for s in "abc"])
    for bar, v in zip(bars, tps, strict=True):
        ax.annotate(f"{v:,.0f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom")
    goal = 0.3 * r["xadd_rps"]
    ax.axhline(goal, color="red", ls="--", lw=1, label=f"0.3 × redis-benchmark XADD = {goal:,.0f}/s")
    ax.set_ylabel("delivered tokens/s")
    ax.set_title(f"throughput at saturation ({r['plan']['sat_concurrency']} streams, 1 ms pacing)")
    ax.legend(loc="upper right")

    ax = axes[1][1]
    for s in "abc":
        runs = r["sustained"]["runs"][s]
        if not runs:
            continue
        levels = [lv["level"] for lv in runs]
        ax.plot(
            levels,
            [max(lv["max_gap_ms"], 0.1) for lv in runs],
            marker="o",
            color=colors[s],
            label=f"{SETUPS[s]}: worst gap between chunks",
        )
        ax.plot(
            levels,
            [max(lv["max_late_ms"], 0.1) for lv in runs],
            marker="x",
            ls=":",
            color=colors[s],
            label=f"{SETUPS[s]}: first token, most late",
        )
    ax.axhline(200, color="red", ls="--", lw=1, label="stall: 10 × pacing = 200 ms")
    ax.set_yscale("log")
    ax.set_xlabel("concurrent streams at 50 tokens/s (each level until one fails)")
    ax.set_ylabel("ms (log)")
    ax.set_title("streams sustained")
    ax.legend(loc="lower right", fontsize="small", framealpha=0.8)
    ax.grid(True, which="both", alpha=0.3)

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
