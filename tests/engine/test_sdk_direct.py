"""The direct path (engine/sdk_direct.py) hands the SDK's processors what the SDK's own API would.

One workflow with every kind of step — parallel branches, a retried node, a failure with
an exception, a skipped branch, user attributes of every type, an LLM node — runs once
through each path; the exported spans and events must match field by field (ids and
times aside).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry._logs import NoOpLoggerProvider
from opentelemetry.sdk._logs import LoggerProvider, ReadableLogRecord
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, InMemoryLogRecordExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, TraceIdRatioBased

from flowscope.engine import Engine, NodeContext, RetryPolicy, Telemetry, TelemetryOptions, Workflow, WorkflowBuilder
from flowscope.engine.sdk_direct import DirectRecords, StepSpan

_TIMES = {"durationMs", "delayMs", "timeToFirstTokenMs", "performance", "workflow.llm.time_to_first_token"}


class Flaky:
    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, ctx: NodeContext) -> str:
        self.calls += 1
        if self.calls == 1:
            raise ConnectionError("first call fails")
        return "ok"


async def annotate(ctx: NodeContext) -> dict[str, Any]:
    ctx.set_attribute("app.text", "hello")
    ctx.set_attribute("app.count", 3)
    ctx.set_attribute("app.ratio", 0.5)
    ctx.set_attribute("app.flag", True)
    ctx.set_attribute("app.list", ["a", "b"])
    ctx.set_attribute("app.ints", [1, 2, 3])
    ctx.span.add_event("checkpoint", {"app.step": 1})
    return {"branch": "left"}


async def broken(ctx: NodeContext) -> None:
    raise ValueError("bad input")


async def ok(ctx: NodeContext) -> str:
    return "fine"


def workflow() -> Workflow:
    return (
        WorkflowBuilder("direct-check")
        .code("root", ok)
        .condition("choose", {"left": ["left"], "right": ["right"]}, value="left", depends_on=["root"])
        .code("left", annotate, depends_on=["choose"])
        .code("right", ok, depends_on=["choose"])
        .code("flaky", Flaky(), depends_on=["root"], retry=RetryPolicy(max_attempts=3, initial_delay_s=0.001))
        .llm("ask", "tiny-1", "hi", depends_on=["root"])
        .code("broken", broken, depends_on=["left", "flaky", "ask"])
        .build()
    )


def providers(
    resource: Resource, sampler: Any = None, limits: SpanLimits | None = None, batch: bool = False
) -> tuple[TracerProvider, LoggerProvider, InMemorySpanExporter, InMemoryLogRecordExporter]:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider(resource=resource, sampler=sampler, span_limits=limits)
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    logs = InMemoryLogRecordExporter()  # type: ignore[no-untyped-call]
    logger_provider = LoggerProvider(resource=resource)
    processor = BatchLogRecordProcessor(logs) if batch else SimpleLogRecordProcessor(logs)
    logger_provider.add_log_record_processor(processor)
    return tracer_provider, logger_provider, spans, logs


async def run_once(
    direct: bool, sampler: Any = None, limits: SpanLimits | None = None, batch: bool = False
) -> tuple[list[ReadableSpan], list[ReadableLogRecord], Telemetry]:
    resource = Resource.create({"service.name": "t"})
    tracer_provider, logger_provider, spans, logs = providers(resource, sampler, limits, batch)
    telemetry = Telemetry(
        tracer_provider,
        logger_provider,
        MeterProvider(metric_readers=[InMemoryMetricReader()]),
        TelemetryOptions(capture_io=True),
        direct_records=direct,
    )
    async with Engine(telemetry, concurrency=4) as engine:
        await engine.run(workflow(), {"q": 1}, execution_id="exec-1")
    logger_provider.force_flush()
    return list(spans.get_finished_spans()), list(logs.get_finished_logs()), telemetry


def span_view(span: ReadableSpan, by_id: dict[int, str]) -> dict[str, Any]:
    assert span.context is not None
    return {
        "name": span.name,
        "kind": span.kind,
        "parent": by_id.get(span.parent.span_id) if span.parent else None,
        "trace_flags": span.context.trace_flags,
        "attributes": {k: v for k, v in (span.attributes or {}).items() if k not in _TIMES},
        "status": (span.status.status_code, span.status.description),
        "events": [
            (e.name, {k: v for k, v in (e.attributes or {}).items() if k != "exception.stacktrace"})
            for e in span.events
        ],
        "stacktrace_recorded": [bool((e.attributes or {}).get("exception.stacktrace")) for e in span.events],
        "links": len(span.links),
        "resource": dict(span.resource.attributes),
        "scope": span.instrumentation_scope,
        "dropped": (span.dropped_attributes, span.dropped_events, span.dropped_links),
        "timed": span.start_time is not None and span.end_time is not None and span.end_time >= span.start_time,
    }


def spans_view(spans: list[ReadableSpan]) -> list[dict[str, Any]]:
    by_id = {s.context.span_id: s.name for s in spans if s.context is not None}
    return sorted(
        (span_view(s, by_id) for s in spans), key=lambda v: (v["name"], v["attributes"].get("workflow.node.attempt", 0))
    )


def record_view(record: ReadableLogRecord, by_id: dict[int, str]) -> dict[str, Any]:
    log = record.log_record
    body = json.loads(str(log.body))
    return {
        "event_name": log.event_name,
        "severity": (log.severity_number, log.severity_text),
        "attributes": dict(log.attributes or {}),
        "body": {k: v for k, v in body.items() if k not in _TIMES},
        "span": by_id.get(log.span_id or 0),
        "trace_flags": log.trace_flags,
        "timed": log.timestamp is not None and log.observed_timestamp is not None,
        "resource": dict(record.resource.attributes),
        "scope": record.instrumentation_scope,
        "dropped": record.dropped_attributes,
    }


def records_view(records: list[ReadableLogRecord], spans: list[ReadableSpan]) -> list[dict[str, Any]]:
    by_id = {s.context.span_id: s.name for s in spans if s.context is not None}
    return [record_view(r, by_id) for r in records if r.log_record.event_name != "execution.progress"]


async def test_direct_path_exports_what_the_sdk_api_exports() -> None:
    sdk_spans, sdk_logs, sdk_tel = await run_once(direct=False)
    direct_spans, direct_logs, direct_tel = await run_once(direct=True)
    assert sdk_tel.direct is None and direct_tel.direct is not None
    assert spans_view(direct_spans) == spans_view(sdk_spans)
    assert records_view(direct_logs, direct_spans) == records_view(sdk_logs, sdk_spans)
    # The comparison covers what matters: retries, an exception, user attributes, LLM usage.
    view = spans_view(direct_spans)
    names = [v["name"] for v in view]
    assert names.count("code flaky") == 2 and "chat tiny-1" in names
    left = next(v for v in view if v["name"] == "code left")
    assert left["attributes"]["app.list"] == ("a", "b") and left["events"][0][0] == "checkpoint"
    failed = next(v for v in view if v["name"] == "code broken")
    assert failed["events"][0][0] == "exception" and failed["stacktrace_recorded"] == [True]


async def test_events_queued_for_batch_processors_are_what_the_sdk_queues() -> None:
    # Behind batch processors only, events skip the SDK's per-record copy; what they export is the same.
    sdk_spans, sdk_logs, _ = await run_once(direct=False, batch=True)
    direct_spans, direct_logs, _ = await run_once(direct=True, batch=True)
    assert records_view(direct_logs, direct_spans) == records_view(sdk_logs, sdk_spans)
    assert len(direct_logs) >= 15 and any(r.log_record.event_name == "node.failed" for r in direct_logs)
    # As the SDK's batch processor does, the queued record drops its context (ids stay).
    assert all(not r.log_record.context and r.log_record.span_id for r in direct_logs)


async def test_events_reach_every_processor_when_not_all_are_batch_processors() -> None:
    tracer_provider, logger_provider, _, batched = providers(Resource.create({}), batch=True)
    simple = InMemoryLogRecordExporter()  # type: ignore[no-untyped-call]
    telemetry = Telemetry(tracer_provider, logger_provider)
    async with Engine(telemetry) as engine:
        await engine.run(workflow(), execution_id="before")
        logger_provider.add_log_record_processor(SimpleLogRecordProcessor(simple))
        await engine.run(workflow(), execution_id="after")
    logger_provider.force_flush()

    def ids(exporter: InMemoryLogRecordExporter) -> set[object]:
        return {(r.log_record.attributes or {}).get("workflow.execution.id") for r in exporter.get_finished_logs()}

    assert ids(batched) == {"before", "after"} and ids(simple) == {"after"}
    # The simple processor sees the live record, context included, as the SDK hands it over.
    assert all(r.log_record.context for r in simple.get_finished_logs())


async def test_sampling_and_limits_follow_the_provider() -> None:
    # A sampler that drops everything: no span either way, events still carry the (unsampled) ids.
    for direct in (False, True):
        spans, logs, _ = await run_once(direct, sampler=ALWAYS_OFF)
        assert spans == [] and logs and all(int(r.log_record.trace_flags or 0) & 1 == 0 for r in logs)
    # Ratio sampling: the node spans follow their run's decision, identically on both paths.
    sampler = ParentBased(TraceIdRatioBased(1.0))
    limits = SpanLimits(max_span_attributes=6, max_span_attribute_length=4)
    sdk_spans, _, _ = await run_once(False, sampler, limits)
    direct_spans, _, _ = await run_once(True, sampler, limits)
    assert spans_view(direct_spans) == spans_view(sdk_spans)
    direct_left = next(s for s in direct_spans if s.name == "code left")
    # At the limit the oldest attribute makes room, as in the SDK; strings are cut to the length limit.
    assert len(direct_left.attributes or {}) == 6 and direct_left.dropped_attributes > 0
    assert all(len(v) <= 4 for v in (direct_left.attributes or {}).values() if isinstance(v, str))


async def test_parent_based_static_samplers_decide_node_spans_without_being_asked() -> None:
    # Run spans dropped at the root, node spans recorded under their unsampled local parent:
    # the shortcut must pick the right one of the sampler's two local-parent decisions.
    def sampler() -> ParentBased:
        return ParentBased(ALWAYS_OFF, local_parent_not_sampled=ALWAYS_ON)

    sdk_spans, _, _ = await run_once(False, sampler())
    direct_spans, _, _ = await run_once(True, sampler())
    assert spans_view(direct_spans) == spans_view(sdk_spans)
    names = {s.name for s in direct_spans}
    assert "code left" in names and not any(n.startswith("invoke_workflow") for n in names)

    asked: list[str] = []
    default = ParentBased(ALWAYS_ON)
    ask = default.should_sample

    def counting(*args: Any, **kwargs: Any) -> Any:
        asked.append(kwargs.get("name") or args[2])
        return ask(*args, **kwargs)

    default.should_sample = counting  # type: ignore[method-assign]
    spans, _, _ = await run_once(True, default)
    assert spans_view(spans) == spans_view((await run_once(False, ParentBased(ALWAYS_ON)))[0])
    assert len(spans) == 8 and all(s.context is not None and s.context.trace_flags.sampled for s in spans)
    assert asked == ["invoke_workflow direct-check"], "only the run's span asks the default sampler"

    class Custom(ParentBased):
        def should_sample(self, *args: Any, **kwargs: Any) -> Any:
            asked.append("custom")
            return super().should_sample(*args, **kwargs)

    asked.clear()
    spans, _, _ = await run_once(True, Custom(ALWAYS_ON))
    assert len(asked) == len(spans), "a sampler of its own is asked for every span"


async def test_step_span_after_end_changes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    tracer_provider, logger_provider, spans, _ = providers(Resource.create({}))
    telemetry = Telemetry(tracer_provider, logger_provider)
    assert telemetry.direct is not None
    run = telemetry.start_span("run", parent=None, kind=trace.SpanKind.INTERNAL, attributes={})
    span = telemetry.start_child_span(
        "step", trace.set_span_in_context(run), run.get_span_context(), trace.SpanKind.INTERNAL, {"a": "1"}
    )
    assert isinstance(span, StepSpan) and span.is_recording()
    span.end()
    with caplog.at_level(logging.WARNING):
        span.set_attribute("late", "x")
        span.end()
    assert not span.is_recording()
    (exported,) = spans.get_finished_spans()
    assert dict(exported.attributes or {}) == {"a": "1"}
    assert "ended span" in caplog.text


@pytest.mark.parametrize("max_events", [None, 1, 0])
def test_step_span_events_follow_the_event_limit(max_events: int | None) -> None:
    tracer_provider, logger_provider, spans, _ = providers(
        Resource.create({}), limits=SpanLimits(max_events=max_events)
    )
    telemetry = Telemetry(tracer_provider, logger_provider)
    run = telemetry.start_span("run", parent=None, kind=trace.SpanKind.INTERNAL, attributes={})
    context = trace.set_span_in_context(run)
    quiet = telemetry.start_child_span("quiet", context, run.get_span_context(), trace.SpanKind.INTERNAL, {})
    busy = telemetry.start_child_span("busy", context, run.get_span_context(), trace.SpanKind.INTERNAL, {})
    busy.add_event("first", {"n": 1})
    busy.add_event("second")
    assert [e.name for e in busy.events] == ["first", "second"][: 2 if max_events is None else max_events]  # type: ignore[attr-defined]
    quiet.end()
    busy.end()
    exported = {s.name: s for s in spans.get_finished_spans()}
    assert exported["quiet"].events == ()
    assert [e.name for e in exported["busy"].events] == ["first", "second"][: 2 if max_events is None else max_events]
    assert isinstance(exported["busy"].events, tuple)


def test_only_sdk_providers_take_the_direct_path() -> None:
    assert Telemetry.disabled().direct is None
    assert (
        DirectRecords.for_sdk(trace.NoOpTracerProvider().get_tracer("x"), NoOpLoggerProvider().get_logger("x")) is None
    )
