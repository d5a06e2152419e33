"""Takes ``docs/top.png``: ``tailgate top`` in a real terminal over a small fleet at work.

Run it with the test extra installed (Playwright), Debian's Chromium and tmux (``scripts/test``
installs them): ``.venv/bin/python scripts/top_screenshot.py [docs/top.png]``. It starts a Redis, the
mock model, a gateway and three workers (each capped at 8 streams), starts streams that complete,
fail and get cancelled, SIGKILLs one worker mid-stream so its streams are taken over, starts more
streams than the two survivors have room for, so a queue builds up, then reads ``tailgate top``'s
screen with its colours (``tailgate.dev.terminal``) and has Chromium draw it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
from pathlib import Path

import httpx
from playwright.async_api import async_playwright
from redis.asyncio import Redis

from tailgate import keys
from tailgate.dev.procs import Child, RedisServer, await_until, child_env, free_port, tailgate_command
from tailgate.dev.terminal import Terminal, html

KEY = "tg-screenshot"
CHROMIUM = os.environ.get("CHROMIUM") or "/usr/lib/chromium/chromium"


async def main(out: Path) -> None:
    logs = Path(tempfile.mkdtemp(prefix="tailgate-top-shot-"))
    redis = RedisServer().start()
    children: list[Child] = []
    try:
        mock_port, port = free_port(), free_port()
        mock = Child("mock", tailgate_command("mock-upstream", "--port", str(mock_port)), child_env(), logs)
        children.append(mock)
        env = child_env(
            TAILGATE_REDIS_URL=redis.url,
            TAILGATE_API_KEYS=KEY,
            TAILGATE_CONCURRENCY="8",
            TAILGATE_HEARTBEAT_S="0.5",
            TAILGATE_TAKEOVER_AFTER_S="2",
            TAILGATE_LOG_FORMAT="text",
            OPENAI_API_KEY="sk-mock",
            OPENAI_BASE_URL=f"http://127.0.0.1:{mock_port}/v1",
        )
        gateway = Child(
            "gateway", tailgate_command("gateway", "--host", "127.0.0.1", "--port", str(port)), env, logs
        )
        children.append(gateway)
        workers = [Child(f"worker{i}", tailgate_command("worker"), env, logs) for i in range(3)]
        children += workers
        url = f"http://127.0.0.1:{port}"
        await asyncio.to_thread(gateway.wait_http, f"{url}/readyz")
        for w in workers:
            await asyncio.to_thread(w.wait_for_log, " ready (concurrency")
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}) as client:

            async def start(prompt: str) -> str:
                r = await client.post("/v1/streams", json={"prompt": prompt})
                r.raise_for_status()
                return str(r.json()["id"])

            for prompt in ("a [mock:status=400]", "b [mock:fail_after=5]", "c [mock:fail_after=9]"):
                await start(prompt)
            for i in range(6):
                await start(f"short {i} [mock:tokens=40]")
            cancel = await start("cancel me [mock:tokens=2000]")
            await client.post(f"/v1/streams/{cancel}/cancel")
            first = [await start(f"long {i} [mock:tokens=3000,delay_ms=25]") for i in range(12)]
            async with Redis.from_url(redis.url, decode_responses=True) as r:

                async def running(n: int) -> bool:
                    return int(await r.zcard(keys.RUNNING)) == n

                await await_until(lambda: running(12), "the first streams running", within=60)
                owners = [await r.hget(keys.meta(i), "worker") for i in first]
                victim = next(w for w in workers if f"-{w.pid}-" in str(owners[0]))
                lost = sum(f"-{victim.pid}-" in str(o) for o in owners)
                victim.signal(signal.SIGKILL)

                async def taken_over() -> bool:
                    return int(await r.hget(keys.STATS, "takeovers") or 0) == lost

                await await_until(taken_over, "its streams taken over", within=60)
                for i in range(14):  # more than the two survivors' room: a queue builds up
                    await start(f"more {i} [mock:tokens=3000,delay_ms=25]")
                await await_until(lambda: running(16), "both survivors at their cap", within=60)
            with Terminal(tailgate_command("top"), env, width=104, height=21) as term:
                await await_until(
                    lambda: "tokens/s -" not in term.screen(), "a rate on screen", within=30, blocking=True
                )
                await asyncio.sleep(1.5)  # another frame, so the rate is over a whole second
                screen = await asyncio.to_thread(term.screen, colours=True)
    finally:
        for c in children:
            c.stop()
        redis.close()
    page = Path(logs) / "top.html"
    page.write_text(html(screen, title="tailgate top"))
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        tab = await browser.new_page(device_scale_factor=2)
        await tab.goto(page.as_uri())
        await tab.locator("pre").screenshot(path=str(out))
        await browser.close()
    print(f"wrote {out}")


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/top.png")))
