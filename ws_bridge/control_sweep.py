"""Runs a restarted stack cannot vouch for (docs/control.md, "Liveness: `lost`").

A stack that restarts knows nothing of the runs its engines had: an engine that comes back
lists them, and one that died while the stack was down never will. Each run of an engine with
a control link names that engine in its `workflow.started` (`engineId`); after the restart, once
every engine still alive had time to say hello (lost_after_s and a heartbeat interval), the
hub (ws_bridge/control.py) declares lost every stored run still `running` whose engine no
connected engine is. A run of an engine without a control link names none and is never lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from flowscope.contract import EventName, RunStatus

if TYPE_CHECKING:
    from flowscope.ws_bridge.history import History

# Running runs looked at after a restart; older ones wait for the next restart.
MAX_SWEPT = 500


@dataclass(frozen=True)
class Orphan:
    """A stored running run and the engine its start names."""

    execution_id: str
    workflow_id: str
    engine_id: str
    last_seq: int


def stored_orphans(history: History, limit: int = MAX_SWEPT) -> list[Orphan]:
    """Stored runs still `running` whose workflow.started names a control engine (read off the loop)."""
    from flowscope.ws_bridge.history import ExecutionQuery

    rows, _ = history.list_executions(ExecutionQuery(status=RunStatus.RUNNING.value, limit=limit))
    orphans = []
    for row in rows:
        execution_id = str(row["executionId"])
        events = history.events(execution_id, 1, limit=5)
        started = next((e for e in events if e["type"] == EventName.WORKFLOW_STARTED), None)
        data = started.get("data") if started is not None else None
        engine_id = data.get("engineId") if isinstance(data, dict) else None
        if isinstance(engine_id, str) and engine_id:
            orphans.append(Orphan(execution_id, str(row["workflowId"]), engine_id, history.last_seq(execution_id)))
    return orphans
