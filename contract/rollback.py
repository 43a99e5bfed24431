"""What a rollback undoes (docs/durability.md, "Rollback"): the one rule the engine applies and
the stack shows.

Rolling a run back to `toNode` undoes the completed nodes downstream of it (its descendants,
not `toNode` itself), latest first: in reverse dependency order, so a node is undone only after
every completed node that consumed its output. A node with a compensation is compensated; one
without is skipped when it changed nothing outside the run or declared its effect reversible
(there is nothing the engine could run to undo it), and blocks the rollback when its effect is
`external` — an e-mail sent, a payment made — unless the caller forces it.

Pure: a graph of `NodeSpec`s and the ids of the completed nodes in, a `RollbackPlan` out.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

SIDE_EFFECTS: Final = ("none", "reversible", "external")

# The largest seq a rollback numbers on after (`afterSeq`): the protocol's seqs stop at 2**62, and
# a rollback adds a few events per node, so a larger one — only a forged event can reach it — is
# not where a run's events end.
MAX_AFTER_SEQ: Final = 2**62 - 2**20


class Action(StrEnum):
    COMPENSATE = "compensate"
    # Nothing to undo: no compensation, and no effect that outlives the run (none/reversible).
    SKIP = "skip"
    # An external effect without a compensation: the rollback is refused unless forced.
    CANNOT_UNDO = "cannot_undo"


@dataclass(frozen=True)
class NodeSpec:
    id: str
    depends_on: tuple[str, ...] = ()
    side_effect: str = "none"
    compensable: bool = False


@dataclass(frozen=True)
class Step:
    node_id: str
    action: Action
    side_effect: str
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"nodeId": self.node_id, "action": self.action.value, "sideEffect": self.side_effect,
                "reason": self.reason}  # fmt: skip


@dataclass(frozen=True)
class RollbackPlan:
    """The completed descendants of `to_node`, in the order a rollback undoes them."""

    to_node: str
    steps: tuple[Step, ...]

    def _ids(self, action: Action) -> list[str]:
        return [s.node_id for s in self.steps if s.action is action]

    @property
    def compensate(self) -> list[str]:
        return self._ids(Action.COMPENSATE)

    @property
    def skipped(self) -> list[str]:
        return self._ids(Action.SKIP)

    @property
    def cannot_undo(self) -> list[str]:
        return self._ids(Action.CANNOT_UNDO)

    def as_dict(self) -> dict[str, Any]:
        return {
            "toNode": self.to_node,
            "compensate": self.compensate,
            "skipped": self.skipped,
            "cannotUndo": self.cannot_undo,
            "steps": [s.as_dict() for s in self.steps],
        }


class NotARollbackPoint(ValueError):
    """`toNode` is not a node of the workflow, or did not complete in the run."""


def dependency_order(specs: Sequence[NodeSpec]) -> list[str]:
    """Topological order that keeps the declaration order among ready nodes, so a plan is
    the same every time (as engine/catalog.py `stable_order`)."""
    position = {s.id: i for i, s in enumerate(specs)}
    children: dict[str, list[str]] = {s.id: [] for s in specs}
    remaining = {}
    for spec in specs:
        deps = [d for d in spec.depends_on if d in children]
        remaining[spec.id] = len(deps)
        for dep in deps:
            children[dep].append(spec.id)
    ready = [s.id for s in specs if remaining[s.id] == 0]
    order: list[str] = []
    while ready:
        node_id = min(ready, key=position.__getitem__)
        ready.remove(node_id)
        order.append(node_id)
        for child in children[node_id]:
            remaining[child] -= 1
            if remaining[child] == 0:
                ready.append(child)
    return order


def _descendants(specs: Sequence[NodeSpec], node_id: str) -> set[str]:
    children: dict[str, list[str]] = {}
    for spec in specs:
        for dep in spec.depends_on:
            children.setdefault(dep, []).append(spec.id)
    found: set[str] = set()
    stack = [node_id]
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def plan_rollback(specs: Sequence[NodeSpec], completed: Collection[str], to_node: str) -> RollbackPlan:
    """The steps of rolling a run whose `completed` nodes succeeded back to `to_node`."""
    by_id = {s.id: s for s in specs}
    if to_node not in by_id:
        raise NotARollbackPoint(f"the workflow has no node {to_node!r}")
    if to_node not in completed:
        raise NotARollbackPoint(f"node {to_node!r} did not complete in this run: a run rolls back to a completed node")
    undo = _descendants(specs, to_node) & set(completed)
    steps = [_step(by_id[node_id]) for node_id in reversed(dependency_order(specs)) if node_id in undo]
    return RollbackPlan(to_node, tuple(steps))


def _step(spec: NodeSpec) -> Step:
    if spec.compensable:
        return Step(spec.id, Action.COMPENSATE, spec.side_effect, "its compensation runs")
    if spec.side_effect == "external":
        return Step(spec.id, Action.CANNOT_UNDO, spec.side_effect, "external side effect without a compensation")
    return Step(spec.id, Action.SKIP, spec.side_effect, f"no compensation; side effect {spec.side_effect!r}")


def rollback_points(specs: Sequence[NodeSpec], completed: Iterable[str]) -> list[RollbackPlan]:
    """Every node the run can be rolled back to — each completed node, in dependency order —
    with what rolling back to it would undo."""
    done = set(completed)
    return [plan_rollback(specs, done, node_id) for node_id in dependency_order(specs) if node_id in done]
