"""Rollback with compensation (docs/durability.md, "Rollback"): the plan, the declarations, and
rollbacks of real runs with a real checkpoint store — compensations in reverse dependency order,
each in its span, the run's events numbered on, what was undone forgotten by the store."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.trace import StatusCode

from flowscope.contract.rollback import NodeSpec, NotARollbackPoint, plan_rollback, rollback_points
from flowscope.engine import Engine, WorkflowBuilder, WorkflowValidationError, workflow_from_dict
from flowscope.engine.catalog import FinishedRuns
from flowscope.engine.checkpoints import open_checkpoint_store
from flowscope.engine.control import Commands
from flowscope.engine.dag import Workflow
from flowscope.engine.rollback import CompensationContext, RollbackRefused, rollback
from flowscope.engine.scheduler import ExecutionResult
from tests.engine.conftest import Captured, attrs_of

# a → b, a → c, b → d, c → d, d → e: the diamond with a tail.
DIAMOND = [
    NodeSpec("a"),
    NodeSpec("b", ("a",), "reversible", True),
    NodeSpec("c", ("a",), "none", True),
    NodeSpec("d", ("b", "c"), "external", True),
    NodeSpec("e", ("d",)),
]


def test_a_plan_undoes_the_completed_descendants_latest_first() -> None:
    plan = plan_rollback(DIAMOND, {"a", "b", "c", "d", "e"}, "a")
    assert [s.node_id for s in plan.steps] == ["e", "d", "c", "b"]
    assert plan.compensate == ["d", "c", "b"]
    assert plan.skipped == ["e"] and plan.cannot_undo == []
    # Every node is undone only after every node that consumed its output.
    order = [s.node_id for s in plan.steps]
    for spec in DIAMOND:
        for dep in spec.depends_on:
            if dep in order and spec.id in order:
                assert order.index(spec.id) < order.index(dep)
    # Only what completed, and never toNode itself.
    assert [s.node_id for s in plan_rollback(DIAMOND, {"a", "b", "c"}, "a").steps] == ["c", "b"]
    assert [s.node_id for s in plan_rollback(DIAMOND, {"a", "b", "c", "d"}, "b").steps] == ["d"]


def test_an_external_node_without_compensation_cannot_be_undone() -> None:
    specs = [NodeSpec("a"), NodeSpec("pay", ("a",), "external"), NodeSpec("mail", ("pay",), "reversible")]
    plan = plan_rollback(specs, {"a", "pay", "mail"}, "a")
    assert plan.cannot_undo == ["pay"] and plan.skipped == ["mail"] and plan.compensate == []
    assert plan.as_dict()["steps"][1] == {
        "nodeId": "pay",
        "action": "cannot_undo",
        "sideEffect": "external",
        "reason": "external side effect without a compensation",
    }
    points = rollback_points(specs, {"a", "pay", "mail"})
    assert [(p.to_node, p.cannot_undo) for p in points] == [("a", ["pay"]), ("pay", []), ("mail", [])]
    with pytest.raises(NotARollbackPoint, match="no node 'zz'"):
        plan_rollback(specs, {"a"}, "zz")
    with pytest.raises(NotARollbackPoint, match="'pay' did not complete"):
        plan_rollback(specs, {"a"}, "pay")


def compensate_nothing(ctx: CompensationContext) -> None:
    """A compensation by reference, as a YAML workflow names one."""


def test_declarations_are_validated_and_named() -> None:
    with pytest.raises(WorkflowValidationError) as bad:
        WorkflowBuilder("wf").code("a", fn=lambda ctx: 1, side_effect="sometimes").build()
    assert "node 'a': side_effect must be one of none, reversible, external, not 'sometimes'" in str(bad.value)
    with pytest.raises(WorkflowValidationError, match="node 'a': compensate 'no_such_module:f'"):
        WorkflowBuilder("wf").code("a", fn=lambda ctx: 1, compensate="no_such_module:f").build()
    with pytest.raises(WorkflowValidationError, match="node 'a': compensate must be a callable"):
        WorkflowBuilder("wf").code("a", fn=lambda ctx: 1, compensate=42).build()

    loaded = workflow_from_dict(
        {
            "id": "wf",
            "nodes": [
                {"id": "a", "type": "code", "config": {"fn": "builtins:len"}, "side_effect": "external",
                 "compensate": "tests.engine.test_rollback:compensate_nothing"},
                {"id": "b", "type": "code", "depends_on": ["a"], "config": {"fn": "builtins:len"}},
            ],
        }
    )  # fmt: skip
    assert loaded.node("a").side_effect == "external" and loaded.node("a").compensable
    assert loaded.node("b").side_effect == "none" and not loaded.node("b").compensable
    with pytest.raises(WorkflowValidationError, match="node 'a': compensate must be a 'module:function' string"):
        workflow_from_dict({"id": "wf", "nodes": [{"id": "a", "type": "code", "compensate": ["x"]}]})
    with pytest.raises(WorkflowValidationError, match="node 'a': side_effect must be one of"):
        workflow_from_dict({"id": "wf", "nodes": [{"id": "a", "type": "code", "side_effect": 3}]})


# -- rollbacks of real runs -------------------------------------------------------------------


def diamond(undone: list[tuple[str, Any]], *, pay_compensation: bool = True, fail: str = "") -> Workflow:
    def undo(node_id: str) -> Any:
        async def compensate(ctx: CompensationContext) -> None:
            if node_id == fail:
                raise RuntimeError(f"cannot undo {node_id}")
            undone.append((node_id, ctx.output))

        return compensate

    return (
        WorkflowBuilder("diamond", version="2")
        .code("a", fn=lambda ctx: "A")
        .code("b", fn=lambda ctx: "B", depends_on=["a"], side_effect="reversible", compensate=undo("b"))
        .code("c", fn=lambda ctx: {"c": 1}, depends_on=["a"], compensate=undo("c"))
        .code("d", fn=lambda ctx: "D", depends_on=["b", "c"], side_effect="external",
              compensate=undo("d") if pay_compensation else None)
        .code("e", fn=lambda ctx: "E", depends_on=["d"])
        .build()
    )  # fmt: skip


async def checkpointed(engine: Engine, workflow: Workflow, tmp_path: Path) -> tuple[ExecutionResult, Any]:
    """A run, and a real store holding its outputs as a checkpointing engine leaves them."""
    result = await engine.run(workflow, {"order": 7})
    store = open_checkpoint_store(f"sqlite://{tmp_path}/checkpoints.db")
    await store.put_run(result.execution_id, workflow.id, workflow.version, {"order": 7})
    for node_id, output in result.outputs.items():
        await store.put(result.execution_id, node_id, output, workflow_id=workflow.id,
                        workflow_version=workflow.version, attempt=1)  # fmt: skip
    return result, store


def rollback_events(captured: Captured, execution_id: str, after: int) -> list[tuple[int, str, str]]:
    return [
        (int(a["workflow.event.seq"]), str(r.log_record.event_name), str(a.get("workflow.node.id", "")))
        for r in captured.events(execution_id)
        if int((a := attrs_of(r))["workflow.event.seq"]) > after
    ]


async def test_compensations_run_in_reverse_dependency_order_with_spans_and_events(
    engine: Engine, captured: Captured, tmp_path: Path
) -> None:
    undone: list[tuple[str, Any]] = []
    result, store = await checkpointed(engine, diamond(undone), tmp_path)
    last = result.events_emitted
    try:
        outcome = await rollback(engine, result, "a", invalidate=store.invalidate)

        # d consumed b and c: it is undone first; the order of b and c is the plan's, every time.
        assert undone == [("d", "D"), ("c", {"c": 1}), ("b", "B")]
        assert outcome.compensated == ("d", "c", "b") and outcome.undone == ("e", "d", "c", "b")
        assert outcome.plan.skipped == ["e"]
        # The run's own sequence goes on, gapless, and ends with workflow.rolled_back.
        assert rollback_events(captured, result.execution_id, last) == [
            (last + 1, "node.compensating", "d"),
            (last + 2, "node.compensated", "d"),
            (last + 3, "node.compensating", "c"),
            (last + 4, "node.compensated", "c"),
            (last + 5, "node.compensating", "b"),
            (last + 6, "node.compensated", "b"),
            (last + 7, "workflow.rolled_back", ""),
        ]
        assert outcome.last_seq == last + 7
        end = captured.event_data(captured.events(result.execution_id)[-1])
        assert end["toNode"] == "a" and end["result"] == "success" and end["compensated"] == ["d", "c", "b"]
        assert end["skipped"] == ["e"] and end["rollbackId"] == outcome.rollback_id

        # A rollback span linked to the run's span, one child span per compensation.
        span = captured.span("rollback_workflow diamond")
        assert [link.context.span_id for link in span.links] == [result.span_context.span_id]
        assert span.attributes is not None and span.attributes["workflow.rollback.to_node"] == "a"
        children = [s for s in captured.spans() if s.name.startswith("compensate ")]
        assert [s.name for s in children] == ["compensate d", "compensate c", "compensate b"]
        for child in children:
            assert child.parent is not None and child.parent.span_id == span.context.span_id
            assert child.attributes is not None and "workflow.node.id" not in child.attributes
        events = {str(r.log_record.event_name): r for r in captured.events(result.execution_id)}
        assert events["node.compensated"].log_record.span_id == children[-1].context.span_id

        # What was undone is no longer checkpointed: a resume runs it again.
        checkpoint = await store.load(result.execution_id)
        assert sorted(checkpoint.nodes) == ["a"]

        # What was undone is no longer a completed node: not a rollback point, not undone twice.
        with pytest.raises(NotARollbackPoint, match="'b' did not complete"):
            await rollback(engine, result, "b")
        again = await rollback(engine, result, "a", invalidate=store.invalidate)
        assert again.undone == () and len(undone) == 3
        # … and a second rollback numbers on after the first.
        assert rollback_events(captured, result.execution_id, last + 7) == [(last + 8, "workflow.rolled_back", "")]
    finally:
        store.close()


async def test_an_external_node_without_compensation_refuses_unless_forced(
    engine: Engine, captured: Captured, tmp_path: Path
) -> None:
    undone: list[tuple[str, Any]] = []
    result, store = await checkpointed(engine, diamond(undone, pay_compensation=False), tmp_path)
    last = result.events_emitted
    try:
        with pytest.raises(RollbackRefused, match="external side effects that have no compensation: d") as refused:
            await rollback(engine, result, "a", invalidate=store.invalidate)
        assert refused.value.nodes == ["d"]
        assert undone == [] and rollback_events(captured, result.execution_id, last) == []
        assert sorted((await store.load(result.execution_id)).nodes) == ["a", "b", "c", "d", "e"]

        outcome = await rollback(engine, result, "a", force=True, invalidate=store.invalidate)
        assert [n for n, _ in undone] == ["c", "b"] and outcome.forced
        end = captured.event_data(captured.events(result.execution_id)[-1])
        assert end["forced"] is True and end["cannotUndo"] == ["d"]
    finally:
        store.close()


async def test_a_failed_compensation_stops_the_rollback(engine: Engine, captured: Captured, tmp_path: Path) -> None:
    undone: list[tuple[str, Any]] = []
    result, store = await checkpointed(engine, diamond(undone, fail="c"), tmp_path)
    last = result.events_emitted
    try:
        outcome = await rollback(engine, result, "a", invalidate=store.invalidate)
        assert outcome.result.value == "failure" and outcome.failed_node == "c"
        assert [n for n, _ in undone] == ["d"]  # b, upstream of c, is left as it was
        kinds = [(k, n) for _, k, n in rollback_events(captured, result.execution_id, last)]
        assert kinds[-2:] == [("node.compensation_failed", "c"), ("workflow.rolled_back", "")]
        assert captured.span("compensate c").status.status_code is StatusCode.ERROR
        # c was forgotten before its compensation; nothing puts it back here (no restore given).
        assert sorted((await store.load(result.execution_id)).nodes) == ["a", "b"]
    finally:
        store.close()


async def test_a_store_that_cannot_forget_fails_the_rollback_and_its_resume_waits(
    engine: Engine, captured: Captured, tmp_path: Path
) -> None:
    undone: list[tuple[str, Any]] = []
    result, store = await checkpointed(engine, diamond(undone), tmp_path)
    store.close()  # a closed store refuses every call: the checkpoints of what was undone stay

    outcome = await rollback(engine, result, "c", invalidate=store.invalidate, resume_as="never")
    # What cannot be made non-reusable first is not compensated: a resume would reuse it undone.
    assert undone == [] and outcome.resumed_as is None
    assert outcome.result.value == "failure" and "could not be invalidated" in (outcome.error or "")
    end = captured.event_data(captured.events(result.execution_id)[-1])
    assert end["result"] == "failure" and "could not be invalidated" in end["error"]
    assert engine.get("never") is None


async def test_a_resume_after_rollback_reruns_what_was_undone(
    engine: Engine, captured: Captured, tmp_path: Path
) -> None:
    ran: list[str] = []

    def step(name: str) -> Any:
        def run(ctx: Any) -> str:
            ran.append(name)
            return name.upper()

        return run

    workflow = (
        WorkflowBuilder("chain")
        .code("a", fn=step("a"))
        .code("b", fn=step("b"), depends_on=["a"], compensate=lambda ctx: None)
        .code("c", fn=step("c"), depends_on=["b"])
        .build()
    )
    result, store = await checkpointed(engine, workflow, tmp_path)
    ended: asyncio.Future[ExecutionResult | None] = asyncio.get_running_loop().create_future()

    def finished(execution_id: str, wf: Workflow, res: ExecutionResult | None) -> None:
        if execution_id == "again" and not ended.done():
            ended.set_result(res)

    engine.add_finish_listener(finished)
    try:
        outcome = await rollback(engine, result, "a", invalidate=store.invalidate, resume_as="again")
        assert outcome.resumed_as == "again"
        resumed = await asyncio.wait_for(ended, 30)
        assert resumed is not None and resumed.result.value == "success"
        assert ran == ["a", "b", "c", "b", "c"]  # a reused, what was undone ran again
        assert resumed.outputs == result.outputs
        completed = [r for r in captured.events("again") if r.log_record.event_name == "node.completed"]
        reused = [captured.event_data(r) for r in completed if attrs_of(r)["workflow.node.id"] == "a"]
        assert reused and reused[0]["reused"] is True and reused[0]["reusedFrom"] == result.execution_id
    finally:
        store.close()


@pytest.mark.parametrize("kind", ["sqlite", "chdb"])
async def test_the_store_forgets_invalidated_nodes_only(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = f"sqlite://{tmp_path}/c.db" if kind == "sqlite" else request.getfixturevalue("chdb_dsn")
    store = open_checkpoint_store(url, database=request.getfixturevalue("database") if kind == "chdb" else None)
    try:
        for node_id in ("a", "b", "c"):
            await store.put("e1", node_id, node_id.upper(), workflow_id="wf", workflow_version="1", attempt=1)
        await store.put("e2", "b", "other run", workflow_id="wf", workflow_version="1", attempt=1)
        await store.invalidate("e1", ["b", "c"])
        assert dict((await store.load("e1")).outputs) == {"a": "A"}
        assert dict((await store.load("e2")).outputs) == {"b": "other run"}
        await store.put("e1", "b", "B again", workflow_id="wf", workflow_version="1", attempt=2)  # a rerun
        assert dict((await store.load("e1")).outputs) == {"a": "A", "b": "B again"}
    finally:
        store.close()


async def test_the_control_op_refuses_names_and_runs_in_the_background(captured: Captured) -> None:
    finished = FinishedRuns()
    engine = Engine(captured.telemetry, retry_source=finished)
    assert engine.retry_source is finished, "an empty FinishedRuns is falsy, and still the one given"
    undone: list[tuple[str, Any]] = []
    try:
        result = await engine.run(diamond(undone, pay_compensation=False), {"order": 7})
        finished.add(result)
        commands = Commands(engine)
        frame = {"type": "command", "op": "rollback", "executionId": result.execution_id}

        refused = await commands.handle({**frame, "commandId": "1", "toNode": "a"})
        assert refused["ok"] is False and refused["code"] == "conflict" and "compensation: d" in refused["error"]
        bad = await commands.handle({**frame, "commandId": "2", "toNode": "nope"})
        assert bad["code"] == "bad_request" and "no node 'nope'" in bad["error"]
        unknown = await commands.handle({**frame, "commandId": "3", "toNode": "a", "executionId": "gone"})
        assert unknown["code"] == "conflict"

        async with engine.events.subscribe() as events:
            answer = await commands.handle({**frame, "commandId": "4", "toNode": "a", "force": True, "afterSeq": 90})
            assert answer["ok"] is True and answer["cannotUndo"] == ["d"] and answer["forced"] is True
            assert answer["compensate"] == ["c", "b"] and answer["rollbackId"]
            seen = []
            async for event in events:
                seen.append((event.seq, event.type.value, event.node_id))
                if event.type.value == "workflow.rolled_back":
                    break
        # The stack knew a later seq than the engine's (afterSeq): the rollback numbers on after it.
        assert seen[0] == (91, "node.compensating", "c") and seen[-1][0] == 95
        assert [n for n, _ in undone] == ["c", "b"]
    finally:
        await engine.aclose()


async def test_closing_the_engine_waits_for_a_rollback_in_the_background(captured: Captured) -> None:
    finished = FinishedRuns()
    engine = Engine(captured.telemetry, retry_source=finished)
    undone: list[tuple[str, Any]] = []
    result = await engine.run(diamond(undone, pay_compensation=False), {"order": 7})
    finished.add(result)
    frame = {"type": "command", "op": "rollback", "executionId": result.execution_id, "commandId": "1"}
    answer = await Commands(engine).handle({**frame, "toNode": "a", "force": True})
    assert answer["ok"] is True and undone == []
    await engine.aclose()
    assert [n for n, _ in undone] == ["c", "b"]


def gated(release: asyncio.Event, entered: asyncio.Event, done: list[str]) -> Workflow:
    """a → b → c, b and c compensable; c's compensation waits for `release`."""

    async def undo_c(ctx: CompensationContext) -> None:
        entered.set()
        await release.wait()
        done.append("c")

    def undo_b(ctx: CompensationContext) -> None:
        done.append("b")

    def broken(ctx: Any) -> str:
        raise RuntimeError("ship failed")

    return (
        WorkflowBuilder("gated", version="3")
        .code("a", fn=lambda ctx: "A")
        .code("b", fn=lambda ctx: "B", depends_on=["a"], side_effect="external", compensate=undo_b)
        .code("c", fn=lambda ctx: "C", depends_on=["b"], side_effect="external", compensate=undo_c)
        .code("d", fn=broken, depends_on=["c"])
        .build()
    )


async def test_nothing_continues_a_run_while_it_is_rolled_back(captured: Captured) -> None:
    finished = FinishedRuns()
    engine = Engine(captured.telemetry, retry_source=finished)
    release, entered, done = asyncio.Event(), asyncio.Event(), list[str]()
    try:
        result = await engine.run(gated(release, entered, done), None)
        assert result.result.value == "failure"
        finished.add(result)
        commands, run = Commands(engine), result.execution_id
        started = await commands.handle({"commandId": "1", "op": "rollback", "executionId": run, "toNode": "a"})
        assert started["ok"] is True
        await asyncio.wait_for(entered.wait(), 30)
        for command_id, frame in (
            ("2", {"op": "resume", "newExecutionId": "r1"}),
            ("3", {"op": "retry", "newExecutionId": "r2"}),
            ("4", {"op": "rollback", "toNode": "a"}),
        ):
            answer = await commands.handle({**frame, "commandId": command_id, "executionId": run})
            assert answer["ok"] is False and answer["code"] == "conflict", answer
            assert "being rolled back" in answer["error"]
        assert engine.get("r1") is None and engine.get("r2") is None
        release.set()
        await settle(engine)
        assert done == ["c", "b"]
        again = await commands.handle({"commandId": "5", "op": "retry", "executionId": run, "newExecutionId": "r3"})
        assert again["ok"] is True
    finally:
        release.set()
        await engine.aclose()


async def settle(engine: Engine) -> None:
    from flowscope.engine.rollback import settle_rollbacks

    await settle_rollbacks(engine)


async def test_a_node_loses_its_checkpoint_before_its_compensation_runs(captured: Captured, tmp_path: Path) -> None:
    engine = Engine(captured.telemetry)
    release, entered, done = asyncio.Event(), asyncio.Event(), list[str]()
    workflow = gated(release, entered, done)
    result, store = await checkpointed(engine, workflow, tmp_path)
    try:
        running = asyncio.ensure_future(rollback(engine, result, "a", invalidate=store.invalidate))
        await asyncio.wait_for(entered.wait(), 30)
        # An engine killed now leaves c — being compensated — non-reusable: a resume runs it again.
        assert sorted((await store.load(result.execution_id)).outputs) == ["a", "b"]
        release.set()
        outcome = await running
        assert outcome.undone == ("c", "b") and sorted((await store.load(result.execution_id)).outputs) == ["a"]
    finally:
        release.set()
        store.close()
        await engine.aclose()


async def test_a_failed_compensation_puts_its_checkpoint_back(captured: Captured, tmp_path: Path) -> None:
    engine = Engine(captured.telemetry)
    undone: list[tuple[str, Any]] = []
    result, store = await checkpointed(engine, diamond(undone, fail="c"), tmp_path)

    async def restore(execution_id: str, node_id: str, output: Any) -> None:
        await store.put(execution_id, node_id, output, workflow_id="diamond", workflow_version="2", attempt=1)

    try:
        outcome = await rollback(engine, result, "a", invalidate=store.invalidate, restore=restore)
        assert outcome.failed_node == "c" and outcome.undone == ("e", "d")
        assert dict((await store.load(result.execution_id)).outputs)["c"] == {"c": 1}
    finally:
        store.close()
        await engine.aclose()


async def test_an_after_seq_past_the_protocols_range_is_refused(captured: Captured) -> None:
    finished = FinishedRuns()
    engine = Engine(captured.telemetry, retry_source=finished)
    undone: list[tuple[str, Any]] = []
    try:
        result = await engine.run(diamond(undone), None)
        finished.add(result)
        frame = {"op": "rollback", "executionId": result.execution_id, "toNode": "a"}
        for command_id, after in (("1", 2**63 - 1), ("2", 2**62)):
            answer = await Commands(engine).handle({**frame, "commandId": command_id, "afterSeq": after})
            assert answer["ok"] is False and answer["code"] == "bad_request" and "afterSeq" in answer["error"]
        assert undone == []
    finally:
        await engine.aclose()


async def test_a_resume_naming_another_workflow_is_refused(captured: Captured) -> None:
    finished = FinishedRuns()
    engine = Engine(captured.telemetry, retry_source=finished)
    release, entered, done = asyncio.Event(), asyncio.Event(), list[str]()
    try:
        result = await engine.run(gated(release, entered, done), None)
        finished.add(result)
        frame = {"op": "resume", "executionId": result.execution_id, "newExecutionId": "n1"}
        for command_id, named in (("1", {"workflowId": "other"}), ("2", {"workflowId": "gated", "version": "9"})):
            answer = await Commands(engine).handle({**frame, **named, "commandId": command_id})
            assert answer["ok"] is False and answer["code"] == "conflict" and "not of" in answer["error"]
        assert engine.get("n1") is None
        fine = await Commands(engine).handle({**frame, "workflowId": "gated", "version": "3", "commandId": "3"})
        assert fine["ok"] is True
    finally:
        release.set()
        await engine.aclose()
