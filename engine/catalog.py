"""What an engine serves and what it remembers of ended runs (docs/control.md).

A `Catalog` is a set of workflows with the node registry they need: what `flowscope worker`
loads from `module:attr` and an engine announces to the stack. `RetrySource` is where a
retry finds the run it retries; today the engine's memory of recent runs (`FinishedRuns`),
later a durable checkpoint store that any engine can read.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from flowscope.engine.dag import Workflow
from flowscope.engine.nodes import NodeRegistry
from flowscope.engine.results import ExecutionResult, NodeState

__all__ = [
    "DEFAULT_FINISHED_RUNS",
    "Catalog",
    "FinishedRuns",
    "RetrySource",
    "UnknownNode",
    "retry_plan",
    "stable_order",
]

DEFAULT_FINISHED_RUNS = 1_000


@dataclass
class Catalog:
    """Workflows and the node registry their nodes run with."""

    workflows: Sequence[Workflow]
    registry: NodeRegistry = field(default_factory=NodeRegistry)


class RetrySource(Protocol):
    """Where a retry reads the ended run it retries: its outputs, node states and input."""

    def previous(self, execution_id: str) -> ExecutionResult | None: ...


class FinishedRuns:
    """The most recent ended runs of one engine, oldest forgotten first (`capacity` 0: none)."""

    def __init__(self, capacity: int = DEFAULT_FINISHED_RUNS) -> None:
        self.capacity = capacity
        self._runs: OrderedDict[str, ExecutionResult] = OrderedDict()

    def add(self, result: ExecutionResult) -> None:
        if self.capacity <= 0:
            return
        self._runs[result.execution_id] = result
        self._runs.move_to_end(result.execution_id)
        while len(self._runs) > self.capacity:
            self._runs.popitem(last=False)

    def previous(self, execution_id: str) -> ExecutionResult | None:
        return self._runs.get(execution_id)

    def __len__(self) -> int:
        return len(self._runs)


class UnknownNode(ValueError):
    def __init__(self, workflow: Workflow, node_id: str) -> None:
        self.node_id = node_id
        super().__init__(f"workflow {workflow.id!r} has no node {node_id!r}")


def stable_order(workflow: Workflow) -> list[str]:
    """Topological order that keeps the declaration order among ready nodes: "the first failed
    node" must name the same node every time."""
    remaining = {n.id: len(n.depends_on) for n in workflow.nodes}
    position = {node_id: i for i, node_id in enumerate(workflow.node_ids)}
    ready = [n.id for n in workflow.nodes if not n.depends_on]
    order: list[str] = []
    while ready:
        node_id = min(ready, key=position.__getitem__)
        ready.remove(node_id)
        order.append(node_id)
        for child in workflow.dependents(node_id):
            remaining[child] -= 1
            if remaining[child] == 0:
                ready.append(child)
    return order


def default_from_node(previous: ExecutionResult) -> str:
    """The first failed node; else the first that was cancelled or never ran; else (the run
    succeeded) the first node, so the whole run runs again."""
    order = stable_order(previous.workflow)
    states = previous.node_states
    for wanted in ({NodeState.FAILED}, {NodeState.CANCELLED, NodeState.PENDING, NodeState.RUNNING}):
        for node_id in order:
            if states.get(node_id) in wanted:
                return node_id
    return order[0]


def descendants(workflow: Workflow, node_id: str) -> set[str]:
    found = {node_id}
    stack = [node_id]
    while stack:
        for child in workflow.dependents(stack.pop()):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def retry_plan(previous: ExecutionResult, from_node: str | None = None) -> tuple[str, dict[str, Any]]:
    """Where a retry starts and the outputs it reuses: every node that succeeded, except
    `from_node` and everything downstream of it."""
    workflow = previous.workflow
    start = from_node if from_node is not None else default_from_node(previous)
    if start not in workflow.node_ids:
        raise UnknownNode(workflow, start)
    rerun = descendants(workflow, start)
    reused = {
        node_id: previous.outputs[node_id]
        for node_id, state in previous.node_states.items()
        if state is NodeState.SUCCESS and node_id not in rerun and node_id in previous.outputs
    }
    return start, reused
