"""Inputs and outputs as telemetry: opt-in, truncated, secrets never included."""

from __future__ import annotations

import json
import re
from typing import Any

REDACTED = "[REDACTED]"
_SECRET_KEY = re.compile(r"(pass(word)?|secret|token|api[-_]?key|authorization|credential|private[-_]?key)", re.I)


class Secret(str):
    """A string value that telemetry must never reveal (API keys, passwords…)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "Secret('[REDACTED]')"


def redact(value: Any, *, secret_keys: frozenset[str] = frozenset()) -> Any:
    if isinstance(value, Secret):
        return REDACTED
    if isinstance(value, dict):
        return {
            k: REDACTED
            if (isinstance(k, str) and (k in secret_keys or _SECRET_KEY.search(k)))
            else redact(v, secret_keys=secret_keys)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(v, secret_keys=secret_keys) for v in value]
    return value


def preview(value: Any, max_chars: int, *, secret_keys: frozenset[str] = frozenset()) -> str:
    """A redacted JSON rendering of `value`, cut to `max_chars` with a marker."""
    text = json.dumps(redact(value, secret_keys=secret_keys), default=repr, ensure_ascii=False)
    if len(text) <= max_chars:
        return text
    return text[: max(0, max_chars - 14)] + "…[truncated]"
