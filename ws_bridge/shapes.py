"""The history's shapes: ClickHouse rows and stored events as the REST API's JSON, and the
fold of an execution's events into its nodes. Lenient by design: a row stored before intake
checked it is read as far as it makes sense, never a 500."""

from __future__ import annotations

import datetime as dt
import json
import math
from typing import Any

from flowscope.contract import COMPENSATION_EVENTS, COMPENSATION_STATES, EventName, NodeState, RunStatus
from flowscope.contract import node_state as _node_state
from flowscope.ws_bridge.types import LiveEvent


def iso(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return str(value.isoformat()).replace("+00:00", "Z")
    return str(value)


def finite(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    return round(number, 3) if number == number and abs(number) != float("inf") else None


def jsonable(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date):
        return iso(value) if isinstance(value, dt.datetime) else value.isoformat()
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, int | float | str | bool) or value is None:
        return value
    return str(value)


def execution_row(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "executionId": r["ExecutionId"],
        "workflowId": r["WorkflowId"],
        "workflowName": r["WorkflowName"],
        "workflowVersion": r["WorkflowVersion"],
        "status": r["Status"],
        "trigger": r["TriggerType"],
        "userId": r["UserId"] or None,
        "startTime": iso(r["StartTime"]),
        "endTime": iso(r["EndTime"]),
        "durationMs": finite(r["DurationMs"]),
        "totalNodes": r["TotalNodes"],
        "completedNodes": r["CompletedNodes"],
        "failedNodes": r["FailedNodes"],
        "skippedNodes": r["SkippedNodes"],
        "error": r["Error"] or None,
        "traceId": r["TraceId"],
        "serviceName": r["ServiceName"],
        "resumedFrom": r["ResumedFrom"] or None,
        "parentExecutionId": r["ParentExecutionId"] or None,
    }


def execution_from_events(execution_id: str, events: list[LiveEvent], owner: tuple[str, str] | None) -> dict[str, Any]:
    first = events[0]
    data = first["data"]
    return {
        "executionId": execution_id,
        "workflowId": owner[0] if owner else first["workflowId"],
        "workflowName": first["workflowName"],
        "workflowVersion": None,
        "status": _live_status(events),
        "trigger": _text(data.get("trigger")),
        "userId": (owner[1] or None) if owner else _text(data.get("userId")),
        "startTime": first["ts"],
        "endTime": None,
        "durationMs": None,
        "totalNodes": whole(data.get("totalNodes")),
        "completedNodes": 0,
        "failedNodes": 0,
        "skippedNodes": 0,
        "error": None,
        "traceId": first["traceId"],
        "serviceName": "",
        "resumedFrom": _text(data.get("resumedFrom")),
        "parentExecutionId": _text(data.get("parentExecutionId")),
    }


def _live_status(events: list[LiveEvent]) -> RunStatus:
    """A run known only by its events (its row not stored yet) is running, or lost if the
    last word on its engine was workflow.lost."""
    for event in reversed(events):
        if event["type"] == EventName.WORKFLOW_LOST:
            return RunStatus.LOST
        if event["type"] == EventName.WORKFLOW_RECOVERED:
            break
    return RunStatus.RUNNING


def owned_by(event: LiveEvent, owner: tuple[str, str]) -> bool:
    """Whether an event agrees with its execution's owner: its workflow, and for the
    workflow.started that names a user, that user."""
    workflow, user = owner
    if workflow and event["workflowId"] and event["workflowId"] != workflow:
        return False
    return event["type"] != EventName.WORKFLOW_STARTED or (_text(event["data"].get("userId")) or "") == user


# Rows stored before intake checked event bodies (collector/admission.py) may hold anything:
# readers — these, the live hub, `flowscope watch` — take what has the documented type and
# ignore the rest, never failing the request.


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def whole(value: Any) -> int:
    """A non-negative integer field, else 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def number(value: Any) -> float | int | None:
    """A finite number field, else None."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value == value and abs(value) != math.inf:
        return value
    return None


def node_specs(value: Any) -> list[dict[str, Any]]:
    """The entries of a `nodes` field that are objects with a non-empty string id."""
    if not isinstance(value, list):
        return []
    return [spec for spec in value if isinstance(spec, dict) and isinstance(spec.get("id"), str) and spec["id"]]


def _ids(value: Any) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def event_row(r: dict[str, Any]) -> LiveEvent:
    try:
        data = json.loads(r["Data"]) if r["Data"] else {}
    except (json.JSONDecodeError, RecursionError):
        data = {"raw": r["Data"]}
    if not isinstance(data, dict):
        data = {"value": data}
    return {
        "type": r["EventName"],
        "seq": int(r["Seq"]),
        "ts": iso(r["Timestamp"]) or "",
        "executionId": r["ExecutionId"],
        "workflowId": r["WorkflowId"],
        "workflowName": r["WorkflowName"],
        "nodeId": r["NodeId"] or None,
        "nodeType": r["NodeType"] or None,
        "traceId": r["TraceId"],
        "spanId": r["SpanId"],
        "data": data,
    }


def _fold_rollback(nodes: dict[str, dict[str, Any]], event: LiveEvent) -> None:
    """A rollback leaves a node's state as the run left it and says what became of it since:
    `compensation` (its state, rollback, duration, error) and `undone` — a rollback passed it,
    compensated or with nothing to undo, so it no longer counts as completed."""
    data = event["data"]
    if event["type"] == EventName.WORKFLOW_ROLLED_BACK:
        for node_id in _ids(data.get("undone")):
            if node_id in nodes:
                nodes[node_id]["undone"] = True
                nodes[node_id]["rolledBackTo"] = _text(data.get("toNode"))
        return
    node = nodes.get(event["nodeId"] or "")
    if node is None:
        return
    compensation: dict[str, Any] = {
        "state": COMPENSATION_STATES[event["type"]],
        "rollbackId": _text(data.get("rollbackId")),
        "seq": event["seq"],
    }
    if "durationMs" in data:
        compensation["durationMs"] = number(data["durationMs"])
    if data.get("error"):
        compensation["error"] = _text(data.get("error"))
    node["compensation"] = compensation


def fold_nodes(events: list[LiveEvent], attempts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Node states from the event log (which sees running nodes), enriched by finished attempts."""
    nodes: dict[str, dict[str, Any]] = {}
    for event in events:
        if event["type"] == EventName.WORKFLOW_STARTED:
            for spec in node_specs(event["data"].get("nodes")):
                nodes[spec["id"]] = {
                    "nodeId": spec["id"],
                    "nodeType": _text(spec.get("type")),
                    "label": _text(spec.get("label")) or spec["id"],
                    "dependsOn": _ids(spec.get("dependsOn")),
                    "state": NodeState.PENDING,
                    "attempts": 0,
                    "durationMs": None,
                    "error": None,
                }
            continue
        if event["type"] == EventName.WORKFLOW_ROLLED_BACK or event["type"] in COMPENSATION_EVENTS:
            _fold_rollback(nodes, event)
            continue
        node_id = event["nodeId"]
        data = event["data"]
        state = _node_state(event["type"], data)
        if not node_id or state is None:
            continue
        node = nodes.setdefault(
            node_id,
            {"nodeId": node_id, "nodeType": event["nodeType"], "label": node_id, "dependsOn": [],
             "state": NodeState.PENDING, "attempts": 0, "durationMs": None, "error": None},
        )  # fmt: skip
        node["state"] = state
        node["attempts"] = max(node["attempts"], whole(data.get("attempt")))
        if "durationMs" in data:
            node["durationMs"] = number(data["durationMs"])
        if state in (NodeState.FAILED, NodeState.RETRYING):
            node["error"] = data.get("error")
        elif state is NodeState.SUCCESS:
            node["error"] = None
        if data.get("reason"):
            node["reason"] = data["reason"]
        if isinstance(data.get("usage"), dict) and data["usage"]:
            node["usage"] = data["usage"]
    for attempt in attempts:
        known = nodes.get(attempt["NodeId"])
        if known is None:
            continue
        known.setdefault("attemptHistory", []).append(
            {
                "attempt": attempt["Attempt"],
                "status": attempt["Status"],
                "startTime": iso(attempt["StartTime"]),
                "durationMs": finite(attempt["DurationMs"]),
                "errorType": attempt["ErrorType"] or None,
                "error": attempt["Error"] or None,
                "spanId": attempt["SpanId"],
            }
        )
    return list(nodes.values())
