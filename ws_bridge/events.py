"""OTLP log records carrying workflow events → live events in the wire format; spans → run facts."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import orjson

from flowscope.collector.convert import any_value
from flowscope.contract import EventName
from flowscope.contract.attributes import (
    EVENT_SEQ,
    EXECUTION_ID,
    NODE_ATTEMPT,
    NODE_ID,
    NODE_RESULT,
    NODE_TYPE,
    WORKFLOW_ID,
    WORKFLOW_NAME,
)
from flowscope.ws_bridge.types import LiveEvent

_SPAN_KEYS = frozenset({EXECUTION_ID, WORKFLOW_ID, NODE_ID, NODE_TYPE, NODE_ATTEMPT, NODE_RESULT})

# Where an event's JSON is cached on its dict (flowscope.ws_bridge.types.LiveEvent).
WIRE: Final = "_wire"


def wire_json(event: LiveEvent) -> str:
    """The event as JSON, serialised once however many connections send it or replay it.

    orjson because this runs for every event the bridge sees: 5–10× the standard
    library's encoder, which was a fifth of the bridge's time at 2,000 events/s.
    """
    base = event.get(WIRE)
    if base is None:
        try:
            base = orjson.dumps(event, default=str).decode()
        except TypeError:
            # Integers beyond 64 bits (a node's captured output may hold one): the slow way.
            base = json.dumps(event, separators=(",", ":"), default=str)
        event[WIRE] = base
    return base


def event_from_wire(wire: str) -> LiveEvent:
    """An event back from its JSON, the JSON kept so it is not serialised again."""
    event: LiveEvent = orjson.loads(wire)
    event[WIRE] = wire
    return event


# (epoch second, its text), swapped whole so threads never see one without the other.
_second: tuple[int, str] = (-1, "")


def iso_from_ns(ns: int) -> str:
    """`2026-11-23T10:00:01.123456Z`. Events come in bursts within one second, so the
    formatted second is kept: strftime per event was a tenth of the bridge's time."""
    global _second
    seconds, nanos = divmod(ns, 1_000_000_000)
    cached = _second
    if cached[0] != seconds:
        cached = _second = (seconds, dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    return f"{cached[1]}.{nanos // 1000:06d}Z"


def events_from_logs(request: Any) -> list[LiveEvent]:
    """Every workflow lifecycle event in an ExportLogsServiceRequest, in order."""
    out: list[LiveEvent] = []
    for resource_logs in request.resource_logs:
        for scope_logs in resource_logs.scope_logs:
            for record in scope_logs.log_records:
                if not record.event_name:
                    continue
                attrs = {kv.key: kv.value for kv in record.attributes}
                execution = attrs.get(EXECUTION_ID)
                seq = attrs.get(EVENT_SEQ)
                if execution is None or seq is None:
                    continue
                number = _seq(seq)
                if number is None:
                    continue  # intake refuses these (collector/admission.py); nothing can order it
                body = record.body.string_value or any_value(record.body)
                try:
                    data = orjson.loads(body) if body else {}
                except orjson.JSONDecodeError:
                    data = {"raw": body}
                out.append(
                    {
                        "type": record.event_name,
                        "seq": number,
                        "ts": iso_from_ns(record.time_unix_nano or record.observed_time_unix_nano),
                        "executionId": any_value(execution),
                        "workflowId": _text(attrs.get(WORKFLOW_ID)),
                        "workflowName": _text(attrs.get(WORKFLOW_NAME)),
                        "nodeId": _text(attrs.get(NODE_ID)) or None,
                        "nodeType": _text(attrs.get(NODE_TYPE)) or None,
                        "traceId": record.trace_id.hex(),
                        "spanId": record.span_id.hex(),
                        "data": data if isinstance(data, dict) else {"value": data},
                    }
                )
    return out


def user_of_events(events: Iterable[LiveEvent]) -> str | None:
    """The end user of an execution, from its first workflow.started event."""
    for event in events:
        if event["type"] == EventName.WORKFLOW_STARTED:
            data = event.get("data")
            user = data.get("userId") if isinstance(data, dict) else None
            return user if isinstance(user, str) and user else None
    return None


def _seq(value: Any) -> int | None:
    """A positive sequence number, from an int attribute or a decimal string; None otherwise."""
    if value.WhichOneof("value") == "int_value":
        number = int(value.int_value)
    else:
        text = any_value(value)
        if not (text.isascii() and text.isdigit()):
            return None
        number = int(text)
    return number if 0 < number < 1 << 64 else None


def _text(value: Any) -> str:
    return any_value(value) if value is not None else ""


@dataclass(frozen=True)
class SpanFact:
    """What an ended run or node-attempt span tells the bridge (spans carry no seq)."""

    execution_id: str
    workflow_id: str | None  # run spans
    node_id: str | None  # node attempt spans
    node_type: str | None
    attempt: int
    result: str
    duration_ms: float
    end_ts: str
    trace_id: str
    span_id: str


def facts_from_spans(request: Any) -> list[SpanFact]:
    """The workflow spans of an ExportTraceServiceRequest; every other span is skipped cheaply."""
    out: list[SpanFact] = []
    for resource_spans in request.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                attrs = {kv.key: kv.value for kv in span.attributes if kv.key in _SPAN_KEYS}
                execution = attrs.get(EXECUTION_ID)
                if execution is None:
                    continue
                node_id = _text(attrs.get(NODE_ID)) or None
                attempt = attrs.get(NODE_ATTEMPT)
                attempt_no = _seq(attempt) if attempt is not None else 1
                out.append(
                    SpanFact(
                        execution_id=any_value(execution),
                        workflow_id=None if node_id else _text(attrs.get(WORKFLOW_ID)) or None,
                        node_id=node_id,
                        node_type=_text(attrs.get(NODE_TYPE)) or None,
                        attempt=attempt_no or 1,
                        result=_text(attrs.get(NODE_RESULT)),
                        duration_ms=max(0, span.end_time_unix_nano - span.start_time_unix_nano) / 1e6,
                        end_ts=iso_from_ns(span.end_time_unix_nano),
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                    )
                )
    return out
