"""What an engine serves and what it remembers of ended runs (docs/control.md).

A `Catalog` is a set of workflows with the node registry they need: what `flowscope worker`
loads from `module:attr` and an engine announces to the stack. `RetrySource` is where a
retry or a resume finds the run it continues: the engine's memory of recent runs
(`FinishedRuns`), or a checkpoint store any engine sharing it can read (`CheckpointedRuns`,
docs/durability.md).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from opentelemetry.trace import INVALID_SPAN_CONTEXT, SpanContext, TraceFlags

from flowscope.engine.checkpoints import Checkpoint, CheckpointStore, Stored
from flowscope.engine.dag import Workflow
from flowscope.engine.nodes import NodeRegistry
from flowscope.engine.results import ExecutionResult, NodeState, Result

__all__ = [
    "DEFAULT_FINISHED_RUNS",
    "Catalog",
    "CheckpointedRuns",
    "FinishedRuns",
    "NotResumable",
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
    """Where a retry reads the ended run it retries: its outputs, node states and input (at
    once, or awaited when it must be read from a store)."""

    def previous(self, execution_id: str) -> ExecutionResult | Awaitable[ExecutionResult | None] | None: ...


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


class NotResumable(ValueError):
    """A run the checkpoint store knows that this engine cannot continue (its workflow version is
    not served here, its input was not stored)."""


# Which workflow a stored run names, from what the engine serves (None: not served here).
ServedWorkflow = Callable[[str, str], Workflow | None]


class CheckpointedRuns:
    """Ended, cancelled or lost runs as a checkpoint store holds them, so that any engine sharing
    the store can resume or retry them; the engine's own memory (`recent`) is asked first, as it
    knows each node's state exactly."""

    def __init__(self, store: CheckpointStore, served: ServedWorkflow, recent: FinishedRuns | None = None) -> None:
        self.store = store
        self._served = served
        self._recent = recent

    async def previous(self, execution_id: str) -> ExecutionResult | None:
        if self._recent is not None:
            found = self._recent.previous(execution_id)
            if found is not None:
                return found
        checkpoint = await self.store.load(execution_id)
        run = checkpoint.run
        if run is None:
            return None
        workflow = self._served(run.workflow_id, run.workflow_version)
        if workflow is None:
            raise NotResumable(
                f"execution {execution_id} ran workflow {run.workflow_id!r} version {run.workflow_version!r}, "
                "which this engine does not serve"
            )
        if run.input_stored is not Stored.OUTPUT:
            raise NotResumable(f"the input of execution {execution_id} was not stored ({run.input_stored.value})")
        return ExecutionResult(
            execution_id=execution_id,
            workflow=workflow,
            # Its outcome is the stack's to know (failed, cancelled or lost): not a success here.
            result=Result.ERROR,
            outputs=dict(checkpoint.outputs),
            node_states=stored_states(workflow, checkpoint),
            attempts={node_id: node.attempt for node_id, node in checkpoint.nodes.items()},
            error="read from the checkpoint store",
            duration_s=0.0,
            span_context=span_context_of(run.trace_parent),
            events_emitted=0,
            workflow_input=run.input,
        )


def stored_states(workflow: Workflow, checkpoint: Checkpoint) -> dict[str, NodeState]:
    """Node states as far as checkpoints tell them: a checkpointed node succeeded; one whose every
    dependency was checkpointed was ready, so may have been running when its engine died (RUNNING:
    a resume marks it a rerun); the rest never started."""
    done = checkpoint.nodes.keys()
    states = {}
    for node in workflow.nodes:
        if node.id in done:
            states[node.id] = NodeState.SUCCESS
        elif all(d in done for d in node.depends_on):
            states[node.id] = NodeState.RUNNING
        else:
            states[node.id] = NodeState.PENDING
    return states


def span_context_of(trace_parent: str | None) -> SpanContext:
    """The run span named by a W3C traceparent as put_run stored it (invalid when none)."""
    parts = (trace_parent or "").split("-")
    if len(parts) != 4:
        return INVALID_SPAN_CONTEXT
    try:
        trace_id, span_id = int(parts[1], 16), int(parts[2], 16)
    except ValueError:
        return INVALID_SPAN_CONTEXT
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))


def trace_parent_of(span_context: SpanContext) -> str | None:
    if not span_context.is_valid:
        return None
    return f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-01"


def rerun_nodes(previous: ExecutionResult, reused: dict[str, Any]) -> frozenset[str]:
    """Nodes a continuation of `previous` runs that had started there (or may have)."""
    never = (NodeState.PENDING, NodeState.SKIPPED)
    return frozenset(n for n, state in previous.node_states.items() if n not in reused and state not in never)
