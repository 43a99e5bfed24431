"""Event bodies are compact JSON any parser reads, whatever a node put in its payload."""

from __future__ import annotations

import datetime
import json
import math
from typing import Any

import pytest

from flowscope.engine.telemetry import event_body


class Opaque:
    def __str__(self) -> str:
        return "opaque!"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"a": 1, "b": [1.5, "x", None, True], "c": {"d": "é"}},
            {"a": 1, "b": [1.5, "x", None, True], "c": {"d": "é"}},
        ),
        ({"when": datetime.date(2026, 1, 2), "obj": Opaque()}, {"when": "2026-01-02", "obj": "opaque!"}),
        ({1: "int key", "t": (1, 2)}, {"1": "int key", "t": [1, 2]}),
        ({"big": 2**70, "obj": Opaque()}, {"big": 2**70, "obj": "opaque!"}),  # beyond 64 bits: the fallback encoder
    ],
)
def test_body_is_json_of_the_payload(data: dict[str, Any], expected: dict[str, Any]) -> None:
    body = event_body(data)
    assert json.loads(body) == expected
    assert ", " not in body and ": " not in body  # compact


def test_non_finite_numbers_become_null_not_invalid_json() -> None:
    body = event_body({"ratio": math.nan, "limit": math.inf})
    assert json.loads(body, parse_constant=lambda name: pytest.fail(f"invalid JSON constant {name}")) == {
        "ratio": None,
        "limit": None,
    }
