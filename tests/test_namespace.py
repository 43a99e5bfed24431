"""The components install under one name: `flowscope.<component>`, never as top-level modules.

`flowscope/engine`, `flowscope/collector`, `flowscope/ws_bridge` and `flowscope/contract` are
symlinks to the folders at the repository root (README, "How it installs"). From the root the
folders are still importable by their bare names, and a file imported under two names is two
modules (two registries, two enums that compare unequal), so nothing may import them that way.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OLD = ("engine", "collector", "ws_bridge", "contract")
# Python the project owns: the components are read through their folders, once each.
TREES = ("engine", "collector", "ws_bridge", "contract", "flowscope", "tests", "bench", "examples", "scripts")
SYMLINKED = {("flowscope", name) for name in OLD}
_ALT = "|".join(OLD)
_CODE_IMPORT = re.compile(rf"(?m)^\s*(?:from|import)\s+({_ALT})\b(?!\s*=)")
_MODULE_STRING = re.compile(rf"^({_ALT})(?:[.:][A-Za-z_]\w*)+$")


def _python_files() -> list[Path]:
    files: list[Path] = []
    for tree in TREES:
        top = ROOT / tree
        if top.is_dir():
            files += [p for p in sorted(top.rglob("*.py")) if p.relative_to(ROOT).parts[:2] not in SYMLINKED]
    return [p for p in files if p.resolve() != Path(__file__).resolve()]


def old_imports(source: str) -> list[tuple[int, str]]:
    """Imports of a bare component name: statements, and code or module paths in strings."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] in OLD]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] in OLD:
            found.append((node.lineno, node.module or ""))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
            if _CODE_IMPORT.search(text) or _MODULE_STRING.match(text.strip()):
                found.append((node.lineno, text.strip().splitlines()[0][:80]))
    return found


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import engine", [(1, "engine")]),
        ("from collector.schema import MIGRATIONS", [(1, "collector.schema")]),
        ("import ws_bridge.app as app", [(1, "ws_bridge.app")]),
        ("importlib.import_module('engine.sdk_direct')", [(1, "engine.sdk_direct")]),
        ('CODE = "from contract import EventName"', [(1, "from contract import EventName")]),
        ("from flowscope.engine import Engine\nimport flowscope.collector as collector", []),
        ("from . import attributes", []),
        ('tokens = {"tok": ("engine", frozenset())}', []),
    ],
)
def test_old_imports_finds_bare_component_imports(source: str, expected: list[tuple[int, str]]) -> None:
    assert old_imports(source) == expected


def test_nothing_imports_a_component_by_its_bare_name() -> None:
    found = [f"{p.relative_to(ROOT)}:{n}: {what}" for p in _python_files() for n, what in old_imports(p.read_text())]
    assert found == [], "import the components as flowscope.<component>"


def test_each_component_is_a_symlink_under_flowscope() -> None:
    for name in OLD:
        link = ROOT / "flowscope" / name
        assert link.is_symlink() and os.readlink(link) == f"../{name}", f"flowscope/{name} -> ../{name}"


def test_only_flowscope_is_packaged_at_the_top() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {pattern.split(".")[0].rstrip("*") for pattern in include} == {"flowscope"}
    assert not set(config["tool"]["mypy"]["files"]) & set(OLD), "mypy reaches them through flowscope/"


def test_the_whole_package_imports_under_one_name() -> None:
    """Import every module of the package in a fresh interpreter: no bare name is loaded."""
    probe = (
        "import json, pkgutil, sys, flowscope\n"
        "for m in pkgutil.walk_packages(flowscope.__path__, 'flowscope.'):\n"
        "    if m.name not in ('flowscope.__main__',):\n"
        "        __import__(m.name)\n"
        f"print(json.dumps(sorted(n for n in sys.modules if n.split('.')[0] in {OLD!r})))\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
