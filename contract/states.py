"""What runs and nodes come to: results, a run's stored status, a node's state.

`Result` is the value of `workflow.result` / `workflow.node.result` and of an ended event's
`result` (the CI/CD semantic conventions' names); `RunStatus` is an execution's `Status` in
ClickHouse (`running` until the run span arrives, then its result; `lost` while its engine is
gone); `NodeState` is what the engine, the history API, the live page and `flowscope watch`
show for a node.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final


class Result(StrEnum):
    """Outcome of a run or an attempt."""

    SUCCESS = "success"
    FAILURE = "failure"  # the work failed
    ERROR = "error"  # the definition is wrong: bad reference, bad tool input
    TIMEOUT = "timeout"
    CANCELLATION = "cancellation"
    SKIP = "skip"


class RunStatus(StrEnum):
    """An execution's status: stored (the `Status` column) and shown."""

    RUNNING = "running"
    SUCCESS = "success"
    FAILURE = "failure"
    ERROR = "error"
    TIMEOUT = "timeout"
    CANCELLATION = "cancellation"
    # Stored: the run's engine went silent (workflow.lost). Not a result — workflow.recovered
    # makes it running again and the run span, when it comes, decides as always.
    LOST = "lost"
    # Shown only: the live page's status between workflow.paused and workflow.resumed, and
    # before anything is known. Never stored, so never a filter of the history API.
    PAUSED = "paused"
    PENDING = "pending"


# What the history API filters on: every status the Status column can hold.
STORED_RUN_STATUSES: Final = frozenset(RunStatus) - {RunStatus.PAUSED, RunStatus.PENDING}
# A run that is not running and did not succeed counts as failed in the aggregates: a lost
# run too, since nothing says it will ever succeed.
NOT_FAILED_RUN_STATUSES: Final = frozenset({RunStatus.SUCCESS, RunStatus.RUNNING})


class NodeState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    WAITING = "waiting"
    RETRYING = "retrying"
    SUCCESS = "success"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"


# A node in one of these states will not change again in this run.
DONE_NODE_STATES: Final = frozenset({NodeState.SUCCESS, NodeState.FAILED, NodeState.SKIPPED, NodeState.CANCELLED})
# A node in one of these has started and not ended: its time is counting.
ACTIVE_NODE_STATES: Final = frozenset({NodeState.RUNNING, NodeState.WAITING, NodeState.RETRYING})
