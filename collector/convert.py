"""OTLP protobuf requests → column-oriented rows in the contrib exporter's encoding.

Written column by column with local appends: converting a span, not parsing
it, is the cost that bounds ingest (bench/README.md, collector ingest), so this module avoids
per-row dicts and attribute lookups in the hot loops.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from flowscope.collector.types import Outcome, Signal

SPAN_KINDS = ("Unspecified", "Internal", "Server", "Client", "Producer", "Consumer")
STATUS_CODES = ("Unset", "Ok", "Error")

TRACE_COLUMNS = (
    "Timestamp", "TraceId", "SpanId", "ParentSpanId", "TraceState", "SpanName", "SpanKind", "ServiceName",
    "ResourceAttributes", "ScopeName", "ScopeVersion", "SpanAttributes", "Duration", "StatusCode",
    "StatusMessage", "Events.Timestamp", "Events.Name", "Events.Attributes", "Links.TraceId", "Links.SpanId",
    "Links.TraceState", "Links.Attributes",
)  # fmt: skip
LOG_COLUMNS = (
    "Timestamp", "TraceId", "SpanId", "TraceFlags", "SeverityText", "SeverityNumber", "ServiceName", "Body",
    "ResourceSchemaUrl", "ResourceAttributes", "ScopeSchemaUrl", "ScopeName", "ScopeVersion", "ScopeAttributes",
    "LogAttributes", "EventName",
)  # fmt: skip
_METRIC_COMMON = (
    "ResourceAttributes", "ResourceSchemaUrl", "ScopeName", "ScopeVersion", "ScopeAttributes",
    "ScopeDroppedAttrCount", "ScopeSchemaUrl", "ServiceName", "MetricName", "MetricDescription", "MetricUnit",
    "Attributes", "StartTimeUnix", "TimeUnix",
)  # fmt: skip
_EXEMPLARS = (
    "Exemplars.FilteredAttributes", "Exemplars.TimeUnix", "Exemplars.Value", "Exemplars.SpanId",
    "Exemplars.TraceId",
)  # fmt: skip
METRIC_COLUMNS = {
    "otel_metrics_gauge": (*_METRIC_COMMON, "Value", "Flags", *_EXEMPLARS),
    "otel_metrics_sum": (*_METRIC_COMMON, "Value", "Flags", *_EXEMPLARS, "AggregationTemporality", "IsMonotonic"),
    "otel_metrics_histogram": (
        *_METRIC_COMMON, "Count", "Sum", "BucketCounts", "ExplicitBounds", *_EXEMPLARS, "Flags", "Min", "Max",
        "AggregationTemporality",
    ),
    "otel_metrics_exponential_histogram": (
        *_METRIC_COMMON, "Count", "Sum", "Scale", "ZeroCount", "PositiveOffset", "PositiveBucketCounts",
        "NegativeOffset", "NegativeBucketCounts", *_EXEMPLARS, "Flags", "Min", "Max", "AggregationTemporality",
    ),
    "otel_metrics_summary": (
        *_METRIC_COMMON, "Count", "Sum", "ValueAtQuantiles.Quantile", "ValueAtQuantiles.Value", "Flags",
    ),
}  # fmt: skip


class InvalidData(ValueError):
    """The request is well-formed protobuf but carries data that cannot be stored."""


@dataclass
class Columns:
    """Rows of one table, column-oriented, ready for `client.insert(column_oriented=True)`."""

    table: str
    names: tuple[str, ...]
    data: list[list[Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.data:
            self.data = [[] for _ in self.names]

    @property
    def rows(self) -> int:
        return len(self.data[0]) if self.data else 0

    def extend(self, other: Columns) -> None:
        for mine, theirs in zip(self.data, other.data, strict=True):
            mine.extend(theirs)

    def split(self, max_rows: int) -> list[Columns]:
        if self.rows <= max_rows:
            return [self]
        return [
            Columns(self.table, self.names, [col[i : i + max_rows] for col in self.data])
            for i in range(0, self.rows, max_rows)
        ]


@dataclass(frozen=True)
class Converted(Outcome):
    """A request's rows, with what became of its items. Stays inside the collector's
    conversion and queue: what a consumer answers a receiver with is the `outcome`.

    An Outcome itself only so consumers written against the old contract, which answered
    with a Converted, still fit `Consume`."""

    tables: list[Columns]

    @property
    def rows(self) -> int:
        return sum(c.rows for c in self.tables)

    @property
    def outcome(self) -> Outcome:
        return Outcome(accepted=self.accepted, rejected=self.rejected, reasons=self.reasons)


@dataclass
class _Rejections:
    """Items refused as invalid: all counted, the first few explained to the client."""

    count: int = 0
    reasons: list[str] = field(default_factory=list)

    def add(self, reason: str) -> None:
        self.count += 1
        if len(self.reasons) < 5:
            self.reasons.append(reason)


def any_value(value: Any) -> str:
    """An AnyValue as the contrib exporter stores it: pdata's `Value.AsString()`."""
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return str(value.string_value)
    if kind is None:
        return ""
    if kind == "bool_value":
        return "true" if value.bool_value else "false"
    if kind == "int_value":
        return str(value.int_value)
    if kind == "double_value":
        return float_text(value.double_value)
    if kind == "bytes_value":
        return base64.b64encode(value.bytes_value).decode()
    # Maps and arrays: Go's encoding/json of AsRaw(), which fails (and AsString answers "")
    # on a NaN or an infinity anywhere inside.
    try:
        return go_json(_raw(value))
    except ValueError:
        return ""


def _raw(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "int_value":
        return value.int_value
    if kind == "double_value":
        return value.double_value
    if kind == "bytes_value":
        return base64.b64encode(value.bytes_value).decode()
    if kind == "array_value":
        return [_raw(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _raw(kv.value) for kv in value.kvlist_value.values}
    return None


def float_text(value: float) -> str:
    """A double as pdata writes it (`float64AsString`, Go's encoding/json rule, ES6 number to
    string): shortest round-trip digits, fixed notation from 1e-6 up to 1e21, exponent
    notation (`1e+21`, `1.5e-7`) outside; non-finite values as pdata's error text."""
    if not math.isfinite(value):
        name = "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")
        return f"json: unsupported value: {name}"
    text = repr(value)
    magnitude = abs(value)
    if magnitude != 0 and (magnitude < 1e-6 or magnitude >= 1e21):
        # repr writes every double in this range with an exponent, with the same digits.
        mantissa, _, exponent = text.partition("e")
        power = int(exponent)
        return f"{mantissa}e{'+' if power >= 0 else '-'}{abs(power)}"
    if "e" not in text:
        return text[:-2] if text.endswith(".0") else text
    # Fixed notation of repr's shortest digits, padded with zeros (1.5e+16, 1.5e-05).
    return format(Decimal(text).normalize(), "f")


def go_json(raw: Any) -> str:
    """JSON as Go's encoding/json writes it: map keys sorted, doubles as `float_text`, strings
    with Go's escapes (HTML characters and U+2028/U+2029 as \\u escapes). No Python JSON
    library writes doubles and escapes this way, hence by hand. ValueError on NaN/±Inf."""
    if isinstance(raw, str):
        return _go_string(raw)
    if raw is None:
        return "null"
    if isinstance(raw, bool):
        return "true" if raw else "false"
    if isinstance(raw, int):
        return str(raw)
    if isinstance(raw, float):
        if not math.isfinite(raw):
            raise ValueError(f"json: unsupported value: {raw}")
        return float_text(raw)
    if isinstance(raw, dict):
        return "{" + ",".join(f"{_go_string(k)}:{go_json(raw[k])}" for k in sorted(raw)) + "}"
    return "[" + ",".join(go_json(item) for item in raw) + "]"


_GO_ESCAPES = {
    **{chr(c): f"\\u{c:04x}" for c in range(0x20)},
    "\\": "\\\\",
    '"': '\\"',
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}
_GO_ESCAPED = re.compile("[" + re.escape("".join(_GO_ESCAPES)) + "]")


def _go_string(text: str) -> str:
    return '"' + _GO_ESCAPED.sub(lambda m: _GO_ESCAPES[m.group()], text) + '"'


def attributes(kvs: Iterable[Any]) -> dict[str, str]:
    # Most values are strings: reading string_value first skips a WhichOneof per item.
    return {kv.key: (kv.value.string_value or any_value(kv.value)) for kv in kvs}


def _hex_id(raw: bytes, size: int, what: str) -> str:
    if len(raw) != size or raw == _ZEROS[size]:
        if len(raw) != size:
            raise InvalidData(f"{what} must be {size} bytes, got {len(raw)}")
        raise InvalidData(f"{what} must not be all zeros")
    return raw.hex()


_ZEROS = {16: bytes(16), 8: bytes(8)}
# DateTime64(9) is a signed 64-bit count of nanoseconds: OTLP's fixed64 can exceed it.
MAX_NS = (1 << 63) - 1


def _ns(value: int, what: str) -> int:
    if value > MAX_NS:
        raise InvalidData(f"{what} {value} is beyond the year 2262")
    return value


_EMPTY: list[Any] = []


def _optional_id(raw: bytes, size: int, what: str) -> str:
    if not raw:
        return ""
    if len(raw) != size:
        raise InvalidData(f"{what} must be {size} bytes or empty, got {len(raw)}")
    return raw.hex()


def convert_traces(request: Any) -> Converted:
    cols = Columns("otel_traces", TRACE_COLUMNS)
    (ts, trace_ids, span_ids, parents, states, names, kinds, services, res_attrs, scope_names, scope_versions,
     span_attrs, durations, status_codes, status_msgs, ev_ts, ev_names, ev_attrs, ln_trace, ln_span, ln_state,
     ln_attrs) = cols.data  # fmt: skip
    accepted = 0
    rejections = _Rejections()
    for rs in request.resource_spans:
        resource = attributes(rs.resource.attributes)
        service = resource.get("service.name", "")
        for ss in rs.scope_spans:
            scope_name, scope_version = ss.scope.name, ss.scope.version
            for span in ss.spans:
                try:
                    trace_id = _hex_id(span.trace_id, 16, "traceId")
                    span_id = _hex_id(span.span_id, 8, "spanId")
                    parent = _optional_id(span.parent_span_id, 8, "parentSpanId")
                    start = _ns(span.start_time_unix_nano, "startTimeUnixNano")
                    end = _ns(span.end_time_unix_nano, "endTimeUnixNano")
                    for event in span.events:
                        _ns(event.time_unix_nano, "event timeUnixNano")
                    span_links = span.links
                    links = (
                        [
                            (_hex_id(ln.trace_id, 16, "link traceId"), _hex_id(ln.span_id, 8, "link spanId"), ln)
                            for ln in span_links
                        ]
                        if span_links
                        else None
                    )
                except InvalidData as exc:
                    rejections.add(f"span {span.name!r}: {exc}")
                    continue
                ts.append(start)
                trace_ids.append(trace_id)
                span_ids.append(span_id)
                parents.append(parent)
                states.append(span.trace_state)
                names.append(span.name)
                kinds.append(SPAN_KINDS[span.kind] if span.kind < len(SPAN_KINDS) else "Unspecified")
                services.append(service)
                res_attrs.append(resource)
                scope_names.append(scope_name)
                scope_versions.append(scope_version)
                span_attrs.append(attributes(span.attributes))
                durations.append(end - start if end > start else 0)
                status = span.status
                code = status.code
                status_codes.append(STATUS_CODES[code] if code < len(STATUS_CODES) else "Unset")
                status_msgs.append(status.message)
                events = span.events
                # Most spans have no events or links; the shared empty list is never mutated.
                if events:
                    ev_ts.append([e.time_unix_nano for e in events])
                    ev_names.append([e.name for e in events])
                    ev_attrs.append([attributes(e.attributes) for e in events])
                else:
                    ev_ts.append(_EMPTY)
                    ev_names.append(_EMPTY)
                    ev_attrs.append(_EMPTY)
                if links:
                    ln_trace.append([t for t, _, _ in links])
                    ln_span.append([s for _, s, _ in links])
                    ln_state.append([ln.trace_state for _, _, ln in links])
                    ln_attrs.append([attributes(ln.attributes) for _, _, ln in links])
                else:
                    ln_trace.append(_EMPTY)
                    ln_span.append(_EMPTY)
                    ln_state.append(_EMPTY)
                    ln_attrs.append(_EMPTY)
                accepted += 1
    return Converted(
        [cols] if accepted else [], accepted=accepted, rejected=rejections.count, reasons=rejections.reasons
    )


def convert_logs(request: Any) -> Converted:
    cols = Columns("otel_logs", LOG_COLUMNS)
    (ts, trace_ids, span_ids, flags, sev_text, sev_num, services, bodies, res_urls, res_attrs, scope_urls,
     scope_names, scope_versions, scope_attrs, log_attrs, event_names) = cols.data  # fmt: skip
    accepted = 0
    rejections = _Rejections()
    for rl in request.resource_logs:
        resource = attributes(rl.resource.attributes)
        service = resource.get("service.name", "")
        for sl in rl.scope_logs:
            scope = sl.scope
            scope_attributes = attributes(scope.attributes)
            for record in sl.log_records:
                try:
                    trace_id = _optional_id(record.trace_id, 16, "traceId")
                    span_id = _optional_id(record.span_id, 8, "spanId")
                    when = _ns(record.time_unix_nano or record.observed_time_unix_nano, "timeUnixNano")
                except InvalidData as exc:
                    rejections.add(f"log record: {exc}")
                    continue
                ts.append(when)
                trace_ids.append(trace_id)
                span_ids.append(span_id)
                flags.append(record.flags & 0xFF)
                sev_text.append(record.severity_text)
                # uint8(SeverityNumber), as the contrib exporter stores it.
                sev_num.append(record.severity_number & 0xFF)
                services.append(service)
                bodies.append(any_value(record.body))
                res_urls.append(rl.schema_url)
                res_attrs.append(resource)
                scope_urls.append(sl.schema_url)
                scope_names.append(scope.name)
                scope_versions.append(scope.version)
                scope_attrs.append(scope_attributes)
                log_attrs.append(attributes(record.attributes))
                event_names.append(record.event_name)
                accepted += 1
    return Converted(
        [cols] if accepted else [], accepted=accepted, rejected=rejections.count, reasons=rejections.reasons
    )


def _exemplar_columns(
    points_exemplars: Any,
) -> tuple[list[Any], list[int], list[float], list[str], list[str]]:
    filtered, times, values, span_ids, trace_ids = [], [], [], [], []
    for ex in points_exemplars:
        filtered.append(attributes(ex.filtered_attributes))
        times.append(ex.time_unix_nano)
        values.append(ex.as_double if ex.WhichOneof("value") == "as_double" else float(ex.as_int))
        span_ids.append(ex.span_id.hex())
        trace_ids.append(ex.trace_id.hex())
    return filtered, times, values, span_ids, trace_ids


def _number(point: Any) -> float:
    return float(point.as_double) if point.WhichOneof("value") == "as_double" else float(point.as_int)


def convert_metrics(request: Any) -> Converted:
    tables = {name: Columns(name, names) for name, names in METRIC_COLUMNS.items()}
    accepted = 0
    rejections = _Rejections()
    for rm in request.resource_metrics:
        resource = attributes(rm.resource.attributes)
        service = resource.get("service.name", "")
        for sm in rm.scope_metrics:
            scope = sm.scope
            scope_attributes = attributes(scope.attributes)
            for metric in sm.metrics:
                kind = metric.WhichOneof("data")
                if kind is None:
                    continue
                common = [
                    resource, rm.schema_url, scope.name, scope.version, scope_attributes,
                    scope.dropped_attributes_count, sm.schema_url, service, metric.name, metric.description,
                    metric.unit,
                ]  # fmt: skip
                data = getattr(metric, kind)
                for point in data.data_points:
                    try:
                        _ns(point.start_time_unix_nano, "startTimeUnixNano")
                        _ns(point.time_unix_nano, "timeUnixNano")
                        for exemplar in getattr(point, "exemplars", ()):
                            _ns(exemplar.time_unix_nano, "exemplar timeUnixNano")
                    except InvalidData as exc:
                        rejections.add(f"metric {metric.name!r}: {exc}")
                        continue
                    row = [
                        *common,
                        attributes(point.attributes),
                        point.start_time_unix_nano,
                        point.time_unix_nano,
                    ]
                    if kind in ("gauge", "sum"):
                        row += [_number(point), point.flags, *_exemplar_columns(point.exemplars)]
                        if kind == "sum":
                            row += [data.aggregation_temporality, data.is_monotonic]
                    elif kind == "histogram":
                        row += [
                            point.count, point.sum, list(point.bucket_counts), list(point.explicit_bounds),
                            *_exemplar_columns(point.exemplars), point.flags, point.min, point.max,
                            data.aggregation_temporality,
                        ]  # fmt: skip
                    elif kind == "exponential_histogram":
                        row += [
                            point.count, point.sum, point.scale, point.zero_count, point.positive.offset,
                            list(point.positive.bucket_counts), point.negative.offset,
                            list(point.negative.bucket_counts), *_exemplar_columns(point.exemplars), point.flags,
                            point.min, point.max, data.aggregation_temporality,
                        ]  # fmt: skip
                    else:
                        row += [
                            point.count, point.sum, [q.quantile for q in point.quantile_values],
                            [q.value for q in point.quantile_values], point.flags,
                        ]  # fmt: skip
                    table = tables[_METRIC_TABLE[kind]]
                    for column, value in zip(table.data, row, strict=True):
                        column.append(value)
                    accepted += 1
    tables_out = [t for t in tables.values() if t.rows]
    return Converted(tables_out, accepted=accepted, rejected=rejections.count, reasons=rejections.reasons)


_METRIC_TABLE = {
    "gauge": "otel_metrics_gauge",
    "sum": "otel_metrics_sum",
    "histogram": "otel_metrics_histogram",
    "exponential_histogram": "otel_metrics_exponential_histogram",
    "summary": "otel_metrics_summary",
}

CONVERTERS = {Signal.TRACES: convert_traces, Signal.LOGS: convert_logs, Signal.METRICS: convert_metrics}
# The OTLP request message of each signal.
REQUESTS: dict[Signal, Any] = {
    Signal.TRACES: ExportTraceServiceRequest,
    Signal.METRICS: ExportMetricsServiceRequest,
    Signal.LOGS: ExportLogsServiceRequest,
}
