"""The monitoring files in deploy/: the alert rules pass promtool (and their unit tests), the
dashboard's queries parse, every ``tailgate_*`` metric either names is one the code exports, and
every panel of the dashboard is one that ``scripts/dashboard`` (``bench/grafana.py``) can draw."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

import gateway.app  # noqa: F401  (registers the gateway's metrics in the default registry)
import worker.runner  # noqa: F401  (and the worker's)
from bench import grafana
from bench.dashboard import RATE_INTERVAL

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
RULES = ROOT / "deploy" / "prometheus-rules.yml"
# The samples each metric type exposes, by the suffix a query names them with.
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
# What DESIGN.md ("Metrics") names; the dashboard shows each of them.
DESIGN_METRICS = {
    "tailgate_stream_queue_wait_seconds",
    "tailgate_upstream_first_token_seconds",
    "tailgate_streams_finished",
    "tailgate_tokens",
    "tailgate_takeovers",
    "tailgate_streams_running",
    "tailgate_queue_depth",
    "tailgate_sse_connections",
}


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    found = shutil.which("promtool")
    assert found, "promtool is missing: apt-get install prometheus (scripts/test does)"
    return subprocess.run([found, *args], capture_output=True, text=True)


def exported_samples() -> dict[str, str]:
    """Every sample name the gateway's and the worker's code export (``tailgate_tokens_total``,
    ``..._bucket``), to the family it belongs to, from the real registry."""
    return {
        family.name + suffix: family.name
        for family in REGISTRY.collect()
        for suffix in SUFFIXES.get(family.type, ("",))
    }


def dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p["targets"]]


def rule_queries() -> list[str]:
    return [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def metric_names(query: str) -> set[str]:
    return set(re.findall(r"\btailgate_[a-z_]+", query))


def test_alert_rules_pass_promtool_and_fire_in_their_unit_tests() -> None:
    checked = promtool("check", "rules", RULES)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 5 rules found" in checked.stdout
    tested = promtool("test", "rules", ROOT / "tests" / "promtool" / "rules_test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    alerts = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    for alert in alerts:
        assert alert["for"] and alert["labels"]["severity"] in ("warning", "critical"), alert["alert"]
        assert alert["annotations"]["summary"], alert["alert"]


def drawn_queries() -> list[str]:
    """The dashboard's queries as ``scripts/dashboard`` sends them to Prometheus (Grafana's variables
    substituted by ``bench/grafana.py``)."""
    panels = grafana.panels(json.loads(DASHBOARD.read_text()), RATE_INTERVAL)
    return [t.expr for p in panels for t in p.targets]


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    # promtool parses a rule's expression: each panel query, as the picture's drawing sends it (and
    # as Grafana would, but for the window of $__rate_interval), becomes a recording rule.
    rules = [{"record": f"dashboard:query{i}", "expr": q} for i, q in enumerate(drawn_queries())]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = promtool("check", "rules", path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules)} rules found" in checked.stdout


def test_every_metric_the_dashboard_and_the_alerts_name_is_exported_by_the_code() -> None:
    exported = exported_samples()
    on_dashboard = {n for q in dashboard_queries() for n in metric_names(q)}
    in_rules = {n for q in rule_queries() for n in metric_names(q)}
    assert on_dashboard | in_rules <= set(exported), (on_dashboard | in_rules) - set(exported)
    assert {exported[n] for n in on_dashboard} >= DESIGN_METRICS, DESIGN_METRICS - {
        exported[n] for n in on_dashboard
    }
    assert DESIGN_METRICS <= set(exported.values())


def test_metric_name_check_catches_a_misspelled_metric() -> None:
    # The check above is only as good as its parsing: a name the code does not export is caught.
    assert metric_names("sum(rate(tailgate_token_total[5m]))") == {"tailgate_token_total"}
    assert "tailgate_token_total" not in exported_samples()
    assert "tailgate_stream_queue_wait_seconds_bucket" in exported_samples()


def test_the_dashboard_picture_draws_every_panel_and_query_where_the_dashboard_has_them() -> None:
    # docs/dashboard.png is the dashboard drawn by bench/grafana.py, which knows only part of
    # Grafana: grafana.panels raises Unsupported on the rest (the next test), so reading the whole
    # dashboard through it says that each panel is one it draws.
    dashboard = json.loads(DASHBOARD.read_text())
    panels = grafana.panels(dashboard, RATE_INTERVAL)
    assert [p.title for p in panels] == [p["title"] for p in dashboard["panels"]]
    assert drawn_queries() == [q.replace("$__rate_interval", RATE_INTERVAL) for q in dashboard_queries()]
    assert all("$" not in q for q in drawn_queries())
    # The panels tile Grafana's 24-column grid as the picture lays them out: no cell drawn twice.
    cells = [(x, y) for p in panels for x in range(p.x, p.x + p.w) for y in range(p.y, p.y + p.h)]
    assert len(cells) == len(set(cells))


_FIRST = json.loads(DASHBOARD.read_text())["panels"][0]
_DEFAULTS = _FIRST["fieldConfig"]["defaults"]
# Changes to the first panel that the picture cannot draw as Grafana would.
UNDRAWABLE: dict[str, dict[str, Any]] = {
    "a panel type": {"type": "gauge"},
    "a dashboard variable": {"targets": [{"expr": 'max(tailgate_queue_depth{instance=~"$gateway"})'}]},
    "a unit": {"fieldConfig": {"defaults": _DEFAULTS | {"unit": "bytes"}}},
    "a stacking mode": {
        "fieldConfig": {"defaults": _DEFAULTS | {"custom": {"stacking": {"mode": "percent"}}}}
    },
    "field overrides": {"fieldConfig": {"defaults": _DEFAULTS, "overrides": [{"matcher": {"id": "byName"}}]}},
    "a panel off the grid": {"gridPos": _FIRST["gridPos"] | {"x": 18}},
}


@pytest.mark.parametrize("what", UNDRAWABLE)
def test_the_dashboard_picture_refuses_what_it_cannot_draw(what: str) -> None:
    # A dashboard that grows something the drawing does not know fails the test above: here, each
    # such thing, which it would otherwise draw wrong or leave out.
    dashboard = json.loads(DASHBOARD.read_text())
    dashboard["panels"][0] |= UNDRAWABLE[what]
    with pytest.raises(grafana.Unsupported):
        grafana.panels(dashboard, RATE_INTERVAL)
