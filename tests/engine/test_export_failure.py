"""The engine keeps running workflows when its collector is unreachable; drops are counted."""

from __future__ import annotations

import socket

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from flowscope.engine import Engine, NodeContext, Result, Telemetry, WorkflowBuilder
from flowscope.engine.telemetry import batch_delays_millis


async def step(ctx: NodeContext) -> int:
    return 1


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_unreachable_collector_never_stops_workflows_and_drops_are_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What flowscope.engine.setup() turns on, so the SDK reports what its full queue drops.
    monkeypatch.setenv("OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED", "true")
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    exporter = OTLPSpanExporter(endpoint=f"http://127.0.0.1:{closed_port()}", insecure=True, timeout=1)
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(
        BatchSpanProcessor(exporter, max_queue_size=8, max_export_batch_size=4, meter_provider=meter_provider)
    )
    engine = Engine(Telemetry(tracer_provider, LoggerProvider(), meter_provider))
    builder = WorkflowBuilder("offline").code("n0", step)
    for i in range(1, 60):
        builder.code(f"n{i}", step, depends_on=[f"n{i - 1}"])
    result = await engine.run(builder.build())
    assert result.result is Result.SUCCESS
    data = reader.get_metrics_data()
    assert data is not None
    dropped = 0.0
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name != "otel.sdk.processor.span.processed":
                    continue
                for point in metric.data.data_points:
                    if (
                        isinstance(point, NumberDataPoint)
                        and (point.attributes or {}).get("error.type") == "queue_full"
                    ):
                        dropped += point.value
    assert dropped > 0, "a full export queue must be counted, not silent"
    tracer_provider.shutdown()
    await engine.aclose()


def test_batch_delays_are_short_events_shorter_and_overridable() -> None:
    assert batch_delays_millis(None, {}) == (100, 20)
    env = {"OTEL_BSP_SCHEDULE_DELAY": "250", "OTEL_BLRP_SCHEDULE_DELAY": "60"}
    assert batch_delays_millis(None, env) == (250, 60)
    assert batch_delays_millis(10, env) == (10, 10)
