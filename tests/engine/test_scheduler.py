from __future__ import annotations

import asyncio
from typing import Any

import pytest
from opentelemetry.trace import SpanKind, StatusCode

from flowscope.engine import (
    Engine,
    EventType,
    NodeContext,
    NodeState,
    NonRetryableError,
    Result,
    RetryPolicy,
    Workflow,
    WorkflowBuilder,
)
from tests.engine.conftest import Captured, attrs_of


async def one(ctx: NodeContext) -> int:
    return 1


async def add_inputs(ctx: NodeContext) -> int:
    return sum(v for v in ctx.inputs.values() if isinstance(v, int)) + 1


class Flaky:
    """Fails the first `failures` calls, then succeeds."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    async def __call__(self, ctx: NodeContext) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError(f"flaky call {self.calls}")
        return "ok"


async def boom(ctx: NodeContext) -> None:
    raise ValueError("bad row 17")


def assert_seq_contiguous(captured: Captured, execution_id: str) -> list[int]:
    seqs = [int(attrs_of(r)["workflow.event.seq"]) for r in captured.events(execution_id)]
    assert seqs == list(range(1, len(seqs) + 1))
    return seqs


async def test_parallel_branches_span_tree_and_data_flow(engine: Engine, captured: Captured) -> None:
    started: list[str] = []
    both_running = asyncio.Event()

    async def slow(ctx: NodeContext) -> int:
        started.append(ctx.node.id)
        if len(started) == 2:
            both_running.set()
        # Both branches must be in flight together before either finishes.
        await both_running.wait()
        return 10

    wf = (
        WorkflowBuilder("fan", "Fan out", version="3")
        .code("root", one)
        .code("left", slow, depends_on=["root"])
        .code("right", slow, depends_on=["root"])
        .code("join", add_inputs, depends_on=["left", "right"])
        .build()
    )
    result = await engine.run(wf, {"x": 1}, user_id="u-7", trigger="schedule")
    assert result.result is Result.SUCCESS
    assert result.outputs == {"root": 1, "left": 10, "right": 10, "join": 21}

    run = captured.span("invoke_workflow Fan out")
    assert run.parent is None
    assert run.kind is SpanKind.INTERNAL
    attrs = dict(run.attributes or {})
    assert attrs["gen_ai.operation.name"] == "invoke_workflow"
    assert attrs["workflow.id"] == "fan"
    assert attrs["workflow.version"] == "3"
    assert attrs["workflow.execution.id"] == result.execution_id
    assert attrs["workflow.trigger.type"] == "schedule"
    assert attrs["enduser.id"] == "u-7"
    assert attrs["workflow.node.count"] == 4
    assert attrs["workflow.result"] == "success"
    for name in ("code root", "code left", "code right", "code join"):
        span = captured.span(name)
        assert span.parent is not None and span.parent.span_id == run.context.span_id
        assert span.context.trace_id == run.context.trace_id
        assert span.attributes is not None
        assert span.attributes["workflow.node.result"] == "success"
        assert span.attributes["workflow.node.attempt"] == 1
    assert set(started) == {"left", "right"}
    assert_seq_contiguous(captured, result.execution_id)


async def test_retry_emits_one_span_per_attempt_and_retrying_events(engine: Engine, captured: Captured) -> None:
    flaky = Flaky(failures=2)
    wf = (
        WorkflowBuilder("etl")
        .code("extract", flaky, retry=RetryPolicy(max_attempts=3, initial_delay_s=0.001, jitter=0))
        .build()
    )
    result = await engine.run(wf)
    assert result.result is Result.SUCCESS
    assert result.attempts["extract"] == 3
    spans = sorted(
        (s for s in captured.spans() if s.name == "code extract"),
        key=lambda s: str((s.attributes or {})["workflow.node.attempt"]),
    )
    assert [(s.attributes or {})["workflow.node.result"] for s in spans] == ["failure", "failure", "success"]
    assert spans[0].status.status_code is StatusCode.ERROR
    assert (spans[0].attributes or {})["error.type"] == "ConnectionError"
    assert spans[0].events[0].name == "exception"
    assert spans[2].status.status_code is StatusCode.UNSET
    types = captured.event_types(result.execution_id)
    assert types == [
        ("workflow.started", ""),
        ("node.started", "extract"),
        ("node.failed", "extract"),
        ("node.retrying", "extract"),
        ("node.started", "extract"),
        ("node.failed", "extract"),
        ("node.retrying", "extract"),
        ("node.started", "extract"),
        ("node.completed", "extract"),
        ("workflow.completed", ""),
    ]
    retrying = [r for r in captured.events(result.execution_id) if r.log_record.event_name == "node.retrying"]
    assert captured.event_data(retrying[0])["delayMs"] == pytest.approx(1.0)
    assert sum(p.value for p in captured.metric_points("workflow.node.retries")) == 2


async def test_non_retryable_error_stops_retries(engine: Engine, captured: Captured) -> None:
    calls = 0

    async def fatal(ctx: NodeContext) -> None:
        nonlocal calls
        calls += 1
        raise NonRetryableError("credentials revoked")

    wf = WorkflowBuilder("w").code("a", fatal, retry={"max_attempts": 5, "initial_delay_s": 0}).build()
    result = await engine.run(wf)
    assert result.result is Result.FAILURE
    assert calls == 1


async def test_failed_node_fails_workflow_with_error_status(engine: Engine, captured: Captured) -> None:
    wf = (
        WorkflowBuilder("load")
        .code("a", one)
        .code("b", boom, depends_on=["a"])
        .code("c", one, depends_on=["b"])
        .build()
    )
    result = await engine.run(wf)
    assert result.result is Result.FAILURE
    assert result.error is not None and "bad row 17" in result.error
    assert result.node_states == {"a": NodeState.SUCCESS, "b": NodeState.FAILED, "c": NodeState.PENDING}
    run = captured.span("invoke_workflow load")
    assert run.status.status_code is StatusCode.ERROR
    assert (run.attributes or {})["workflow.result"] == "failure"
    failed = captured.span("code b")
    assert failed.status.status_code is StatusCode.ERROR
    assert (failed.attributes or {})["error.type"] == "ValueError"
    assert "code c" not in {s.name for s in captured.spans()}
    records = captured.events(result.execution_id)
    assert records[-1].log_record.event_name == "workflow.failed"
    assert "bad row 17" in captured.event_data(records[-1])["error"]
    node_failed = next(r for r in records if r.log_record.event_name == "node.failed")
    assert format(node_failed.log_record.span_id, "016x") == format(failed.context.span_id, "016x")
    assert node_failed.log_record.trace_id == failed.context.trace_id


async def test_condition_skips_untaken_branch(engine: Engine, captured: Captured) -> None:
    wf = (
        WorkflowBuilder("route")
        .node("check", "condition", value="{{ input.kind }}", branches={"big": ["heavy"], "small": ["light"]})
        .code("heavy", one, depends_on=["check"])
        .code("light", one, depends_on=["check"])
        .code("after_heavy", one, depends_on=["heavy"])
        .code("join", add_inputs, depends_on=["heavy", "light"])
        .build()
    )
    result = await engine.run(wf, {"kind": "small"})
    assert result.result is Result.SUCCESS
    assert result.node_states["heavy"] is NodeState.SKIPPED
    assert result.node_states["after_heavy"] is NodeState.SKIPPED
    assert result.node_states["light"] is NodeState.SUCCESS
    assert result.node_states["join"] is NodeState.SUCCESS
    assert result.outputs["check"] == {"branch": "small"}
    assert {s.name for s in captured.spans()} == {
        "invoke_workflow route",
        "condition check",
        "code light",
        "code join",
    }
    skipped = [r for r in captured.events(result.execution_id) if r.log_record.event_name == "node.skipped"]
    reasons = {str(attrs_of(r)["workflow.node.id"]): captured.event_data(r)["reason"] for r in skipped}
    assert "not taken" in reasons["heavy"]
    assert reasons["after_heavy"] == "every upstream node was skipped"


async def test_node_timeout(engine: Engine, captured: Captured) -> None:
    async def hang(ctx: NodeContext) -> None:
        await asyncio.Event().wait()

    wf = WorkflowBuilder("slow").code("stuck", hang, timeout_s=0.05).build()
    result = await engine.run(wf)
    assert result.result is Result.FAILURE
    span = captured.span("code stuck")
    assert (span.attributes or {})["workflow.node.result"] == "timeout"
    assert (span.attributes or {})["error.type"] == "timeout"


async def test_workflow_timeout(engine: Engine, captured: Captured) -> None:
    async def hang(ctx: NodeContext) -> None:
        await asyncio.Event().wait()

    wf = WorkflowBuilder("slow", timeout_s=0.05).code("stuck", hang).build()
    result = await engine.run(wf)
    assert result.result is Result.TIMEOUT
    run = captured.span("invoke_workflow slow")
    assert (run.attributes or {})["workflow.result"] == "timeout"
    assert (captured.span("code stuck").attributes or {})["workflow.node.result"] == "cancellation"


async def test_cancellation_reaches_every_running_node(engine: Engine, captured: Captured) -> None:
    entered = asyncio.Event()
    seen_cancel: list[str] = []
    running = 0

    async def hang(ctx: NodeContext) -> None:
        nonlocal running
        running += 1
        if running == 2:
            entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            seen_cancel.append(ctx.node.id)
            raise

    wf = WorkflowBuilder("c").code("a", hang).code("b", hang).code("after", one, depends_on=["a", "b"]).build()
    handle = engine.start(wf)
    await entered.wait()
    handle.cancel("user pressed stop")
    result = await handle.result()
    assert result.result is Result.CANCELLATION
    assert sorted(seen_cancel) == ["a", "b"]
    assert result.node_states["a"] is NodeState.CANCELLED
    assert result.node_states["after"] is NodeState.PENDING
    types = [t for t, _ in captured.event_types(result.execution_id)]
    assert types[-1] == "workflow.cancelled"
    assert (captured.span("invoke_workflow c").attributes or {})["workflow.result"] == "cancellation"
    assert_seq_contiguous(captured, result.execution_id)


async def test_node_cancelled_by_its_own_code_ends_the_run_as_cancellation(engine: Engine, captured: Captured) -> None:
    async def gives_up(ctx: NodeContext) -> None:
        raise asyncio.CancelledError

    async def slow(ctx: NodeContext) -> None:
        await asyncio.Event().wait()

    wf = WorkflowBuilder("self-cancel").code("a", gives_up).code("b", slow).build()
    result = await engine.run(wf)
    assert result.result is Result.CANCELLATION
    assert result.error == "node 'a' was cancelled"
    # The sibling still running is cancelled with the run, not left behind.
    assert result.node_states["b"] is NodeState.CANCELLED
    types = [t for t, _ in captured.event_types(result.execution_id)]
    assert types[-1] == "workflow.cancelled"
    assert_seq_contiguous(captured, result.execution_id)


async def test_resume_reuses_successful_outputs_and_links(engine: Engine, captured: Captured) -> None:
    calls: dict[str, int] = {"extract": 0}
    broken = True

    async def extract(ctx: NodeContext) -> list[int]:
        calls["extract"] += 1
        return [1, 2, 3]

    async def load(ctx: NodeContext) -> int:
        if broken:
            raise RuntimeError("warehouse down")
        return sum(ctx.inputs["extract"])

    wf = WorkflowBuilder("etl").code("extract", extract).code("load", load, depends_on=["extract"]).build()
    first = await engine.run(wf)
    assert first.result is Result.FAILURE
    broken = False
    second = await engine.resume(first).result()
    assert second.result is Result.SUCCESS
    assert second.outputs["load"] == 6
    assert calls["extract"] == 1
    assert second.execution_id != first.execution_id
    runs = [s for s in captured.spans() if s.name == "invoke_workflow etl"]
    resumed = next(s for s in runs if (s.attributes or {})["workflow.execution.id"] == second.execution_id)
    assert (resumed.attributes or {})["workflow.resumed_from.execution.id"] == first.execution_id
    assert (resumed.attributes or {})["workflow.trigger.type"] == "resume"
    assert resumed.links[0].context.span_id == first.span_context.span_id
    reused = [
        captured.event_data(r)
        for r in captured.events(second.execution_id)
        if r.log_record.event_name == "node.completed" and attrs_of(r)["workflow.node.id"] == "extract"
    ]
    assert reused == [{"reused": True, "reusedFrom": first.execution_id, "durationMs": 0.0, "attempt": 0}]


async def test_subworkflow_is_one_trace(engine: Engine, captured: Captured) -> None:
    child = WorkflowBuilder("child", "Child").code("inner", one).build()
    wf = (
        WorkflowBuilder("parent", "Parent")
        .subworkflow("sub", child)
        .code("after", add_inputs, depends_on=["sub"])
        .build()
    )
    result = await engine.run(wf)
    assert result.result is Result.SUCCESS
    assert result.outputs["after"] == 2
    parent_run = captured.span("invoke_workflow Parent")
    sub = captured.span("subworkflow sub")
    child_run = captured.span("invoke_workflow Child")
    inner = captured.span("code inner")
    assert child_run.context.trace_id == parent_run.context.trace_id
    assert child_run.parent is not None and child_run.parent.span_id == sub.context.span_id
    assert inner.parent is not None and inner.parent.span_id == child_run.context.span_id
    child_id = str((child_run.attributes or {})["workflow.execution.id"])
    assert (child_run.attributes or {})["workflow.parent.execution.id"] == result.execution_id
    assert_seq_contiguous(captured, child_id)
    assert_seq_contiguous(captured, result.execution_id)


async def test_pause_holds_new_nodes_until_resume(engine: Engine, captured: Captured) -> None:
    gate = asyncio.Event()
    in_a = asyncio.Event()
    a_done = asyncio.Event()

    async def first(ctx: NodeContext) -> int:
        in_a.set()
        await gate.wait()
        return 1

    def watch(event: Any) -> None:
        if event.type is EventType.NODE_COMPLETED and event.node_id == "a":
            a_done.set()

    engine.events.add_callback(watch)
    wf = WorkflowBuilder("p").code("a", first).code("b", one, depends_on=["a"]).build()
    handle = engine.start(wf)
    await in_a.wait()
    handle.pause("maintenance window")
    gate.set()
    await a_done.wait()
    # "a" finished while paused; give the scheduler time to (wrongly) start "b".
    await asyncio.sleep(0.01)
    assert handle.execution.states["a"] is NodeState.SUCCESS
    assert handle.execution.states["b"] is NodeState.PENDING
    handle.resume()
    result = await handle.result()
    assert result.result is Result.SUCCESS
    types = [t for t, _ in captured.event_types(result.execution_id)]
    assert types.index("workflow.paused") < types.index("workflow.resumed") < types.index("node.started", 2)
    paused = [r for r in captured.events(result.execution_id) if r.log_record.event_name == "workflow.paused"]
    assert captured.event_data(paused[0]) == {"reason": "maintenance window"}


async def test_wait_for_signal_and_delay(engine: Engine, captured: Captured) -> None:
    wf = (
        WorkflowBuilder("approval")
        .wait("approve", signal="approved")
        .wait("cool", delay_s=0.001, depends_on=["approve"])
        .build()
    )
    handle = engine.start(wf)
    events = engine.events
    waiting = asyncio.Event()
    events.add_callback(lambda e: waiting.set() if e.type is EventType.NODE_WAITING else None)
    await waiting.wait()
    handle.signal("approved", {"by": "ana"})
    result = await handle.result()
    assert result.result is Result.SUCCESS
    assert result.outputs["approve"] == {"signal": "approved", "payload": {"by": "ana"}}
    waits = [
        captured.event_data(r)
        for r in captured.events(result.execution_id)
        if r.log_record.event_name == "node.waiting"
    ]
    assert waits == [{"waitingFor": "signal approved"}, {"waitingFor": "delay 0.001s"}]


async def test_in_process_event_iterator_sees_every_event(engine: Engine, captured: Captured) -> None:
    wf = WorkflowBuilder("it").code("a", one).code("b", one, depends_on=["a"]).build()
    seen: list[tuple[int, str]] = []
    async with engine.events.subscribe() as stream:
        handle = engine.start(wf)
        async for event in stream:
            seen.append((event.seq, event.type.value))
            if event.type is EventType.WORKFLOW_COMPLETED:
                break
    result = await handle.result()
    assert [s for s, _ in seen] == list(range(1, result.events_emitted + 1))
    exported = [str(r.log_record.event_name) for r in captured.events(result.execution_id)]
    assert [t for _, t in seen] == exported


async def test_capture_io_truncates_and_redacts(engine: Engine, captured: Captured) -> None:
    async def produce(ctx: NodeContext) -> dict[str, Any]:
        return {"api_key": "sk-live-123", "rows": list(range(500))}

    wf = WorkflowBuilder("io").code("p", produce).build()
    result = await engine.run(wf)
    span = captured.span("code p")
    output = str((span.attributes or {})["workflow.node.output"])
    assert "sk-live-123" not in output
    assert "[REDACTED]" in output
    assert len(output) <= 200 and output.endswith("[truncated]")
    completed = [r for r in captured.events(result.execution_id) if r.log_record.event_name == "node.completed"]
    assert "sk-live-123" not in str(completed[0].log_record.body)


async def test_metrics_points_have_bounded_labels(engine: Engine, captured: Captured) -> None:
    wf = WorkflowBuilder("m").code("a", one).llm("chat", "tiny-1", "hello {{ nodes.a }}", depends_on=["a"]).build()
    await engine.run(wf)
    await engine.run(wf)
    runs = captured.metric_points("workflow.run.duration")
    assert len(runs) == 1 and runs[0].count == 2
    assert dict(runs[0].attributes) == {"workflow.name": "m", "workflow.result": "success"}
    active = captured.metric_points("workflow.run.active")
    assert [p.value for p in active] == [0]
    nodes = captured.metric_points("workflow.node.duration")
    assert {(p.attributes["workflow.node.type"], p.count) for p in nodes} == {("code", 2), ("llm", 2)}
    waits = captured.metric_points("workflow.node.queue_wait")
    assert sum(p.count for p in waits) == 4
    tokens = captured.metric_points("gen_ai.client.token.usage")
    assert {p.attributes["gen_ai.token.type"] for p in tokens} == {"input", "output"}
    for name in ("workflow.run.duration", "workflow.node.duration", "gen_ai.client.token.usage"):
        for point in captured.metric_points(name):
            assert "workflow.execution.id" not in point.attributes
    llm = next(s for s in captured.spans() if s.name == "chat tiny-1")
    attrs = dict(llm.attributes or {})
    assert attrs["gen_ai.request.model"] == "tiny-1"
    tokens_out = attrs["gen_ai.usage.output_tokens"]
    assert isinstance(tokens_out, int) and tokens_out > 0
    ttft = attrs["workflow.llm.time_to_first_token"]
    assert isinstance(ttft, float) and ttft >= 0


async def test_remote_trigger_joins_caller_trace(engine: Engine, captured: Captured) -> None:
    caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    headers = {"traceparent": f"00-{caller_trace}-00f067aa0ba902b7-01"}
    wf: Workflow = WorkflowBuilder("remote").code("a", one).build()
    await engine.run(wf, headers=headers, trigger="http")
    run = captured.span("invoke_workflow remote")
    assert run.kind is SpanKind.SERVER
    assert format(run.context.trace_id, "032x") == caller_trace
    assert run.parent is not None and format(run.parent.span_id, "016x") == "00f067aa0ba902b7"


async def test_progress_is_coalesced_but_ends_current(captured: Captured) -> None:
    engine = Engine(captured.telemetry, progress_interval_s=60.0)
    wf = WorkflowBuilder("chain").code("a", one).code("b", one, depends_on=["a"]).code("c", one, depends_on=["b"])
    result = await engine.run(wf.build())
    progress = [
        captured.event_data(r)
        for r in captured.events(result.execution_id)
        if r.log_record.event_name == "execution.progress"
    ]
    # First change is sent at once; the rest are folded into one flush before the end.
    assert len(progress) == 2
    assert progress[-1]["completedNodes"] == 3 and progress[-1]["progress"] == 1.0
    types = [str(r.log_record.event_name) for r in captured.events(result.execution_id)]
    assert types[-2:] == ["execution.progress", "workflow.completed"]
    assert_seq_contiguous(captured, result.execution_id)
    await engine.aclose()


async def test_http_client_is_made_only_when_a_node_needs_it(captured: Captured) -> None:
    engine = Engine(captured.telemetry)
    await engine.run(WorkflowBuilder("local").code("a", one).build())
    assert engine._http_client is None
    execution = engine.start(WorkflowBuilder("local").code("a", one).build())
    assert execution.execution.http_client is engine.http_client is engine._http_client is not None
    await execution.result()
    await engine.aclose()
