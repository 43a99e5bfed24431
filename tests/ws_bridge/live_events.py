"""Complete live events for tests that hand the hub events directly, not through OTLP."""

from __future__ import annotations

from typing import Any

from flowscope.ws_bridge.types import LiveEvent


def live_event(
    kind: str,
    seq: int,
    *,
    execution: str = "e1",
    workflow: str = "wf",
    workflow_name: str | None = None,
    ts: str = "2026-11-23T10:00:00.000000Z",
    node_id: str | None = None,
    node_type: str | None = None,
    trace_id: str = "ab" * 16,
    span_id: str = "cd" * 8,
    data: dict[str, Any] | None = None,
) -> LiveEvent:
    """Every key flowscope.contract.LiveEvent requires; the workflow's name is its id unless given."""
    return {
        "type": kind,
        "seq": seq,
        "ts": ts,
        "executionId": execution,
        "workflowId": workflow,
        "workflowName": workflow if workflow_name is None else workflow_name,
        "nodeId": node_id,
        "nodeType": node_type,
        "traceId": trace_id,
        "spanId": span_id,
        "data": {} if data is None else data,
    }
