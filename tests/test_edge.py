"""The gateway at the edge, before any key is checked: slow and silent clients, huge heads, too many
connections, half-open peers (``gateway/protocol.py``). Raw sockets against a real uvicorn process."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from typing import Any

import httpx

from tailgate.dev.sse import assert_exactly_once, read_sse, text_of
from tests.harness import MakeStack, expected_answer

DEADLINE = {"TAILGATE_REQUEST_TIMEOUT_S": "1"}


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def _answer(reader: asyncio.StreamReader, within: float = 5.0) -> tuple[int, dict[str, Any]]:
    """Read until the server closes: the status and the JSON error body."""
    async with asyncio.timeout(within):
        raw = await reader.read()  # to EOF: the server must close
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)


async def test_silent_and_trickling_clients_get_408_and_are_closed_at_the_request_deadline(
    make_stack: MakeStack,
) -> None:
    url = await make_stack(**DEADLINE).agateway()
    port = _port(url)
    silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(20)]
    trickling = [await asyncio.open_connection("127.0.0.1", port) for _ in range(20)]

    async def trickle(writer: asyncio.StreamWriter) -> None:
        # Slowloris: a byte every 0.2 s, each of which restarted uvicorn's own keep-alive timer.
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        while not writer.is_closing():
            writer.write(b"X")
            await asyncio.sleep(0.2)

    tricklers = [asyncio.create_task(trickle(w)) for _, w in trickling]
    started = time.monotonic()
    try:
        answers = await asyncio.gather(*(_answer(r) for r, _ in silent + trickling))
    finally:
        for t in tricklers:
            t.cancel()
        for _, w in silent + trickling:
            w.close()
    assert time.monotonic() - started < 4
    for status, body in answers:
        assert status == 408
        assert body["error"]["code"] == "request_timeout"


async def test_a_trickling_second_request_on_a_kept_alive_connection_gets_408(
    make_stack: MakeStack,
) -> None:
    url = await make_stack(**DEADLINE).agateway()  # keep-alive stays at its default 75 s
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(url))
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await reader.readuntil(b'{"status":"ok"}')).startswith(b"HTTP/1.1 200")
    writer.write(b"GET /healthz HTTP/1.1\r\n")

    async def trickle() -> None:
        while not writer.is_closing():
            writer.write(b"X")
            await asyncio.sleep(0.2)

    task = asyncio.create_task(trickle())
    try:
        status, body = await _answer(reader)
    finally:
        task.cancel()
        writer.close()
    assert (status, body["error"]["code"]) == (408, "request_timeout")


async def test_a_body_that_never_completes_gets_408(make_stack: MakeStack) -> None:
    url = await make_stack(**DEADLINE).agateway()
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(url))
    head = b"POST /v1/streams HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    writer.write(head + b'Content-Length: 100\r\n\r\n{"prompt": "hi')
    status, body = await _answer(reader)
    writer.close()
    assert (status, body["error"]["code"]) == (408, "request_timeout")


async def test_a_head_over_the_size_limit_gets_431(make_stack: MakeStack) -> None:
    url = await make_stack(TAILGATE_MAX_HEADER_BYTES="4096").agateway()
    port = _port(url)
    # One endless header line, and a complete head of many headers.
    endless = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 8000
    many = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(
        b"X-%d: %s\r\n" % (i, b"b" * 100) for i in range(60)
    )
    for request in (endless, many + b"\r\n"):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        status, body = await _answer(reader)
        writer.close()
        assert (status, body["error"]["code"]) == (431, "headers_too_large")
    async with httpx.AsyncClient() as client:  # a head under the limit is served
        r = await client.get(f"{url}/healthz", headers={"X-Pad": "c" * 3000})
    assert r.status_code == 200


async def test_connections_past_the_cap_get_503_until_idle_ones_are_closed(
    make_stack: MakeStack,
) -> None:
    url = await make_stack(TAILGATE_MAX_CONNECTIONS="5", TAILGATE_REQUEST_TIMEOUT_S="2").agateway()
    port = _port(url)
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(5)]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    status, body = await _answer(reader, within=1.5)  # at once, long before the idle ones time out
    writer.close()
    assert (status, body["error"]["code"]) == (503, "unavailable")
    # The held ones reach their deadline and free their places.
    await asyncio.gather(*(_answer(r) for r, _ in held))
    for _, w in held:
        w.close()
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{url}/healthz")).status_code == 200


async def test_client_connections_carry_tcp_keepalive_so_half_open_peers_are_closed(
    make_stack: MakeStack,
) -> None:
    url = await make_stack().agateway()
    port = _port(url)
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\n")
    await writer.drain()
    # The server's side of the connection (source port = the gateway's) has a keepalive timer.
    ss = ["ss", "-tnoH", "state", "established", f"( sport = :{port} )"]
    out = ""
    for _ in range(50):
        out = (await asyncio.to_thread(subprocess.run, ss, capture_output=True, text=True)).stdout
        if out.strip():
            break
        await asyncio.sleep(0.05)
    writer.close()
    assert "timer:(keepalive" in out, out


async def test_a_stream_lasting_longer_than_the_request_deadline_is_served_whole(
    make_stack: MakeStack, mock_url: str, prompt: str
) -> None:
    stack = make_stack(**DEADLINE)
    url = await stack.agateway()
    await stack.aworker()
    prompt += " [mock:tokens=25,delay_ms=100]"  # 2.5 s of tokens
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.post(f"{url}/v1/streams", json={"prompt": prompt}, headers=stack.headers)
        assert r.status_code == 202
        _, events = await read_sse(client, url + r.json()["events_url"], headers=stack.headers)
    assert_exactly_once(events)
    assert events[-1].event == "done"
    assert text_of(events) == await expected_answer(mock_url, prompt)
