"""Real engine → real OTLP exporters (gRPC and HTTP) → collector on port 0 → chdb, field by field."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from flowscope.collector.service import Collector
from flowscope.engine import Engine, NodeContext, RetryPolicy, WorkflowBuilder
from tests.collector.otlp import otlp_providers


class FlakyOnce:
    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, ctx: NodeContext) -> str:
        self.calls += 1
        if self.calls == 1:
            raise ConnectionError("reset by peer")
        return "rows"


async def boom(ctx: NodeContext) -> None:
    ctx.log("about to fail", level="warning", row=17)
    raise ValueError("bad row 17")


async def ok(ctx: NodeContext) -> int:
    return 1


def query(collector: Collector, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    client = collector.client()
    try:
        return [tuple(r) for r in client.query(sql.replace("{db}", collector.database), parameters=params).result_rows]
    finally:
        client.close()


async def run_sample_workflows(collector: Collector, protocol: str) -> tuple[str, str]:
    providers = otlp_providers(collector, protocol)
    engine = Engine(providers.telemetry())
    good_wf = (
        WorkflowBuilder("etl", "ETL", version="5")
        .code("extract", FlakyOnce(), retry=RetryPolicy(max_attempts=2, initial_delay_s=0.001))
        .node("route", "condition", value="a", branches={"a": ["keep"], "b": ["drop"]}, depends_on=["extract"])
        .code("keep", ok, depends_on=["route"])
        .code("drop", ok, depends_on=["route"])
        .llm("summarise", "tiny-1", "sum {{ nodes.keep }}", depends_on=["keep"])
        .build()
    )
    good = await engine.run(good_wf, user_id="ana", trigger="schedule")
    bad = await engine.run(WorkflowBuilder("load", "Load").code("a", ok).code("b", boom, depends_on=["a"]).build())
    # SDK counters and histograms of the engine itself, plus the run.
    await asyncio.to_thread(providers.flush)
    await asyncio.to_thread(providers.shutdown)
    await engine.aclose()
    assert collector.pipeline is not None
    assert await asyncio.to_thread(collector.pipeline.flush, 30.0)
    return good.execution_id, bad.execution_id


@pytest.mark.parametrize("protocol", ["grpc", "http"])
async def test_spans_events_and_views_land_field_by_field(collector: Collector, protocol: str) -> None:
    good, bad = await run_sample_workflows(collector, protocol)

    runs = query(
        collector,
        "SELECT SpanName, SpanKind, ServiceName, StatusCode, ParentSpanId,"
        " ResourceAttributes['deployment.environment.name'],"
        " SpanAttributes['workflow.execution.id'], SpanAttributes['workflow.version'], SpanAttributes['enduser.id'],"
        " length(TraceId), Duration > 0, ScopeName"
        " FROM {db}.otel_traces WHERE SpanName LIKE 'invoke_workflow %' ORDER BY Timestamp",
    )
    assert runs == [
        (
            "invoke_workflow ETL",
            "Internal",
            "svc-test",
            "Unset",
            "",
            "test",
            good,
            "5",
            "ana",
            32,
            True,
            "flowscope.engine",
        ),
        (
            "invoke_workflow Load",
            "Internal",
            "svc-test",
            "Error",
            "",
            "test",
            bad,
            "1",
            "",
            32,
            True,
            "flowscope.engine",
        ),
    ]
    attempts = query(
        collector,
        "SELECT SpanAttributes['workflow.node.attempt'], StatusCode, SpanAttributes['error.type'],"
        " Events.Name, Events.Attributes[1]['exception.type']"
        " FROM {db}.otel_traces WHERE SpanName = 'code extract' ORDER BY SpanAttributes['workflow.node.attempt']",
    )
    assert attempts == [("1", "Error", "ConnectionError", ["exception"], "ConnectionError"), ("2", "Unset", "", [], "")]
    llm = query(
        collector,
        "SELECT SpanKind, SpanAttributes['gen_ai.request.model'],"
        " toUInt32(SpanAttributes['gen_ai.usage.output_tokens']) > 0"
        " FROM {db}.otel_traces WHERE SpanName = 'chat tiny-1'",
    )
    assert llm == [("Client", "tiny-1", True)]
    # Trace id lookup table fed by its materialized view, as in the contrib schema.
    lookups = query(collector, "SELECT count() FROM {db}.otel_traces_trace_id_ts")
    assert lookups[0][0] >= 2

    events = query(
        collector,
        "SELECT EventName, LogAttributes['workflow.event.seq'], SeverityText, length(SpanId)"
        " FROM {db}.otel_logs WHERE LogAttributes['workflow.execution.id'] = {e:String}"
        " AND EventName != 'execution.progress' ORDER BY toUInt64(LogAttributes['workflow.event.seq'])",
        e=bad,
    )
    assert [(e[0], e[2]) for e in events] == [
        ("workflow.started", "INFO"),
        ("node.started", "INFO"),
        ("node.completed", "INFO"),
        ("node.started", "INFO"),
        ("execution.log", "INFO"),
        ("node.failed", "ERROR"),
        ("workflow.failed", "ERROR"),
    ]
    assert all(e[3] == 16 for e in events)

    # Workflow tables filled inside ClickHouse by the materialized views.
    executions = query(
        collector,
        "SELECT ExecutionId, WorkflowId, WorkflowVersion, Status, TriggerType, UserId, TotalNodes, CompletedNodes,"
        " FailedNodes, SkippedNodes, Error, DurationMs > 0, EndTime > StartTime, length(TraceId)"
        " FROM {db}.workflow_executions FINAL ORDER BY StartTime",
    )
    assert executions == [
        (good, "etl", "5", "success", "schedule", "ana", 5, 4, 0, 1, "", True, True, 32),
        (bad, "load", "1", "failure", "api", "", 2, 1, 1, 0, "node 'b' failed: ValueError: bad row 17", True, True, 32),
    ]
    nodes = query(
        collector,
        "SELECT NodeId, Attempt, NodeType, Status, ErrorType, Model, OutputTokens > 0"
        " FROM {db}.node_executions FINAL WHERE ExecutionId = {e:String} ORDER BY NodeId, Attempt",
        e=good,
    )
    assert nodes == [
        ("extract", 1, "code", "failure", "ConnectionError", "", False),
        ("extract", 2, "code", "success", "", "", False),
        ("keep", 1, "code", "success", "", "", False),
        ("route", 1, "condition", "success", "", "", False),
        ("summarise", 1, "llm", "success", "", "tiny-1", True),
    ]
    seqs = query(
        collector,
        "SELECT groupArray(Seq), groupArray(EventName) FROM"
        " (SELECT Seq, EventName FROM {db}.workflow_events FINAL WHERE ExecutionId = {e:String} ORDER BY Seq)",
        e=good,
    )
    seq_list, names = seqs[0]
    assert list(seq_list) == list(range(1, len(seq_list) + 1))
    assert names[0] == "workflow.started" and names[-1] == "workflow.completed"
    assert "node.skipped" in names and "node.retrying" in names
    skipped = query(
        collector,
        "SELECT NodeId, Data FROM {db}.workflow_events FINAL"
        " WHERE ExecutionId = {e:String} AND EventName = 'node.skipped'",
        e=good,
    )
    assert skipped[0][0] == "drop" and "not taken" in json.loads(skipped[0][1])["reason"]

    metrics = dict(
        query(
            collector,
            # Cumulative temporality: each export repeats the totals, so take the latest point per series.
            "SELECT MetricName, sum(Count) FROM (SELECT MetricName, argMax(Count, TimeUnix) AS Count"
            " FROM {db}.otel_metrics_histogram WHERE MetricName IN ('workflow.run.duration', 'workflow.node.duration')"
            " GROUP BY MetricName, Attributes) GROUP BY MetricName",
        )
    )
    assert metrics == {"workflow.run.duration": 2, "workflow.node.duration": 7}
    active = query(
        collector,
        "SELECT Attributes['workflow.name'], argMax(Value, TimeUnix), any(IsMonotonic) FROM {db}.otel_metrics_sum"
        " WHERE MetricName = 'workflow.run.active' GROUP BY 1 ORDER BY 1",
    )
    assert active == [("ETL", 0.0, False), ("Load", 0.0, False)]
