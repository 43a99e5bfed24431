"""The contract as the live page reads it: plain JSON data, served as `/static/contract.js`."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from flowscope.contract.events import (
    COMPENSATION_EVENTS,
    NODE_STATES,
    NODE_STATES_BY_RESULT,
    RUN_EVENTS,
    TERMINAL_EVENTS,
    ControlType,
    DerivedEventName,
    EventName,
)
from flowscope.contract.states import STORED_RUN_STATUSES, NodeState, Result, RunStatus


def _members(enum: type[StrEnum]) -> dict[str, str]:
    return {member.name: member.value for member in enum}


def _ordered(values: frozenset[Any], enum: type[StrEnum]) -> list[str]:
    """A set's members in their enum's order, so the page lists them as declared."""
    return [member.value for member in enum if member in values]


def page_constants() -> dict[str, Any]:
    return {
        "events": _members(EventName),
        "derivedEvents": _members(DerivedEventName),
        "control": _members(ControlType),
        "terminalEvents": _ordered(TERMINAL_EVENTS, EventName),
        "runEvents": _ordered(RUN_EVENTS, EventName),
        "compensationEvents": _ordered(COMPENSATION_EVENTS, EventName),
        "results": _members(Result),
        "runStatuses": _members(RunStatus),
        "storedRunStatuses": _ordered(STORED_RUN_STATUSES, RunStatus),
        "nodeStates": _members(NodeState),
        "nodeStateOf": {str(k): str(v) for k, v in NODE_STATES.items()},
        "nodeStateByResult": {
            str(event): {str(r): str(s) for r, s in by.items()} for event, by in NODE_STATES_BY_RESULT.items()
        },
    }
