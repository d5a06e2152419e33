"""The browser module (``/v1/client.js``) and the demo page, in a real Chromium driven by Playwright:
Debian's ``chromium`` package (``scripts/test`` installs it), never a browser Playwright downloads.

The pages run against real gateways and workers; the fault tests SIGKILL a gateway and start it
again on the same port (a browser reconnects to the URL it has, as it would behind a load balancer),
or SIGKILL a worker so that another takes the stream over."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, Page, Route, async_playwright
from redis.asyncio import Redis

from tailgate.dev.procs import Child, free_port, tailgate_command
from tailgate.settings import Settings
from tests.harness import FAST_TAKEOVER, MakeStack, Stack, expected_answer

# The binary, not the /usr/bin/chromium launcher script (which misreads some /dev/shm mounts).
CHROMIUM = os.environ.get("CHROMIUM") or "/usr/lib/chromium/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",  # the tests may run as root
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
APP = "http://localhost:9"  # the app's own origin, served by Playwright: not the gateway's
ENDED = (
    "() => ['done', 'error', 'cancelled', 'failed'].includes(document.getElementById('status').textContent)"
)


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    if not (os.access(CHROMIUM, os.X_OK) or shutil.which(CHROMIUM)):
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (or set CHROMIUM)")
    async with async_playwright() as p:
        chromium = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        await chromium.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    """A fresh page; whatever it logs to its console is printed when a test fails."""
    # The gateways are on loopback. A page of another origin (APP) may reach them only from a secure
    # context (hence `localhost`) with Chromium's local network access permission, which a user grants.
    context = await browser.new_context(
        viewport={"width": 980, "height": 1000}, permissions=["local-network-access"]
    )
    tab = await context.new_page()
    tab.on("console", lambda m: print(f"console.{m.type}: {m.text}"))
    tab.on("pageerror", lambda e: print(f"page error: {e}"))
    yield tab
    await context.close()


@pytest.fixture(scope="session")
async def demo(stack: Stack) -> str:
    """A gateway of the session's stack with the demo on; its URL."""
    return await stack.agateway(TAILGATE_DEMO="true")


def gateway_on(stack: Stack, port: int, **env: str) -> Child:
    """A gateway of ``stack`` on a given port (``Stack.gateway`` picks a free one), ready; the stack
    stops it with the rest."""
    argv = tailgate_command("gateway", "--host", "127.0.0.1", "--port", str(port))
    child = Child("gateway", argv, stack.env | env, stack.log_dir)
    stack.procs.append(child)
    child.wait_http(f"http://127.0.0.1:{port}/readyz")
    return child


async def seen(page: Page) -> dict[str, Any]:
    """What the demo page shows, and what it recorded (``window.demo``)."""
    shown: dict[str, Any] = await page.evaluate(
        """() => ({
            status: document.getElementById('status').textContent,
            seq: document.getElementById('seq').textContent,
            reconnects: document.getElementById('reconnects').textContent,
            text: document.getElementById('text').textContent,
            log: document.getElementById('log').innerText,
            events: window.demo.events.map(e => ({seq: e.seq, type: e.type, at: e.at})),
            opens: window.demo.reconnects.map(r => r.at),
            error: window.demo.error,
        })"""
    )
    return shown


def assert_whole(shown: dict[str, Any], answer: str) -> None:
    """The page ended with the exact answer, every seq once and in order, and says so."""
    assert shown["error"] is None, shown["log"]
    assert shown["status"] == "done", shown["log"]
    assert shown["text"] == answer
    seqs = [e["seq"] for e in shown["events"]]
    assert seqs == list(range(1, len(seqs) + 1))
    assert shown["events"][-1]["type"] == "done"
    assert shown["seq"] == str(seqs[-1])


async def test_module_is_served_to_any_origin_and_the_demo_is_off_unless_enabled(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    r = await client.get(f"{stack.url}/v1/client.js", headers={"Origin": APP})
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/javascript; charset=utf-8"
    assert r.headers["access-control-allow-origin"] == "*"  # a module script is fetched with CORS
    assert "export function follow(" in r.text and "export async function start(" in r.text
    again = await client.get(f"{stack.url}/v1/client.js", headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304

    assert (await client.get(f"{stack.url}/demo")).status_code == 404
    refused = await client.post(f"{stack.url}/demo/streams", json={"prompt": "hi"})
    assert refused.status_code == 404
    assert refused.json()["error"]["code"] == "not_found"
    paths = (await client.get(f"{stack.url}/openapi.json")).json()["paths"]
    assert not {"/v1/client.js", "/demo", "/demo/streams"} & set(paths)


def test_demo_needs_a_key_to_create_with_unless_auth_is_off() -> None:
    with pytest.raises(ValueError, match="TAILGATE_API_KEYS"):
        Settings(demo=True, auth=True, api_keys="")
    assert Settings(demo=True, auth=False, api_keys="").demo
    assert Settings(demo=True, auth=True, api_keys="k1").demo


async def test_demo_creates_streams_with_its_key_for_its_own_page_only(
    client: httpx.AsyncClient, stack: Stack, demo: str
) -> None:
    url = demo
    body = {"prompt": "demo [mock:tokens=2]"}

    for foreign in ({"Origin": "http://evil.test"}, {"Sec-Fetch-Site": "cross-site"}):
        r = await client.post(f"{url}/demo/streams", json=body, headers=foreign)
        assert r.status_code == 403
        assert r.json()["error"]["code"] == "cross_origin"
    assert (await client.post(f"{url}/demo/streams", json=body | {"model": "x"})).status_code == 422

    own = {"Origin": url, "Sec-Fetch-Site": "same-origin"}
    r = await client.post(f"{url}/demo/streams", json=body, headers=own)
    assert r.status_code == 202
    created = r.json()
    assert set(created) == {"id", "status", "events_url", "status_url", "read_token"}
    # The stream is the demo key's (the first of TAILGATE_API_KEYS): its holder sees it, another key not.
    status = await client.get(f"{url}/v1/streams/{created['id']}", headers=stack.headers)
    assert status.status_code == 200
    other = {"Authorization": "Bearer tg-test-key-two"}
    assert (await client.get(f"{url}/v1/streams/{created['id']}", headers=other)).status_code == 404
    async with Redis.from_url(stack.redis_url, decode_responses=True) as r:
        assert await r.hget(f"tg:{{{created['id']}}}:meta", "owner") != "anonymous"


async def test_a_page_on_another_origin_creates_through_its_backend_and_follows_with_the_module(
    client: httpx.AsyncClient, stack: Stack, page: Page, mock_url: str, prompt: str
) -> None:
    """The README's example: the app's backend holds the key and creates; the page, on the app's
    origin, imports the module from the gateway and reads with the read token (CORS)."""
    gateway = await stack.agateway(TAILGATE_CORS_ORIGINS=APP)
    prompt += " [mock:tokens=40,delay_ms=5]"
    created_by_backend: list[str] = []

    async def backend(route: Route) -> None:
        """The app's backend: it adds the key the page never sees."""
        body = route.request.post_data_json
        r = await client.post(f"{gateway}/v1/streams", json=body, headers=stack.headers)
        created_by_backend.append(r.json()["id"])
        await route.fulfill(status=r.status_code, content_type="application/json", body=r.text)

    await page.route(f"{APP}/", lambda route: route.fulfill(content_type="text/html", body="<p>app</p>"))
    await page.route(f"{APP}/api/streams", backend)
    await page.goto(f"{APP}/")
    result = await page.evaluate(
        """async ([gateway, prompt]) => {
            const { start } = await import(`${gateway}/v1/client.js`);
            const texts = [];
            const stream = await start("/api/streams", { prompt }, { onText: (t) => texts.push(t) });
            const { text, event } = await stream.finished;
            return { id: stream.id, text, type: event.type, seq: stream.seq, duplicates: stream.duplicates,
                     updates: texts.length, status: stream.status };
        }""",
        [gateway, prompt],
    )

    assert result["id"] == created_by_backend[0]
    assert result["text"] == await expected_answer(mock_url, prompt)
    assert (result["type"], result["status"], result["duplicates"]) == ("done", "done", 0)
    assert result["seq"] == 2 + 40 + 1  # queued, started, 40 deltas, done
    assert result["updates"] == 40


@pytest.mark.parametrize("retry_ms", ["0", "1000"], ids=["without_retry_hint", "with_retry_hint"])
async def test_demo_page_rides_out_a_gateway_sigkill_and_ends_with_the_exact_text(
    make_stack: MakeStack, page: Page, mock_url: str, prompt: str, log_dir: Path, retry_ms: str
) -> None:
    s = make_stack(TAILGATE_DEMO="true", TAILGATE_SSE_RETRY_MS=retry_ms)
    await s.aworker()
    port = free_port()
    gateway = await asyncio.to_thread(gateway_on, s, port)
    base = f"http://127.0.0.1:{port}"
    prompt += " [mock:tokens=300,delay_ms=20]"

    await page.goto(f"{base}/demo")
    await page.fill("#prompt", prompt)
    await page.click("#start")
    await page.wait_for_function("window.demo.events.filter(e => e.type === 'delta').length >= 20")
    killed_ms = time.time() * 1000
    await asyncio.to_thread(gateway.stop, 10, kill=True)  # SIGKILL: no goodbye, no retry hint
    await asyncio.to_thread(gateway_on, s, port)
    back_ms = time.time() * 1000
    await page.wait_for_function(ENDED, timeout=60_000)
    shown = await seen(page)
    await page.screenshot(path=str(log_dir / f"demo-after-gateway-kill-{retry_ms}.png"), full_page=True)

    assert_whole(shown, await expected_answer(mock_url, prompt))
    assert int(shown["reconnects"]) >= 1  # shown on the page
    assert "connection lost (network)" in shown["log"] and "reconnected after" in shown["log"]
    reopened = shown["opens"][0]
    first = next(e for e in shown["events"] if e["at"] >= reopened)
    assert first["seq"] > 20  # resumed, not read again from the start
    print(
        f"\nretry hint {'none' if retry_ms == '0' else retry_ms + ' ms'}: gateway SIGKILL -> "
        f"replacement ready {back_ms - killed_ms:.0f} ms, first resumed event in the browser "
        f"{first['at'] - killed_ms:.0f} ms"
    )


async def test_demo_page_surfaces_a_reset_when_a_worker_dies_and_ends_with_the_new_attempts_text(
    make_stack: MakeStack, page: Page, mock_url: str, prompt: str
) -> None:
    s = make_stack(TAILGATE_DEMO="true", **FAST_TAKEOVER)
    url = await s.agateway()
    workers = [await s.aworker(), await s.aworker()]
    prompt += " [mock:tokens=200,delay_ms=10]"

    await page.goto(f"{url}/demo")
    await page.fill("#prompt", prompt)
    await page.click("#start")
    await page.wait_for_function("window.demo.events.filter(e => e.type === 'delta').length >= 10")
    stream_id = await page.text_content("#stream-id")
    async with Redis.from_url(s.redis_url, decode_responses=True) as r:
        owner = await r.hget(f"tg:{{{stream_id}}}:meta", "worker")
    pid = int(str(owner).rsplit("-", 2)[1])
    [running] = [w for w in workers if w.pid == pid]
    running.signal(signal.SIGKILL)
    await page.wait_for_function(ENDED, timeout=60_000)
    shown = await seen(page)

    assert_whole(shown, await expected_answer(mock_url, prompt))
    assert [e["type"] for e in shown["events"]].count("reset") == 1
    assert "reset (worker_lost): the text so far is void" in shown["log"]
    assert shown["reconnects"] == "0"  # the connection held; the stream started over


SSE_HEADERS = {"Content-Type": "text/event-stream", "Access-Control-Allow-Origin": APP}


def frames(*events: tuple[int, str, dict[str, Any]]) -> str:
    return "".join(
        f"id: 1-{seq}\nevent: {kind}\ndata: {json.dumps({'seq': seq} | data)}\n\n"
        for seq, kind, data in events
    )


@pytest.mark.parametrize(
    ("body", "outcome"),
    [
        (
            frames(
                (1, "queued", {}),
                (2, "started", {}),
                (3, "delta", {"text": "a"}),
                (3, "delta", {"text": "a"}),
                (2, "started", {}),
                (4, "delta", {"text": "b"}),
                (5, "done", {}),
            ),
            {"status": "done", "text": "ab", "seq": 5, "duplicates": 2, "error": None},
        ),
        (
            frames(
                (1, "queued", {}),
                (2, "started", {}),
                (3, "delta", {"text": "a"}),
                (5, "delta", {"text": "c"}),
            ),
            {"status": "failed", "text": "a", "seq": 3, "duplicates": 0, "error": "gap"},
        ),
        (
            frames(
                (1, "queued", {}), (2, "delta", {"text": "x"}), (3, "reset", {}), (4, "delta", {"text": "y"})
            )
            + frames((5, "error", {"code": "upstream_error", "message": "boom"})),
            {"status": "error", "text": "y", "seq": 5, "duplicates": 0, "error": "upstream_error"},
        ),
    ],
    ids=["duplicates_dropped", "gap_is_an_error", "reset_voids_the_text"],
)
async def test_module_checks_seq_on_what_the_wire_delivers(
    stack: Stack, page: Page, body: str, outcome: dict[str, Any]
) -> None:
    """Wire faults a correct gateway never makes, served by Playwright: the module drops what it
    has seen, stops at a gap, and voids the text at a reset."""
    await page.route(f"{APP}/", lambda route: route.fulfill(content_type="text/html", body="<p>app</p>"))
    await page.route(f"{APP}/events*", lambda route: route.fulfill(headers=SSE_HEADERS, body=body))
    await page.goto(f"{APP}/")
    result = await page.evaluate(
        """async ([gateway, app]) => {
            const { follow } = await import(`${gateway}/v1/client.js`);
            const stream = follow({ id: "x", read_token: "t", events_url: "/events" }, { base: app });
            const error = await stream.finished.then(() => null, (e) => e.code);
            return { status: stream.status, text: stream.text, seq: stream.seq,
                     duplicates: stream.duplicates, error };
        }""",
        [stack.url, APP],
    )
    assert result == outcome


async def test_drop_connection_button_resumes_after_the_last_event(
    page: Page, demo: str, mock_url: str, prompt: str
) -> None:
    prompt += " [mock:tokens=150,delay_ms=10]"
    await page.goto(f"{demo}/demo")
    await page.fill("#prompt", prompt)
    await page.click("#start")
    for reconnects in (1, 2):
        await page.wait_for_function(f"window.demo.events.length >= {reconnects * 25}")
        await page.click("#drop")
        await page.wait_for_function(f"window.demo.reconnects.length === {reconnects}")
    await page.wait_for_function(ENDED, timeout=60_000)
    shown = await seen(page)

    assert_whole(shown, await expected_answer(mock_url, prompt))
    assert shown["reconnects"] == "2"
    assert shown["log"].count("connection lost (dropped)") == 2


async def test_module_reopens_by_itself_after_error_answers_from_a_load_balancer(
    client: httpx.AsyncClient, stack: Stack, page: Page, demo: str, mock_url: str, prompt: str
) -> None:
    """An answer other than 200 makes EventSource give up for good; the module asks why and, for a
    5xx, opens again after a backoff, resuming where it was."""
    prompt += " [mock:tokens=60,delay_ms=5]"
    created = (await client.post(f"{demo}/v1/streams", json={"prompt": prompt}, headers=stack.headers)).json()
    refusals = 3

    async def load_balancer(route: Route) -> None:
        nonlocal refusals
        if refusals:
            refusals -= 1
            await route.fulfill(status=502, content_type="text/html", body="<h1>502 Bad Gateway</h1>")
        else:
            await route.continue_()

    await page.goto(f"{demo}/demo")
    await page.route("**/events?*", load_balancer)
    result = await page.evaluate(
        """async (created) => {
            const { follow } = await import("/v1/client.js");
            const stream = follow(created);
            const { text } = await stream.finished;
            return { text, seq: stream.seq, reconnects: stream.reconnects, status: stream.status };
        }""",
        created,
    )

    assert refusals == 0
    assert result == {
        "text": await expected_answer(mock_url, prompt),
        "seq": 63,
        "reconnects": 1,
        "status": "done",
    }


async def test_module_stops_with_the_gateways_error_when_the_token_is_refused(
    client: httpx.AsyncClient, stack: Stack, page: Page, demo: str, prompt: str
) -> None:
    created = (await client.post(f"{demo}/v1/streams", json={"prompt": prompt}, headers=stack.headers)).json()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url) if "/events" in r.url else None)
    await page.goto(f"{demo}/demo")
    result = await page.evaluate(
        """async (created) => {
            const { follow } = await import("/v1/client.js");
            const stream = follow({ ...created, read_token: "1.forged" });
            const error = await stream.finished.then(() => null, (e) => [e.code, e.status]);
            return { error, status: stream.status };
        }""",
        created,
    )

    assert result == {"error": ["invalid_token", 401], "status": "failed"}
    assert len(requests) == 2  # EventSource's, then the module's question: no reconnect loop


async def test_the_readme_example_runs_as_written(
    client: httpx.AsyncClient, stack: Stack, page: Page, mock_url: str
) -> None:
    """The README's Browser example, as written but for the gateway's address, on an app's page
    whose backend route adds the key."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("\n## Browser\n", 1)[1].split("\n## ", 1)[0]
    [html] = re.findall(r"```html\n(.*?)```", section, re.S)
    gateway = await stack.agateway(TAILGATE_CORS_ORIGINS=APP)
    html = html.replace("https://gateway.example.com", gateway)

    async def backend(route: Route) -> None:
        body = route.request.post_data_json
        r = await client.post(f"{gateway}/v1/streams", json=body, headers=stack.headers)
        await route.fulfill(status=r.status_code, content_type="application/json", body=r.text)

    await page.route(f"{APP}/", lambda route: route.fulfill(content_type="text/html", body=html))
    await page.route(f"{APP}/api/streams", backend)
    await page.goto(f"{APP}/")
    expected = await expected_answer(mock_url, "Tell me about rivers")
    await page.wait_for_function(
        "expected => document.getElementById('answer').textContent === expected", arg=expected
    )
