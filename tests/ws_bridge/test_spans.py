"""Spans feed the bridge too: ETA medians learnt from live node spans, and warnings from spans
when a node's events never arrived. A bridge without history (the remote deployment's shape)
so whatever it knows can only have come through its feed."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
from opentelemetry.sdk._logs import ReadableLogRecord
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, LogRecordExporter, LogRecordExportResult

from flowscope.collector.schema import SchemaOptions
from flowscope.collector.service import Collector, CollectorConfig
from flowscope.collector.serving import serve_asgi
from flowscope.engine import Engine, NodeContext, WorkflowBuilder
from flowscope.ws_bridge.app import Bridge, BridgeConfig
from flowscope.ws_bridge.derive import Thresholds
from tests.collector.otlp import OtlpProviders, otlp_providers
from tests.ws_bridge.conftest import recv_until, ws_client


async def one(ctx: NodeContext) -> int:
    return 1


async def slow(ctx: NodeContext) -> int:
    await asyncio.sleep(0.08)
    return 2


class DroppingLogExporter(LogRecordExporter):
    """Loses every event of one node, as a full SDK queue would: outside our control, so faked."""

    def __init__(self, inner: OTLPLogExporter, node_id: str) -> None:
        self.inner = inner
        self.node_id = node_id

    def export(self, batch: Sequence[ReadableLogRecord]) -> LogRecordExportResult:
        kept = [r for r in batch if (r.log_record.attributes or {}).get("workflow.node.id") != self.node_id]
        return self.inner.export(kept) if kept else LogRecordExportResult.SUCCESS

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.inner.force_flush(timeout_millis)


@contextlib.asynccontextmanager
async def remote_bridge(
    chdb_dsn: str, database: str, thresholds: Thresholds
) -> AsyncIterator[tuple[Bridge, Collector, int]]:
    bridge = Bridge(BridgeConfig(otlp_port=0, thresholds=thresholds), None)
    async with bridge.running():
        config = CollectorConfig(
            dsn=chdb_dsn, schema=SchemaOptions(database=database), grpc_port=0, http_port=0, flush_interval_s=0.05,
            forward_endpoints=(f"127.0.0.1:{bridge.otlp_port}",),
        )  # fmt: skip
        async with Collector(config).running() as collector, serve_asgi(bridge.app()) as port:
            yield bridge, collector, port


async def until(predicate: Any) -> None:
    """Waits for state the bridge's loop changes when a feed request lands; no event to await."""
    async with asyncio.timeout(20):
        while not predicate():  # noqa: ASYNC110 - a bounded wait on a condition, not a guess
            await asyncio.sleep(0.02)


async def test_node_spans_teach_eta_medians_without_history(chdb_dsn: str, database: str) -> None:
    wf = WorkflowBuilder("learnt").code("a", one).code("b", slow, depends_on=["a"]).build()
    async with remote_bridge(chdb_dsn, database, Thresholds()) as (bridge, collector, port):
        providers = otlp_providers(collector, "grpc")
        engine = Engine(providers.telemetry(), progress_interval_s=0)
        assert bridge.medians.get("learnt") == {}
        await engine.run(wf)
        await asyncio.to_thread(providers.flush)
        await until(lambda: set(bridge.medians.get("learnt")) == {"a", "b"})
        assert bridge.medians.get("learnt")["b"] >= 80.0
        async with ws_client(f"ws://127.0.0.1:{port}/ws") as ws:
            await ws.send(json.dumps({"op": "subscribe", "id": "e", "rooms": ["workflow:learnt"]}))
            await recv_until(ws, lambda m: m.get("type") == "replay.done")
            second = await engine.run(wf)
            await asyncio.to_thread(providers.flush)
            # The first run's last events may still be on their way through the forward: not these.
            received = await recv_until(
                ws, lambda m: m.get("type") == "workflow.completed" and m["executionId"] == second.execution_id
            )
        await asyncio.to_thread(providers.shutdown)
        await engine.aclose()
        assert bridge.hub.stats()["spansIn"] >= 6
    etas = [
        m["data"]["etaMs"]
        for m in received
        if m["type"] == "execution.progress" and m["executionId"] == second.execution_id
    ]
    # The first progress comes before any node ran: the whole critical path is still ahead.
    assert isinstance(etas[0], float) and etas[0] >= 80.0
    assert etas[-1] == 0.0


async def test_a_slow_node_whose_events_were_lost_is_warned_from_its_span(chdb_dsn: str, database: str) -> None:
    wf = WorkflowBuilder("lossy", "Lossy").code("a", one).code("slow", slow, depends_on=["a"]).build()
    thresholds = Thresholds(warning_ms=50, critical_ms=60_000)
    async with remote_bridge(chdb_dsn, database, thresholds) as (_, collector, port):
        base = otlp_providers(collector, "grpc")
        base.logger_provider.shutdown()
        providers = OtlpProviders(base.tracer_provider, _dropping_logs(collector, "slow"), base.meter_provider)
        engine = Engine(providers.telemetry())
        async with ws_client(f"ws://127.0.0.1:{port}/ws") as ws:
            await ws.send(json.dumps({"op": "subscribe", "id": "w", "rooms": ["workflow:lossy"]}))
            await recv_until(ws, lambda m: m.get("type") == "replay.done")
            result = await engine.run(wf)
            await asyncio.to_thread(providers.flush)
            received = await recv_until(ws, lambda m: m.get("type") == "performance.warning")
        await asyncio.to_thread(providers.shutdown)
        await engine.aclose()
    assert result.result.value == "success"
    seen_nodes = {m.get("nodeId") for m in received if m["type"].startswith("node.")}
    assert seen_nodes == {"a"}  # nothing of "slow" came through the events
    warning = received[-1]
    assert warning["nodeId"] == "slow" and warning["derived"] is True
    assert warning["data"]["running"] is False and warning["data"]["actualMs"] >= 80.0
    assert warning["workflowName"] == "Lossy" and len(warning["spanId"]) == 16


def _dropping_logs(collector: Collector, node_id: str) -> Any:
    from opentelemetry.sdk._logs import LoggerProvider

    inner = OTLPLogExporter(endpoint=f"http://127.0.0.1:{collector.grpc_port}", insecure=True)
    provider = LoggerProvider()
    provider.add_log_record_processor(
        BatchLogRecordProcessor(DroppingLogExporter(inner, node_id), schedule_delay_millis=50)
    )
    return provider
