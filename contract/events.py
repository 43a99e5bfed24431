"""Lifecycle event names and the live event's shape (docs/telemetry.md, docs/live-protocol.md)."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any, Final, NotRequired, TypedDict

from flowscope.contract.states import NodeState, Result


class EventName(StrEnum):
    """The `EventName` of the engine's log records, and `type` of a live event."""

    WORKFLOW_STARTED = "workflow.started"
    WORKFLOW_COMPLETED = "workflow.completed"
    WORKFLOW_FAILED = "workflow.failed"
    WORKFLOW_CANCELLED = "workflow.cancelled"
    WORKFLOW_PAUSED = "workflow.paused"
    WORKFLOW_RESUMED = "workflow.resumed"
    # The stack declares a run lost when its engine goes silent (docs/control.md); the engine,
    # back and still running it, says so with workflow.recovered. Neither ends the run.
    WORKFLOW_LOST = "workflow.lost"
    WORKFLOW_RECOVERED = "workflow.recovered"
    # A rollback of an ended run (docs/durability.md, "Rollback"), numbered on in the run's own
    # sequence: each compensation's start and end, then the rollback's end. None ends a run.
    WORKFLOW_ROLLED_BACK = "workflow.rolled_back"
    NODE_COMPENSATING = "node.compensating"
    NODE_COMPENSATED = "node.compensated"
    NODE_COMPENSATION_FAILED = "node.compensation_failed"
    NODE_STARTED = "node.started"
    NODE_COMPLETED = "node.completed"
    NODE_FAILED = "node.failed"
    NODE_RETRYING = "node.retrying"
    NODE_SKIPPED = "node.skipped"
    NODE_WAITING = "node.waiting"
    EXECUTION_PROGRESS = "execution.progress"
    EXECUTION_LOG = "execution.log"


class DerivedEventName(StrEnum):
    """Events the bridge derives (`"derived": true`): outside the gapless sequence."""

    PERFORMANCE_WARNING = "performance.warning"
    PERFORMANCE_CRITICAL = "performance.critical"


class ControlType(StrEnum):
    """The `type` of the live protocol's control frames (not events: no seq, no execution)."""

    SUBSCRIBED = "subscribed"
    UNSUBSCRIBED = "unsubscribed"
    REPLAY_DONE = "replay.done"
    HEARTBEAT = "heartbeat"
    PONG = "pong"
    LAGGED = "lagged"
    ERROR = "error"
    CONTROL_RESULT = "control.result"  # the answer to a control op (docs/control.md)


LIFECYCLE_EVENTS: Final = frozenset(EventName)
# Every `type` a live subscription may filter on.
LIVE_EVENT_TYPES: Final = frozenset[str](EventName) | frozenset(DerivedEventName)
# A run's last event: one of these ends it.
TERMINAL_EVENTS: Final = frozenset(
    {EventName.WORKFLOW_COMPLETED, EventName.WORKFLOW_FAILED, EventName.WORKFLOW_CANCELLED}
)
# What a run's list row follows: its start, its end, and its engine going and coming back
# (progress is live only).
RUN_EVENTS: Final = (
    frozenset({EventName.WORKFLOW_STARTED, EventName.WORKFLOW_LOST, EventName.WORKFLOW_RECOVERED}) | TERMINAL_EVENTS
)
NODE_EVENTS: Final = frozenset(e for e in EventName if e.startswith("node."))
# A rollback's node events: they say what was undone after the run, not a node's state in it;
# the history shows a node's `compensation.state` after each.
COMPENSATION_STATES: Final[Mapping[str, str]] = {
    EventName.NODE_COMPENSATING: "compensating",
    EventName.NODE_COMPENSATED: "compensated",
    EventName.NODE_COMPENSATION_FAILED: NodeState.FAILED.value,
}
COMPENSATION_EVENTS: Final = frozenset(COMPENSATION_STATES)

# A node's state after each node event; `node_state` adds what the event's data says.
NODE_STATES: Final[Mapping[str, NodeState]] = {
    EventName.NODE_STARTED: NodeState.RUNNING,
    EventName.NODE_COMPLETED: NodeState.SUCCESS,
    EventName.NODE_FAILED: NodeState.FAILED,
    EventName.NODE_RETRYING: NodeState.RETRYING,
    EventName.NODE_SKIPPED: NodeState.SKIPPED,
    EventName.NODE_WAITING: NodeState.WAITING,
}


# Where an ended node event's `result` says more than its name: a node failed by
# cancellation is `cancelled`, not `failed` — what every reader shows.
NODE_STATES_BY_RESULT: Final[Mapping[str, Mapping[str, NodeState]]] = {
    EventName.NODE_FAILED: {Result.CANCELLATION: NodeState.CANCELLED},
}


def node_state(event_type: str, data: Mapping[str, Any]) -> NodeState | None:
    """A node's state after an event of this type and data; None for events that are no node's."""
    state = NODE_STATES.get(event_type)
    result = data.get("result")
    if state is not None and isinstance(result, str):
        return NODE_STATES_BY_RESULT.get(event_type, {}).get(result, state)
    return state


class EventHeader(TypedDict):
    """What a live event says of where it comes from: its place in the execution, the
    workflow, the node, the trace. A derived event (a performance warning) takes these from
    the event or span it is about."""

    seq: int
    ts: str
    executionId: str
    workflowId: str
    workflowName: str
    nodeId: str | None
    nodeType: str | None
    traceId: str
    spanId: str


class LiveEvent(EventHeader):
    """A lifecycle event as the live protocol carries it (camelCase on the wire); the history
    API returns stored events in the same shape."""

    type: str  # an EventName, a DerivedEventName, or whatever name a foreign producer sent
    data: dict[str, Any]
    derived: NotRequired[bool]  # performance.* only
    sub: NotRequired[str]  # the subscription that matched, as sent on a connection
