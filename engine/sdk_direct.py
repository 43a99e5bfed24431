"""Node spans and lifecycle events built straight into the OTel SDK's record types.

Why this exists: the SDK's `Tracer.start_span` and `Logger.emit` validate every
attribute through `BoundedAttributes` (recursive ABC checks under a lock) and copy
each record once more on its way to the processors. For the engine's own records —
attributes it builds itself from strings and integers — that validation is most of
the per-step cost (bench/engine_overhead.py: the SDK span 33 µs and each event
19 µs against a 40–70 µs scheduler step). Here the same SDK objects are built
directly: the tracer's sampler and id generator decide, the provider's span and
log processors receive a `ReadableSpan` and a `ReadWriteLogRecord` exactly as the
SDK would hand them over, and the batch processors and OTLP exporters run
unchanged. Values that arrive from user code (`NodeContext.set_attribute`) still
go through the SDK's own cleaning.

Used only for SDK providers (`DirectRecords.for_sdk`); any other provider gets the
plain API calls. tests/engine/test_sdk_direct.py keeps both paths' output equal.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Mapping
from typing import Any, cast

from opentelemetry import trace
from opentelemetry._logs import LogRecord, SeverityNumber
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.context import Context
from opentelemetry.sdk._logs import Logger as SdkLogger
from opentelemetry.sdk._logs import LogRecordLimits, ReadableLogRecord, ReadWriteLogRecord
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanLimits
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.trace.sampling import Decision, ParentBased, StaticSampler
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState
from opentelemetry.util import types

logger = logging.getLogger(__name__)

# Scalars stored as they are; anything else goes through the SDK's cleaning.
_PLAIN = (str, bool, int, float)
_NO_CONTEXT = Context()
# Status is immutable; the SDK's own ReadableSpan shares one UNSET default the same way.
_UNSET = Status(StatusCode.UNSET)


class StepSpan(trace.Span, ReadableSpan):
    """A recording span whose attributes are a plain dict, ended into the tracer's processors.

    It is both the live API span (nodes call `set_attribute`, `record_exception`)
    and, once ended, the `ReadableSpan` the processors export. Like the SDK's span
    it ignores changes after `end()`; it has no lock because the engine mutates it
    from the event loop only (a node's own threads get the span through
    `NodeContext`, and a dict store is atomic under the GIL).
    """

    def __init__(
        self,
        tracer: SdkTracer,
        limits: SpanLimits,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, types.AttributeValue],
        start_time: int,
    ) -> None:
        super().__init__(
            name=name,
            context=context,
            parent=parent,
            resource=tracer.resource,
            attributes=attributes,
            events=(),
            links=(),
            kind=kind,
            status=_UNSET,
            start_time=start_time,
            instrumentation_scope=getattr(tracer, "_instrumentation_scope", None),
        )
        self._tracer = tracer
        self._limits = limits
        self._attrs = attributes
        # Most node spans never get an event: the list comes with the first.
        self._events_list: list[Event] | None = None
        self._dropped = 0

    # -- API span ---------------------------------------------------------------------------

    def get_span_context(self) -> SpanContext:
        return cast(SpanContext, self._context)

    def is_recording(self) -> bool:
        return self._end_time is None

    def set_attribute(self, key: str, value: types.AttributeValue) -> None:
        if self._end_time is not None:
            logger.warning("Setting attribute on ended span.")
            return
        if not key:
            logger.warning("invalid attribute key %r: must be a non-empty string; dropped", key)
            self._dropped += 1
            return
        if type(value) in _PLAIN:
            limit = self._limits.max_span_attribute_length
            if limit is not None and type(value) is str and len(value) > limit:
                value = value[:limit]
            self._store(key, value)
            return
        # The SDK's cleaning: sequences to tuples, invalid keys and values dropped with a warning.
        for k, v in BoundedAttributes(
            attributes={key: value}, max_value_len=self._limits.max_span_attribute_length
        ).items():
            self._store(k, v)

    def set_attributes(self, attributes: Mapping[str, types.AttributeValue]) -> None:
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def _store(self, key: str, value: types.AttributeValue) -> None:
        attrs = self._attrs
        limit = self._limits.max_span_attributes
        if limit == 0:
            self._dropped += 1
            return
        if key in attrs:
            del attrs[key]  # re-added last, as the SDK orders a replaced key
        elif limit is not None and len(attrs) >= limit:
            # The SDK's rule at the limit: the oldest attribute makes room.
            del attrs[next(iter(attrs))]
            self._dropped += 1
        attrs[key] = value

    @property
    def dropped_attributes(self) -> int:
        return self._dropped

    def add_event(self, name: str, attributes: types.Attributes = None, timestamp: int | None = None) -> None:
        if self._end_time is not None:
            logger.warning("Calling add_event() on an ended span.")
            return
        if self._events_list is None:
            self._events_list = []
            self._events = self._events_list
        limit = self._limits.max_events
        if limit is not None and len(self._events_list) >= limit:
            return
        cleaned = BoundedAttributes(
            self._limits.max_event_attributes,
            attributes,
            max_value_len=self._limits.max_attribute_length,
            immutable=True,
        )
        self._events_list.append(Event(name=name, attributes=cleaned, timestamp=timestamp))

    def add_link(self, context: SpanContext, attributes: types.Attributes = None) -> None:
        # Node spans are created without links; one added later is as rare as in the SDK, and dropped.
        logger.warning("Links cannot be added to a node span after it started.")

    def update_name(self, name: str) -> None:
        if self._end_time is None:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self._end_time is not None or self._status.status_code is StatusCode.OK:
            return
        if isinstance(status, StatusCode):
            status = Status(status, description)
        if status.status_code is not StatusCode.UNSET:
            self._status = status

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        # The same event the SDK's Span.record_exception writes.
        module = type(exception).__module__
        qualname = type(exception).__qualname__
        event_attributes: dict[str, types.AttributeValue] = {
            "exception.type": f"{module}.{qualname}" if module and module != "builtins" else qualname,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        if attributes:
            event_attributes.update(attributes)
        self.add_event("exception", event_attributes, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._end_time is not None:
            logger.warning("Calling end() on an ended span.")
            return
        self._end_time = end_time if end_time is not None else time.time_ns()
        self._events = tuple(self._events_list) if self._events_list else ()
        processor = self._tracer.span_processor
        # The SDK's (experimental) hook before on_end, when this SDK has it.
        on_ending = getattr(processor, "_on_ending", None)
        if on_ending is not None:
            on_ending(self)
        processor.on_end(self)


class DirectRecords:
    """Builds node spans and events for one SDK tracer and one SDK logger."""

    def __init__(self, tracer: SdkTracer, events: SdkLogger) -> None:
        self._tracer = tracer
        self._events = events
        self._span_limits = getattr(tracer, "_span_limits", None) or SpanLimits()
        self._log_limits = LogRecordLimits()
        self._event_value_limit = self._log_limits.max_attribute_length
        # Events skip the SDK's per-record copy when the logger's processors are all batch processors.
        multi = getattr(events, "_multi_log_record_processor", None)
        direct_queue = all(hasattr(events, a) for a in ("_is_enabled", "_logger_metrics")) and hasattr(
            multi, "_log_record_processors"
        )
        self._multi = multi if direct_queue else None
        self._processors: tuple[Any, ...] | None = None
        self._batches: tuple[Any, ...] | None = None
        self._sampler: object = None
        self._local_decisions: tuple[Decision, Decision] | None = None

    @classmethod
    def for_sdk(cls, tracer: Any, events: Any) -> DirectRecords | None:
        """Only for the SDK's own tracer and logger (and only while the SDK keeps the parts used here)."""
        if type(tracer) is not SdkTracer or type(events) is not SdkLogger:
            return None
        if not all(hasattr(tracer, a) for a in ("sampler", "id_generator", "span_processor", "resource")):
            return None
        return cls(tracer, events)

    def start_span(
        self,
        name: str,
        parent_context: Context,
        parent: SpanContext,
        kind: SpanKind,
        attributes: dict[str, types.AttributeValue],
    ) -> trace.Span:
        """A child of `parent` (a valid span context), sampled by the tracer's sampler."""
        tracer = self._tracer
        decisions = self._decisions_for_local_parents()
        extra: Mapping[str, types.AttributeValue] | None = None
        trace_state: TraceState | None
        if decisions is not None and not parent.is_remote:
            decision = decisions[0] if parent.trace_flags.sampled else decisions[1]
            trace_state = parent.trace_state
        else:
            sampling = tracer.sampler.should_sample(parent_context, parent.trace_id, name, kind, attributes, None)
            decision, trace_state, extra = sampling.decision, sampling.trace_state, sampling.attributes
        flags = TraceFlags.SAMPLED if decision.is_sampled() else TraceFlags.DEFAULT  # type: ignore[no-untyped-call]
        if parent.trace_flags.random_trace_id:
            flags |= TraceFlags.RANDOM_TRACE_ID
        context = SpanContext(
            parent.trace_id, tracer.id_generator.generate_span_id(), False, TraceFlags(flags), trace_state
        )
        if not decision.is_recording():  # type: ignore[no-untyped-call]
            return trace.NonRecordingSpan(context)
        if extra:
            attributes.update(extra)
        limits = self._span_limits
        if limits.max_span_attribute_length is not None or (
            limits.max_span_attributes is not None and len(attributes) > limits.max_span_attributes
        ):
            # Rare (limits below the engine's own attributes): the same rules as set_attribute.
            span = StepSpan(tracer, limits, name, context, parent, kind, {}, time.time_ns())
            span.set_attributes(attributes)
        else:
            span = StepSpan(tracer, limits, name, context, parent, kind, attributes, time.time_ns())
        tracer.span_processor.on_start(span, parent_context=parent_context)  # type: ignore[arg-type]
        return span

    def emit(
        self,
        event_name: str,
        ts_ns: int,
        context: Context,
        severity: SeverityNumber,
        body: str,
        attributes: dict[str, types.AttributeValue],
    ) -> None:
        record = LogRecord(
            timestamp=ts_ns,
            context=context,
            severity_number=severity,
            severity_text=severity.name,
            body=body,
            event_name=event_name,
        )
        events = self._events
        # Set after construction: ReadWriteLogRecord would re-validate every value, and these are
        # the engine's own strings and integers.
        limit = self._event_value_limit
        if limit is not None:
            attributes = {k: v[:limit] if type(v) is str else v for k, v in attributes.items()}
        batches = self._batch_processors()
        if batches is None:
            writable = ReadWriteLogRecord(record, events.resource, events.instrumentation_scope, self._log_limits)
            record.attributes = attributes
            events.emit(cast(LogRecord, writable))
            return
        if not events._is_enabled():
            return
        # What each BatchLogRecordProcessor.on_emit would queue: the record without its context
        # (the SDK copies the record to drop it; this record is ours alone, so no copy).
        record.attributes = attributes
        record.context = _NO_CONTEXT
        readable = ReadableLogRecord(record, events.resource, events.instrumentation_scope, self._log_limits)
        events._logger_metrics.emit_log()
        for batch in batches:
            batch.emit(readable)

    def _decisions_for_local_parents(self) -> tuple[Decision, Decision] | None:
        """(under a sampled parent, under an unsampled one) when the tracer's sampler is the SDK's
        parent-based sampler with static samplers for local parents — the SDK's default. A node
        span's parent is its run's span, started by this process's tracer: a local parent, so one
        of those two decisions is all the sampler would say (with the parent's trace state, and
        the span's own attributes back). Any other sampler is asked for every span."""
        sampler = self._tracer.sampler
        if sampler is not self._sampler:
            self._sampler, self._local_decisions = sampler, None
            delegates = (
                getattr(sampler, "_local_parent_sampled", None),
                getattr(sampler, "_local_parent_not_sampled", None),
            )
            if (
                isinstance(sampler, ParentBased)
                and type(sampler).should_sample is ParentBased.should_sample
                and all(
                    isinstance(d, StaticSampler) and type(d).should_sample is StaticSampler.should_sample
                    for d in delegates
                )
            ):
                sampled, unsampled = cast(tuple[StaticSampler, StaticSampler], delegates)
                self._local_decisions = (sampled._decision, unsampled._decision)
        return self._local_decisions

    def _batch_processors(self) -> tuple[Any, ...] | None:
        """The queues of the logger's processors when every one is the SDK's batch processor, else None."""
        processors = self._multi._log_record_processors if self._multi is not None else None
        if processors is not self._processors:
            self._processors = processors
            self._batches = None
            if processors and all(type(p) is BatchLogRecordProcessor for p in processors):
                self._batches = tuple(p._batch_processor for p in processors)
        return self._batches
