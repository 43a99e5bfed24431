from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry.sdk._logs import LoggerProvider, ReadableLogRecord
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from flowscope.engine import Engine, NodeRegistry, Telemetry, TelemetryOptions


def attrs_of(record: ReadableLogRecord) -> dict[str, Any]:
    return dict(record.log_record.attributes or {})


@dataclass
class Captured:
    spans_exporter: InMemorySpanExporter
    logs_exporter: InMemoryLogRecordExporter
    metrics: InMemoryMetricReader
    telemetry: Telemetry

    def spans(self) -> list[ReadableSpan]:
        return list(self.spans_exporter.get_finished_spans())

    def span(self, name: str) -> ReadableSpan:
        found = [s for s in self.spans() if s.name == name]
        assert len(found) == 1, f"expected one span {name!r}, got {[s.name for s in self.spans()]}"
        return found[0]

    def events(self, execution_id: str | None = None) -> list[ReadableLogRecord]:
        records = [r for r in self.logs_exporter.get_finished_logs()]
        if execution_id is not None:
            records = [r for r in records if attrs_of(r)["workflow.execution.id"] == execution_id]
        return records

    def event_types(self, execution_id: str) -> list[tuple[str, str]]:
        return [
            (str(r.log_record.event_name), str(attrs_of(r).get("workflow.node.id", "")))
            for r in self.events(execution_id)
            if r.log_record.event_name != "execution.progress"
        ]

    def event_data(self, record: ReadableLogRecord) -> dict[str, Any]:
        body = record.log_record.body
        assert isinstance(body, str)
        data: dict[str, Any] = json.loads(body)
        return data

    def metric_points(self, name: str) -> list[Any]:
        data = self.metrics.get_metrics_data()
        points: list[Any] = []
        if data is None:
            return points
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name == name:
                        points.extend(metric.data.data_points)
        return points


@pytest.fixture
def captured() -> Captured:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    logs = InMemoryLogRecordExporter()  # type: ignore[no-untyped-call]
    logger_provider = LoggerProvider()
    logger_provider.add_log_record_processor(SimpleLogRecordProcessor(logs))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    telemetry = Telemetry(
        tracer_provider, logger_provider, meter_provider, TelemetryOptions(capture_io=True, max_io_chars=200)
    )
    return Captured(spans, logs, reader, telemetry)


@pytest.fixture
async def engine(captured: Captured) -> AsyncIterator[Engine]:
    eng = Engine(captured.telemetry, NodeRegistry(), concurrency=8)
    yield eng
    await eng.aclose()
