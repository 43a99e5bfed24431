"""Node types carry their own knowledge: the span attributes of their attempts, and which
dependents a result leaves untaken. The scheduler and the run reporter only ask."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from opentelemetry.trace import SpanKind

from flowscope.engine import Engine, NodeContext, NodeRegistry, WorkflowBuilder
from flowscope.engine.dag import Node, Workflow
from flowscope.engine.nodes import ExecutorBase
from flowscope.engine.scheduler import NodeState, Result
from tests.engine.conftest import Captured, attrs_of


class Lookup(ExecutorBase):
    """A custom node type with span attributes of its own."""

    kind = SpanKind.CLIENT

    def problems(self, node: Node, workflow: Workflow, registry: NodeRegistry) -> list[str]:
        return []

    def span_name(self, node: Node) -> str:
        return f"lookup {node.id}"

    def span_attributes(self, node: Node) -> Mapping[str, Any]:
        return {"db.system.name": "kv", "db.collection.name": str(node.config.get("table", ""))}

    async def execute(self, ctx: NodeContext) -> Any:
        return {"found": ctx.node.config.get("table") == "users"}


class Gate(ExecutorBase):
    """A custom branching node type: when closed, its dependents listed under `guarded` are untaken."""

    kind = SpanKind.INTERNAL

    def problems(self, node: Node, workflow: Workflow, registry: NodeRegistry) -> list[str]:
        return []

    def span_name(self, node: Node) -> str:
        return f"gate {node.id}"

    def untaken(self, node: Node, output: Any) -> Mapping[str, str]:
        if output.get("open"):
            return {}
        return {target: f"gate {node.id!r} is closed" for target in node.config["guarded"]}

    async def execute(self, ctx: NodeContext) -> Any:
        return {"open": bool(ctx.single_input["found"])}


class Bare:
    """A node type written against the protocol alone, with none of the optional parts."""

    kind = SpanKind.INTERNAL

    def problems(self, node: Node, workflow: Workflow, registry: NodeRegistry) -> list[str]:
        return []

    def span_name(self, node: Node) -> str:
        return f"bare {node.id}"

    async def execute(self, ctx: NodeContext) -> Any:
        return "bare"


async def done(ctx: NodeContext) -> str:
    return "done"


def registry() -> NodeRegistry:
    base = NodeRegistry()
    return NodeRegistry({**base.executors, "lookup": Lookup(), "gate": Gate(), "bare": Bare()})


async def test_node_types_declare_span_attributes_and_untaken_dependents(captured: Captured) -> None:
    wf = (
        WorkflowBuilder("custom-types")
        .node("find", "lookup", table="orders")
        .node("check", "gate", depends_on=["find"], guarded=["charge"])
        .code("charge", done, depends_on=["check"])
        .node("plain", "bare", depends_on=["check"])
        .build()
    )
    async with Engine(captured.telemetry, registry()) as engine:
        result = await engine.run(wf)
    assert result.result is Result.SUCCESS
    assert result.node_states["charge"] is NodeState.SKIPPED
    assert result.node_states["plain"] is NodeState.SUCCESS and result.outputs["plain"] == "bare"

    lookup = captured.span("lookup find")
    assert lookup.kind is SpanKind.CLIENT
    assert lookup.attributes is not None
    assert lookup.attributes["db.system.name"] == "kv" and lookup.attributes["db.collection.name"] == "orders"
    assert lookup.attributes["workflow.node.id"] == "find"
    bare = captured.span("bare plain").attributes or {}
    assert "db.system.name" not in bare and "gen_ai.operation.name" not in bare

    skipped = [r for r in captured.events(result.execution_id) if r.log_record.event_name == "node.skipped"]
    assert [(attrs_of(r)["workflow.node.id"], captured.event_data(r)["reason"]) for r in skipped] == [
        ("charge", "gate 'check' is closed")
    ]
