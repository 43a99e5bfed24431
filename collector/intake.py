"""OTLP trace requests converted by ClickHouse itself: the fast path of trace ingest.

ClickHouse reads the OTLP protobuf bytes (its `Protobuf` input format, with the schema
below passed inline by `format_schema_source = 'string'`) into a `Null` table, and a
materialized view converts each span into an `otel_traces` row — the same SQL-side
design as the workflow views, and several times faster than converting in Python (the
cost that bounded ingest: bench/README.md). Python only checks that a request is one the
view converts exactly as `flowscope.collector.convert` would (`fast_path_spans`); anything else
(invalid ids or timestamps to reject) takes the Python converter, so both paths write
identical rows (tests/collector/test_intake.py).
Array and map attribute values (rare on spans: OTel SDKs emit flat attributes) make the
view raise before anything is stored, and the writer converts that batch in Python.

Log records take the same road (`otlp_logs_intake` → `otel_logs`, migration 5): the
events are the live stream's bulk, and converting and serialising them in Python held
the GIL of the process that also serves the live view (bench/README.md, live latency).

Why a hand-written schema and not the upstream .proto files: ClickHouse cannot map
recursive messages (AnyValue holds arrays of AnyValue), so these are the OTLP trace and
logs schemas cut to what the views read, with the same field numbers; nested values are
read as opaque bytes, only to notice them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from flowscope.collector.convert import MAX_NS
from flowscope.collector.types import Signal

INTAKE_TABLE = "otlp_traces_intake"
LOG_INTAKE_TABLE = "otlp_logs_intake"

# Field numbers are opentelemetry-proto's (trace/v1, logs/v1, common/v1, resource/v1).
_COMMON_PROTO = """
syntax = "proto3";
message AnyValue { oneof value { string string_value = 1; bool bool_value = 2; int64 int_value = 3;
  double double_value = 4; bytes array_value = 5; bytes kvlist_value = 6; bytes bytes_value = 7; } }
message KeyValue { string key = 1; AnyValue value = 2; }
message Resource { repeated KeyValue attributes = 1; }
"""

PROTO_SCHEMA = re.sub(
    r"\s+",
    " ",
    _COMMON_PROTO
    + """
message InstrumentationScope { string name = 1; string version = 2; }
message Event { fixed64 time_unix_nano = 1; string name = 2; repeated KeyValue attributes = 3; }
message Link { bytes trace_id = 1; bytes span_id = 2; string trace_state = 3; repeated KeyValue attributes = 4; }
message Status { string message = 2; int32 code = 3; }
message Span { bytes trace_id = 1; bytes span_id = 2; string trace_state = 3; bytes parent_span_id = 4;
  string name = 5; int32 kind = 6; fixed64 start_time_unix_nano = 7; fixed64 end_time_unix_nano = 8;
  repeated KeyValue attributes = 9; repeated Event events = 11; repeated Link links = 13; Status status = 15; }
message ScopeSpans { InstrumentationScope scope = 1; repeated Span spans = 2; }
message ResourceSpans { Resource resource = 1; repeated ScopeSpans scope_spans = 2; }
message ExportTraceServiceRequest { repeated ResourceSpans resource_spans = 1; }
""",
).strip()

LOGS_PROTO_SCHEMA = re.sub(
    r"\s+",
    " ",
    _COMMON_PROTO
    + """
message InstrumentationScope { string name = 1; string version = 2; repeated KeyValue attributes = 3; }
message LogRecord { fixed64 time_unix_nano = 1; int32 severity_number = 2; string severity_text = 3;
  AnyValue body = 5; repeated KeyValue attributes = 6; fixed32 flags = 8; bytes trace_id = 9; bytes span_id = 10;
  fixed64 observed_time_unix_nano = 11; string event_name = 12; }
message ScopeLogs { InstrumentationScope scope = 1; repeated LogRecord log_records = 2; string schema_url = 3; }
message ResourceLogs { Resource resource = 1; repeated ScopeLogs scope_logs = 2; string schema_url = 3; }
message ExportLogsServiceRequest { repeated ResourceLogs resource_logs = 1; }
""",
).strip()


def _settings(schema: str, message: str) -> dict[str, str | int]:
    return {
        "format_schema_source": "string",
        "format_schema": schema,
        "format_schema_message_name": message,
        # Fills each AnyValue's `value` enum with the oneof member that was set.
        "input_format_protobuf_oneof_presence": 1,
    }


@dataclass(frozen=True)
class Intake:
    """Where ClickHouse reads one signal's OTLP requests, and the contrib table its view fills."""

    table: str
    target: str
    settings: dict[str, str | int]


INTAKES = {
    Signal.TRACES: Intake(INTAKE_TABLE, "otel_traces", _settings(PROTO_SCHEMA, "ExportTraceServiceRequest")),
    Signal.LOGS: Intake(LOG_INTAKE_TABLE, "otel_logs", _settings(LOGS_PROTO_SCHEMA, "ExportLogsServiceRequest")),
}

_ANY = (
    "Tuple(value Enum8('none' = 0, 'string_value' = 1, 'bool_value' = 2, 'int_value' = 3, 'double_value' = 4,"
    " 'array_value' = 5, 'kvlist_value' = 6, 'bytes_value' = 7), string_value String, bool_value Bool,"
    " int_value Int64, double_value Float64, array_value String, kvlist_value String, bytes_value String)"
)
_KVS = f"Array(Tuple(key String, value {_ANY}))"

_INTAKE = f"""CREATE TABLE IF NOT EXISTS {{db}}.{INTAKE_TABLE} (
    resource_spans Array(Tuple(
        resource Tuple(attributes {_KVS}),
        scope_spans Array(Tuple(
            scope Tuple(name String, version String),
            spans Array(Tuple(
                trace_id String, span_id String, trace_state String, parent_span_id String, name String,
                kind Int32, start_time_unix_nano UInt64, end_time_unix_nano UInt64,
                attributes {_KVS},
                events Array(Tuple(time_unix_nano UInt64, name String, attributes {_KVS})),
                links Array(Tuple(trace_id String, span_id String, trace_state String, attributes {_KVS})),
                status Tuple(message String, code Int32)))))))
) ENGINE = Null"""

# Raised (code 395, before any row is stored) for array and map values, which
# `flowscope.collector.convert` renders as JSON: the writer converts such a batch in Python instead.
NESTED_VALUE = "flowscope intake: nested attribute value"

# An AnyValue as `flowscope.collector.convert.any_value` renders a scalar (pdata's AsString).
# ClickHouse's toString writes a double as pdata does (shortest digits, fixed from 1e-6 to
# 1e21) but for the exponent's sign above 1e21 and the text of non-finite values.
_DOUBLE_TEXT = """if(isFinite({d}), if(abs({d}) >= 1e21, replaceOne(toString({d}), 'e', 'e+'), toString({d})),
        concat('json: unsupported value: ', if(isNaN({d}), 'NaN', if({d} > 0, '+Inf', '-Inf'))))"""


def fast_path_double_text(expression: str) -> str:
    """The SQL that writes the Float64 `expression` as `flowscope.collector.convert.float_text` does."""
    return _DOUBLE_TEXT.format(d=expression)


_TEXT = (
    """multiIf(
    {v}.value = 'string_value', {v}.string_value,
    {v}.value = 'bool_value', if({v}.bool_value, 'true', 'false'),
    {v}.value = 'int_value', toString({v}.int_value),
    {v}.value = 'double_value', """
    + fast_path_double_text("{v}.double_value")
    + """,
    {v}.value = 'bytes_value', base64Encode({v}.bytes_value),
    {v}.value IN ('array_value', 'kvlist_value'), toString(throwIf({v}.value IN ('array_value', 'kvlist_value'),
        '"""
    + NESTED_VALUE
    + """')),
    '')"""
)


def _attributes(kvs: str) -> str:
    """A KeyValue list as a Map; a repeated key keeps its last value, as a Python dict does."""
    return (
        f"CAST(arrayReverse(arrayFilter((kv, first) -> first = 1,"
        f" arrayReverse(arrayMap(kv -> (kv.key, {_TEXT.format(v='kv.value')}), {kvs})),"
        f" arrayEnumerateUniq(arrayReverse(arrayMap(kv -> kv.key, {kvs}))))),"
        " 'Map(LowCardinality(String), String)')"
    )


_INTAKE_MV = f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {{db}}.{INTAKE_TABLE}_mv TO {{db}}.otel_traces AS
SELECT
    fromUnixTimestamp64Nano(toInt64(s.start_time_unix_nano)) AS Timestamp,
    lower(hex(s.trace_id)) AS TraceId,
    lower(hex(s.span_id)) AS SpanId,
    lower(hex(s.parent_span_id)) AS ParentSpanId,
    s.trace_state AS TraceState,
    s.name AS SpanName,
    if(s.kind BETWEEN 0 AND 5,
       ['Unspecified', 'Internal', 'Server', 'Client', 'Producer', 'Consumer'][s.kind + 1], 'Unspecified') AS SpanKind,
    ResourceAttributes['service.name'] AS ServiceName,
    {_attributes("rs.resource.attributes")} AS ResourceAttributes,
    ss.scope.name AS ScopeName,
    ss.scope.version AS ScopeVersion,
    {_attributes("s.attributes")} AS SpanAttributes,
    if(s.end_time_unix_nano > s.start_time_unix_nano, s.end_time_unix_nano - s.start_time_unix_nano, 0) AS Duration,
    if(s.status.code BETWEEN 0 AND 2, ['Unset', 'Ok', 'Error'][s.status.code + 1], 'Unset') AS StatusCode,
    s.status.message AS StatusMessage,
    arrayMap(e -> fromUnixTimestamp64Nano(toInt64(e.time_unix_nano)), s.events) AS `Events.Timestamp`,
    arrayMap(e -> e.name, s.events) AS `Events.Name`,
    arrayMap(e -> {_attributes("e.attributes")}, s.events) AS `Events.Attributes`,
    arrayMap(l -> lower(hex(l.trace_id)), s.links) AS `Links.TraceId`,
    arrayMap(l -> lower(hex(l.span_id)), s.links) AS `Links.SpanId`,
    arrayMap(l -> l.trace_state, s.links) AS `Links.TraceState`,
    arrayMap(l -> {_attributes("l.attributes")}, s.links) AS `Links.Attributes`
FROM {{db}}.{INTAKE_TABLE}
ARRAY JOIN resource_spans AS rs
ARRAY JOIN rs.scope_spans AS ss
ARRAY JOIN ss.spans AS s"""


_LOG_INTAKE = f"""CREATE TABLE IF NOT EXISTS {{db}}.{LOG_INTAKE_TABLE} (
    resource_logs Array(Tuple(
        resource Tuple(attributes {_KVS}),
        schema_url String,
        scope_logs Array(Tuple(
            scope Tuple(name String, version String, attributes {_KVS}),
            schema_url String,
            log_records Array(Tuple(
                time_unix_nano UInt64, observed_time_unix_nano UInt64, severity_number Int32, severity_text String,
                body {_ANY}, attributes {_KVS}, flags UInt32, trace_id String, span_id String,
                event_name String))))))
) ENGINE = Null"""

# Row for row what `flowscope.collector.convert.convert_logs` writes.
_LOG_INTAKE_MV = f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {{db}}.{LOG_INTAKE_TABLE}_mv TO {{db}}.otel_logs AS
SELECT
    fromUnixTimestamp64Nano(toInt64(if(l.time_unix_nano != 0, l.time_unix_nano, l.observed_time_unix_nano)))
        AS Timestamp,
    lower(hex(l.trace_id)) AS TraceId,
    lower(hex(l.span_id)) AS SpanId,
    toUInt8(bitAnd(l.flags, 255)) AS TraceFlags,
    l.severity_text AS SeverityText,
    toUInt8(bitAnd(l.severity_number, 255)) AS SeverityNumber,
    ResourceAttributes['service.name'] AS ServiceName,
    {_TEXT.format(v="l.body")} AS Body,
    rl.schema_url AS ResourceSchemaUrl,
    {_attributes("rl.resource.attributes")} AS ResourceAttributes,
    sl.schema_url AS ScopeSchemaUrl,
    sl.scope.name AS ScopeName,
    sl.scope.version AS ScopeVersion,
    {_attributes("sl.scope.attributes")} AS ScopeAttributes,
    {_attributes("l.attributes")} AS LogAttributes,
    l.event_name AS EventName
FROM {{db}}.{LOG_INTAKE_TABLE}
ARRAY JOIN resource_logs AS rl
ARRAY JOIN rl.scope_logs AS sl
ARRAY JOIN sl.log_records AS l"""


def intake_statements(database: str) -> list[str]:
    return [_INTAKE.format(db=database), _INTAKE_MV.format(db=database)]


def log_intake_statements(database: str) -> list[str]:
    return [_LOG_INTAKE.format(db=database), _LOG_INTAKE_MV.format(db=database)]


_ZERO_TRACE = bytes(16)
_ZERO_SPAN = bytes(8)


def fast_path_spans(request: Any) -> int | None:
    """The request's span count when every span is valid, else None.

    None sends the request through `convert_traces`, which rejects the invalid spans
    and tells the client which. Attribute values are not looked at here (a Python loop
    over them costs more than ClickHouse's whole conversion): the view refuses nested
    ones itself (NESTED_VALUE).
    """
    count = 0
    for rs in request.resource_spans:
        for ss in rs.scope_spans:
            for span in ss.spans:
                trace_id, span_id = span.trace_id, span.span_id
                if len(trace_id) != 16 or len(span_id) != 8 or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
                    return None
                if len(span.parent_span_id) not in (0, 8):
                    return None
                if span.start_time_unix_nano > MAX_NS or span.end_time_unix_nano > MAX_NS:
                    return None
                for event in span.events:
                    if event.time_unix_nano > MAX_NS:
                        return None
                for link in span.links:
                    if len(link.trace_id) != 16 or len(link.span_id) != 8:
                        return None
                    if link.trace_id == _ZERO_TRACE or link.span_id == _ZERO_SPAN:
                        return None
                count += 1
    return count


def fast_path_logs(request: Any) -> int | None:
    """The request's log record count when `convert_logs` would take every record, else None
    (then it converts the request and tells the client which records it rejected)."""
    count = 0
    for rl in request.resource_logs:
        for sl in rl.scope_logs:
            for record in sl.log_records:
                if len(record.trace_id) not in (0, 16) or len(record.span_id) not in (0, 8):
                    return None
                if (record.time_unix_nano or record.observed_time_unix_nano) > MAX_NS:
                    return None
                count += 1
    return count


FAST_PATHS = {Signal.TRACES: fast_path_spans, Signal.LOGS: fast_path_logs}


def frame(payloads: list[bytes]) -> bytes:
    """Requests as ClickHouse's `Protobuf` format reads rows: each prefixed by its varint length."""
    out = bytearray()
    for payload in payloads:
        size = len(payload)
        while size > 0x7F:
            out.append((size & 0x7F) | 0x80)
            size >>= 7
        out.append(size)
        out += payload
    return bytes(out)
