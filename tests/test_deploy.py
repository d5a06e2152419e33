"""The deployment files: valid against their schemas (offline), and everything they reference exists:
files, CLI commands, settings, routes, ports, Services, metrics, and Redis configured to lose no
acknowledged event. ``k8s/`` holds core objects (``kubectl apply -f k8s/``), ``k8s/sentinel/`` core
objects to use instead of ``k8s/redis.yaml``, ``k8s/keda/`` KEDA's (validated against the vendored
schema in ``k8s/schemas/``)."""

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
from tests.test_monitoring import exported_samples, metric_names

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SETTINGS = {f"TAILGATE_{name.upper()}" for name in Settings.model_fields}
SDK_ENV = {"OPENAI_API_KEY", "OPENAI_BASE_URL"}


K8S = ROOT / "k8s"
KEDA_SCHEMA = K8S / "schemas" / "keda-scaledobject.json"
# The trigger metadata KEDA's prometheus scaler reads (pkg/scalers/prometheus_scaler.go, at the
# commit the vendored schema names): the schema says only "a map of strings".
KEDA_PROMETHEUS_KEYS = {
    "serverAddress", "query", "queryParameters", "threshold", "activationThreshold", "namespace",
    "customHeaders", "ignoreNullValues", "unsafeSsl", "awsRegion", "timeout", "identityOwner",
}  # fmt: skip
SENTINEL_URL = re.compile(r"redis\+sentinel://([a-z0-9-]+):(\d+)/([A-Za-z0-9_-]+)/(\d+)")


def core_files() -> list[Path]:
    return sorted([*K8S.glob("*.yaml"), *(K8S / "sentinel").glob("*.yaml")])


def load(files: list[Path]) -> list[dict[str, Any]]:
    return [d for f in files for d in yaml.safe_load_all(f.read_text()) if d]


def k8s_docs() -> list[dict[str, Any]]:
    """Every object in k8s/ and its subdirectories, KEDA's too."""
    return load([*core_files(), *(K8S / "keda").glob("*.yaml")])


def named(kind: str, name: str) -> dict[str, Any]:
    [doc] = [d for d in k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (``matchLabels``/``matchExpressions`` with ``In``, or a Service's
    plain map) selects ``labels``."""
    plain = selector.get("matchLabels", selector if "matchExpressions" not in selector else {})
    if any(labels.get(k) != v for k, v in plain.items()):
        return False
    for e in selector.get("matchExpressions", []):
        assert e["operator"] == "In", e
        if labels.get(e["key"]) not in e["values"]:
            return False
    return True


def name(doc: dict[str, Any]) -> str:
    return str(doc["metadata"]["name"])


def workloads() -> list[dict[str, Any]]:
    return [d for d in k8s_docs() if d["kind"] in ("Deployment", "StatefulSet")]


def selected(selector: dict[str, Any]) -> list[dict[str, Any]]:
    return [w for w in workloads() if selects(selector, w["spec"]["template"]["metadata"]["labels"])]


def config() -> dict[str, str]:
    data: dict[str, str] = named("ConfigMap", "tailgate")["data"]
    return data


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
    files = core_files()
    names = {f.name for f in files}
    assert names >= {"config.yaml", "gateway.yaml", "worker.yaml", "redis.yaml", "ingress.yaml"}
    assert "redis-sentinel.yaml" in names
    assert all(d["apiVersion"] != "keda.sh/v1alpha1" for d in load(files))  # k8s/keda/ only
    r = subprocess.run(
        [BIN / "kubernetes-validate", "--strict", "--quiet", *files], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr


def check_keda(*files: Path) -> subprocess.CompletedProcess[str]:
    argv: list[str | Path] = [BIN / "check-jsonschema", "--schemafile", KEDA_SCHEMA, *files]
    return subprocess.run(argv, capture_output=True, text=True)


def test_keda_scaled_object_is_valid_against_the_vendored_crd_schema() -> None:
    files = sorted((K8S / "keda").glob("*.yaml"))
    assert [f.name for f in files] == ["worker-scaledobject.yaml"]
    r = check_keda(*files)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "kedacore/keda" in yaml.safe_load(KEDA_SCHEMA.read_text())["$comment"]


def test_keda_schema_refuses_a_misspelled_field(tmp_path: Path) -> None:
    text = (K8S / "keda" / "worker-scaledobject.yaml").read_text()
    for right, wrong in [
        ("minReplicaCount:", "minReplicasCount:"),  # in spec
        ("stabilizationWindowSeconds:", "stabilisationWindowSeconds:"),  # deep in advanced
        ("    - type: prometheus", "    - kind: prometheus"),  # in a trigger
        ("kind: ScaledObject", "kind: ScaledObjects"),
    ]:
        assert right in text
        bad = tmp_path / "bad.yaml"
        bad.write_text(text.replace(right, wrong, 1))
        r = check_keda(bad)
        assert r.returncode == 1, (wrong, r.stdout)
        assert "Schema validation errors" in r.stdout, r.stdout


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
    k8s_cmd = pod_spec(named("StatefulSet", "tailgate-redis"))["containers"][0]["args"]
    for cmd in (redis_cmd, k8s_cmd):
        assert cmd[cmd.index("--appendonly") + 1] == "yes"
        assert cmd[cmd.index("--appendfsync") + 1] == "always"
    # The Sentinel setup's Redis pods, primary and replica alike, start from a script.
    [script] = pod_spec(named("StatefulSet", "tailgate-redis-node"))["containers"][0]["args"]
    assert "--appendonly yes --appendfsync always" in script


def test_load_balancer_config_exists_and_does_not_buffer_sse() -> None:
    [mount] = compose()["services"]["lb"]["volumes"]
    conf = ROOT / mount.split(":")[0]
    text = conf.read_text()
    assert "proxy_buffering off;" in text
    assert "server gateway:8000" in text
    assert "gateway" in compose()["services"]


def tailgate_containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in pod_spec(workload)["containers"] if c["image"].startswith("tailgate")]


def test_k8s_ports_services_probes_and_scrape_annotations_agree_with_the_cli_and_the_app() -> None:
    routes = set(create_app(Settings()).openapi()["paths"])
    for service in [d for d in k8s_docs() if d["kind"] == "Service"]:
        [workload] = selected(service["spec"]["selector"])
        ports = {p["name"]: p["containerPort"] for c in pod_spec(workload)["containers"] for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in {*ports, *ports.values()}, (service["metadata"]["name"], port)
    tailgate = [w for w in workloads() if tailgate_containers(w)]
    assert {w["metadata"]["name"] for w in tailgate} == {"tailgate-gateway", "tailgate-worker"}
    for workload in tailgate:
        [c] = tailgate_containers(workload)
        args = build_parser().parse_args(c["args"])
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        # Each declared port is one the process listens on, by its flags.
        listens = {getattr(args, flag, None) for flag in ("port", "metrics_port")} - {None}
        assert set(ports.values()) == listens, (c["args"], ports)
        for probe in ("readinessProbe", "livenessProbe"):
            if probe in c:
                assert c[probe]["httpGet"]["path"] in routes
                assert c[probe]["httpGet"]["port"] in ports
        scrape = workload["spec"]["template"]["metadata"]["annotations"]
        assert scrape["prometheus.io/scrape"] == "true"
        assert int(scrape["prometheus.io/port"]) in ports.values()
        assert scrape["prometheus.io/path"] == "/metrics"
        if args.command == "gateway":
            assert "/metrics" in routes and int(scrape["prometheus.io/port"]) == args.port
        else:
            assert int(scrape["prometheus.io/port"]) == args.metrics_port


def test_k8s_autoscalers_own_the_replicas_and_keda_scales_on_exported_metrics() -> None:
    hpa = named("HorizontalPodAutoscaler", "tailgate-gateway")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", "tailgate-gateway")
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]

    scaled = named("ScaledObject", "tailgate-worker")["spec"]
    assert scaled["scaleTargetRef"] == {"name": "tailgate-worker"}  # a Deployment, KEDA's default
    assert 2 <= scaled["minReplicaCount"] < scaled["maxReplicaCount"]
    [trigger] = scaled["triggers"]
    assert trigger["type"] == "prometheus"
    assert set(trigger["metadata"]) <= KEDA_PROMETHEUS_KEYS, set(trigger["metadata"]) - KEDA_PROMETHEUS_KEYS
    used = metric_names(trigger["metadata"]["query"])
    assert used == {"tailgate_queue_depth", "tailgate_streams_running"}
    assert used <= set(exported_samples())
    # KEDA aims at `threshold` streams per worker: under what one worker may run.
    assert 0 < float(trigger["metadata"]["threshold"]) <= int(config()["TAILGATE_CONCURRENCY"])

    for app in ("tailgate-gateway", "tailgate-worker"):
        deployment = named("Deployment", app)
        assert "replicas" not in deployment["spec"], f"{app}: its autoscaler owns the replica count"
        budget = named("PodDisruptionBudget", app)["spec"]
        assert selected(budget["selector"]) == [deployment]
        assert budget["minAvailable"] < 2  # below every autoscaler's minimum: a drain can proceed


def test_k8s_ingress_routes_to_the_gateway_service_and_keeps_sse_streaming() -> None:
    ingress = named("Ingress", "tailgate")
    [rule] = ingress["spec"]["rules"]
    [path] = rule["http"]["paths"]
    backend = path["backend"]["service"]
    service = named("Service", backend["name"])
    port = backend["port"]
    assert port.get("name") in {p["name"] for p in service["spec"]["ports"]} or port.get("number") in {
        p["port"] for p in service["spec"]["ports"]
    }
    assert selected(service["spec"]["selector"]) == [named("Deployment", "tailgate-gateway")]

    notes = ingress["metadata"]["annotations"]
    nginx = {k.removeprefix("nginx.ingress.kubernetes.io/"): v for k, v in notes.items()}
    assert nginx["proxy-buffering"] == "off"
    ping_s = float(config().get("TAILGATE_PING_S", Settings.model_fields["ping_s"].default))
    assert int(nginx["proxy-read-timeout"]) > 4 * ping_s  # an idle stream outlives a few lost pings
    assert int(nginx["proxy-send-timeout"]) > 4 * ping_s
    body = nginx["proxy-body-size"]
    assert body.endswith("m") and int(body[:-1]) << 20 > Settings.model_fields["max_body_bytes"].default
    assert "affinity" not in nginx  # any gateway resumes any stream


def test_k8s_redis_is_reached_only_by_tailgate_pods() -> None:
    policies = [d for d in k8s_docs() if d["kind"] == "NetworkPolicy"]
    guarded = {w["metadata"]["name"] for p in policies for w in selected(p["spec"]["podSelector"])}
    redis = {
        w["metadata"]["name"]
        for w in workloads()
        if pod_spec(w)["containers"][0]["image"].startswith("redis")
    }
    assert redis == {"tailgate-redis", "tailgate-redis-node", "tailgate-sentinel"}
    assert guarded == redis
    clients = {"tailgate-gateway", "tailgate-worker"}
    for policy in policies:
        [target] = selected(policy["spec"]["podSelector"])
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        [rule] = policy["spec"]["ingress"]
        [source] = rule["from"]
        assert set(source) == {"podSelector"}  # pods of this namespace, nothing from elsewhere
        allowed = {w["metadata"]["name"] for w in selected(source["podSelector"])}
        assert clients <= allowed <= clients | redis, allowed
        ports = {p["containerPort"] for c in pod_spec(target)["containers"] for p in c["ports"]}
        assert {p["port"] for p in rule["ports"]} == ports


def test_k8s_gateways_and_workers_spread_over_nodes_and_zones() -> None:
    for app in ("tailgate-gateway", "tailgate-worker"):
        deployment = named("Deployment", app)
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        spread = pod_spec(deployment)["topologySpreadConstraints"]
        assert {c["topologyKey"] for c in spread} == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
        assert all(selects(c["labelSelector"], labels) for c in spread)


def test_sentinel_url_in_the_docs_names_the_sentinel_service_and_the_monitored_master() -> None:
    [script] = pod_spec(named("StatefulSet", "tailgate-sentinel"))["containers"][0]["args"]
    monitor = re.search(r"^sentinel monitor (\S+) ", script, re.M)
    assert monitor
    places = [K8S / "README.md", K8S / "config.yaml", K8S / "sentinel" / "redis-sentinel.yaml"]
    for place in places:
        urls = SENTINEL_URL.findall(place.read_text())
        assert urls, place
        for host, port, master, db in urls:
            service = named("Service", host)
            assert int(port) in {p["port"] for p in service["spec"]["ports"]}
            assert [w["metadata"]["name"] for w in selected(service["spec"]["selector"])] == [
                "tailgate-sentinel"
            ]
            assert (master, db) == (monitor.group(1), "0")
