"""The vocabulary every flowscope component shares: attribute keys, event names, states.

At the bottom of the dependency graph: it imports nothing from the project, and the engine,
the collector's views, the bridge, the CLI and the live page (`/static/contract.js`) all take
their names from here, so they cannot drift apart.
"""

from __future__ import annotations

from flowscope.contract import attributes
from flowscope.contract.events import (
    COMPENSATION_EVENTS,
    COMPENSATION_STATES,
    LIFECYCLE_EVENTS,
    LIVE_EVENT_TYPES,
    NODE_EVENTS,
    NODE_STATES,
    NODE_STATES_BY_RESULT,
    RUN_EVENTS,
    TERMINAL_EVENTS,
    ControlType,
    DerivedEventName,
    EventName,
    LiveEvent,
    node_state,
)
from flowscope.contract.states import (
    ACTIVE_NODE_STATES,
    DONE_NODE_STATES,
    NOT_FAILED_RUN_STATUSES,
    STORED_RUN_STATUSES,
    NodeState,
    Result,
    RunStatus,
)

__all__ = [
    "ACTIVE_NODE_STATES",
    "COMPENSATION_EVENTS",
    "COMPENSATION_STATES",
    "DONE_NODE_STATES",
    "LIFECYCLE_EVENTS",
    "LIVE_EVENT_TYPES",
    "NODE_EVENTS",
    "NODE_STATES",
    "NODE_STATES_BY_RESULT",
    "NOT_FAILED_RUN_STATUSES",
    "RUN_EVENTS",
    "STORED_RUN_STATUSES",
    "TERMINAL_EVENTS",
    "ControlType",
    "DerivedEventName",
    "EventName",
    "LiveEvent",
    "NodeState",
    "Result",
    "RunStatus",
    "attributes",
    "node_state",
]
