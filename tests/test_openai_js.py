"""The openai npm package, unmodified, under Node: Chat Completions streamed, and the Responses API's
create, drop, resume. The scripts are in ``tests/js`` (``scripts/test`` installs their package)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tailgate.dev.procs import arun
from tests.harness import Stack, expected_answer, mock_requests

JS = Path(__file__).parent / "js"


async def node(script: str, *args: str) -> dict[str, Any]:
    """Run a script of ``tests/js``; the JSON line it prints."""
    binary = shutil.which("node")
    assert binary, "Node.js is needed for the openai npm package (scripts/test installs it)"
    if not (JS / "node_modules" / "openai").is_dir():
        pytest.fail("the openai npm package is missing: run `npm ci` in tests/js (scripts/test does)")
    run = await arun([binary, str(JS / script), *args], within=60)
    assert run.returncode == 0, run.stderr
    printed: dict[str, Any] = json.loads(run.stdout)
    return printed


async def test_openai_npm_package_streams_chat_completions(stack: Stack, mock_url: str, prompt: str) -> None:
    seen = await node("chat_stream.mjs", stack.url, stack.api_key, prompt)

    assert seen["role"] == "assistant"
    assert seen["text"] == await expected_answer(mock_url, prompt)
    assert seen["finishReason"] == "stop"
    assert seen["usage"]["completion_tokens"] == 24
    assert len(seen["streamId"]) == 32


async def test_openai_npm_package_resumes_a_background_response_after_a_drop(
    stack: Stack, mock_url: str, prompt: str
) -> None:
    prompt += " [mock:tokens=60,delay_ms=10]"
    seen = await node("responses_resume.mjs", stack.url, stack.api_key, prompt, "5")

    expected = await expected_answer(mock_url, prompt)
    assert seen["sequenceNumbers"] == list(range(len(seen["types"])))
    assert seen["types"][seen["startingAfter"]] == "response.output_text.delta"  # dropped mid-text
    assert seen["types"][-1] == "response.completed"
    assert seen["text"] == seen["outputText"] == expected
    assert seen["status"] == "completed"
    assert len(await mock_requests(mock_url, prompt)) == 1
