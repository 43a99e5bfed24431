"""What a run and its nodes come to: outcomes, node states, and the result of an execution."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from opentelemetry.context import Context
from opentelemetry.trace import SpanContext

from flowscope.contract.states import DONE_NODE_STATES, NodeState, Result
from flowscope.engine.dag import Workflow

# What runs and attempts come to and a node's states: the contract's (contract/states.py).
__all__ = ["DONE_STATES", "ExecutionFailed", "ExecutionResult", "NodeState", "NodeStates", "Result", "RunOptions"]

DONE_STATES = DONE_NODE_STATES


class NodeStates:
    """Every node's state, with the number of nodes in each state kept as states change:
    recounting every state per event is O(n²) on wide workflows."""

    def __init__(self, node_ids: tuple[str, ...]) -> None:
        self.states: dict[str, NodeState] = dict.fromkeys(node_ids, NodeState.PENDING)
        self.counts: dict[NodeState, int] = dict.fromkeys(NodeState, 0)
        self.counts[NodeState.PENDING] = len(self.states)

    def set(self, node_id: str, state: NodeState) -> None:
        self.counts[self.states[node_id]] -= 1
        self.counts[state] += 1
        self.states[node_id] = state


class ExecutionFailed(RuntimeError):
    def __init__(self, result: ExecutionResult) -> None:
        self.result = result
        super().__init__(f"execution {result.execution_id} ended with {result.result.value}: {result.error}")


@dataclass
class ExecutionResult:
    execution_id: str
    workflow: Workflow
    result: Result
    outputs: dict[str, Any]
    node_states: dict[str, NodeState]
    attempts: dict[str, int]
    error: str | None
    duration_s: float
    span_context: SpanContext
    events_emitted: int
    workflow_input: Any = None

    @property
    def trace_id(self) -> str:
        return format(self.span_context.trace_id, "032x")

    @property
    def output(self) -> Any:
        """Outputs of the workflow's sink nodes (the only one's output when there is one)."""
        sinks = [n.id for n in self.workflow.nodes if not self.workflow.dependents(n.id) and n.id in self.outputs]
        if len(sinks) == 1:
            return self.outputs[sinks[0]]
        return {s: self.outputs[s] for s in sinks}

    def raise_for_result(self) -> ExecutionResult:
        if self.result is not Result.SUCCESS:
            raise ExecutionFailed(self)
        return self


@dataclass
class RunOptions:
    """How a run was started: by whom, under which parent, resuming what."""

    trigger: str = "api"
    user_id: str | None = None
    parent: Context | None = None
    remote: bool = False
    reused: dict[str, Any] = field(default_factory=dict)
    resumed_from: ExecutionResult | None = None
    parent_execution_id: str | None = None
    # Nodes that may have run in the run this one resumes: their spans say so (workflow.node.rerun).
    rerun: frozenset[str] = frozenset()
    # The engine's control-channel id when it has a link: a restarted stack finds its runs by it.
    engine_id: str | None = None
