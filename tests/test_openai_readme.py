"""The README's "OpenAI SDKs" examples, run as they are written (Python with the openai package, the
JavaScript under Node with the openai npm package) against a live gateway: the environment variables
they read point them at it."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest

from tailgate.dev.procs import arun, child_env
from tests.harness import Stack, expected_answer

ROOT = Path(__file__).parent.parent
SECTION = "## OpenAI SDKs"


def examples(language: str) -> list[str]:
    """The code blocks in ``language`` of the README's OpenAI section."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index(SECTION + "\n")
    end = readme.find("\n## ", start + len(SECTION))
    section = readme[start : end if end != -1 else None]
    return re.findall(rf"^```{language}\n(.*?)^```$", section, flags=re.DOTALL | re.MULTILINE)


async def answers(mock_url: str) -> list[str]:
    """What the examples print: the mock's answers to their two prompts, a line each."""
    return [
        await expected_answer(mock_url, "Tell me about rivers"),
        await expected_answer(mock_url, "Tell me about lakes"),
    ]


def environment(stack: Stack) -> dict[str, str]:
    return child_env(OPENAI_BASE_URL=f"{stack.url}/v1", OPENAI_API_KEY=stack.api_key)


async def test_readme_python_example_runs_as_written(stack: Stack, mock_url: str, tmp_path: Path) -> None:
    [code] = examples("python")
    script = tmp_path / "example.py"
    script.write_text(code)

    run = await arun([sys.executable, str(script)], env=environment(stack), within=60)

    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == await answers(mock_url)


async def test_readme_javascript_example_runs_as_written(stack: Stack, mock_url: str, tmp_path: Path) -> None:
    node = shutil.which("node")
    assert node, "Node.js is needed for the openai npm package (scripts/test installs it)"
    modules = ROOT / "tests" / "js" / "node_modules"
    if not (modules / "openai").is_dir():
        pytest.fail("the openai npm package is missing: run `npm ci` in tests/js (scripts/test does)")
    [code] = examples("js")
    (tmp_path / "node_modules").symlink_to(modules)  # where `import "openai"` finds the package
    script = tmp_path / "example.mjs"
    script.write_text(code)

    run = await arun([node, str(script)], env=environment(stack), within=60)

    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == await answers(mock_url)
