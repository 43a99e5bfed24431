"""Every shared name is defined once, in contract/: no component spells one out itself.

The tree's Python is read with `ast` (so comments and docstrings, which name events to explain
them, are not code) and the page's scripts with a string-literal pattern. A literal counts
when it is exactly a shared name (an event name, a result, a run status, a node state, an
attribute key) or when SQL text quotes one ('success'). Status words are also ordinary words,
so a status word is not counted where it is a field name — a dict key or a subscript
(`{"failed": r["failed"]}`, the REST API's counts); event names and attribute keys count
everywhere.
"""

from __future__ import annotations

import ast
import pathlib
import re
from collections.abc import Iterator

import pytest

from flowscope.collector.schema import MIGRATIONS, SchemaOptions
from flowscope.contract import DerivedEventName, EventName, NodeState, Result, RunStatus, attributes

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("engine", "collector", "ws_bridge", "flowscope")

EVENT_NAMES = {str(n) for enum in (EventName, DerivedEventName) for n in enum}
STATUS_WORDS = {str(s) for enum in (Result, RunStatus, NodeState) for s in enum}
# "error" is a result, but also the live protocol's error frame (ControlType.ERROR, which the
# client and the page do take from the contract), a log level ("execution.log" data) and an
# element id on the page: as a bare word it tells nothing, so it is not searched for.
STATUS_WORDS -= {Result.ERROR.value}
NAMES = EVENT_NAMES | set(attributes.ATTRIBUTE_KEYS)
SQL_QUOTED = re.compile(r"'([a-z_.]+)'")

# Where a shared name may still be spelled out, and why: path → (those names, or None for
# any name in the file; the reason).
ALLOWED: dict[str, tuple[frozenset[str] | None, str]] = {
    "collector/schema.py": (
        None,
        "the SQL of migrations 1–6, already applied to existing databases, must never change (their "
        "text is the schema's history); test_migration_literals_are_in_the_contract checks each name "
        "they use instead. New migrations render their literals from contract/.",
    ),
    "collector/service.py": (frozenset({"running"}), "the writer thread's liveness in /readyz, not a run status"),
    "engine/attempts.py": (
        frozenset({NodeState.CANCELLED}),
        "the error message of an attempt cancelled mid-run (`describe`), not a node state",
    ),
}


def _allowed(path: str, name: str) -> bool:
    names, _ = ALLOWED.get(path, (frozenset(), ""))
    return names is None or name in names


def _field_names(tree: ast.AST) -> set[int]:
    """ids of the constants that are field names (dict keys, subscripts) or docstrings."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            skip.update(id(k) for k in node.keys if k is not None)
        elif isinstance(node, ast.Subscript):
            skip.add(id(node.slice))
        elif isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                skip.add(id(first.value))
    return skip


def python_literals(source: str) -> Iterator[tuple[int, str]]:
    tree = ast.parse(source)
    field_names = _field_names(tree)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Constant) or not isinstance(node.value, str):
            continue
        if node.value in NAMES or (node.value in STATUS_WORDS and id(node) not in field_names):
            yield node.lineno, node.value
        elif node.value not in NAMES | STATUS_WORDS:
            for quoted in SQL_QUOTED.findall(node.value):
                if quoted in NAMES | STATUS_WORDS:
                    yield node.lineno, quoted


_JS_STRING = re.compile(r"""(["'`])((?:(?!\1)[^\\\n])*)\1""")


def script_literals(source: str) -> Iterator[tuple[int, str]]:
    for number, line in enumerate(source.splitlines(), 1):
        if line.lstrip().startswith("//"):
            continue
        for match in _JS_STRING.finditer(line):
            if match.group(2) in NAMES | STATUS_WORDS:
                yield number, match.group(2)


def spelled_out() -> list[str]:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            found += [
                f"{relative}:{n}: {v!r}" for n, v in python_literals(path.read_text()) if not _allowed(relative, v)
            ]
    for path in sorted((ROOT / "ws_bridge" / "static").glob("*.js")):
        relative = path.relative_to(ROOT).as_posix()
        found += [f"{relative}:{n}: {v!r}" for n, v in script_literals(path.read_text()) if not _allowed(relative, v)]
    return found


def test_no_component_spells_out_a_shared_name() -> None:
    assert spelled_out() == [], "import these from contract/ (the page: CONTRACT from /static/contract.js)"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ('TERMINAL = {"workflow.completed"}', [(1, "workflow.completed")]),
        ('state = "cancelled"', [(1, "cancelled")]),
        ("sql = \"countIf(Status = 'success')\"", [(1, "success")]),
        ('attrs.get("workflow.execution.id")', [(1, "workflow.execution.id")]),
        ('row = {"failed": r["failed"], "running": 1}', []),
        ('"""A docstring may say node.failed."""', []),
        ('ERROR = {"type": "error"}', []),
    ],
)
def test_the_search_finds_what_it_should(source: str, expected: list[tuple[int, str]]) -> None:
    assert list(python_literals(source)) == expected


def test_the_script_search_finds_what_it_should() -> None:
    page = 'if (msg.type === "node.failed") x = "pending";\n// "workflow.started" in a comment\nh("div", {id: "log"})'
    assert list(script_literals(page)) == [(1, "node.failed"), (1, "pending")]


def test_migration_literals_are_in_the_contract() -> None:
    """The views' SQL cannot import anything: every attribute key, event name and status it
    quotes must be one the contract defines, or the views and the engine have drifted."""
    options = SchemaOptions()
    sql = "\n".join(statement for migration in MIGRATIONS for statement in migration.statements(options))
    keys = set(re.findall(r"(?:Log|Span)Attributes\['([^']+)'\]", sql))
    assert keys, "the views read attributes"
    assert keys - {"service.name"} <= attributes.ATTRIBUTE_KEYS
    events = set(re.findall(r"EventName = '([^']+)'", sql))
    assert events and events <= EVENT_NAMES
    statuses = set(re.findall(r"'([a-z_]+)' AS Status", sql))
    assert statuses and statuses <= {str(s) for s in RunStatus}
    operations = set(re.findall(r"SpanAttributes\['gen_ai.operation.name'\] = '([^']+)'", sql))
    assert operations == {attributes.OPERATION_INVOKE_WORKFLOW}
