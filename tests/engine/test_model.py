from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowscope.engine import (
    Engine,
    NodeContext,
    NodeRegistry,
    NodeState,
    Result,
    ToolRegistry,
    WorkflowBuilder,
    WorkflowValidationError,
    load_workflow,
    workflow_from_dict,
)
from flowscope.engine.dag import topological_order
from flowscope.engine.retry import Backoff, RetryPolicy
from tests.engine.conftest import Captured

EXAMPLE = Path(__file__).parents[2] / "examples" / "etl.yaml"


async def noop(ctx: NodeContext) -> None:
    return None


def test_every_problem_reported_at_once() -> None:
    raw = {
        "id": "broken",
        "nodes": [
            {"id": "a", "type": "code", "config": {"fn": "examples.steps:extract"}, "depends_on": ["c"]},
            {"id": "b", "type": "code", "config": {"fn": "examples.steps:extract"}, "depends_on": ["a"]},
            {"id": "c", "type": "code", "config": {"fn": "examples.steps:extract"}, "depends_on": ["b"]},
            {"id": "b", "type": "code", "config": {"fn": "examples.steps:extract"}},
            {"id": "d", "type": "code", "depends_on": ["ghost"], "config": {"fn": "examples.steps:extract"}},
        ],
    }
    with pytest.raises(WorkflowValidationError) as info:
        workflow_from_dict(raw)
    problems = info.value.problems
    assert "duplicate node id 'b'" in problems
    assert "node 'd' depends on missing node 'ghost'" in problems
    assert any(p.startswith("cycle: ") for p in problems)
    assert len(problems) == 3
    assert "3 problem(s)" in str(info.value)


def test_unknown_type_and_bad_config_reported_by_engine_registry() -> None:
    tools = ToolRegistry()

    @tools.register
    def lookup(city: str, limit: int = 5) -> list[str]:
        return [city] * limit

    registry = NodeRegistry(tools=tools)
    wf = (
        WorkflowBuilder("bad")
        .node("x", "teleport")
        .http("h", "ftp://example")
        .tool("t", "lookup", args={"city": 42})
        .tool("u", "missing_tool")
        .llm("l", "m", "hi", provider="nope")
        .node("w", "wait")
        .node("c", "condition", branches={"yes": ["not_a_child"]}, value="x")
        .code("k", "no_module_here:fn")
        .code("r", noop, prompt="{{ nodes.h }}")
        .build()
    )
    with pytest.raises(WorkflowValidationError) as info:
        registry.validate(wf)
    text = "\n".join(info.value.problems)
    assert "unknown node type 'teleport'" in text
    assert "url must start with http:// or https://" in text
    assert "argument 'city' must be str, got int" in text
    assert "unknown tool 'missing_tool' (known: lookup)" in text
    assert "unknown LLM provider 'nope'" in text
    assert "exactly one of 'delay_s' or 'signal'" in text
    assert "target 'not_a_child' is not a dependent" in text
    assert "No module named 'no_module_here'" in text
    assert "references nodes.h which is not among its dependencies" in text
    assert len(info.value.problems) == 9


def test_bad_file_errors_are_clear(tmp_path: Path) -> None:
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("id: x\nnodes: [\n")
    with pytest.raises(WorkflowValidationError, match="not valid yaml"):
        load_workflow(bad_yaml)
    with pytest.raises(WorkflowValidationError, match="cannot read"):
        load_workflow(tmp_path / "missing.yaml")
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({"id": "o", "nodes": [{"id": "a", "type": "code", "colour": "red", "retry": 3}]}))
    with pytest.raises(WorkflowValidationError) as info:
        load_workflow(odd)
    assert "node 'a': unknown keys colour (put settings under 'config')" in info.value.problems
    assert "node 'a': retry: retry must be a mapping, got int" in info.value.problems


def test_yaml_and_builder_define_the_same_workflow() -> None:
    from_file = load_workflow(EXAMPLE)
    built = (
        WorkflowBuilder("etl-orders", "ETL orders", version="2", timeout_s=60)
        .code(
            "extract",
            "examples.steps:extract",
            label="Extract orders",
            retry=RetryPolicy(max_attempts=3, backoff=Backoff.EXPONENTIAL, initial_delay_s=0.01),
        )
        .code("total", "examples.steps:total", depends_on=["extract"])
        .condition(
            "route",
            {"large": ["summarise"], "small": ["archive"]},
            fn="examples.steps:is_large",
            depends_on=["total"],
        )
        .llm(
            "summarise",
            "local-small",
            "Summarise a batch worth {{ nodes.total }}",
            depends_on=["route", "total"],
        )
        .wait("archive", delay_s=0, depends_on=["route"])
        .build()
    )
    assert from_file == built
    assert topological_order(built)[0] == "extract"


async def test_declarative_workflow_runs(engine: Engine, captured: Captured) -> None:
    result = await engine.run(load_workflow(EXAMPLE))
    assert result.result is Result.SUCCESS
    assert result.outputs["total"] == 60
    assert result.node_states["archive"] is NodeState.SKIPPED
    assert result.outputs["summarise"]["usage"]["outputTokens"] > 0
    logs = [r for r in captured.events(result.execution_id) if r.log_record.event_name == "execution.log"]
    assert captured.event_data(logs[0])["attributes"] == {"rows": 3}


async def test_tool_node_checks_typed_input_at_run_time(captured: Captured) -> None:
    tools = ToolRegistry()

    @tools.register(name="double")
    async def double(n: int) -> int:
        return n * 2

    engine = Engine(captured.telemetry, NodeRegistry(tools=tools))
    good = WorkflowBuilder("t").tool("d", "double", args={"n": "{{ input.n }}"}).build()
    assert (await engine.run(good, {"n": 4})).outputs["d"] == 8
    bad = await engine.run(good, {"n": "four"})
    assert bad.result is Result.FAILURE
    assert bad.error is not None and "argument 'n' must be int, got str" in bad.error
    span = [s for s in captured.spans() if s.name == "execute_tool double"][-1]
    assert (span.attributes or {})["workflow.node.result"] == "error"
    assert (span.attributes or {})["gen_ai.operation.name"] == "execute_tool"
    await engine.aclose()


def test_retry_backoff_shapes() -> None:
    fixed = RetryPolicy(max_attempts=4, backoff=Backoff.FIXED, initial_delay_s=1, jitter=0)
    linear = RetryPolicy(max_attempts=4, backoff=Backoff.LINEAR, initial_delay_s=1, jitter=0)
    exp = RetryPolicy(max_attempts=4, backoff=Backoff.EXPONENTIAL, initial_delay_s=1, max_delay_s=3, jitter=0)
    assert [fixed.delay_s(a) for a in (1, 2, 3)] == [1, 1, 1]
    assert [linear.delay_s(a) for a in (1, 2, 3)] == [1, 2, 3]
    assert [exp.delay_s(a) for a in (1, 2, 3)] == [1, 2, 3]
    jittered = RetryPolicy(initial_delay_s=1, jitter=0.5)
    assert all(0.5 <= jittered.delay_s(1) <= 1.5 for _ in range(100))
    only_io = RetryPolicy(max_attempts=3, retry_on=frozenset({"OSError"}))
    assert only_io.should_retry(ConnectionError(), 1)
    assert not only_io.should_retry(ValueError(), 1)
    assert not only_io.should_retry(ConnectionError(), 3)
