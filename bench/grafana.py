"""A Grafana dashboard drawn with matplotlib from a Prometheus, for a machine with no Grafana: each
panel's queries go to Prometheus's ``/api/v1/query_range`` as Grafana would send them, and the panels
are laid out by their ``gridPos`` on Grafana's 24-column grid, in colours like Grafana's dark theme.

Only what ``deploy/grafana-dashboard.json`` uses is understood: the panel types in ``PANEL_TYPES``,
the units in ``UNITS``, the stacking modes in ``STACKING`` and the variables of Grafana's that
:func:`variables` names. :func:`panels` raises :class:`Unsupported` on anything else (a new panel
type, a dashboard variable, field overrides), so the dashboard and this drawing of it cannot drift
apart unseen: tests/test_monitoring.py reads the dashboard through it.

Deliberate differences from Grafana: a series that stays 0 or absent over the whole range is left
out (the code declares every label set up front, so "finished by outcome and code" would list a
dozen error codes that never happened, each a flat line); ``$__rate_interval`` is what the caller
says, not Grafana's max(4 × scrape interval, step + scrape interval); and the PNG has 256 colours.
"""

from __future__ import annotations

import io
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

COLUMNS = 24  # Grafana's grid
CELL_PX, GAP_PX = 30, 8  # a grid row's height and the gap between panels, as Grafana draws them
WIDTH_PX, HEADER_PX = 1600, 52
PANEL_TYPES = frozenset({"timeseries"})
STACKING = frozenset({"none", "normal"})
# Grafana's dark theme: page, panel, border, text, dim text, grid; and its classic palette.
THEME = {"page": "#111217", "panel": "#181b1f", "border": "#2a2d33", "text": "#ccccdc", "dim": "#8e8e9a"}
GRID, ANNOTATION = "#26292f", "#00d3ff"
PALETTE = ("#73bf69", "#fade2a", "#5794f2", "#ff9830", "#f2495c", "#b877d9", "#6ed0e0", "#8ab8ff")
_LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def _si(value: float, suffix: str = "") -> str:
    """``1.5 K``, ``12``, ``0.25``: a number as Grafana's ``short`` unit shows it."""
    for scale, prefix in ((1e9, " Bil"), (1e6, " Mil"), (1e3, " K")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{prefix}{suffix}"
    return f"{value:.3g}{suffix}"


def _seconds(value: float) -> str:
    if value == 0 or abs(value) >= 1:
        return f"{value:.3g} s"
    if abs(value) >= 1e-3:
        return f"{value * 1e3:.3g} ms"
    return f"{value * 1e6:.3g} µs"


# A panel's unit (its fieldConfig.defaults.unit) -> how an axis labels a value.
UNITS: dict[str, Callable[[float], str]] = {
    "short": _si,
    "s": _seconds,
    "reqps": lambda v: _si(v, " req/s"),
}


def _clock(t: float, _pos: object = None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t))  # the dashboard's timezone is the browser's


class Unsupported(ValueError):
    """The dashboard uses something this drawing does not understand: teach :func:`panels` first."""


@dataclass(frozen=True)
class Target:
    expr: str  # as Prometheus gets it, the variables substituted
    legend: str  # the legendFormat; "" for Grafana's default, the series' labels


@dataclass(frozen=True)
class Panel:
    title: str
    x: int
    y: int
    w: int
    h: int
    unit: str
    stacked: bool
    fill: float  # the area under a line, 0..1 (Grafana's fillOpacity / 100)
    minimum: float | None
    targets: tuple[Target, ...]


@dataclass(frozen=True)
class Series:
    label: str
    values: list[float]  # one a step of the range; NaN where Prometheus has none


def substitute(expr: str, variables: Mapping[str, str]) -> str:
    """``expr`` with Grafana's variables replaced; :class:`Unsupported` if one is left."""
    for name, value in variables.items():
        expr = expr.replace(name, value)
    if "$" in expr:
        raise Unsupported(f"a variable this drawing does not know in {expr!r} (knows {sorted(variables)})")
    return expr


def variables(rate_interval: str) -> dict[str, str]:
    """What Grafana substitutes in a query: ``$__rate_interval`` is its window for ``rate()``."""
    return {"$__rate_interval": rate_interval, "${__rate_interval}": rate_interval}


def panels(dashboard: Mapping[str, Any], rate_interval: str) -> list[Panel]:
    """The dashboard's panels as this module draws them; :class:`Unsupported` on anything else."""
    extra = [v["name"] for v in dashboard.get("templating", {}).get("list", []) if v["type"] != "datasource"]
    if extra:
        raise Unsupported(f"dashboard variables {extra}: only the data source is understood")
    out = []
    for p in dashboard["panels"]:
        title, kind = p.get("title", ""), p["type"]
        if kind not in PANEL_TYPES:
            raise Unsupported(f"panel {title!r}: type {kind!r} (understood: {sorted(PANEL_TYPES)})")
        defaults = p.get("fieldConfig", {}).get("defaults", {})
        unit, stacking = defaults.get("unit", "short"), defaults.get("custom", {}).get("stacking", {})
        if unit not in UNITS:
            raise Unsupported(f"panel {title!r}: unit {unit!r} (understood: {sorted(UNITS)})")
        if stacking.get("mode", "none") not in STACKING:
            raise Unsupported(f"panel {title!r}: stacking {stacking['mode']!r}")
        if p.get("fieldConfig", {}).get("overrides") or p.get("transformations"):
            raise Unsupported(f"panel {title!r}: field overrides and transformations are not drawn")
        grid = p["gridPos"]
        x, y, w, h = (int(grid[k]) for k in "xywh")
        if not (0 <= x and w > 0 and x + w <= COLUMNS and y >= 0 and h > 0):
            raise Unsupported(f"panel {title!r}: gridPos {grid} is not inside the {COLUMNS}-column grid")
        targets = tuple(
            Target(substitute(t["expr"], variables(rate_interval)), t.get("legendFormat", ""))
            for t in p["targets"]
            if not t.get("hide")
        )
        if not targets:
            raise Unsupported(f"panel {title!r}: no query to draw")
        fill = defaults.get("custom", {}).get("fillOpacity", 0) / 100
        out.append(
            Panel(
                title, x, y, w, h, unit, stacking.get("mode") == "normal", fill, defaults.get("min"), targets
            )
        )
    return out


def legend(fmt: str, labels: Mapping[str, str]) -> str:
    """A series' name as Grafana shows it: ``legendFormat`` with its ``{{label}}``s filled in, or
    the series' labels (``{instance="w1"}``) without one."""
    if fmt:
        return _LEGEND.sub(lambda m: labels.get(m[1], ""), fmt).strip()
    named = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if k != "__name__")
    return labels.get("__name__", "") + "{" + named + "}"


def query(prometheus: str, panel: Panel, start: float, end: float, step: float) -> list[Series]:
    """Every series of ``panel``'s targets over ``start``..``end``, one value a ``step``."""
    steps = int((end - start) // step) + 1
    out = []
    for target in panel.targets:
        params: dict[str, str | float] = {"query": target.expr, "start": start, "end": end, "step": step}
        r = httpx.get(f"{prometheus}/api/v1/query_range", params=params, timeout=30)
        r.raise_for_status()
        for result in r.json()["data"]["result"]:
            values = [math.nan] * steps
            for t, v in result["values"]:
                values[round((float(t) - start) / step)] = float(v)
            out.append(Series(legend(target.legend, result["metric"]), values))
    return sorted(out, key=lambda s: s.label) if len(panel.targets) == 1 else out


def draw(
    title: str,
    note: str,
    drawn: list[tuple[Panel, list[Series]]],
    annotations: list[tuple[float, str]],
    start: float,
    step: float,
    path: Path,
) -> None:
    """The panels with their series (from :func:`query`) as a PNG at ``path``: the dashboard's
    ``title`` and a ``note`` above them, and ``annotations`` ((unix time, text)) as Grafana draws
    its own: a dashed line across every panel, the text on the top row's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    rows = max(p.y + p.h for p, _ in drawn)
    page = _Page(HEADER_PX + rows * (CELL_PX + GAP_PX))
    fig = plt.figure(figsize=(WIDTH_PX / 100, page.height_px / 100), dpi=100, facecolor=THEME["page"])
    plt.rcParams.update({"font.size": 8, "text.color": THEME["text"]})
    fig.text(GAP_PX / WIDTH_PX, 1 - 22 / page.height_px, title, fontsize=13, weight="bold", va="center")
    fig.text(GAP_PX / WIDTH_PX, 1 - 42 / page.height_px, note, fontsize=8, color=THEME["dim"], va="center")
    for panel, series in drawn:
        _panel(fig, page, panel, series, annotations, start, step)
    buffer = io.BytesIO()
    fig.savefig(buffer, facecolor=THEME["page"])
    plt.close(fig)
    # 256 colours are plenty for flat panels and thin lines, at a third of the bytes.
    Image.open(buffer).convert("RGB").quantize(256).save(path, optimize=True)


@dataclass(frozen=True)
class _Page:
    height_px: float

    def box(self, x_px: float, top_px: float, w_px: float, h_px: float) -> tuple[float, float, float, float]:
        """A rectangle in pixels from the top left, in figure fractions (left, bottom, width, height)."""
        h = self.height_px
        return (x_px / WIDTH_PX, 1 - (top_px + h_px) / h, w_px / WIDTH_PX, h_px / h)


def _panel(
    fig: Any,
    page: _Page,
    panel: Panel,
    all_series: list[Series],
    annotations: list[tuple[float, str]],
    start: float,
    step: float,
) -> None:
    """One panel on ``fig``: its box and title, its graph (:func:`_graph`), and Grafana's "list"
    legend under the graph."""
    from matplotlib.patches import FancyBboxPatch

    col_px = (WIDTH_PX - GAP_PX) / COLUMNS
    x_px, top_px = GAP_PX + panel.x * col_px, HEADER_PX + panel.y * (CELL_PX + GAP_PX)
    w_px, h_px = panel.w * col_px - GAP_PX, panel.h * (CELL_PX + GAP_PX) - GAP_PX
    left, bottom, width, height = page.box(x_px, top_px, w_px, h_px)
    fig.patches.append(
        FancyBboxPatch(
            (left, bottom), width, height, boxstyle="round,pad=0,rounding_size=0.003",
            transform=fig.transFigure, facecolor=THEME["panel"], edgecolor=THEME["border"], lw=1,
            zorder=-1,  # under the axes (zorder 0)
        )
    )  # fmt: skip
    fig.text(left + 8 / WIDTH_PX, 1 - (top_px + 16) / page.height_px, panel.title, fontsize=9.5, va="center")
    series = [s for s in all_series if any(v and not math.isnan(v) for v in s.values)]
    # Grafana's "list" legend under the graph, in columns as wide as the longest name (~6 px a letter).
    longest = max((len(s.label) for s in series), default=1)
    ncol = max(1, min(len(series), int(w_px // (30 + 6 * longest))))
    legend_rows = max(1, math.ceil(len(series) / ncol))
    ax = fig.add_axes(page.box(x_px + 58, top_px + 44, w_px - 72, h_px - 44 - 24 - 16 * legend_rows))
    handles = _graph(ax, panel, series, annotations, start, step)
    # matplotlib fills a legend column by column; Grafana's reads row by row.
    cells = [r * ncol + c for c in range(ncol) for r in range(legend_rows)]
    ax.legend(
        handles=[handles[k] for k in cells if k < len(handles)], loc="lower left",
        bbox_to_anchor=(left + 4 / WIDTH_PX, bottom + 4 / page.height_px), bbox_transform=fig.transFigure,
        ncol=ncol, frameon=False, fontsize=7.5, handlelength=1.2, handletextpad=0.4, columnspacing=1.2,
        labelcolor=THEME["text"],
    )  # fmt: skip


def _graph(
    ax: Any,
    panel: Panel,
    series: list[Series],
    annotations: list[tuple[float, str]],
    start: float,
    step: float,
) -> list[Any]:
    """``series`` drawn on a panel's axes as Grafana's time series (stacked or not, filled as the panel
    says), with the annotations; the lines, for the legend."""
    import numpy as np
    from matplotlib.ticker import FuncFormatter

    ax.set_facecolor(THEME["panel"])
    for side in ax.spines.values():
        side.set_visible(False)
    ax.tick_params(colors=THEME["dim"], length=0, labelsize=7.5)
    ax.grid(True, color=GRID, lw=0.8)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos, unit=panel.unit: UNITS[unit](v)))
    ax.xaxis.set_major_formatter(FuncFormatter(_clock))
    xs = [start + i * step for i in range(len(series[0].values))] if series else []
    base, handles = np.zeros(len(xs)), []
    for i, s in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        ys = np.array(s.values)
        low = base.copy() if panel.stacked else np.zeros(len(xs))
        top = low + ys
        handles += ax.plot(xs, top, color=colour, lw=1.2, label=s.label)
        ax.fill_between(xs, low, top, color=colour, alpha=panel.fill, lw=0)
        if panel.stacked:
            base = base + np.nan_to_num(ys)
    for at, what in annotations:
        ax.axvline(at, color=ANNOTATION, lw=0.9, ls=(0, (4, 3)), alpha=0.7)
        if panel.y == 0:
            ax.text(at, 1.02, what, transform=ax.get_xaxis_transform(), color=ANNOTATION,
                    fontsize=7, ha="center", va="bottom")  # fmt: skip
    if xs:
        ax.set_xlim(xs[0], xs[-1])
        # A time every 30 s on the clock, none at the edges (where it would run off the panel).
        ax.set_xticks(range(math.ceil((xs[0] + 10) / 30) * 30, int(xs[-1] - 10), 30))
    if panel.minimum is not None:
        ax.set_ylim(bottom=panel.minimum)
    if not series:
        ax.text(0.5, 0.5, "No data", transform=ax.transAxes, ha="center", color=THEME["dim"])
    return handles
