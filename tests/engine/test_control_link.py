"""The engine's control link against a scripted stack over a real WebSocket (docs/control.md):
hello, start, pause/resume, stop, retry, command deduplication, reconnects, lost, refusals."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from flowscope.engine import (
    Catalog,
    ControlLink,
    Engine,
    FinishedRuns,
    NodeContext,
    NodeState,
    Result,
    Workflow,
    WorkflowBuilder,
)
from flowscope.engine.catalog import UnknownNode
from tests.engine.conftest import Captured, attrs_of
from tests.engine.control_peer import ScriptedStack, scripted_stack

TOKEN = "engine-token"


@dataclass
class Flows:
    """Workflows whose nodes count their runs and hold at gates the test opens."""

    calls: Counter[str] = field(default_factory=Counter)
    gates: dict[str, asyncio.Event] = field(default_factory=dict)
    entered: dict[str, asyncio.Event] = field(default_factory=dict)
    broken: bool = True

    def gate(self, name: str) -> asyncio.Event:
        return self.gates.setdefault(name, asyncio.Event())

    def arrived(self, name: str) -> asyncio.Event:
        return self.entered.setdefault(name, asyncio.Event())

    async def held(self, ctx: NodeContext) -> str:
        self.calls[ctx.node.id] += 1
        self.arrived(ctx.node.id).set()
        await self.gate(ctx.node.id).wait()
        return f"{ctx.node.id}-out"

    async def step(self, ctx: NodeContext) -> str:
        self.calls[ctx.node.id] += 1
        return f"{ctx.node.id}-out"

    async def flaky(self, ctx: NodeContext) -> str:
        self.calls[ctx.node.id] += 1
        if self.broken:
            raise RuntimeError("ledger down")
        return f"{ctx.node.id}-out:{sorted(ctx.inputs)}"

    def hold(self) -> Workflow:
        return WorkflowBuilder("hold", "Hold").code("a", self.held).code("b", self.step, depends_on=["a"]).build()

    def wide(self) -> Workflow:
        return (
            WorkflowBuilder("wide", "Wide", version="3")
            .code("g1", self.held)
            .code("g2", self.held)
            .code("join", self.step, depends_on=["g1", "g2"], label="Join")
            .build()
        )

    def fork(self) -> Workflow:
        """src feeds left and mid; mid feeds end, which fails while broken."""
        return (
            WorkflowBuilder("fork", "Fork")
            .code("src", self.step)
            .code("left", self.step, depends_on=["src"])
            .code("mid", self.step, depends_on=["src"])
            .code("end", self.flaky, depends_on=["mid"])
            .build()
        )


@pytest.fixture
def flows() -> Flows:
    return Flows()


@pytest.fixture
async def stack() -> AsyncIterator[ScriptedStack]:
    async with scripted_stack() as peer:
        yield peer


@pytest.fixture
async def engine(captured: Captured, stack: ScriptedStack, flows: Flows) -> AsyncIterator[Engine]:
    eng = Engine(captured.telemetry, control=stack.url, control_token=TOKEN)
    eng.serve(flows.hold(), flows.wide(), flows.fork())
    async with eng:
        yield eng
        for gate in flows.gates.values():
            gate.set()


def types_of(captured: Captured, execution_id: str) -> list[str]:
    return [kind for kind, _ in captured.event_types(execution_id)]


def event(captured: Captured, execution_id: str, kind: str) -> dict[str, Any]:
    found = [r for r in captured.events(execution_id) if r.log_record.event_name == kind]
    assert len(found) == 1, f"{kind}: {len(found)} events"
    return captured.event_data(found[0])


# What a node without rollback declarations announces (docs/durability.md, "Rollback").
NO_ROLLBACK = {"sideEffect": "none", "compensable": False}


async def test_hello_announces_the_served_workflows_and_heartbeats(engine: Engine, stack: ScriptedStack) -> None:
    hello = await stack.hello()
    assert stack.authorizations == [f"Bearer {TOKEN}"]
    assert len(hello["engineId"]) == 32
    assert hello["name"] == f"{socket.gethostname()}:{os.getpid()}"
    assert hello["executions"] == []
    wide = next(w for w in hello["workflows"] if w["workflowId"] == "wide")
    assert {w["workflowId"] for w in hello["workflows"]} == {"hold", "wide", "fork"}
    assert wide == {
        "workflowId": "wide",
        "version": "3",
        "name": "Wide",
        "nodes": [
            {"id": "g1", "type": "code", "label": "g1", "dependsOn": [], **NO_ROLLBACK},
            {"id": "g2", "type": "code", "label": "g2", "dependsOn": [], **NO_ROLLBACK},
            {"id": "join", "type": "code", "label": "Join", "dependsOn": ["g1", "g2"], **NO_ROLLBACK},
        ],
    }
    await stack.wait_for(lambda: stack.of_type("heartbeat"), "a heartbeat")


async def test_start_runs_under_the_stacks_execution_id(
    engine: Engine, stack: ScriptedStack, flows: Flows, captured: Captured
) -> None:
    await stack.hello()
    answer = await stack.command(
        "start", executionId="run-1", workflowId="fork", input={"n": 1}, trigger="manual", userId="ana"
    )
    assert answer == {"type": "result", "commandId": answer["commandId"], "ok": True, "executionId": "run-1"}
    finished = await stack.ended("run-1")
    assert finished["workflowId"] == "fork" and finished["result"] == "failure"
    started = event(captured, "run-1", "workflow.started")
    assert (started["trigger"], started["userId"]) == ("manual", "ana")
    previous = engine.finished.previous("run-1")
    assert previous is not None and previous.workflow_input == {"n": 1}

    unknown = await stack.command("start", executionId="run-2", workflowId="nope", input=None)
    assert (unknown["ok"], unknown["code"]) == (False, "conflict")
    assert "does not serve workflow nope" in unknown["error"]
    again = await stack.command("start", executionId="run-1", workflowId="fork", input=None)
    assert (again["ok"], again["code"]) == (False, "conflict")
    malformed = await stack.command("start", workflowId="fork")
    assert (malformed["ok"], malformed["code"]) == (False, "bad_request")
    assert engine.get("run-2") is None and flows.calls["src"] == 1


async def test_a_repeated_command_id_is_answered_but_not_applied_again(
    engine: Engine, stack: ScriptedStack, flows: Flows, captured: Captured
) -> None:
    await stack.hello()
    first = await stack.command("start", command_id="cmd-1", executionId="once", workflowId="hold", input=None)
    await flows.arrived("a").wait()
    second = await stack.command("start", command_id="cmd-1", executionId="once", workflowId="hold", input=None)
    assert second == first and first["ok"] is True
    pause = await stack.command("pause", command_id="cmd-2", executionId="once")
    pause_again = await stack.command("pause", command_id="cmd-2", executionId="once")
    assert pause_again == pause and pause["status"] == "paused"
    await stack.command("resume", executionId="once")
    flows.gate("a").set()
    await stack.ended("once")
    assert flows.calls == Counter({"a": 1, "b": 1})
    assert types_of(captured, "once").count("workflow.started") == 1
    assert types_of(captured, "once").count("workflow.paused") == 1


async def test_pause_holds_new_nodes_until_resume(
    engine: Engine, stack: ScriptedStack, flows: Flows, captured: Captured
) -> None:
    await stack.hello()
    await stack.command("start", executionId="p1", workflowId="hold", input=None)
    await flows.arrived("a").wait()
    paused = await stack.command("pause", executionId="p1")
    assert paused["ok"] and paused["status"] == "paused"
    await stack.wait_for(
        lambda: any(e["status"] == "paused" for h in stack.of_type("heartbeat") for e in h["executions"]),
        "a heartbeat saying paused",
    )
    flows.gate("a").set()
    execution = engine.get("p1")
    assert execution is not None
    await stack.wait_for(lambda: execution.states["a"] is NodeState.SUCCESS, "a to succeed")
    # A command's round trip later (many loop turns), b has still not started.
    again = await stack.command("pause", executionId="p1")
    assert (again["ok"], again["code"]) == (False, "conflict")
    assert execution.states["b"] is NodeState.PENDING
    assert "b" not in flows.calls
    resumed = await stack.command("resume", executionId="p1")
    assert resumed["ok"] and resumed["status"] == "running"
    assert (await stack.ended("p1"))["result"] == "success"
    types = types_of(captured, "p1")
    assert types.index("workflow.paused") < types.index("workflow.resumed") < types.index("node.started", 2)
    not_paused = await stack.command("resume", executionId="p1")
    assert not_paused["code"] == "conflict" and "already ended (success)" in not_paused["error"]


async def test_stop_cancels_every_running_node(engine: Engine, stack: ScriptedStack, flows: Flows) -> None:
    await stack.hello()
    await stack.command("start", executionId="s1", workflowId="wide", input=None)
    await flows.arrived("g1").wait()
    await flows.arrived("g2").wait()
    stopped = await stack.command("stop", executionId="s1")
    assert stopped["ok"] and stopped["status"] == "cancelling"
    assert (await stack.ended("s1"))["result"] == "cancellation"
    previous = engine.finished.previous("s1")
    assert previous is not None
    assert previous.node_states == {"g1": NodeState.CANCELLED, "g2": NodeState.CANCELLED, "join": NodeState.PENDING}
    unknown = await stack.command("stop", executionId="never")
    assert unknown["code"] == "conflict" and "not running on this engine" in unknown["error"]
    bad_op = await stack.command("explode", executionId="s1")
    assert bad_op["code"] == "bad_request"


async def test_retry_reruns_the_node_and_what_follows_and_reuses_the_rest(
    engine: Engine, stack: ScriptedStack, flows: Flows, captured: Captured
) -> None:
    await stack.hello()
    await stack.command("start", executionId="f1", workflowId="fork", input={"k": "v"})
    assert (await stack.ended("f1"))["result"] == "failure"
    flows.broken = False

    from_failed = await stack.command("retry", executionId="f1", newExecutionId="f2")
    assert from_failed == {
        "type": "result",
        "commandId": from_failed["commandId"],
        "ok": True,
        "executionId": "f2",
        "retryOf": "f1",
        "fromNode": "end",
    }
    assert (await stack.ended("f2"))["result"] == "success"
    assert flows.calls == Counter({"src": 1, "left": 1, "mid": 1, "end": 2})

    from_mid = await stack.command("retry", executionId="f1", newExecutionId="f3", fromNode="mid")
    assert from_mid["ok"] and from_mid["fromNode"] == "mid"
    assert (await stack.ended("f3"))["result"] == "success"
    assert flows.calls == Counter({"src": 1, "left": 1, "mid": 2, "end": 3})

    reused = {
        str(attrs_of(r)["workflow.node.id"])
        for r in captured.events("f3")
        if r.log_record.event_name == "node.completed" and captured.event_data(r).get("reused")
    }
    assert reused == {"src", "left"}
    started = event(captured, "f3", "workflow.started")
    assert (started["resumedFrom"], started["trigger"]) == ("f1", "retry")
    run = next(
        s
        for s in captured.spans()
        if s.name == "invoke_workflow Fork" and (s.attributes or {})["workflow.execution.id"] == "f3"
    )
    previous = engine.finished.previous("f1")
    assert previous is not None and run.links[0].context.span_id == previous.span_context.span_id
    f3 = engine.finished.previous("f3")
    assert f3 is not None and f3.workflow_input == {"k": "v"} and f3.outputs["end"] == "end-out:['mid']"

    unknown_node = await stack.command("retry", executionId="f1", newExecutionId="f4", fromNode="ghost")
    assert unknown_node["code"] == "bad_request" and "ghost" in unknown_node["error"]
    unknown_run = await stack.command("retry", executionId="zzz", newExecutionId="f5")
    assert unknown_run["code"] == "conflict"
    taken = await stack.command("retry", executionId="f1", newExecutionId="f2")
    assert taken["code"] == "conflict"
    assert engine.get("f4") is None and engine.finished.previous("f4") is None


async def test_engine_retry_needs_no_network(captured: Captured, flows: Flows) -> None:
    async with Engine(captured.telemetry) as engine:
        first = await engine.run(flows.fork())
        assert first.result is Result.FAILURE
        flows.broken = False
        again = await engine.retry(first, "mid", execution_id="mine").result()
        assert again.execution_id == "mine" and again.result is Result.SUCCESS
        assert flows.calls == Counter({"src": 1, "left": 1, "mid": 2, "end": 2})
        # A succeeded run retried without a node runs whole.
        whole = await engine.retry(again).result()
        assert whole.result is Result.SUCCESS
        assert flows.calls == Counter({"src": 2, "left": 2, "mid": 3, "end": 3})
        with pytest.raises(UnknownNode):
            engine.retry(first, "ghost")


async def test_the_link_reconnects_and_sends_nothing_twice(engine: Engine, stack: ScriptedStack, flows: Flows) -> None:
    first_hello = await stack.hello()
    start = await stack.command("start", command_id="c-start", executionId="r1", workflowId="hold", input=None)
    await flows.arrived("a").wait()
    # The stack drops the link; the next connection attempt is refused outright, so the run
    # ends while the engine is away.
    stack.refusals.append(1011)
    await stack.connections[-1].close(1011, "stack restarting")
    await stack.wait_for(lambda: len(stack.authorizations) >= 2, "a reconnect attempt")
    flows.gate("a").set()
    await stack.wait_for(lambda: engine.finished.previous("r1") is not None, "r1 to end")
    second_hello = await stack.hello(2)
    assert second_hello["engineId"] == first_hello["engineId"]
    assert (await stack.ended("r1"))["result"] == "success"
    # The stack resends the command it never saw answered: answered again, not applied again.
    resent = await stack.command("start", command_id="c-start", executionId="r1", workflowId="hold", input=None)
    assert resent == start
    await stack.command("pause", executionId="r1")  # a round trip after everything queued
    assert len(stack.finished("r1")) == 1
    assert flows.calls == Counter({"a": 1, "b": 1})
    assert [index for index, f in stack.frames if f["type"] == "finished"] == [1]


async def test_a_lost_run_that_still_runs_says_recovered(
    engine: Engine, stack: ScriptedStack, flows: Flows, captured: Captured
) -> None:
    await stack.hello()
    await stack.command("start", executionId="l1", workflowId="hold", input=None, userId="bo")
    await flows.arrived("a").wait()
    await stack.send({"type": "lost", "executionId": "l1", "seq": 50})
    await stack.send({"type": "lost", "executionId": "gone", "seq": 3})
    await stack.wait_for(lambda: "workflow.recovered" in types_of(captured, "l1"), "workflow.recovered")
    flows.gate("a").set()
    await stack.ended("l1")
    records = captured.events("l1")
    recovered = next(r for r in records if r.log_record.event_name == "workflow.recovered")
    data = captured.event_data(recovered)
    started = event(captured, "l1", "workflow.started")
    assert data == {**started, "startTimeUnixNano": data["startTimeUnixNano"], "lostSeq": 50}
    assert {"totalNodes", "trigger", "userId", "workflowVersion"} <= set(data) and data["userId"] == "bo"
    run = next(s for s in captured.spans() if s.name == "invoke_workflow Hold")
    assert data["startTimeUnixNano"] == run.start_time
    seqs = [int(str(attrs_of(r)["workflow.event.seq"])) for r in records]
    after = seqs[seqs.index(int(str(attrs_of(recovered)["workflow.event.seq"]))) :]
    assert after[0] == 51 and after == list(range(51, 51 + len(after)))


async def test_a_refused_engine_token_is_logged_and_retried(
    captured: Captured, stack: ScriptedStack, flows: Flows, caplog: pytest.LogCaptureFixture
) -> None:
    stack.refusals.extend([4403, 4401])
    async with Engine(captured.telemetry) as engine:
        engine.serve(flows.hold())
        link = ControlLink(engine, stack.url, "read-only-token", auth_retry_s=0.05)
        engine.control_link = link
        with caplog.at_level(logging.ERROR, logger="flowscope.engine.control_link"):
            link.start()
            await stack.hello()
        messages = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert any("lacks the 'engine' grant (4403)" in m for m in messages)
        assert any("refused the engine's token (4401" in m for m in messages)
        flows.gate("a").set()
        assert (await engine.run(flows.hold())).result is Result.SUCCESS


def test_a_catalog_carries_its_registry() -> None:
    flows = Flows()
    catalog = Catalog([flows.hold()])
    assert [w.id for w in catalog.workflows] == ["hold"] and catalog.registry is not None


async def test_ended_runs_are_kept_bounded_and_only_for_a_steered_engine(captured: Captured, flows: Flows) -> None:
    async with Engine(captured.telemetry) as plain:
        ran = await plain.run(flows.fork())
        assert plain.finished.previous(ran.execution_id) is None
    kept = FinishedRuns(2)
    for result in (ran, replace(ran, execution_id="b"), replace(ran, execution_id="c")):
        kept.add(result)
    assert (kept.previous(ran.execution_id), len(kept)) == (None, 2)
    assert kept.previous("b") is not None and kept.previous("c") is not None
