"""References from node config to data: `{{ nodes.fetch.body }}`, `{{ input.city }}`.

A string that is exactly one reference becomes the referenced value (any type);
references inside longer strings are rendered as text. This keeps declarative
files as expressive as Python definitions without embedding a language.
"""

from __future__ import annotations

import json
import re
from typing import Any

_REF = re.compile(r"\{\{\s*([A-Za-z_][\w.\-]*)\s*\}\}")


class TemplateError(ValueError):
    pass


def references(value: Any) -> set[str]:
    """Node ids referenced by `nodes.<id>` anywhere in a config value."""
    found: set[str] = set()
    if isinstance(value, str):
        for match in _REF.finditer(value):
            parts = match.group(1).split(".")
            if parts[0] == "nodes" and len(parts) > 1:
                found.add(parts[1])
    elif isinstance(value, dict):
        for item in value.values():
            found |= references(item)
    elif isinstance(value, list | tuple):
        for item in value:
            found |= references(item)
    return found


def render(value: Any, scope: dict[str, Any]) -> Any:
    if isinstance(value, str):
        whole = _REF.fullmatch(value.strip())
        if whole:
            return _lookup(whole.group(1), scope)
        return _REF.sub(lambda m: _as_text(_lookup(m.group(1), scope)), value)
    if isinstance(value, dict):
        return {k: render(v, scope) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [render(v, scope) for v in value]
    return value


def _lookup(path: str, scope: dict[str, Any]) -> Any:
    current: Any = scope
    for part in path.split("."):
        if isinstance(current, dict) and part in current:
            current = current[part]
        elif isinstance(current, list) and part.isdigit() and int(part) < len(current):
            current = current[int(part)]
        else:
            raise TemplateError(f"reference {{{{ {path} }}}} does not resolve (no {part!r})")
    return current


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)
