"""OTel instrumentation of runs and node attempts: spans, lifecycle events, metrics.

Names follow docs/telemetry.md (defined once in contract/). `setup()` is the one
place that reads the standard OTEL_* variables and wires the SDK.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from opentelemetry import trace
from opentelemetry._logs import Logger, LoggerProvider, NoOpLoggerProvider, SeverityNumber
from opentelemetry.context import Context
from opentelemetry.metrics import Histogram, MeterProvider, NoOpMeterProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, LogRecordExporter
from opentelemetry.trace import Link, NoOpTracerProvider, Span, SpanContext, SpanKind, TracerProvider

from flowscope.contract.attributes import EVENT_SEQ, NODE_ID, NODE_TYPE, SCOPE
from flowscope.engine import sdk_compat
from flowscope.engine.dag import Node
from flowscope.engine.event_backpressure import EventBackpressure, ExportHealth

if TYPE_CHECKING:
    # Imported at run time only once engine/sdk_compat.py allows the fast paths.
    from flowscope.engine.sdk_direct import DirectRecords
    from flowscope.engine.sdk_metrics import DirectHistogram

logger = logging.getLogger(__name__)


# The standard encoder is the fallback for what orjson refuses (integers beyond 64 bits).
_BODY_JSON = json.JSONEncoder(default=str, separators=(",", ":"))
_BODY_OPTIONS = orjson.OPT_NON_STR_KEYS


def event_body(data: dict[str, Any]) -> str:
    """An event's payload as compact JSON text; values JSON has no type for are written as strings.

    orjson because every event is encoded on the engine's loop (a run's first event lists all its
    nodes): several times faster than the standard encoder, and NaN/Infinity become null, not the
    invalid JSON the standard encoder writes.
    """
    try:
        return orjson.dumps(data, default=str, option=_BODY_OPTIONS).decode()
    except TypeError:
        return _BODY_JSON.encode(data)


@dataclass(frozen=True)
class TelemetryOptions:
    capture_io: bool = False
    max_io_chars: int = 1024


class Telemetry:
    """Holds the tracer, event logger and instruments the scheduler reports through.

    Providers default to the global ones, so `setup()` (or any other SDK
    wiring the host application did) is picked up.
    """

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        logger_provider: LoggerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        options: TelemetryOptions | None = None,
        *,
        direct_records: bool = True,
    ) -> None:
        from opentelemetry import _logs, metrics

        self.options = options or TelemetryOptions()
        tp = tracer_provider or trace.get_tracer_provider()
        lp = logger_provider or _logs.get_logger_provider()
        mp = meter_provider or metrics.get_meter_provider()
        self.tracer = tp.get_tracer(SCOPE)
        self.events: Logger = lp.get_logger(SCOPE)
        # Node spans and events skip the SDK's per-value validation when the providers are the SDK's.
        self.direct: DirectRecords | None = None
        wrap: Any = None
        if direct_records and sdk_compat.fast_path():
            try:
                from flowscope.engine.sdk_direct import DirectRecords
                from flowscope.engine.sdk_metrics import DirectHistogram
            except (ImportError, AttributeError) as error:
                sdk_compat.fell_back("node spans, events and histograms", error)
            else:
                self.direct = DirectRecords.for_sdk(self.tracer, self.events)
                wrap = DirectHistogram.wrap
        # Runs wait (asynchronously, bounded) for room in the SDK's event queue rather than overflow it.
        self.backpressure = EventBackpressure.for_logger(self.events)
        meter = mp.get_meter(SCOPE)

        def histogram(name: str, unit: str, description: str) -> Histogram | DirectHistogram:
            created = meter.create_histogram(name, unit=unit, description=description)
            # Per step records skip the SDK's attribute cleaning when the meter is the SDK's.
            return wrap(created) if wrap is not None else created

        self.run_duration = histogram("workflow.run.duration", unit="s", description="Duration of workflow runs")
        self.run_active = meter.create_up_down_counter(
            "workflow.run.active", unit="{run}", description="Workflow runs in progress"
        )
        self.node_duration = histogram("workflow.node.duration", unit="s", description="Duration of node attempts")
        self.node_retries = meter.create_counter(
            "workflow.node.retries", unit="{retry}", description="Node attempts scheduled for retry"
        )
        self.node_queue_wait = histogram(
            "workflow.node.queue_wait", unit="s", description="Time a ready node waited for a slot"
        )
        self.token_usage = histogram(
            "gen_ai.client.token.usage", unit="{token}", description="Tokens used per LLM operation"
        )
        self.llm_duration = histogram(
            "gen_ai.client.operation.duration", unit="s", description="Duration of LLM operations"
        )

    @classmethod
    def disabled(cls) -> Telemetry:
        return cls(NoOpTracerProvider(), NoOpLoggerProvider(), NoOpMeterProvider())

    def events_backlogged(self) -> bool:
        """True when a run should `await event_room()` before it emits more (engine/event_backpressure.py)."""
        gate = self.backpressure
        return gate is not None and gate.backlogged()

    async def event_room(self) -> None:
        """Returns once the event queue has room, or has stopped draining (a dead collector never blocks)."""
        if self.backpressure is not None:
            await self.backpressure.wait()

    def start_span(
        self,
        name: str,
        *,
        parent: Context | None,
        kind: SpanKind,
        attributes: dict[str, Any],
        links: list[Link] | None = None,
        start_time_ns: int | None = None,
    ) -> Span:
        return self.tracer.start_span(
            name, context=parent, kind=kind, attributes=attributes, links=links, start_time=start_time_ns
        )

    def start_child_span(
        self, name: str, parent: Context, parent_span: SpanContext, kind: SpanKind, attributes: dict[str, Any]
    ) -> Span:
        """A node attempt's span under the run's span (`parent_span`, the span in `parent`)."""
        if self.direct is not None and parent_span.is_valid:
            return self.direct.start_span(name, parent, parent_span, kind, attributes)
        return self.tracer.start_span(name, context=parent, kind=kind, attributes=attributes)

    def emit(
        self,
        event_name: str,
        seq: int,
        ts_ns: int,
        base_attributes: dict[str, Any],
        node: Node | None,
        data: dict[str, Any],
        context: Context,
    ) -> None:
        """One lifecycle event as an OTel log record with EventName, in `context`'s span."""
        attributes = {**base_attributes, EVENT_SEQ: seq}
        if node is not None:
            attributes[NODE_ID] = node.id
            attributes[NODE_TYPE] = node.type
        failed = event_name.endswith(".failed")
        # The event payload travels as JSON text in the body: OTLP attributes
        # are flat, and every collector stores a string body unchanged.
        body = event_body(data) if data else "{}"
        if self.direct is not None:
            severity = SeverityNumber.ERROR if failed else SeverityNumber.INFO
            self.direct.emit(event_name, ts_ns, context, severity, body, attributes)
            return
        self.events.emit(
            timestamp=ts_ns,
            context=context,
            severity_number=SeverityNumber.ERROR if failed else SeverityNumber.INFO,
            severity_text="ERROR" if failed else "INFO",
            body=body,
            attributes=attributes,
            event_name=event_name,
        )


_DEFAULT_SCHEDULE_DELAY_MILLIS = 100
# Events are the live stream, and the batch delay is most of what a live view waits
# (bench/live_latency.py at 2,000 events/s: p50 146 ms at 100 ms, 77 ms at 50, ≈ 35 ms
# at 20), for at most 50 exports a second when busy — cheap since events are encoded
# in place (engine/otlp_encoding.py).
_DEFAULT_LOG_SCHEDULE_DELAY_MILLIS = 20
_DEFAULT_SERVICE_NAME = "flowscope-engine"
# The SDK's 2,048 / 512 overflowed at a thousand concurrent runs on a busy machine. The queue
# holds a burst of every in-flight run's next events above the back-pressure high-water mark
# (a quarter of it, engine/event_backpressure.py); bigger batches mean fewer export calls for
# the one worker thread. ≈ 1 KiB a queued record: ≈ 16 MiB at most while the collector is away.
_DEFAULT_LOG_MAX_QUEUE_SIZE = 16_384
_DEFAULT_LOG_MAX_EXPORT_BATCH_SIZE = 1_024


def log_queue_sizes(env: Mapping[str, str]) -> tuple[int, int]:
    """(max queue size, max export batch size) for events: OTEL_BLRP_MAX_QUEUE_SIZE /
    OTEL_BLRP_MAX_EXPORT_BATCH_SIZE when set, else ours; the batch never exceeds the queue."""
    queue = int(env.get("OTEL_BLRP_MAX_QUEUE_SIZE", _DEFAULT_LOG_MAX_QUEUE_SIZE))
    batch = int(env.get("OTEL_BLRP_MAX_EXPORT_BATCH_SIZE", min(_DEFAULT_LOG_MAX_EXPORT_BATCH_SIZE, queue)))
    return queue, batch


def batch_delays_millis(explicit: int | None, env: Mapping[str, str]) -> tuple[int, int]:
    """(span, event) batch delays: the explicit argument, else OTEL_BSP_/OTEL_BLRP_SCHEDULE_DELAY, else ours."""
    if explicit:
        return explicit, explicit
    return (
        int(env.get("OTEL_BSP_SCHEDULE_DELAY", _DEFAULT_SCHEDULE_DELAY_MILLIS)),
        int(env.get("OTEL_BLRP_SCHEDULE_DELAY", _DEFAULT_LOG_SCHEDULE_DELAY_MILLIS)),
    )


def event_processor(
    exporter: LogRecordExporter, schedule_delay_millis: int, env: Mapping[str, str], meter_provider: MeterProvider
) -> BatchLogRecordProcessor:
    """The events' batch processor: sized by `log_queue_sizes`; its exporter (`ExportHealth`) sends
    batches a busy collector refused again and tells the engine's back-pressure when the collector
    is unreachable, so runs never wait on one that is gone (docs/telemetry.md "Event delivery")."""
    queue_size, batch_size = log_queue_sizes(env)
    return BatchLogRecordProcessor(
        ExportHealth(exporter),
        schedule_delay_millis=schedule_delay_millis,
        max_queue_size=queue_size,
        max_export_batch_size=batch_size,
        meter_provider=meter_provider,
    )


def setup(
    *,
    service_name: str | None = None,
    protocol: str | None = None,
    endpoint: str | None = None,
    schedule_delay_millis: int | None = None,
    console: bool = False,
    instrument_asyncio: bool | None = None,
    options: TelemetryOptions | None = None,
) -> Telemetry:
    """Wire tracer, logger and meter providers with OTLP exporters and install them globally.

    Precedence: explicit argument, then the standard OTEL_* variable, then the
    default. Batch delays are short for live views: 100 ms for spans, 20 ms for
    the lifecycle events. The event queue is sized for the engine's rate
    (`log_queue_sizes`). `console=True` prints telemetry instead of exporting it.
    """
    from opentelemetry import _logs, metrics
    from opentelemetry.sdk._logs import LoggerProvider as SdkLoggerProvider
    from opentelemetry.sdk._logs.export import ConsoleLogRecordExporter
    from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    env = os.environ
    # The SDK counts what its full queues drop (otel.sdk.processor.*.processed
    # with error.type=queue_full) only when this is on; a silent drop is worse.
    env.setdefault("OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED", "true")
    protocol = protocol or env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    delay, log_delay = batch_delays_millis(schedule_delay_millis, env)
    if instrument_asyncio is None:
        instrument_asyncio = env.get("FLOWSCOPE_INSTRUMENT_ASYNCIO", "").lower() in {"1", "true", "yes"}
    attrs = {"service.name": service_name} if service_name else {}
    resource = Resource.create(attrs)
    if "service.name" not in attrs and str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource.create({"service.name": _DEFAULT_SERVICE_NAME}))

    if console:
        span_exporter: Any = ConsoleSpanExporter()
        log_exporter: Any = ConsoleLogRecordExporter()
        metric_exporter: Any = ConsoleMetricExporter()
    else:
        span_exporter, log_exporter, metric_exporter = _otlp_exporters(protocol, endpoint)

    meter_provider = SdkMeterProvider(
        resource=resource,
        metric_readers=[PeriodicExportingMetricReader(metric_exporter)],
    )
    tracer_provider = SdkTracerProvider(resource=resource)
    tracer_provider.add_span_processor(
        BatchSpanProcessor(span_exporter, schedule_delay_millis=delay, meter_provider=meter_provider)
    )
    logger_provider = SdkLoggerProvider(resource=resource)
    logger_provider.add_log_record_processor(event_processor(log_exporter, log_delay, env, meter_provider))
    trace.set_tracer_provider(tracer_provider)
    _logs.set_logger_provider(logger_provider)
    metrics.set_meter_provider(meter_provider)
    if instrument_asyncio:
        from opentelemetry.instrumentation.asyncio import AsyncioInstrumentor

        AsyncioInstrumentor().instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)
    return Telemetry(tracer_provider, logger_provider, meter_provider, options)


def shutdown() -> None:
    """Flush and stop the global providers installed by `setup()`."""
    from opentelemetry import _logs, metrics

    for provider in (trace.get_tracer_provider(), _logs.get_logger_provider(), metrics.get_meter_provider()):
        stop = getattr(provider, "shutdown", None)
        if stop is not None:
            stop()


def _otlp_exporters(protocol: str, endpoint: str | None) -> tuple[Any, Any, Any]:
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        span_class, log_class = _grpc_exporter_classes()
        insecure = None if endpoint is None else endpoint.startswith("http://")
        return (
            span_class(endpoint=endpoint, insecure=insecure),
            log_class(endpoint=endpoint, insecure=insecure),
            OTLPMetricExporter(endpoint=endpoint, insecure=insecure),
        )
    if protocol in {"http/protobuf", "http"}:
        from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter as HttpLogExporter
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
            OTLPMetricExporter as HttpMetricExporter,
        )
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter

        base = endpoint.rstrip("/") if endpoint else None
        return (
            HttpSpanExporter(endpoint=f"{base}/v1/traces" if base else None),
            HttpLogExporter(endpoint=f"{base}/v1/logs" if base else None),
            HttpMetricExporter(endpoint=f"{base}/v1/metrics" if base else None),
        )
    raise ValueError(f"unsupported OTLP protocol {protocol!r}: use 'grpc' or 'http/protobuf'")


def _grpc_exporter_classes() -> tuple[Any, Any]:
    """The SDK's OTLP/gRPC exporters; on the fast path, encoding spans and events in place
    (engine/otlp_encoding.py)."""
    if sdk_compat.grpc_encoding():
        try:
            from flowscope.engine.otlp_encoding import GrpcLogExporter, GrpcSpanExporter
        except (ImportError, AttributeError) as error:
            sdk_compat.fell_back("OTLP encoding", error)
        else:
            return GrpcSpanExporter, GrpcLogExporter
    from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter, OTLPLogExporter
