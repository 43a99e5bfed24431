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
from pathlib import Path
from typing import Any

import opentelemetry.sdk.metrics._internal.instrument as instrument
import pytest
from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk._logs import ReadableLogRecord
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader, NumberDataPoint
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan

from engine import Engine, Telemetry, TelemetryOptions, sdk_compat, telemetry
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
    from engine.otlp_encoding import GrpcLogExporter, GrpcSpanExporter

    assert telemetry._grpc_exporter_classes() == (GrpcSpanExporter, GrpcLogExporter)
    monkeypatch.setenv(sdk_compat.ENV, "0")
    sdk_compat.reset()
    assert telemetry._grpc_exporter_classes() == (OTLPSpanExporter, OTLPLogExporter)


_RENAMED_PRIVATE = textwrap.dedent(
    """
    import asyncio, json
    import opentelemetry.sdk.metrics._internal.instrument as instrument

    # As if the next SDK renamed its private histogram class: the SDK itself keeps working.
    del instrument._Histogram

    import engine
    from engine import Engine, Telemetry
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader, NumberDataPoint
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
