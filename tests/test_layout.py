"""The tree is the architecture: the layers import only what they may, and the README's Architecture
section names every module where it lives."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gateway", "worker", "tailgate", "tailgate/dev", "bench")
# What each layer must never import (a prefix of a module's dotted name). ``tailgate/cli.py`` is the
# composition root: it alone picks what a process runs, so it alone reaches the others.
FORBIDDEN = {
    "gateway": ("worker", "bench", "tests", "tailgate.dev"),
    "worker": ("gateway", "bench", "tests", "tailgate.dev"),
    "tailgate": ("gateway", "worker", "bench", "tests", "tailgate.dev"),
    "tailgate/dev": ("gateway", "worker", "bench", "tests"),
}
ROOTS = {"tailgate/cli.py"}


def modules(package: str) -> list[Path]:
    """The package's own ``*.py`` files (not a subpackage's)."""
    return sorted((ROOT / package).glob("*.py"))


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_each_layer_imports_only_what_it_may() -> None:
    crossings = {
        f"{path.relative_to(ROOT)} imports {name}"
        for package, banned in FORBIDDEN.items()
        for path in modules(package)
        if str(path.relative_to(ROOT)) not in ROOTS
        for name in imported(path)
        if any(name == b or name.startswith(b + ".") for b in banned)
    }
    assert crossings == set()
    assert {"gateway.server", "worker.runner"} <= imported(ROOT / "tailgate" / "cli.py")


def test_the_readme_architecture_names_every_module_under_its_package() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Architecture\n", 1)[1].split("\n## ", 1)[0]
    # A top-level bullet per package: "- **gateway/** ...", up to the next top-level bullet.
    bullets = dict(re.findall(r"^- \*\*([a-z/]+)/\*\*(.*?)(?=^- |\Z)", section, re.M | re.S))
    missing = {
        f"{package}/{path.name}"
        for package in PACKAGES
        for path in modules(package)
        if path.name != "__init__.py" and f"`{path.name}`" not in bullets.get(package, "")
    }
    assert missing == set()
