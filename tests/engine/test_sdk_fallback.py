"""The engine's SDK fast paths are taken only on a verified SDK (engine/sdk_compat.py); the
fallback — the SDK's public API — exports the same spans, events and metrics.

The fallback is forced the two ways a process meets it: FLOWSCOPE_SDK_FAST_PATH=0, and an
SDK that is not the verified one (another version, or a private name gone). The workflow
is test_sdk_direct's: parallel branches, a retry, a failure with an exception, a skipped
branch, user attributes of every type, an LLM node.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import opentelemetry.sdk.metrics._internal.instrument as instrument
import pytest
from google.protobuf import json_format
from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk._logs import LoggerProvider, ReadableLogRecord
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    NumberDataPoint,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from flowscope.engine import Engine, Telemetry, TelemetryOptions, sdk_compat, telemetry
from tests.engine.test_sdk_direct import _TIMES as _TIMED_ATTRIBUTES
from tests.engine.test_sdk_direct import providers, records_view, spans_view, workflow

_REPO = Path(__file__).resolve().parents[2]
# Histogram sums that are durations differ run to run; token counts do not.
_TIMED_SUMS = {
    "workflow.node.duration",
    "workflow.node.queue_wait",
    "workflow.run.duration",
    "gen_ai.client.operation.duration",
}


@pytest.fixture(autouse=True)
def fresh_decision(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.delenv(sdk_compat.ENV, raising=False)
    sdk_compat.reset()
    yield
    sdk_compat.reset()


def metrics_view(reader: InMemoryMetricReader) -> list[tuple[Any, ...]]:
    data = reader.get_metrics_data()
    assert data is not None
    points: list[tuple[Any, ...]] = []
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for point in metric.data.data_points:
                    attrs = tuple(sorted((point.attributes or {}).items()))
                    if isinstance(point, HistogramDataPoint):
                        total = None if metric.name in _TIMED_SUMS else point.sum
                        points.append((metric.name, attrs, "histogram", point.count, total))
                    else:
                        assert isinstance(point, NumberDataPoint)
                        points.append((metric.name, attrs, "sum", point.value))
    return sorted(points, key=repr)


async def run_once(
    batch: bool,
) -> tuple[list[ReadableSpan], list[ReadableLogRecord], list[tuple[Any, ...]], Telemetry]:
    tracer_provider, logger_provider, spans, logs = providers(Resource.create({"service.name": "t"}), batch=batch)
    reader = InMemoryMetricReader()
    tel = Telemetry(
        tracer_provider, logger_provider, MeterProvider(metric_readers=[reader]), TelemetryOptions(capture_io=True)
    )
    async with Engine(tel, concurrency=4) as engine:
        await engine.run(workflow(), {"q": 1}, execution_id="exec-1")
    logger_provider.force_flush()
    exported = list(spans.get_finished_spans()), list(logs.get_finished_logs()), metrics_view(reader), tel
    logger_provider.shutdown()
    tracer_provider.shutdown()
    return exported


def takes_fast_paths(tel: Telemetry) -> bool:
    wrapped = [type(h).__name__ == "DirectHistogram" for h in (tel.node_duration, tel.node_queue_wait)]
    assert len(set(wrapped)) == 1
    return tel.direct is not None and wrapped[0] and tel.backpressure is not None


@pytest.mark.parametrize("batch", [False, True], ids=["simple-processor", "batch-processor"])
async def test_forced_fallback_exports_what_the_fast_path_exports(monkeypatch: pytest.MonkeyPatch, batch: bool) -> None:
    fast_spans, fast_logs, fast_metrics, fast_tel = await run_once(batch)
    monkeypatch.setenv(sdk_compat.ENV, "0")
    sdk_compat.reset()
    slow_spans, slow_logs, slow_metrics, slow_tel = await run_once(batch)

    assert takes_fast_paths(fast_tel) and not sdk_compat.fast_path()
    assert slow_tel.direct is None and slow_tel.backpressure is None and not takes_fast_paths(slow_tel)
    assert spans_view(slow_spans) == spans_view(fast_spans)
    assert records_view(slow_logs, slow_spans) == records_view(fast_logs, fast_spans)
    assert slow_metrics == fast_metrics
    # The comparison covers what matters: retries, an exception, LLM tokens, a failed run.
    names = [s.name for s in slow_spans]
    assert names.count("code flaky") == 2 and "chat tiny-1" in names
    metric_names = {p[0] for p in slow_metrics}
    assert {"gen_ai.client.token.usage", "workflow.node.retries", "workflow.run.duration"} <= metric_names
    assert any(r.log_record.event_name == "node.failed" for r in slow_logs)


async def test_an_sdk_of_another_version_takes_the_public_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sdk_compat, "installed_version", lambda: "1.46.0")
    spans, logs, metrics, tel = await run_once(batch=True)
    assert not takes_fast_paths(tel) and tel.direct is None
    assert "1.46.0 is not a verified version" in sdk_compat.decision().reason
    assert len(spans) >= 8 and any(r.log_record.event_name == "workflow.failed" for r in logs)
    assert any(p[0] == "workflow.node.duration" for p in metrics)


@pytest.mark.parametrize(
    ("version", "env", "fast"),
    [
        ("1.45.1", {}, True),
        ("1.45.0", {"FLOWSCOPE_SDK_FAST_PATH": "1"}, True),
        ("1.46.0", {}, False),
        ("1.44.9", {}, False),
        ("2.0.0", {}, False),
        ("1.45.dev0", {}, True),
        ("one.two", {}, False),
        (None, {}, False),
        ("1.45.1", {"FLOWSCOPE_SDK_FAST_PATH": "0"}, False),
        ("1.45.1", {"FLOWSCOPE_SDK_FAST_PATH": "off"}, False),
    ],
)
def test_decision_by_version_and_switch(version: str | None, env: dict[str, str], fast: bool) -> None:
    decision = sdk_compat.decide(version, env)
    assert decision.fast is fast, decision.reason


def test_a_missing_private_part_means_the_public_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # As if the SDK renamed its private histogram class; its own code holds another reference.
    monkeypatch.delattr(instrument, "_Histogram")
    decision = sdk_compat.decide("1.45.1", {})
    assert not decision.fast
    assert "opentelemetry.sdk.metrics._internal.instrument:_Histogram" in decision.reason


def test_grpc_exporters_encode_in_place_only_on_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from flowscope.engine.otlp_encoding import GrpcLogExporter, GrpcSpanExporter

    assert telemetry._grpc_exporter_classes() == (GrpcSpanExporter, GrpcLogExporter)
    # An OTLP exporter release the in-place encoding was not verified against, beside a verified SDK.
    versions = {"opentelemetry-sdk": "1.45.1", sdk_compat.EXPORTER_DISTRIBUTION: "1.46.0"}
    monkeypatch.setattr(sdk_compat, "installed_version", versions.get)
    assert sdk_compat.fast_path()
    assert telemetry._grpc_exporter_classes() == (OTLPSpanExporter, OTLPLogExporter)
    monkeypatch.undo()
    monkeypatch.setenv(sdk_compat.ENV, "0")
    sdk_compat.reset()
    assert telemetry._grpc_exporter_classes() == (OTLPSpanExporter, OTLPLogExporter)


_RENAMED_PRIVATE = textwrap.dedent(
    """
    import asyncio, json
    import opentelemetry.sdk.metrics._internal.instrument as instrument

    # As if the next SDK renamed its private histogram class: the SDK itself keeps working.
    del instrument._Histogram

    import flowscope.engine as engine
    from flowscope.engine import Engine, Telemetry
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from tests.engine.test_sdk_direct import workflow

    spans, logs, reader = InMemorySpanExporter(), InMemoryLogRecordExporter(), InMemoryMetricReader()
    tp, lp = TracerProvider(), LoggerProvider()
    tp.add_span_processor(SimpleSpanProcessor(spans))
    lp.add_log_record_processor(SimpleLogRecordProcessor(logs))
    tel = Telemetry(tp, lp, MeterProvider(metric_readers=[reader]))

    async def main():
        async with Engine(tel) as eng:
            return await eng.run(workflow(), {"q": 1})

    result = asyncio.run(main())
    metrics = reader.get_metrics_data().resource_metrics[0].scope_metrics[0].metrics
    print(json.dumps({
        "result": result.result.value,
        "direct": tel.direct is not None,
        "spans": len(spans.get_finished_spans()),
        "events": len(logs.get_finished_logs()),
        "metrics": sorted(m.name for m in metrics),
        "reason": engine.sdk_compat.decision().reason,
    }))
    """
)


def test_import_engine_survives_an_sdk_without_a_private_part() -> None:
    env = {k: v for k, v in os.environ.items() if k != sdk_compat.ENV}
    env["PYTHONPATH"] = str(_REPO)
    done = subprocess.run(
        [sys.executable, "-c", _RENAMED_PRIVATE], cwd=_REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["result"] == "failure" and out["direct"] is False
    assert "instrument:_Histogram" in out["reason"]
    assert out["spans"] >= 8 and out["events"] >= 15
    assert {"workflow.node.duration", "workflow.run.duration", "gen_ai.client.token.usage"} <= set(out["metrics"])


class OtlpReceiver:
    """A real OTLP/gRPC endpoint on 127.0.0.1 that keeps every request it is sent."""

    def __init__(self) -> None:
        self.requests: dict[str, list[Any]] = {"traces": [], "logs": [], "metrics": []}
        self._lock = threading.Lock()
        self.server = grpc.server(ThreadPoolExecutor(max_workers=2))
        receiver = self

        class Traces(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                receiver.keep("traces", request)
                return trace_service_pb2.ExportTraceServiceResponse()

        class Logs(logs_service_pb2_grpc.LogsServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                receiver.keep("logs", request)
                return logs_service_pb2.ExportLogsServiceResponse()

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                receiver.keep("metrics", request)
                return metrics_service_pb2.ExportMetricsServiceResponse()

        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), self.server)  # type: ignore[no-untyped-call]
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Logs(), self.server)  # type: ignore[no-untyped-call]
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), self.server)  # type: ignore[no-untyped-call]
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def keep(self, signal: str, request: Any) -> None:
        with self._lock:
            self.requests[signal].append(request)

    def take(self) -> dict[str, list[Any]]:
        with self._lock:
            taken, self.requests = self.requests, {"traces": [], "logs": [], "metrics": []}
        return taken


def _value(any_value: Any) -> Any:
    return json_format.MessageToDict(any_value)


def _attrs(pairs: Any, drop: frozenset[str] = frozenset()) -> dict[str, Any]:
    return {p.key: _value(p.value) for p in pairs if p.key not in drop}


_DROP = frozenset(_TIMED_ATTRIBUTES)


def received_view(requests: dict[str, list[Any]]) -> dict[str, Any]:
    """What the receiver got, without ids and times: spans, events and metric points."""
    spans = [
        (rs, span)
        for req in requests["traces"]
        for rs in req.resource_spans
        for ss in rs.scope_spans
        for span in ss.spans
    ]
    names = {span.span_id: span.name for _, span in spans}
    span_view = sorted(
        (
            {
                "resource": _attrs(rs.resource.attributes),
                "name": span.name,
                "kind": span.kind,
                "parent": names.get(span.parent_span_id),
                "flags": span.flags,
                "attributes": _attrs(span.attributes, _DROP),
                "status": (span.status.code, span.status.message),
                "events": [(e.name, _attrs(e.attributes, frozenset({"exception.stacktrace"}))) for e in span.events],
                "links": len(span.links),
            }
            for rs, span in spans
        ),
        key=repr,
    )
    records = [
        (sl.scope.name, record)
        for req in requests["logs"]
        for rl in req.resource_logs
        for sl in rl.scope_logs
        for record in sl.log_records
    ]
    event_view = [
        {
            "scope": scope,
            "event_name": r.event_name,
            "severity": (r.severity_number, r.severity_text),
            "attributes": _attrs(r.attributes),
            "body": {k: v for k, v in json.loads(r.body.string_value).items() if k not in _DROP},
            "span": names.get(r.span_id),
            "flags": r.flags,
        }
        for scope, r in records
        if r.event_name != "execution.progress"
    ]
    points = set()
    for req in requests["metrics"]:
        for rm in req.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    for kind in ("histogram", "sum"):
                        if metric.HasField(kind):
                            for p in getattr(metric, kind).data_points:
                                measured = p.count if kind == "histogram" else _value(p)["asInt"]
                                points.add((metric.name, repr(sorted(_attrs(p.attributes).items())), kind, measured))
    return {"spans": span_view, "events": sorted(event_view, key=repr), "metrics": sorted(points)}


async def export_through_otlp(receiver: OtlpReceiver) -> dict[str, list[Any]]:
    """One run with the exporters and processors `setup()` builds, sent to `receiver`; all of it flushed."""
    span_exporter, log_exporter, metric_exporter = telemetry._otlp_exporters(
        "grpc", f"http://127.0.0.1:{receiver.port}"
    )
    resource = Resource.create({"service.name": "fallback-check"})
    reader = PeriodicExportingMetricReader(metric_exporter, export_interval_millis=3_600_000)
    meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter, schedule_delay_millis=50))
    logger_provider = LoggerProvider(resource=resource)
    logger_provider.add_log_record_processor(telemetry.event_processor(log_exporter, 20, {}, meter_provider))
    tel = Telemetry(tracer_provider, logger_provider, meter_provider, TelemetryOptions(capture_io=True))
    async with Engine(tel, concurrency=4) as engine:
        await engine.run(workflow(), {"q": 1}, execution_id="exec-1")
    # Shutting down flushes: every request has been answered by the receiver when these return.
    for provider in (tracer_provider, logger_provider, meter_provider):
        provider.shutdown()
    return receiver.take()


async def test_fallback_sends_a_real_receiver_what_the_fast_path_sends(monkeypatch: pytest.MonkeyPatch) -> None:
    receiver = OtlpReceiver()
    try:
        fast = await export_through_otlp(receiver)
        monkeypatch.setenv(sdk_compat.ENV, "0")
        sdk_compat.reset()
        slow = await export_through_otlp(receiver)
    finally:
        receiver.server.stop(None)
    fast_view, slow_view = received_view(fast), received_view(slow)
    assert slow_view["spans"] == fast_view["spans"]
    assert slow_view["events"] == fast_view["events"]
    assert slow_view["metrics"] == fast_view["metrics"]
    assert len(slow_view["spans"]) >= 8 and len(slow_view["events"]) >= 15
    assert {"workflow.node.duration", "workflow.node.retries"} <= {p[0] for p in slow_view["metrics"]}
