"""A run whose engine went silent is `lost` everywhere (docs/control.md, "Liveness"): in
`workflow_executions`, in the REST API and its status filter, in the live stream as
`workflow.lost` with its seq; `workflow.recovered` makes it running again, and its run span
decides its end as always.

The real embedded stack and a real engine run: the engine exports over OTLP/gRPC, the stack's
`LostEmitter` (what the control plane calls) writes `workflow.lost` through the collector's
intake, and `workflow.recovered` comes over OTLP/gRPC as the engine sends it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

from flowscope.engine import Engine, NodeContext, WorkflowBuilder
from flowscope.engine.scheduler import ExecutionHandle
from flowscope.reading import _watch_fold
from flowscope.stack import Stack
from flowscope.ws_bridge.auth import AuthConfig, Authenticator
from flowscope.ws_bridge.control_events import LostEmitter, LostRun, OtlpLogSink, lost_request
from flowscope.ws_bridge.shapes import execution_from_events
from tests.collector.otlp import OtlpProviders, otlp_providers
from tests.collector.test_outage import OutageWriter, outage_factory
from tests.conftest import CollectorFactory
from tests.flowscope.test_bridge_assembly import ROOT, _bridge_port
from tests.helpers import Gate, eventually
from tests.ws_bridge.conftest import StackFactory, recv_json, recv_until, stack, stack_factory, ws_client, ws_url
from tests.ws_bridge.control_peer import answering, http, scripted_engine
from tests.ws_bridge.control_peer import run as peer_run
from tests.ws_bridge.live_events import live_event

__all__ = ["stack", "stack_factory"]

_DEADLINE_S = 60.0


async def quick(ctx: NodeContext) -> int:
    return 1


@pytest.fixture
async def providers(stack: Stack) -> AsyncIterator[OtlpProviders]:
    made = otlp_providers(stack.collector, "grpc", service="lost-engine")
    yield made
    await asyncio.to_thread(made.shutdown)


def _stored(stack: Stack, execution_id: str) -> dict[str, Any] | None:
    assert stack.bridge is not None and stack.bridge.history is not None
    return stack.bridge.history.started_run(execution_id)


async def _status(stack: Stack, execution_id: str) -> str | None:
    row = await asyncio.to_thread(_stored, stack, execution_id)
    return None if row is None else str(row["Status"])


async def _started(stack: Stack, providers: OtlpProviders, gate: Gate) -> tuple[Engine, ExecutionHandle, int]:
    """A real run waiting at its gate, its workflow.started stored; returns its last seq."""
    engine = Engine(providers.telemetry())
    workflow = WorkflowBuilder("liveness", "Liveness").code("a", quick).code("wait", gate, depends_on=["a"]).build()
    handle = engine.start(workflow, user_id="ana")
    await gate.entered.wait()
    await asyncio.to_thread(providers.flush)
    assert await eventually(lambda: _status(stack, handle.execution_id), "the started row") == "running"
    assert stack.bridge is not None and stack.bridge.history is not None
    history = stack.bridge.history

    async def settled() -> list[Any] | None:
        # The engine's last event before the gate is the progress saying `wait` runs (progress
        # is coalesced, so it trails the node's start): after it the run is quiet.
        events = await asyncio.to_thread(history.events, handle.execution_id)
        last = events[-1] if events else None
        quiet = last is not None and _at_gate(last)
        return events if quiet else None

    events = await eventually(settled, "the run quiet at its gate")
    return engine, handle, int(events[-1]["seq"])


def _at_gate(event: Mapping[str, Any]) -> bool:
    """The progress saying `a` is done and `wait` runs: the run's last event before its gate."""
    data = event.get("data") or {}
    counts = (data.get("completedNodes"), data.get("runningNodes"))
    return event.get("type") == "execution.progress" and counts == (1, 1)


@pytest.mark.slow
async def test_a_run_lost_while_clickhouse_is_away_is_lost_once_it_is_back(stack_factory: StackFactory) -> None:
    """Its workflow.started is not stored yet: the hub's copy gives the lost row its start."""
    writers: list[OutageWriter] = []
    async with stack_factory(writer_factory=outage_factory(writers)) as stack:
        assert stack.bridge is not None and stack.bridge.emit_lost is not None
        providers = otlp_providers(stack.collector, "grpc", service="lost-engine")
        try:
            gate = Gate()
            engine = Engine(providers.telemetry())
            workflow = WorkflowBuilder("liveness", "Liveness").code("a", quick).code("wait", gate, depends_on=["a"])
            handle = engine.start(workflow.build(), user_id="ana")
            execution_id = handle.execution_id
            await gate.entered.wait()
            await asyncio.to_thread(providers.flush)
            async with ws_client(ws_url(stack, f"/ws/executions/{execution_id}?fromSeq=1")) as ws:
                last = (await recv_until(ws, _at_gate))[-1]["seq"]
                assert await _status(stack, execution_id) is None, "nothing is stored while ClickHouse is away"
                stack.bridge.emit_lost(LostRun(execution_id, "liveness", last + 1, "e-1", "worker-a", "silent"))
                lost = (await recv_until(ws, lambda m: m.get("type") == "workflow.lost"))[-1]
            assert lost["seq"] == last + 1 and lost["data"]["userId"] == "ana" and lost["data"]["totalNodes"] == 2
            assert lost["data"]["startTimeUnixNano"] > 0
            for writer in writers:
                writer.down.clear()
            assert await eventually(lambda: _is(stack, execution_id, "lost"), "status lost once written") == "lost"
            gate.release.set()
            await handle.result()
            await engine.aclose()
        finally:
            await asyncio.to_thread(providers.shutdown)


@pytest.mark.slow
@pytest.mark.parametrize("spooled", [False, True], ids=["memory", "spooled"])
async def test_a_lost_run_is_lost_everywhere_then_recovers_and_its_span_decides(
    stack_factory: StackFactory, tmp_path: Path, spooled: bool
) -> None:
    """Spooled, every insert carries a deduplication token down to the views
    (collector/writer.py): a second lost or recovered row must not be taken for the first."""
    async with stack_factory(spool_dir=tmp_path / "spool" if spooled else None) as stack:
        providers = otlp_providers(stack.collector, "grpc", service="lost-engine")
        try:
            await _lost_then_recovered(stack, providers)
        finally:
            await asyncio.to_thread(providers.shutdown)


async def _lost_then_recovered(stack: Stack, providers: OtlpProviders) -> None:
    assert stack.endpoints is not None and stack.bridge is not None and stack.bridge.emit_lost is not None
    gate = Gate()
    engine, handle, last = await _started(stack, providers, gate)
    execution_id = handle.execution_id
    before = await asyncio.to_thread(_stored, stack, execution_id)
    assert before is not None
    async with (
        ws_client(ws_url(stack, f"/ws/executions/{execution_id}?fromSeq={last + 1}")) as ws,
        httpx.AsyncClient(base_url=stack.endpoints.web) as http,
    ):
        assert (await recv_json(ws))["type"] == "subscribed"
        stack.bridge.emit_lost(LostRun(execution_id, "liveness", last + 1, "engine-1", "worker-a", "disconnected"))

        lost = (await recv_until(ws, lambda m: m.get("type") == "workflow.lost"))[-1]
        assert lost["seq"] == last + 1 and lost["executionId"] == execution_id
        assert lost["workflowId"] == "liveness" and lost["workflowName"] == "Liveness"
        assert lost["data"]["reason"] == "disconnected" and lost["data"]["engineName"] == "worker-a"
        assert lost["traceId"] == before["TraceId"]

        assert await eventually(lambda: _is(stack, execution_id, "lost"), "status lost") == "lost"
        after = await asyncio.to_thread(_stored, stack, execution_id)
        assert after is not None
        # The lost row replaced the started one: every column the run started with is kept.
        kept = ("WorkflowName", "WorkflowVersion", "TriggerType", "UserId", "StartTimeUnixNano", "TotalNodes",
                "TraceId", "SpanId", "ServiceName", "ResumedFrom", "ParentExecutionId")  # fmt: skip
        assert {k: after[k] for k in kept} == {k: before[k] for k in kept}
        listed = (await http.get("/api/v1/executions", params={"status": "lost"})).json()["items"]
        assert [e["executionId"] for e in listed] == [execution_id]
        assert listed[0]["status"] == "lost" and listed[0]["userId"] == "ana"
        detail = (await http.get(f"/api/v1/executions/{execution_id}")).json()
        assert detail["status"] == "lost" and detail["lastSeq"] == last + 1
        assert (await http.get("/api/v1/executions", params={"status": "running"})).json()["items"] == []

        # The engine, back, says the run is alive (what it does on the stack's `lost` frame).
        assert handle.execution.recovered(last + 1)
        await asyncio.to_thread(providers.flush)
        recovered = (await recv_until(ws, lambda m: m.get("type") == "workflow.recovered"))[-1]
        assert recovered["seq"] == last + 2 and recovered["data"]["lostSeq"] == last + 1
        assert await eventually(lambda: _is(stack, execution_id, "running"), "status running") == "running"
        running = (await http.get("/api/v1/executions", params={"status": "running"})).json()["items"]
        assert [e["executionId"] for e in running] == [execution_id]

        # Lost and recovered a second time, then the run ends: its span decides.
        stack.bridge.emit_lost(LostRun(execution_id, "liveness", last + 3, "engine-1", "worker-a", "silent"))
        assert (await recv_until(ws, lambda m: m.get("type") == "workflow.lost"))[-1]["seq"] == last + 3
        assert await eventually(lambda: _is(stack, execution_id, "lost"), "status lost again") == "lost"
        assert handle.execution.recovered(last + 3)
        await asyncio.to_thread(providers.flush)
        assert await eventually(lambda: _is(stack, execution_id, "running"), "running again") == "running"
        gate.release.set()
        result = await handle.result()
        await engine.aclose()
        await asyncio.to_thread(providers.flush)
        assert await eventually(lambda: _is(stack, execution_id, "success"), "the span's result") == "success"
        assert result.result.value == "success"
    events = await asyncio.to_thread(stack.bridge.history.events, execution_id)  # type: ignore[union-attr]
    kinds = [e["type"] for e in events]
    assert kinds.count("workflow.lost") == 2 and kinds.count("workflow.recovered") == 2
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))


async def _is(stack: Stack, execution_id: str, status: str) -> str | None:
    found = await _status(stack, execution_id)
    return found if found == status else None


@pytest.mark.slow
async def test_a_run_whose_span_came_first_stays_ended(stack: Stack, providers: OtlpProviders) -> None:
    """The finished row wins whatever order the records arrive in; the emitter does not even
    declare an ended run lost."""
    engine = Engine(providers.telemetry())
    handle = engine.start(WorkflowBuilder("liveness", "Liveness").code("a", quick).build())
    await handle.result()
    await engine.aclose()
    await asyncio.to_thread(providers.flush)
    execution_id = handle.execution_id
    assert await eventually(lambda: _is(stack, execution_id, "success"), "the run's result") == "success"
    stored = await asyncio.to_thread(_stored, stack, execution_id)
    assert stored is not None
    # A lost record that races the span into the store (sent straight to the intake).
    late = lost_request(LostRun(execution_id, "liveness", 99, "engine-1", "worker-a", "silent"), stored)
    await asyncio.to_thread(stack.collector.consume_logs, late)
    assert stack.bridge is not None and stack.bridge.history is not None
    history = stack.bridge.history
    await eventually(
        lambda: asyncio.to_thread(lambda: any(e["seq"] == 99 for e in history.events(execution_id, 99))),
        "the late lost event stored",
    )
    assert await _status(stack, execution_id) == "success"


async def test_the_emitter_skips_ended_runs_and_sends_what_it_has_when_the_run_is_unknown(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    assert stack.bridge is not None and stack.bridge.history is not None
    sent: list[ExportLogsServiceRequest] = []
    emitter = LostEmitter(stack.bridge.history, sent.append, lookup_timeout_s=0.2)
    emitter(LostRun("nowhere", "wf", 4, "e", "worker", "silent", last_heartbeat_unix_nano=123))
    await asyncio.to_thread(emitter.close)
    (request,) = sent
    record = request.resource_logs[0].scope_logs[0].log_records[0]
    assert record.event_name == "workflow.lost"
    assert json.loads(record.body.string_value) == {
        "reason": "silent",
        "engineId": "e",
        "engineName": "worker",
        "lastHeartbeatUnixNano": 123,
    }
    with caplog.at_level(logging.WARNING):
        emitter(LostRun("after", "wf", 1, "e", "worker", "silent"))
    assert "after the emitter closed" in caplog.text


async def test_the_grpc_sink_gives_up_quietly_when_the_collector_is_away(caplog: pytest.LogCaptureFixture) -> None:
    """`flowscope bridge` without a reachable collector: logged, never raised into the bridge."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sink = OtlpLogSink(f"http://127.0.0.1:{port}", "tok", attempts=2, timeout_s=0.5)
    try:
        with caplog.at_level(logging.ERROR):
            await asyncio.to_thread(sink, lost_request(LostRun("x", "wf", 1, "e", "n", "silent"), None))
    finally:
        sink.close()
    assert "sending workflow.lost" in caplog.text


async def test_the_grpc_sink_presents_its_token(stack_factory: StackFactory) -> None:
    tokens = {"ingest-token": ("engine", frozenset({"ingest"}))}
    async with stack_factory(auth_tokens=tokens) as stack:
        assert stack.endpoints is not None and stack.bridge is not None and stack.bridge.history is not None
        history = stack.bridge.history
        sink = OtlpLogSink(stack.endpoints.otlp_grpc, "ingest-token")
        try:
            await asyncio.to_thread(sink, lost_request(LostRun("via-grpc", "wf", 1, "e", "n", "silent"), None))
        finally:
            sink.close()
        events = await eventually(lambda: asyncio.to_thread(history.events, "via-grpc"), "the event stored")
        assert events[0]["type"] == "workflow.lost"
        # Without the run's start the view writes no row; the API still shows it lost, by its events.
        execution = await asyncio.to_thread(history.get_execution, "via-grpc")
        assert execution is not None and execution["status"] == "lost"


def test_watch_shows_lost_then_running_then_the_result() -> None:
    nodes: dict[str, dict[str, Any]] = {}
    status: dict[str, Any] = {"value": "running", "progress": 0.0, "error": None}
    seen = []
    for seq, kind, data in (
        (1, "workflow.started", {"nodes": [{"id": "a"}]}),
        (2, "workflow.lost", {"reason": "silent"}),
        (3, "workflow.recovered", {"lostSeq": 2}),
        (4, "workflow.lost", {"reason": "disconnected"}),
        (5, "workflow.completed", {"result": "success"}),
    ):
        _watch_fold(nodes, status, live_event(kind, seq, data=data))
        seen.append(status["value"])
    assert seen == ["running", "lost", "running", "lost", "success"]


def test_a_run_known_by_its_events_alone_is_lost_until_recovered() -> None:
    started = live_event("workflow.started", 1, data={"totalNodes": 1})
    lost = live_event("workflow.lost", 2, data={"reason": "silent"})
    recovered = live_event("workflow.recovered", 3, data={"lostSeq": 2})
    progress = live_event("execution.progress", 4, data={"progress": 0.5})
    assert execution_from_events("e1", [started, lost], None)["status"] == "lost"
    assert execution_from_events("e1", [started, lost, recovered, progress], None)["status"] == "running"
    assert execution_from_events("e1", [started, progress], None)["status"] == "running"


@pytest.mark.slow
async def test_flowscope_bridge_sends_lost_runs_to_the_collector_tier(
    collector_factory: CollectorFactory, tmp_path: Path
) -> None:
    """The distributed bridge: its engine's channel closes, and the run's workflow.lost goes over
    OTLP/gRPC to FLOWSCOPE_CONTROL_OTLP_ENDPOINT with FLOWSCOPE_TOKEN, stored by the collector."""
    ingest = Authenticator(AuthConfig(tokens={"ingest-token": ("control", frozenset({"ingest"}))}))
    async with collector_factory(authorize=ingest.authorize_ingest) as collector:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWSCOPE_", "OTEL_"))}
        env |= {
            "PYTHONPATH": str(ROOT),
            "NO_COLOR": "1",
            "COLUMNS": "200",
            "FLOWSCOPE_AUTH_TOKENS": "engine-token=engine-1:engine,operator=op:control:*",
            "FLOWSCOPE_TOKEN": "ingest-token",
            "FLOWSCOPE_CONTROL_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.grpc_port}",
        }
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "flowscope.cli", "bridge", "--dsn", f"chdb://{tmp_path}/chdb"),
            *("--http-port", "0", "--otlp-port", "0"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=ROOT,
        )
        try:
            port = await _bridge_port(process)
            async with scripted_engine(port) as engine, http(port, "operator") as operator:
                # Started by the stack: a run the stack knows, so lost is declared for it.
                await engine.hello()
                starting = asyncio.create_task(operator.post("/api/v1/executions", json={"workflowId": "wf-a"}))
                await answering(engine, 1)
                execution_id = (await starting).json()["executionId"]
                await engine.heartbeat([peer_run(execution_id, seq=3)])
                await engine.sync()
            # The channel closed: the run is lost, seq one past the engine's last.
            client = collector.client()

            async def stored() -> list[Any]:
                sql = f"SELECT Seq, EventName, ServiceName FROM {collector.database}.workflow_events FINAL"
                result = await asyncio.to_thread(client.query, sql + f" WHERE ExecutionId = '{execution_id}'")
                return list(result.result_rows)

            assert await eventually(stored, "the lost event in the collector's store") == [
                (4, "workflow.lost", "flowscope-control")
            ]
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.communicate(), _DEADLINE_S)
        assert process.returncode == 0
