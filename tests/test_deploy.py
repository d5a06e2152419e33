"""The deployment files: valid against their schemas (offline), and everything they reference exists:
files, CLI commands, settings, routes, ports, and Redis configured to lose no acknowledged event."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import REGISTRY

import worker.runner  # noqa: F401  (registers the worker's metrics, as gateway.app does the gateway's)
from gateway.app import create_app
from tailgate.cli import build_parser
from tailgate.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SETTINGS = {f"TAILGATE_{name.upper()}" for name in Settings.model_fields}
SDK_ENV = {"OPENAI_API_KEY", "OPENAI_BASE_URL"}
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


def k8s_docs() -> list[dict[str, Any]]:
    return [d for f in sorted((ROOT / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]


def compose() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return spec


def tailgate_commands() -> set[str]:
    parser = build_parser()
    [sub] = [a for a in parser._actions if a.dest == "command"]
    assert sub.choices is not None
    return set(sub.choices)


def test_compose_file_is_valid_against_the_compose_spec() -> None:
    r = subprocess.run(
        [BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", ROOT / "docker-compose.yml"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_k8s_manifests_are_valid_kubernetes_resources() -> None:
    files = sorted((ROOT / "k8s").glob("*.yaml"))
    assert {f.name for f in files} >= {"config.yaml", "gateway.yaml", "worker.yaml", "redis.yaml"}
    r = subprocess.run(
        [BIN / "kubernetes-validate", "--strict", "--quiet", *files], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_copies_what_exists_and_runs_the_cli() -> None:
    text = (ROOT / "Dockerfile").read_text()
    for line in text.splitlines():
        if line.startswith("COPY "):
            for source in shlex.split(line)[1:-1]:
                assert (ROOT / source).exists(), source
    assert 'ENTRYPOINT ["tailgate"]' in text
    cmd = re.search(r"^CMD (\[.*\])$", text, re.M)
    assert cmd and yaml.safe_load(cmd.group(1))[0] in tailgate_commands()


def test_every_command_setting_route_and_port_referenced_exists() -> None:
    # The app's own `routes` do not list what its routers hold (FastAPI keeps included routers
    # whole); its OpenAPI paths do.
    routes = set(create_app(Settings()).openapi()["paths"])
    services = compose()["services"]
    commands = [s["command"] for s in services.values() if "build" in s]
    env_names = set(compose()["x-tailgate-env"]) | {
        k for s in services.values() for k in s.get("environment", {})
    }
    for doc in k8s_docs():
        if doc["kind"] == "ConfigMap" or doc["kind"] == "Secret":
            env_names |= set(doc.get("data", {})) | set(doc.get("stringData", {}))
        for c in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            if c["image"].startswith("tailgate"):
                commands.append(c["args"])
                assert c["args"][0] in tailgate_commands()
                for probe in ("readinessProbe", "livenessProbe"):
                    if probe in c:
                        assert c[probe]["httpGet"]["path"] in routes
                for port in c.get("ports", []):
                    assert str(port["containerPort"]) in c["args"]  # the gateway listens where declared
    for command in commands:
        assert command[0] in tailgate_commands(), command
        build_parser().parse_args(command)  # every flag is real
    assert env_names - SDK_ENV <= SETTINGS, env_names - SDK_ENV - SETTINGS
    assert "/readyz" in routes and "/healthz" in routes


def test_redis_is_configured_to_lose_no_acknowledged_event() -> None:
    redis_cmd = compose()["services"]["redis"]["command"]
    [statefulset] = [d for d in k8s_docs() if d["kind"] == "StatefulSet"]
    k8s_cmd = statefulset["spec"]["template"]["spec"]["containers"][0]["args"]
    for cmd in (redis_cmd, k8s_cmd):
        assert cmd[cmd.index("--appendonly") + 1] == "yes"
        assert cmd[cmd.index("--appendfsync") + 1] == "always"


def test_load_balancer_config_exists_and_does_not_buffer_sse() -> None:
    [mount] = compose()["services"]["lb"]["volumes"]
    conf = ROOT / mount.split(":")[0]
    text = conf.read_text()
    assert "proxy_buffering off;" in text
    assert "server gateway:8000" in text
    assert "gateway" in compose()["services"]


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


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    # promtool parses a rule's expression: each panel query becomes a recording rule.
    rules = [
        {"record": f"dashboard:query{i}", "expr": q.replace("$__rate_interval", "5m")}
        for i, q in enumerate(dashboard_queries())
    ]
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
