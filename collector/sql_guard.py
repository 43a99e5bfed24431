"""Which user SQL may run, decided by ClickHouse's own parser.

Why the parser and not patterns over the text: a regex sees characters, ClickHouse runs a
syntax tree. Comments, quoting, case, nesting, multi-statement input and clauses in unusual
places all change what the text looks like and not what the tree is; every pattern list
misses one of them, and the miss is a write (`SELECT 1 INTO OUTFILE '….pth'` is code
execution) or a read outside the database. `readonly=1` does not close that gap in the
embedded engine: chdb writes INTO OUTFILE files and runs the scalar `file()` under it.

So, for each query:

1. `formatQuerySingleLine` parses the text, bound as a query parameter so it stays data:
   syntax errors and multi-statement input fail here, and what comes back is the one
   statement's canonical text, the only thing that is checked and run afterwards.
2. The same call asks the parser whether the statement can take an output `FORMAT`; it
   cannot when it already has one (the endpoint answers JSON, so that is refused).
3. `EXPLAIN AST` of the canonical text gives the tree, and the rules read it: the
   statement kind (SELECT/WITH, SHOW, DESCRIBE, EXPLAIN of one of those), no output file
   (an INTO OUTFILE path is a literal hanging off the statement node itself), no table
   function but the generators in `TABLE_FUNCTIONS`, no scalar function in `FUNCTIONS_REFUSED`.

Readonly and the limits still ride on the query as ClickHouse settings (ws_bridge/history.py
`History.sql`); a server should add its own read-only user (deploy/clickhouse/users.d).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from clickhouse_connect.driver.client import Client

STATEMENTS = "SELECT, WITH, SHOW, DESCRIBE and EXPLAIN"
# Table functions that generate rows and read nothing outside the query itself.
TABLE_FUNCTIONS = frozenset(
    {"numbers", "numbers_mt", "zeros", "zeros_mt", "generate_series", "generateseries", "values", "view"}
)
# Scalar functions that read outside the database: `file(path)` returns any readable file.
FUNCTIONS_REFUSED = frozenset({"file", "catboostevaluate", "modelevaluate"})
_SELECT_KINDS = frozenset({"SelectWithUnionQuery", "SelectIntersectExceptQuery", "DescribeQuery"})


class Refused(ValueError):
    """The statement may not run; the message says what is not allowed."""


@dataclass(frozen=True)
class Checked:
    statement: str
    # The session is read-only already (a server user's profile): ClickHouse refuses any
    # setting change then, so the caller sends its limits only when this is False.
    readonly_session: bool


@dataclass
class _Node:
    label: str
    children: list[_Node]

    @property
    def kind(self) -> str:
        return self.label.split(" ", 1)[0]

    def walk(self, parent: _Node | None = None) -> Iterator[tuple[_Node, _Node | None]]:
        yield self, parent
        for child in self.children:
            yield from child.walk(self)


def check(client: Client, query: str) -> Checked:
    """The canonical statement to run, or `Refused`; ClickHouse's own errors (syntax) propagate."""
    canonical, has_format, readonly = client.query(
        "SELECT formatQuerySingleLine({q:String}),"
        " formatQuerySingleLineOrNull(concat(formatQuerySingleLine({q:String}), ' FORMAT TabSeparated')) IS NULL,"
        " getSetting('readonly')",
        parameters={"q": query},
        settings=_explicit_select(client),
    ).result_rows[0]
    if not str(canonical).isprintable():
        raise Refused(_UNREADABLE)
    tree = _tree(client.command(f"EXPLAIN AST {canonical}"))
    _check_kind(tree, canonical)
    if any(child.kind == "Literal" for child in tree.children):
        raise Refused("INTO OUTFILE is not allowed: results come back in the response, never into a file")
    if has_format:
        raise Refused("a FORMAT clause is not supported: results come back as JSON (flowscope sql --format csv|json)")
    for node, parent in tree.walk():
        if node.kind != "Function":
            continue
        name = node.label.split(" ")[1]
        if parent is not None and parent.kind == "TableExpression" and name.lower() not in TABLE_FUNCTIONS:
            raise Refused(
                f"table function {name}() is not allowed: read the database's tables"
                f" (generators allowed: {', '.join(sorted(TABLE_FUNCTIONS))})"
            )
        if name.lower() in FUNCTIONS_REFUSED:
            raise Refused(f"function {name}() is not allowed: it reads outside the database")
    _check_text(str(canonical))
    return Checked(str(canonical), int(readonly) != 0)


# Independent of the tree: the formatter writes these as plain keywords and names, so
# their absence from the canonical text is certain (a literal or alias that merely
# mentions them is refused too, a price worth paying for a check that cannot be fooled).
_OUTFILE = re.compile(r"\bINTO\s+OUTFILE\b", re.IGNORECASE)
_FILE_CALL = re.compile(r"(?<![\w.])`?(?:" + "|".join(sorted(FUNCTIONS_REFUSED)) + r")`?\s*\(", re.IGNORECASE)


def _check_text(canonical: str) -> None:
    if _OUTFILE.search(canonical):
        raise Refused("INTO OUTFILE is not allowed: results come back in the response, never into a file")
    found = _FILE_CALL.search(canonical)
    if found:
        name = found.group(0).strip("`( ")
        raise Refused(f"function {name}() is not allowed: it reads outside the database")


def _explicit_select(client: Client) -> dict[str, int]:
    """The embedded engine parses `SELEC x` as `SELECT SELEC AS x` (implicit_select, on in
    clickhouse-local); a server does not. Off where the session may change it, so a typo is a
    syntax error everywhere."""
    setting = client.server_settings.get("implicit_select")
    # A read-only session refuses the change: a server's reader (setting.readonly) or a
    # client made read-only after connecting.
    if setting is None or setting.readonly or client.get_client_setting("readonly") not in (None, "0"):
        return {}
    return {} if setting.value == "0" else {"implicit_select": 0}


def _check_kind(node: _Node, canonical: str) -> None:
    if _reads(node):
        return
    verb = canonical.split(" ", 1)[0].upper()
    if node.kind == "Explain":
        raise Refused("EXPLAIN is allowed of SELECT, WITH, SHOW and DESCRIBE statements only (readonly mode)")
    raise Refused(f"{verb} is not allowed: user SQL runs in readonly mode, only {STATEMENTS} statements")


def _reads(node: _Node) -> bool:
    if node.kind in _SELECT_KINDS or node.kind.startswith("Show") or node.label.startswith("SHOW "):
        return True
    if node.kind == "Explain":
        # Its children: EXPLAIN's own settings (Set), the explained statement, output clauses.
        explained = [child for child in node.children if child.kind not in ("Set", "Literal", "Identifier")]
        return bool(explained) and _reads(explained[0])
    return False


def _tree(explained: Any) -> _Node:
    """`EXPLAIN AST` output (one node a line, indented one space per level) as nodes.

    ClickHouse prints aliases and identifiers raw in it, so a name holding a line break
    would add lines that are not nodes (and could hide the real ones from the rules). The
    tree is taken only when it is exactly what ClickHouse declared: one root, each line a
    node one level below its parent at most, every node with as many children as its
    `(children N)` says (none when it says nothing), every line printable. Anything else
    is refused, never read leniently."""
    if isinstance(explained, str):
        text = explained
    elif isinstance(explained, Sequence):
        text = "\n".join(str(line) for line in explained)
    else:
        text = str(explained)
    root: _Node | None = None
    stack: list[tuple[int, _Node, int]] = []  # (depth, node, declared children)
    for line in text.rstrip("\n").split("\n"):
        match = _LINE.fullmatch(line)
        if match is None or not line.isprintable():
            raise Refused(_UNREADABLE)
        depth = len(match["indent"])
        node = _Node(match["label"].split(" (children ", 1)[0], [])
        while stack and stack[-1][0] >= depth:
            _close(stack.pop())
        if stack:
            if depth != stack[-1][0] + 1:
                raise Refused(_UNREADABLE)
            stack[-1][1].children.append(node)
        elif root is None and depth == 0:
            root = node
        else:
            raise Refused(_UNREADABLE)
        declared = _CHILDREN.search(line)
        stack.append((depth, node, int(declared["count"]) if declared else 0))
    while stack:
        _close(stack.pop())
    if root is None:
        raise Refused("the statement is empty")
    return root


_LINE = re.compile(r"(?P<indent> *)(?P<label>[A-Za-z][A-Za-z0-9_]*(?: .*)?)")
_CHILDREN = re.compile(r" \(children (?P<count>\d+)\)$")
_UNREADABLE = "the statement's names hold characters the check cannot read (line breaks, control characters)"


def _close(entry: tuple[int, _Node, int]) -> None:
    if len(entry[1].children) != entry[2]:
        raise Refused(_UNREADABLE)
