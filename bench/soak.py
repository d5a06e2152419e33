"""``python -m bench.soak [--streams N] [--minutes M] [--quick]``: the chaos soak.

N concurrent clients run streams for M minutes through two gateways and two workers, all on one
Redis (AOF, ``appendfsync always``) reached through a TCP fault proxy, while a chaos loop, every few
seconds, does one of: SIGKILL a worker, SIGTERM a worker, SIGKILL a gateway, SIGTERM a gateway,
SIGKILL and restart Redis, or reset every Redis connection. Whatever it stops comes back a moment
later. Clients behave like ``EventSource``: on a dropped connection or an error status they reconnect
to a random gateway with their ``Last-Event-ID``.

Each stream is checked the way a client can check it: every ``seq`` from 1 to the last, once
(a missing one is a lost event, a repeated one a duplicate), exactly one terminal event, and the text
after the last ``reset`` equal to the mock's answer for the same request. The worst takeover is the
longest silence a client saw before a ``reset`` (kill → new attempt).

Progress prints every 5 s; at the end a table, JSON and a PNG go to ``bench/results/``. Every process
started is stopped at the end, on error and on Ctrl-C too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import openai

from bench.procs import ROOT, Child, _wait_http, _wait_registered, raise_fd_limit
from tailgate.dev.faultproxy import FaultProxy
from tailgate.dev.procs import RedisServer, free_port
from tailgate.events import id_key

RESULTS = ROOT / "bench" / "results"
API_KEY = "tg-soak-key"
MODEL = "gpt-4o-mini"
ACTIONS = ("kill_worker", "term_worker", "kill_gateway", "term_gateway", "restart_redis", "cut_redis")


@dataclass
class Tally:
    started: int = 0
    done: int = 0
    ended_with_error: int = 0
    text_exact: int = 0
    text_wrong: int = 0
    lost: int = 0
    duplicated: int = 0
    extra_terminals: int = 0
    resets: int = 0
    reconnects: int = 0
    create_retries: int = 0
    worst_takeover_s: float = 0.0
    takeovers: list[float] = field(default_factory=list)
    finished_at: list[float] = field(default_factory=list)
    chaos: list[tuple[float, str]] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)


class Cluster:
    """Redis behind a fault proxy, a mock model, two gateways on fixed ports, two workers."""

    def __init__(self, log_dir: Any) -> None:
        self.log_dir = log_dir
        self.redis = RedisServer(appendonly=True)
        self.proxy = FaultProxy(0)
        self.mock: Child | None = None
        self.gateway_ports = [free_port(), free_port()]
        self.gateways: list[Child | None] = [None, None]
        self.workers: list[Child | None] = [None, None]
        self.env: dict[str, str] = {}
        self.mock_url = ""

    async def start(self) -> None:
        self.redis.start()
        self.proxy.target_port = self.redis.port
        await self.proxy.start()
        mock_port = free_port()
        self.mock_url = f"http://127.0.0.1:{mock_port}"
        args = ["mock-upstream", "--port", str(mock_port), "--delay-ms", "20", "--ttft-ms", "200"]
        self.mock = Child("mock", [sys.executable, "-m", "tailgate", *args], {}, self.log_dir)
        await asyncio.to_thread(_wait_http, f"{self.mock_url}/v1/models", self.mock)
        self.env = {
            "TAILGATE_REDIS_URL": self.proxy.url,
            "TAILGATE_API_KEYS": API_KEY,
            "TAILGATE_RATE_LIMIT_PER_MIN": "100000000",
            "TAILGATE_MAX_ACTIVE_PER_KEY": "100000000",
            "TAILGATE_LOG_FORMAT": "text",
            "TAILGATE_DRAIN_S": "1",
            "TAILGATE_SHUTDOWN_GRACE_S": "3",
            "OPENAI_API_KEY": "sk-soak",
            "OPENAI_BASE_URL": f"{self.mock_url}/v1",
            "PYTHONUNBUFFERED": "1",
            "PATH": "/usr/bin:/bin",
        }
        await asyncio.gather(
            *(self.start_gateway(i) for i in range(2)), *(self.start_worker(i) for i in range(2))
        )

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.gateway_ports]

    async def start_gateway(self, i: int) -> None:
        args = ["gateway", "--host", "127.0.0.1", "--port", str(self.gateway_ports[i])]
        child = Child(f"gateway{i}", [sys.executable, "-m", "tailgate", *args], self.env, self.log_dir)
        self.gateways[i] = child
        await asyncio.to_thread(_wait_http, f"{self.urls[i]}/readyz", child)

    async def start_worker(self, i: int) -> None:
        child = Child(f"worker{i}", [sys.executable, "-m", "tailgate", "worker"], self.env, self.log_dir)
        self.workers[i] = child
        import redis

        with redis.Redis.from_url(self.redis.url, decode_responses=True) as r:
            await asyncio.to_thread(_wait_registered, child, r)

    async def chaos(self, action: str, rng: random.Random) -> str:
        i = rng.randrange(2)
        if action in ("kill_worker", "term_worker"):
            sig = signal.SIGKILL if action == "kill_worker" else signal.SIGTERM
            await _stop(self.workers[i], sig)
            await asyncio.sleep(rng.uniform(0.5, 3.0))
            await self.start_worker(i)
            return f"{action} {i}"
        if action in ("kill_gateway", "term_gateway"):
            sig = signal.SIGKILL if action == "kill_gateway" else signal.SIGTERM
            await _stop(self.gateways[i], sig)
            await asyncio.sleep(rng.uniform(0.2, 2.0))
            await self.start_gateway(i)
            return f"{action} {i}"
        if action == "restart_redis":
            self.redis.stop(kill=True)
            await asyncio.sleep(rng.uniform(0.5, 2.0))
            await asyncio.to_thread(self.redis.start)
            return action
        return f"{action} ({self.proxy.cut()} connections)"

    async def close(self) -> None:
        for child in [*self.gateways, *self.workers, self.mock]:
            if child is not None:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(child.stop)
        await self.proxy.close()
        self.redis.close()


async def _stop(child: Child | None, sig: int) -> None:
    if child is None or child.popen.poll() is not None:
        return
    child.popen.send_signal(sig)
    await asyncio.to_thread(child.popen.wait, 60)
    child.stop()


async def run_stream(
    client: httpx.AsyncClient,
    api: openai.AsyncOpenAI,
    urls: list[str],
    tally: Tally,
    rng: random.Random,
    n: int,
) -> None:
    prompt = f"soak {n} {rng.random()} [mock:tokens={rng.randint(60, 200)}]"
    headers = {"Authorization": f"Bearer {API_KEY}"}
    events_url = None
    while events_url is None:
        try:
            r = await client.post(f"{rng.choice(urls)}/v1/streams", json={"prompt": prompt}, headers=headers)
            if r.status_code == 202:
                events_url = r.json()["events_url"]
                break
        except httpx.HTTPError:
            pass
        tally.create_retries += 1
        await asyncio.sleep(0.2)
    tally.started += 1
    seen: dict[int, int] = {}
    events: list[tuple[str, str, dict[str, Any]]] = []
    last_id: str | None = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        cursor = {"Last-Event-ID": last_id} if last_id else {}
        try:
            async with client.stream("GET", rng.choice(urls) + events_url, headers=headers | cursor) as resp:
                if resp.status_code == 204:
                    break
                if resp.status_code != 200:
                    await resp.aread()
                    await asyncio.sleep(0.2)
                    tally.reconnects += 1
                    continue
                fields: dict[str, str] = {}
                async for line in resp.aiter_lines():
                    if line == "" and "data" in fields:
                        data = json.loads(fields["data"])
                        seen[data["seq"]] = seen.get(data["seq"], 0) + 1
                        events.append((fields["id"], fields["event"], data))
                        last_id = fields["id"]
                        fields = {}
                    elif line and not line.startswith((":", "retry:")):
                        name, _, value = line.partition(":")
                        fields[name] = value.strip()
        except httpx.HTTPError:
            await asyncio.sleep(0.1)
        if events and events[-1][1] in ("done", "error", "cancelled"):
            break
        tally.reconnects += 1
    top = max(seen, default=0)
    tally.lost += sum(1 for s in range(1, top + 1) if s not in seen)
    tally.duplicated += sum(c - 1 for c in seen.values())
    terminals = [e for e in events if e[1] in ("done", "error", "cancelled")]
    tally.extra_terminals += max(0, len(terminals) - 1)
    for k, (entry_id, kind, data) in enumerate(events):
        if kind == "reset":
            tally.resets += 1
            if k and data.get("reason") == "worker_lost":
                gap = (id_key(entry_id)[0] - id_key(events[k - 1][0])[0]) / 1000
                tally.takeovers.append(gap)
                tally.worst_takeover_s = max(tally.worst_takeover_s, gap)
    if not terminals:
        tally.errors["no terminal event"] = tally.errors.get("no terminal event", 0) + 1
        return
    if terminals[-1][1] == "error":
        tally.ended_with_error += 1
        code = terminals[-1][2].get("code", "?")
        tally.errors[code] = tally.errors.get(code, 0) + 1
        return
    tally.done += 1
    tally.finished_at.append(time.monotonic())
    text = ""
    for _, kind, data in events:
        text = "" if kind == "reset" else text + data.get("text", "") if kind == "delta" else text
    reply = await api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}])
    if text == reply.choices[0].message.content:
        tally.text_exact += 1
    else:
        tally.text_wrong += 1


async def soak(streams: int, minutes: float, seed: int) -> dict[str, Any]:
    raise_fd_limit()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_dir = RESULTS / "logs" / f"soak-{stamp}"
    log_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    tally = Tally()
    cluster = Cluster(log_dir)
    t0 = time.monotonic()
    try:
        print("soak: starting Redis (AOF) behind a fault proxy, the mock, 2 gateways, 2 workers", flush=True)
        await cluster.start()
        end = time.monotonic() + minutes * 60
        limits = httpx.Limits(max_connections=4 * streams, max_keepalive_connections=0)
        async with (
            httpx.AsyncClient(timeout=httpx.Timeout(30.0), limits=limits) as client,
            openai.AsyncOpenAI(base_url=f"{cluster.mock_url}/v1", api_key="sk-soak") as api,
        ):
            counter = 0

            async def lane() -> None:
                nonlocal counter
                while time.monotonic() < end:
                    counter += 1
                    await run_stream(client, api, cluster.urls, tally, rng, counter)

            async def chaos() -> None:
                await asyncio.sleep(3)
                while time.monotonic() < end - 10:
                    action = rng.choice(ACTIONS)
                    done = await cluster.chaos(action, rng)
                    tally.chaos.append((time.monotonic() - t0, done))
                    await asyncio.sleep(rng.uniform(3, 8))

            async def progress() -> None:
                while True:
                    await asyncio.sleep(5)
                    last = tally.chaos[-1][1] if tally.chaos else "-"
                    print(
                        f"[{time.monotonic() - t0:5.0f}s] done {tally.done} (exact {tally.text_exact}), "
                        f"error {tally.ended_with_error}, lost {tally.lost}, duplicated {tally.duplicated}, "
                        f"resets {tally.resets}, reconnects {tally.reconnects}; chaos {len(tally.chaos)} "
                        f"(last: {last})",
                        flush=True,
                    )

            reporter = asyncio.create_task(progress())
            try:
                await asyncio.gather(chaos(), *(lane() for _ in range(streams)))
            finally:
                reporter.cancel()
    finally:
        print("soak: stopping every process", flush=True)
        await cluster.close()
    return {
        "streams": streams,
        "minutes": minutes,
        "seed": seed,
        "wall_s": time.monotonic() - t0,
        "stamp": stamp,
        "t0": t0,
        **asdict(tally),
    }


def table(r: dict[str, Any]) -> str:
    kinds: dict[str, int] = {}
    for _, what in r["chaos"]:
        k = what.split()[0]
        kinds[k] = kinds.get(k, 0) + 1
    chaos = ", ".join(f"{k} ×{v}" for k, v in sorted(kinds.items()))
    takeovers = sorted(r["takeovers"])
    p50 = takeovers[len(takeovers) // 2] if takeovers else 0.0
    rows = [
        ("streams completed (`done`)", f"{r['done']} of {r['started']} started"),
        ("text exact after the last `reset`", f"{r['text_exact']} of {r['done']}"),
        ("events lost (a `seq` never received)", str(r["lost"])),
        ("events duplicated (a `seq` received twice)", str(r["duplicated"])),
        ("streams with more than one terminal event", str(r["extra_terminals"])),
        ("streams ended with `error`", f"{r['ended_with_error']} {r['errors'] or ''}".strip()),
        ("resets seen by clients", str(r["resets"])),
        (
            "takeover (silence before a `worker_lost` reset), p50 / worst",
            f"{p50:.1f} s / {r['worst_takeover_s']:.1f} s",
        ),
        ("client reconnects", str(r["reconnects"])),
        ("faults injected", f"{len(r['chaos'])}: {chaos}"),
    ]
    head = (
        f"Chaos soak: {r['streams']} concurrent streams for {r['minutes']:g} min, 2 gateways, 2 workers\n\n"
    )
    return head + "| figure | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows) + "\n"


def plot(r: dict[str, Any], path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    done = sorted(t - r["t0"] for t in r["finished_at"])
    ax1.plot(done, range(1, len(done) + 1), color="tab:green", label="streams completed")
    for t, what in r["chaos"]:
        ax1.axvline(t, color="tab:red", alpha=0.35, lw=1)
        ax1.text(t, 0, what.split()[0], rotation=90, fontsize=7, va="bottom", color="tab:red")
    ax1.set(xlabel="s", ylabel="streams completed", title="completed streams, faults in red")
    ax2.hist(r["takeovers"] or [0], bins=20, color="tab:blue")
    ax2.set(
        xlabel="s of silence before a `worker_lost` reset",
        ylabel="resets",
        title="takeover time seen by clients",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=40, help="concurrent client streams")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="20 streams for 1 minute")
    args = parser.parse_args()
    streams, minutes = (20, 1.0) if args.quick else (args.streams, args.minutes)
    try:
        result = asyncio.run(soak(streams, minutes, args.seed))
    except KeyboardInterrupt:
        sys.exit("soak: interrupted; every process was stopped")
    RESULTS.mkdir(parents=True, exist_ok=True)
    base = RESULTS / f"soak-{result['stamp']}"
    text = table(result)
    (base.with_suffix(".md")).write_text(text)
    (base.with_suffix(".json")).write_text(json.dumps(result, indent=2))
    plot(result, base.with_suffix(".png"))
    print("\n" + text)
    print(f"table, JSON and plot: {base}.{{md,json,png}}")
    healthy = result["lost"] == 0 and result["duplicated"] == 0 and result["text_wrong"] == 0
    sys.exit(0 if healthy else 1)


if __name__ == "__main__":
    main()
