"""Per-node retry policy: which errors retry, how many times, how long to wait."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Backoff(StrEnum):
    FIXED = "fixed"
    LINEAR = "linear"
    EXPONENTIAL = "exponential"


class NonRetryableError(Exception):
    """Raised by a node to fail at once, whatever its retry policy says."""


_DEFAULT_INITIAL_DELAY_S = 0.1
_DEFAULT_MAX_DELAY_S = 30.0
_DEFAULT_JITTER = 0.1


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 1
    backoff: Backoff = Backoff.EXPONENTIAL
    initial_delay_s: float = _DEFAULT_INITIAL_DELAY_S
    max_delay_s: float = _DEFAULT_MAX_DELAY_S
    # Fraction of the delay drawn at random either way, so retries of many
    # executions do not hit a recovering dependency in lockstep.
    jitter: float = _DEFAULT_JITTER
    # Exception class names (the class or any base) that may be retried;
    # empty means every Exception except NonRetryableError.
    retry_on: frozenset[str] = field(default_factory=frozenset)

    def problems(self) -> list[str]:
        found = []
        if self.max_attempts < 1:
            found.append(f"retry.max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_delay_s < 0 or self.max_delay_s < 0:
            found.append("retry delays must be >= 0")
        if not 0 <= self.jitter <= 1:
            found.append(f"retry.jitter must be within [0, 1], got {self.jitter}")
        return found

    def should_retry(self, exc: BaseException, attempt: int) -> bool:
        if attempt >= self.max_attempts or isinstance(exc, NonRetryableError):
            return False
        if not isinstance(exc, Exception):
            return False
        if not self.retry_on:
            return True
        names = {cls.__name__ for cls in type(exc).__mro__}
        return not names.isdisjoint(self.retry_on)

    def delay_s(self, attempt: int, rng: random.Random | None = None) -> float:
        """Delay before attempt `attempt + 1`, given that `attempt` (1-based) failed."""
        if self.backoff is Backoff.FIXED:
            base = self.initial_delay_s
        elif self.backoff is Backoff.LINEAR:
            base = self.initial_delay_s * attempt
        else:
            base = self.initial_delay_s * (2 ** (attempt - 1))
        base = min(base, self.max_delay_s)
        spread = base * self.jitter
        return max(0.0, base + (rng or random).uniform(-spread, spread))

    @classmethod
    def from_config(cls, raw: Any) -> RetryPolicy:
        if raw is None:
            return cls()
        if isinstance(raw, RetryPolicy):
            return raw
        if not isinstance(raw, dict):
            raise ValueError(f"retry must be a mapping, got {type(raw).__name__}")
        unknown = set(raw) - {
            "max_attempts",
            "backoff",
            "initial_delay_s",
            "max_delay_s",
            "jitter",
            "retry_on",
        }
        if unknown:
            raise ValueError(f"unknown retry keys: {', '.join(sorted(unknown))}")
        return cls(
            max_attempts=int(raw.get("max_attempts", 1)),
            backoff=Backoff(raw.get("backoff", Backoff.EXPONENTIAL.value)),
            initial_delay_s=float(raw.get("initial_delay_s", _DEFAULT_INITIAL_DELAY_S)),
            max_delay_s=float(raw.get("max_delay_s", _DEFAULT_MAX_DELAY_S)),
            jitter=float(raw.get("jitter", _DEFAULT_JITTER)),
            retry_on=frozenset(raw.get("retry_on", ())),
        )
