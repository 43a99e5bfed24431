"""The workflow model: a DAG of typed nodes, its builder, and structural validation."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flowscope.contract.rollback import SIDE_EFFECTS
from flowscope.engine.retry import RetryPolicy


class WorkflowValidationError(ValueError):
    """Every problem found in a workflow, reported together so one fix round suffices."""

    def __init__(self, workflow_id: str, problems: list[str]) -> None:
        self.workflow_id = workflow_id
        self.problems = problems
        listing = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"workflow {workflow_id!r} is invalid ({len(problems)} problem(s)):\n{listing}")


@dataclass(frozen=True)
class Node:
    id: str
    type: str
    label: str = ""
    config: Mapping[str, Any] = field(default_factory=dict)
    depends_on: tuple[str, ...] = ()
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout_s: float | None = None
    # Undoes the node's effect in a rollback: a callable (or 'module:function') taking a
    # rollback.CompensationContext, which holds the node's checkpointed output.
    compensate: Callable[..., Any] | str | None = None
    # What the node does outside the run (contract/rollback.py): none, reversible or external
    # (e-mails, payments, third-party APIs), which a rollback will not pass uncompensated unless forced.
    side_effect: str = "none"

    @property
    def display_label(self) -> str:
        return self.label or self.id

    @property
    def compensable(self) -> bool:
        return self.compensate is not None


@dataclass(frozen=True)
class Workflow:
    id: str
    name: str
    nodes: tuple[Node, ...]
    version: str = "1"
    description: str = ""
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        index: dict[str, Node] = {}
        for node in self.nodes:
            index.setdefault(node.id, node)
        dependents: dict[str, list[str]] = {n.id: [] for n in self.nodes}
        for node in self.nodes:
            for dep in node.depends_on:
                if dep in dependents:
                    dependents[dep].append(node.id)
        # Frozen dataclass: derived lookups are cached once through object.__setattr__.
        object.__setattr__(self, "_index", index)
        object.__setattr__(self, "_dependents", {k: tuple(v) for k, v in dependents.items()})

    def node(self, node_id: str) -> Node:
        index: dict[str, Node] = self._index  # type: ignore[attr-defined]
        return index[node_id]

    def dependents(self, node_id: str) -> tuple[str, ...]:
        deps: dict[str, tuple[str, ...]] = self._dependents  # type: ignore[attr-defined]
        return deps[node_id]

    @property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(n.id for n in self.nodes)


def structural_problems(workflow: Workflow) -> list[str]:
    """Duplicate ids, dangling dependencies and cycles, all at once.

    Computed once per workflow: it depends only on frozen fields, and every run validates.
    """
    cached: tuple[str, ...] | None = workflow.__dict__.get("_structural_problems")
    if cached is None:
        cached = tuple(_structural_problems(workflow))
        object.__setattr__(workflow, "_structural_problems", cached)
    return list(cached)


def _structural_problems(workflow: Workflow) -> list[str]:
    problems: list[str] = []
    if not workflow.id:
        problems.append("workflow id is empty")
    if not workflow.name:
        problems.append("workflow name is empty")
    if not workflow.nodes:
        problems.append("workflow has no nodes")
    seen: set[str] = set()
    all_ids = set(workflow.node_ids)
    for node in workflow.nodes:
        if not node.id:
            problems.append("a node has an empty id")
        elif node.id in seen:
            problems.append(f"duplicate node id {node.id!r}")
        seen.add(node.id)
        for dep in node.depends_on:
            if dep not in all_ids:
                problems.append(f"node {node.id!r} depends on missing node {dep!r}")
            if dep == node.id:
                problems.append(f"node {node.id!r} depends on itself")
        if node.timeout_s is not None and node.timeout_s <= 0:
            problems.append(f"node {node.id!r}: timeout_s must be > 0")
        problems.extend(f"node {node.id!r}: {p}" for p in node.retry.problems())
        problems.extend(f"node {node.id!r}: {p}" for p in rollback_problems(node))
    if workflow.timeout_s is not None and workflow.timeout_s <= 0:
        problems.append("workflow timeout_s must be > 0")
    cycle = find_cycle(workflow)
    if cycle:
        problems.append("cycle: " + " -> ".join(cycle))
    return problems


def rollback_problems(node: Node) -> list[str]:
    """A side-effect class that is not one of SIDE_EFFECTS, a compensation that is neither a
    callable nor an importable 'module:function'."""
    problems = []
    if node.side_effect not in SIDE_EFFECTS:
        problems.append(f"side_effect must be one of {', '.join(SIDE_EFFECTS)}, not {node.side_effect!r}")
    target = node.compensate
    if target is None or callable(target):
        return problems
    if not isinstance(target, str) or ":" not in target:
        return [*problems, f"compensate must be a callable or 'module:function', not {target!r}"]
    try:
        resolve_compensation(target)
    except (ImportError, AttributeError, ValueError) as exc:
        problems.append(f"compensate {target!r}: {exc}")
    return problems


def resolve_compensation(target: Callable[..., Any] | str) -> Callable[..., Any]:
    """The callable a `compensate` names."""
    if callable(target):
        return target
    module_name, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{target!r} is not callable")
    return obj  # type: ignore[no-any-return]


def find_cycle(workflow: Workflow) -> list[str]:
    """One cycle as a closed path of node ids, or [] when the graph is acyclic."""
    known = {n.id for n in workflow.nodes}
    deps: dict[str, list[str]] = {}
    for n in workflow.nodes:
        # With duplicate ids (reported separately) the first definition counts.
        deps.setdefault(n.id, [d for d in n.depends_on if d != n.id and d in known])
    done: set[str] = set()
    # Iterative DFS: a 10,000-deep chain must not hit the interpreter's recursion limit.
    for root in deps:
        if root in done:
            continue
        path: list[str] = []
        on_path: set[str] = set()
        stack: list[tuple[str, int]] = [(root, 0)]
        while stack:
            node_id, child_index = stack.pop()
            if child_index == 0:
                path.append(node_id)
                on_path.add(node_id)
            children = deps[node_id]
            if child_index < len(children):
                stack.append((node_id, child_index + 1))
                child = children[child_index]
                if child in on_path:
                    return [*path[path.index(child) :], child]
                if child not in done:
                    stack.append((child, 0))
                continue
            path.pop()
            on_path.discard(node_id)
            done.add(node_id)
    return []


def topological_order(workflow: Workflow) -> list[str]:
    remaining = {n.id: len(n.depends_on) for n in workflow.nodes}
    ready = [n.id for n in workflow.nodes if not n.depends_on]
    order: list[str] = []
    while ready:
        node_id = ready.pop()
        order.append(node_id)
        for child in workflow.dependents(node_id):
            remaining[child] -= 1
            if remaining[child] == 0:
                ready.append(child)
    return order


class WorkflowBuilder:
    """Python-side definition of a workflow, equivalent to the declarative file format."""

    def __init__(
        self,
        workflow_id: str,
        name: str | None = None,
        *,
        version: str = "1",
        description: str = "",
        timeout_s: float | None = None,
    ) -> None:
        self._id = workflow_id
        self._name = name or workflow_id
        self._version = version
        self._description = description
        self._timeout_s = timeout_s
        self._nodes: list[Node] = []

    def node(
        self,
        node_id: str,
        node_type: str,
        *,
        label: str = "",
        depends_on: Iterable[str] = (),
        retry: RetryPolicy | Mapping[str, Any] | None = None,
        timeout_s: float | None = None,
        compensate: Callable[..., Any] | str | None = None,
        side_effect: str = "none",
        **config: Any,
    ) -> WorkflowBuilder:
        policy = retry if isinstance(retry, RetryPolicy) else RetryPolicy.from_config(retry)
        self._nodes.append(
            Node(
                id=node_id,
                type=node_type,
                label=label,
                config=config,
                depends_on=tuple(depends_on),
                retry=policy,
                timeout_s=timeout_s,
                compensate=compensate,
                side_effect=side_effect,
            )
        )
        return self

    def code(self, node_id: str, fn: Callable[..., Any] | str, **kwargs: Any) -> WorkflowBuilder:
        return self.node(node_id, "code", fn=fn, **kwargs)

    def tool(self, node_id: str, tool: str, **kwargs: Any) -> WorkflowBuilder:
        return self.node(node_id, "tool", tool=tool, **kwargs)

    def http(self, node_id: str, url: str, **kwargs: Any) -> WorkflowBuilder:
        return self.node(node_id, "http", url=url, **kwargs)

    def llm(self, node_id: str, model: str, prompt: str, **kwargs: Any) -> WorkflowBuilder:
        return self.node(node_id, "llm", model=model, prompt=prompt, **kwargs)

    def condition(self, node_id: str, branches: Mapping[str, list[str]], **kwargs: Any) -> WorkflowBuilder:
        return self.node(node_id, "condition", branches=dict(branches), **kwargs)

    def wait(self, node_id: str, **kwargs: Any) -> WorkflowBuilder:
        return self.node(node_id, "wait", **kwargs)

    def subworkflow(self, node_id: str, workflow: Workflow | str, **kwargs: Any) -> WorkflowBuilder:
        return self.node(node_id, "subworkflow", workflow=workflow, **kwargs)

    def build(self, *, validate: bool = True) -> Workflow:
        workflow = Workflow(
            id=self._id,
            name=self._name,
            nodes=tuple(self._nodes),
            version=self._version,
            description=self._description,
            timeout_s=self._timeout_s,
        )
        # Structure only: node types, tools and providers are checked by the
        # engine that runs it, which knows its own registries.
        if validate and (problems := structural_problems(workflow)):
            raise WorkflowValidationError(workflow.id, problems)
        return workflow
