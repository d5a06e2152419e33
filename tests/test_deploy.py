"""The deployment files: valid against their schemas (offline), and everything they reference exists:
files, CLI commands, settings, routes, ports, and Redis configured to lose no acknowledged event."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from gateway.app import create_app
from tailgate.cli import build_parser
from tailgate.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SETTINGS = {f"TAILGATE_{name.upper()}" for name in Settings.model_fields}
SDK_ENV = {"OPENAI_API_KEY", "OPENAI_BASE_URL"}


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
