"""`POST /ask_query`: the original tutorial's JSON-lines stream, and its JavaScript client unchanged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx

from tailgate.dev.procs import arun
from tests.harness import MakeStack, Stack, expected_answer, mock_requests

HERE = Path(__file__).parent


async def test_ask_query_streams_the_tutorials_json_lines(
    client: httpx.AsyncClient, stack: Stack, mock_url: str, prompt: str
) -> None:
    async with client.stream(
        "POST", f"{stack.url}/ask_query", json={"prompt": prompt}, headers=stack.headers
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert len(response.headers["x-tailgate-stream-id"]) == 32
        lines = [json.loads(line) async for line in response.aiter_lines() if line.strip()]

    expected = await expected_answer(mock_url, prompt)
    assert lines[-1] == {"status": "complete", "data": "Stream finished"}
    assert {line["status"] for line in lines[:-1]} == {"processing"}
    assert "".join(line["data"] for line in lines[:-1]) == expected


async def test_ask_query_requires_a_key_when_auth_is_on(client: httpx.AsyncClient, stack: Stack) -> None:
    r = await client.post(f"{stack.url}/ask_query", json={"prompt": "hi"})
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "unauthorized"
    r = await client.post(f"{stack.url}/ask_query", json={}, headers=stack.headers)
    assert r.status_code == 422


async def test_tutorial_javascript_client_works_unchanged(
    make_stack: MakeStack, mock_url: str, prompt: str
) -> None:
    node = shutil.which("node")
    assert node, "Node.js is needed to run the tutorial's client (scripts/test installs it)"
    open_stack = make_stack(TAILGATE_AUTH="false")  # the tutorial's client sends no key
    url = await open_stack.agateway()
    await open_stack.aworker()

    run = await arun([node, str(HERE / "run_tutorial_client.js"), url, prompt], within=60)

    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    printed = run.stdout.splitlines()
    assert printed[-1] == "[complete] Stream finished"
    assert all(line.startswith("[processing] ") for line in printed[:-1])
    assert "".join(line[len("[processing] ") :] for line in printed[:-1]) == await expected_answer(
        mock_url, prompt
    )
    assert len(await mock_requests(mock_url, prompt)) == 1
