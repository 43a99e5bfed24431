"""What the collector admits before anything is queued: workflow lifecycle events the readers
can fold, and records inside a sane time window.

The collector's receivers and the bridge's remote feed run it on every OTLP request ahead of
the pipeline (`admitting`), so both conversion paths (ClickHouse's intake and the Python
converter, collector/intake.py), the spool and the live stream only ever see admitted
records: a refused record is cut out of the request and explained to the client in the
response's `partial_success`, the rest is stored as usual.

A lifecycle event is a log record with an EventName and a `workflow.execution.id`
attribute (what the workflow views read, collector/schema.py). Its `workflow.event.seq`
must be a positive integer and its body empty or a JSON object whose known fields have
the types docs/telemetry.md lists; fields not listed are free.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from flowscope.collector.convert import MAX_NS, any_value
from flowscope.collector.receiver import Consume
from flowscope.collector.types import Outcome, Signal
from flowscope.contract.attributes import EVENT_SEQ as SEQ
from flowscope.contract.attributes import EXECUTION_ID

_MAX_SEQ = (1 << 64) - 1
_NS_PER_DAY = 86_400 * 10**9

# Body fields the readers (history folding, the live hub, the workflow views) compute with.
_COUNTS = frozenset(
    {"attempt", "nextAttempt", "maxAttempts", "totalNodes", "completedNodes", "failedNodes", "skippedNodes",
     "cancelledNodes", "runningNodes", "retryingNodes", "pendingNodes"}
)  # fmt: skip
_NUMBERS = frozenset({"durationMs", "delayMs", "timeToFirstTokenMs", "progress"})
_TEXTS = frozenset({"userId", "trigger", "resumedFrom", "parentExecutionId", "reason", "nodeLabel"})
_KNOWN = _COUNTS | _NUMBERS | _TEXTS | {"usage", "nodes"}


class Refused(ValueError):
    """One record the collector does not admit; the message is the reason given to the client."""


@dataclass(frozen=True)
class TimeWindow:
    """Records stamped more than `max_future_s` ahead of now or more than `max_age_days`
    ago are refused; 0 turns that side off."""

    max_future_s: float = 86_400.0
    max_age_days: float = 365.0

    def bounds(self, now_ns: int) -> tuple[int, int]:
        """(earliest, latest) admitted at `now_ns`."""
        earliest = now_ns - int(self.max_age_days * _NS_PER_DAY) if self.max_age_days > 0 else 0
        latest = now_ns + int(self.max_future_s * 1e9) if self.max_future_s > 0 else MAX_NS
        return earliest, latest

    def check(self, ns: int, what: str, bounds: tuple[int, int]) -> None:
        earliest, latest = bounds
        if earliest <= ns <= latest or ns > MAX_NS:
            return  # beyond DateTime64 altogether: the converter refuses it, saying so
        if ns > latest:
            raise Refused(f"{what} {ns} is more than {self.max_future_s:g} s in the future")
        raise Refused(f"{what} {ns} is more than {self.max_age_days:g} days old")


OFF = TimeWindow(0, 0)


def check_lifecycle_event(record: Any) -> None:
    """Raises Refused when `record` is a lifecycle event the readers could not fold."""
    if not record.event_name:
        return
    # A repeated key keeps its last value in storage (both the intake view and the converter
    # do so): the check reads the same value, or a first decoy would wave the record through.
    execution = seq = None
    for kv in record.attributes:
        key = kv.key
        if key == EXECUTION_ID:
            execution = kv.value
        elif key == SEQ:
            seq = kv.value
    if execution is None or not any_value(execution):
        return
    _check_seq(seq)
    body = record.body.string_value or any_value(record.body)
    if not body:
        return
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise Refused(f"body is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise Refused("body must be a JSON object")
    check_event_data(data)


def _check_seq(seq: Any) -> None:
    if seq is None:
        raise Refused(f"attribute {SEQ} is missing")
    kind = seq.WhichOneof("value")
    if kind == "int_value":
        number = seq.int_value
    elif kind == "string_value" and seq.string_value.isascii() and seq.string_value.isdigit():
        number = int(seq.string_value)
    else:
        raise Refused(f"attribute {SEQ} must be a positive integer, got {any_value(seq)!r}")
    if not 1 <= number <= _MAX_SEQ:
        raise Refused(f"attribute {SEQ} must be a positive integer, got {number}")


def check_event_data(data: dict[str, Any]) -> None:
    """The known fields of an event body have the types the readers compute with."""
    # Most bodies hold a few known fields among others: look only at those.
    for key in _KNOWN.intersection(data):
        value = data[key]
        if value is None:
            continue
        if key in _COUNTS and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            raise Refused(f"body field {key!r} must be a non-negative integer, got {_short(value)}")
        if key in _NUMBERS and not (
            isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        ):
            raise Refused(f"body field {key!r} must be a number, got {_short(value)}")
        if key in _TEXTS and not isinstance(value, str):
            raise Refused(f"body field {key!r} must be a string, got {_short(value)}")
        if key == "usage" and not isinstance(value, dict):
            raise Refused(f"body field 'usage' must be an object, got {_short(value)}")
        if key == "nodes":
            _check_nodes(value)


def _check_nodes(nodes: Any) -> None:
    if not isinstance(nodes, list):
        raise Refused(f"body field 'nodes' must be a list, got {_short(nodes)}")
    for spec in nodes:
        if not isinstance(spec, dict) or not isinstance(spec.get("id"), str) or not spec["id"]:
            raise Refused(f"each of 'nodes' must be an object with a non-empty string 'id', got {_short(spec)}")
        for key in ("type", "label"):
            if spec.get(key) is not None and not isinstance(spec[key], str):
                raise Refused(f"node {spec['id']!r}: {key!r} must be a string")
        depends = spec.get("dependsOn")
        if depends is not None and not (isinstance(depends, list) and all(isinstance(d, str) for d in depends)):
            raise Refused(f"node {spec['id']!r}: 'dependsOn' must be a list of node ids")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass
class Admitted:
    """What `admit` cut out: all counted, the first few explained to the client."""

    rejected: int = 0
    reasons: list[str] = field(default_factory=list)

    def refuse(self, reason: str) -> None:
        self.rejected += 1
        if len(self.reasons) < 5:
            self.reasons.append(reason)


def admit(signal: Signal, request: Any, window: TimeWindow, now_ns: int | None = None) -> Admitted:
    """Cuts the records the collector does not admit out of `request`, in place."""
    bounds = window.bounds(time.time_ns() if now_ns is None else now_ns)
    outcome = Admitted()
    if signal is Signal.LOGS:
        for rl in request.resource_logs:
            for sl in rl.scope_logs:
                _filter(sl.log_records, lambda r: _log_problem(r, window, bounds), "log record", outcome)
    elif signal is Signal.TRACES:
        if window != OFF:
            for rs in request.resource_spans:
                for ss in rs.scope_spans:
                    _filter(ss.spans, lambda s: _span_problem(s, window, bounds), "span", outcome)
    elif window != OFF:
        for rm in request.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    kind = metric.WhichOneof("data")
                    if kind is not None:
                        points = getattr(metric, kind).data_points
                        _filter(points, lambda p: _point_problem(p, window, bounds), "metric", outcome)
    return outcome


def _filter(items: Any, check: Callable[[Any], None], what: str, outcome: Admitted) -> None:
    refused = []
    for index, item in enumerate(items):
        try:
            check(item)
        except Refused as exc:
            name = getattr(item, "event_name", "") or getattr(item, "name", "")
            outcome.refuse(f"{what} {name!r}: {exc}" if name else f"{what}: {exc}")
            refused.append(index)
    for index in reversed(refused):
        del items[index]


def _log_problem(record: Any, window: TimeWindow, bounds: tuple[int, int]) -> None:
    window.check(record.time_unix_nano or record.observed_time_unix_nano, "timeUnixNano", bounds)
    check_lifecycle_event(record)


def _point_problem(point: Any, window: TimeWindow, bounds: tuple[int, int]) -> None:
    window.check(point.time_unix_nano, "timeUnixNano", bounds)


def _span_problem(span: Any, window: TimeWindow, bounds: tuple[int, int]) -> None:
    window.check(span.start_time_unix_nano, "startTimeUnixNano", bounds)


def admitting(
    consume: Consume, window: TimeWindow, count_rejected: Callable[[Signal, int], None] | None = None
) -> Consume:
    """`consume` behind `admit`: refused records are cut out and reported with the outcome."""

    def admitted_consume(signal: Signal, request: Any, raw: bytes | None = None) -> Outcome:
        cut = admit(signal, request, window)
        if not cut.rejected:
            return consume(signal, request, raw)
        if count_rejected is not None:
            count_rejected(signal, cut.rejected)
        # The request changed: its received bytes no longer describe it.
        rest = consume(signal, request, None)
        return Outcome(
            accepted=rest.accepted,
            rejected=rest.rejected + cut.rejected,
            reasons=[*cut.reasons, *rest.reasons][:5],
        )

    return admitted_consume
