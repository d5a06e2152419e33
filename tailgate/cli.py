"""The ``tailgate`` command line, and the composition root: the only place that reads the
environment into :class:`~tailgate.settings.Settings`, configures logging, and picks what a process
runs (``gateway.server``, ``worker.runner``, the development tools in ``tailgate.dev``). Every command
reads the same ``TAILGATE_*`` environment."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from tailgate import keys
from tailgate.settings import Settings

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from tailgate.apikeys import KeyTable
    from tailgate.store import StreamStore


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tailgate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("dev", help="everything on one machine, nothing configured")
    p.add_argument("--port", type=int, default=8000, help="gateway port (default 8000)")

    p = sub.add_parser("gateway", help="a gateway: one process, or N on one port")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes serving the port, under a supervisor (default: TAILGATE_GATEWAY_WORKERS, 1)",
    )
    # What --workers gives each of its processes: listen on the port beside the others (SO_REUSEPORT).
    p.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)

    p = sub.add_parser("worker", help="a worker: one process, or N under a supervisor")
    p.add_argument(
        "--processes",
        type=int,
        default=None,
        help="worker processes, each with its own TAILGATE_CONCURRENCY (default: "
        "TAILGATE_WORKER_PROCESSES, 1)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus metrics on this port at /metrics (default: TAILGATE_METRICS_PORT, 0: none)",
    )

    p = sub.add_parser("mock-upstream", help="an OpenAI-compatible mock model server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--tokens", type=int, default=32, help="tokens per answer")
    p.add_argument("--delay-ms", type=float, default=20.0, help="pause between tokens")
    p.add_argument("--ttft-ms", type=float, default=200.0, help="pause before the first token")
    p.add_argument("--api-key", default=None, help="the only key accepted (default: any)")

    p = sub.add_parser("top", help="live queue depth, running streams, workers and failures, from Redis")
    p.add_argument("--once", action="store_true", help="print one frame as plain text and exit")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between frames (default 1)")

    p = sub.add_parser("inspect", help="one stream's life: status, attempts, events, timings, usage")
    p.add_argument("id", help="a stream id (or a chatcmpl-/resp_ id of one)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser("keys", help="manage API keys stored in Redis")
    p.add_argument("action", choices=["add", "list", "revoke"])
    p.add_argument(
        "value",
        nargs="?",
        help="add: a label; revoke: the key, or (a prefix of) the id `list` shows; "
        "revoking also cancels the key's unfinished streams",
    )

    return parser


def main(argv: list[str] | None = None) -> None:
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Set but empty is unset to us; prometheus_client, which asks only whether it is set, would
        # write every process's metric files into the working directory.
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    args = build_parser().parse_args(argv)
    if args.command == "mock-upstream":
        return _mock_upstream(args)
    if args.command == "dev":
        return _dev(args)
    if args.command == "gateway":
        settings = _settings(gateway_workers=args.workers)
        return _gateway(settings, args.host, args.port, args.reuse_port)
    if args.command == "worker":
        return _worker(_settings(metrics_port=args.metrics_port, worker_processes=args.processes))
    settings = _settings()
    if args.command == "top":
        return _top(settings, args.once, args.interval)
    if args.command == "inspect":
        return asyncio.run(_inspect(settings, args.id, args.json))
    if args.command == "keys":
        return asyncio.run(_keys(settings, args.action, args.value))


# The settings a command-line flag sets, by flag (the rest come from TAILGATE_* alone).
FLAGS = {"gateway_workers": "--workers", "metrics_port": "--metrics-port", "worker_processes": "--processes"}


def _settings(**flags: object) -> Settings:
    """The environment's settings, with the flags given (not ``None``) over them. A value that is not
    valid exits with status 2 and one line per bad value, naming the flag or the variable to fix."""
    from pydantic import ValidationError

    given = {k: v for k, v in flags.items() if v is not None}
    try:
        return Settings(**given)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else ""
            name = FLAGS[field] if field in given else f"TAILGATE_{field.upper()}"
            lines.append(f"tailgate: {name}={error['input']!s}: {error['msg']}")
        print("\n".join(lines), file=sys.stderr)
        sys.exit(2)


def _gateway(settings: Settings, host: str, port: int, reuse_port: bool) -> None:
    from tailgate import logs

    logs.configure(settings.log_format, settings.log_level, "gateway")
    if settings.gateway_workers > 1:
        child = ["gateway", "--host", host, "--port", str(port), "--reuse-port"]
        env = {"TAILGATE_GATEWAY_WORKERS": "1"}
        return _supervise("gateway", child, settings.gateway_workers, env)
    from gateway.server import serve

    serve(settings, host, port, reuse_port=reuse_port)


def _supervise(
    name: str,
    args: list[str],
    n: int,
    env: dict[str, str],
    *,
    metrics_port: int = 0,
) -> None:
    """Run ``tailgate ARGS`` ``n`` times under a supervisor (``tailgate.supervisor``), with ``env``
    over this environment and a fresh metrics directory shared by the processes; exit with its code."""
    from tailgate import prometheus
    from tailgate.supervisor import Supervisor

    argv = [sys.executable, "-m", "tailgate", *args]
    with prometheus.shared_directory(os.environ.get(prometheus.DIR_ENV)) as directory:
        code = Supervisor(name, argv, os.environ | env, n, directory).run(metrics_port)
    sys.exit(code)


def _worker(settings: Settings) -> None:
    from tailgate import logs

    logs.configure(settings.log_format, settings.log_level, "worker")
    if not os.environ.get("OPENAI_API_KEY"):
        sys.exit("tailgate worker: OPENAI_API_KEY is not set (for the mock upstream any value works)")
    if settings.worker_processes > 1:
        # The supervisor serves the processes' metrics, summed; they serve none of their own.
        env = {"TAILGATE_WORKER_PROCESSES": "1", "TAILGATE_METRICS_PORT": "0"}
        return _supervise(
            "worker", ["worker"], settings.worker_processes, env, metrics_port=settings.metrics_port
        )
    from worker.runner import run

    try:
        import uvloop  # uvicorn[standard] brings it; the gateway runs on it too
    except ImportError:
        asyncio.run(run(settings))
    else:
        uvloop.run(run(settings))


def _mock_upstream(args: argparse.Namespace) -> None:
    import uvicorn

    from tailgate.dev.mock_upstream import MockConfig, create_app

    config = MockConfig(
        tokens=args.tokens, delay_ms=args.delay_ms, ttft_ms=args.ttft_ms, api_key=args.api_key
    )
    uvicorn.run(
        create_app(config),
        host=args.host,
        port=args.port,
        access_log=False,
        backlog=4096,
        log_level="warning",
    )


def _dev(args: argparse.Namespace) -> None:
    """Redis, mock upstream, gateway and worker as child processes; Ctrl-C stops them all."""
    from tailgate.dev.procs import NotReady, RedisServer, free_port, http_ok, wait_until

    env = os.environ.copy()
    env.setdefault("TAILGATE_LOG_FORMAT", "text")
    env.setdefault("TAILGATE_DRAIN_S", "0")  # no load balancer to drain from
    env.setdefault("TAILGATE_DEMO", "true")  # /demo, whose streams use the first key: the one printed
    children: list[subprocess.Popen[bytes]] = []
    redis = None
    configured = (k.strip() for k in env.get("TAILGATE_API_KEYS", "").split(","))
    api_key = next((k for k in configured if k), "") or f"tg-dev-{secrets.token_urlsafe(18)}"
    if api_key not in env.get("TAILGATE_API_KEYS", ""):
        env["TAILGATE_API_KEYS"] = ",".join(k for k in (env.get("TAILGATE_API_KEYS", ""), api_key) if k)
    me = [sys.executable, "-m", "tailgate"]
    try:
        if not env.get("TAILGATE_REDIS_URL"):
            redis = RedisServer().start()
            env["TAILGATE_REDIS_URL"] = redis.url
            print(f"tailgate dev: embedded Redis at {redis.url}", flush=True)
        if not env.get("OPENAI_API_KEY"):
            mock_port = free_port()
            env["OPENAI_API_KEY"] = "sk-mock"
            env["OPENAI_BASE_URL"] = f"http://127.0.0.1:{mock_port}/v1"
            children.append(subprocess.Popen([*me, "mock-upstream", "--port", str(mock_port)], env=env))
            print(f"tailgate dev: mock upstream at {env['OPENAI_BASE_URL']}", flush=True)
        children.append(
            subprocess.Popen([*me, "gateway", "--host", "127.0.0.1", "--port", str(args.port)], env=env)
        )
        children.append(subprocess.Popen([*me, "worker"], env=env))
        base = f"http://127.0.0.1:{args.port}"
        try:
            wait_until(
                lambda: any(c.poll() is not None for c in children) or http_ok(f"{base}/readyz"),
                f"{base}/readyz",
                timeout=60,
            )
        except NotReady as exc:
            raise SystemExit(f"tailgate dev: {exc}") from None
        if any(c.poll() is not None for c in children):
            raise SystemExit("tailgate dev: a child process failed to start")
        print(_banner(base, api_key, demo=http_ok(f"{base}/demo")), flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while all(c.poll() is None for c in children):
            time.sleep(0.2)
        sys.exit("tailgate dev: a child process exited; stopping the rest")
    except KeyboardInterrupt:
        print("\ntailgate dev: stopping", flush=True)
    finally:
        for c in children:
            if c.poll() is None:
                c.terminate()
        for c in children:
            try:
                c.wait(30)
            except subprocess.TimeoutExpired:
                c.kill()
        if redis is not None:
            redis.close()


def _banner(base: str, api_key: str, *, demo: bool) -> str:
    demo_line = f"  demo      {base}/demo   (a page that streams with {base}/v1/client.js)\n" if demo else ""
    return f"""
tailgate dev is running
  gateway   {base}        (API docs: {base}/docs)
{demo_line}  metrics   {base}/metrics
  API key   {api_key}

try it:
  curl -s -X POST {base}/v1/streams -H 'Authorization: Bearer {api_key}' \\
       -H 'Content-Type: application/json' -d '{{"prompt": "Hello"}}'
  curl -N {base}/v1/streams/<id>/events -H 'Authorization: Bearer {api_key}'

Ctrl-C stops everything.
"""


def _top(settings: Settings, once: bool, interval: float) -> None:
    from tailgate import top

    if interval <= 0:
        sys.exit("tailgate top: --interval must be above 0")
    if not once:
        return top.live(settings, interval)  # says so on screen while Redis is unreachable
    from tailgate.connections import REDIS_ERRORS

    try:
        print(asyncio.run(top.once(settings)), flush=True)
    except REDIS_ERRORS as exc:
        sys.exit(f"tailgate top: Redis unreachable ({top.describe(settings)}): {exc}")


async def _inspect(settings: Settings, raw_id: str, as_json: bool) -> None:
    from tailgate import inspection
    from tailgate.connections import REDIS_ERRORS, open_store

    stream_id = inspection.stream_id_of(raw_id)
    if stream_id is None:
        sys.exit(f"tailgate inspect: {raw_id!r} is not a stream id (32 hex digits, from POST /v1/streams)")
    store = await open_store(settings, "cli", 1, wait=False)
    try:
        life = await inspection.read(store.redis, stream_id)
    except REDIS_ERRORS as exc:
        sys.exit(f"tailgate inspect: Redis unreachable: {exc}")
    finally:
        await store.aclose()
    if life is None:
        sys.exit(
            f"tailgate inspect: no stream {stream_id} in Redis: it never existed, or it ended more than "
            f"TAILGATE_RETENTION_S ({settings.retention_s} s) ago and expired"
        )
    print(json.dumps(inspection.as_json(life), indent=2) if as_json else inspection.as_text(life), flush=True)


async def _keys(settings: Settings, action: str, value: str | None) -> None:
    """``tailgate keys``: keys live in Redis under their owner id (``tailgate.apikeys``), computed
    exactly as the gateways compute it, from the same TAILGATE_OWNER_KEY or the one in Redis."""
    from tailgate import apikeys
    from tailgate.connections import open_store

    store = await open_store(settings, "cli", 2, wait=False)
    try:
        table = apikeys.KeyTable(store.redis, await apikeys.load_owner_key(settings, store.redis))
        if action == "add":
            print(await table.add(value or ""))
        elif action == "list":
            for owner in sorted(table.owner(k) for k in settings.static_api_keys):
                print(f"{owner[:16]}  (TAILGATE_API_KEYS)")
            for e in await table.entries():
                note = "  (legacy: moves to tg:owners when first used)" if e.legacy else ""
                print(f"{e.id[:16]}  {e.label}{note}")
        else:
            await _revoke(settings, store, table, value)
    finally:
        await store.aclose()


async def _revoke(settings: Settings, store: StreamStore, table: KeyTable, value: str | None) -> None:
    """Take a key out of Redis, then cancel its unfinished streams: its read tokens already fail
    (a gateway checks the stream's key on each use)."""
    from tailgate.apikeys import legacy_digest
    from tailgate.connections import open_client

    if not value:
        sys.exit("tailgate keys revoke: give the key, or the id `tailgate keys list` shows")
    if value in settings.static_api_keys:
        sys.exit("tailgate keys revoke: that key is in TAILGATE_API_KEYS: take it out there and restart")
    owner, digest = table.owner(value), legacy_digest(value)
    entries = await table.entries()
    exact = [e for e in entries if e.id == (digest if e.legacy else owner)]
    found = exact or [e for e in entries if e.id.startswith(value)]
    if not exact and len(found) != 1:
        sys.exit(f"tailgate keys revoke: {len(found)} keys match {value!r}")
    # Owner ids whose streams go: a key given whole may own streams under its pre-upgrade id too.
    owners = {owner, digest[:32]} if exact else {found[0].id[:32]}
    # Legacy entries first: a gateway moving one to tg:owners meanwhile is then caught by the second.
    for e in sorted(found, key=lambda e: not e.legacy):
        if not await table.remove(e) and not exact:
            sys.exit(
                "tailgate keys revoke: that legacy key was just used, which moved it to tg:owners: "
                "revoke it by the key, or by its new id in `tailgate keys list`"
            )
    queue = open_client(settings.queue_url, "cli")
    try:
        cancelled = [s for o in sorted(owners) for s in await _cancel_unfinished(store, queue, o)]
    finally:
        await queue.aclose()
    label = f" ({found[0].label})" if found[0].label else ""
    print(f"revoked {found[0].id[:16]}{label}; cancelled {len(cancelled)} unfinished streams")


async def _cancel_unfinished(store: StreamStore, queue: Redis, owner: str) -> list[str]:
    """Cancel every unfinished stream of ``owner``: a queued one ends at once, a running one is
    flagged and announced to the workers (as the gateway's cancel route does). The ids cancelled."""
    cancelled = []
    for stream_id in await store.books.zrange(keys.active(owner), 0, -1):
        status = await store.cancel(stream_id)
        if status == "running":
            await queue.publish(keys.CANCEL_CHANNEL, stream_id)
        if status in ("running", "cancelled"):
            cancelled.append(stream_id)
    return cancelled
