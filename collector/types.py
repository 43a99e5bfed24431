"""Shared vocabulary of the collector package."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, TypeAlias

Row: TypeAlias = list[Any]


class Signal(StrEnum):
    TRACES = "traces"
    METRICS = "metrics"
    LOGS = "logs"


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """What became of one OTLP request's items: the receivers answer with it (all refused →
    INVALID_ARGUMENT / 400, some → `partial_success`). `reasons` explains the first few refusals."""

    accepted: int
    rejected: int = 0
    reasons: list[str] = field(default_factory=list)


class Backpressure(Exception):
    """The consumer cannot take more now; the client should retry after `retry_after_s`
    (UNAVAILABLE / 503 with a retry hint)."""

    def __init__(self, reason: str, retry_after_s: float = 1.0) -> None:
        self.reason = reason
        self.retry_after_s = retry_after_s
        super().__init__(reason)


class StreamSubscriber(Protocol):
    """Receives every accepted OTLP request, in order, after it is queued for storage."""

    def __call__(self, signal: Signal, request: Any) -> None: ...


Unsubscribe: TypeAlias = Callable[[], None]
