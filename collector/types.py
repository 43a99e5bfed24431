"""Shared vocabulary of the collector package."""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Any, Protocol, TypeAlias

Row: TypeAlias = list[Any]


class Signal(StrEnum):
    TRACES = "traces"
    METRICS = "metrics"
    LOGS = "logs"


class StreamSubscriber(Protocol):
    """Receives every accepted OTLP request, in order, after it is queued for storage."""

    def __call__(self, signal: Signal, request: Any) -> None: ...


Unsubscribe: TypeAlias = Callable[[], None]
