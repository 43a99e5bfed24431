"""The trace and log intakes converted by ClickHouse write the rows the Python converters write."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import (
    AnyValue,
    ArrayValue,
    InstrumentationScope,
    KeyValue,
    KeyValueList,
)
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

from flowscope.collector.convert import LOG_COLUMNS, TRACE_COLUMNS, convert_logs, convert_traces, float_text
from flowscope.collector.intake import fast_path_double_text, fast_path_logs, fast_path_spans
from flowscope.collector.schema import SchemaOptions
from flowscope.collector.store import Dsn, connect, migrate
from flowscope.collector.types import Signal
from flowscope.collector.writer import ClickHouseWriter

text = st.text(max_size=12)
doubles = st.one_of(
    st.floats(allow_nan=True),
    st.sampled_from([0.0, -0.0, 2.0, 1e20, -9.5e18, 2.0**63, 1e21, 1.5e-7, 1e-6, 1.5e-5, 4.17176425040722e19, 0.3]),
)
scalar = st.one_of(
    text.map(lambda s: AnyValue(string_value=s)),
    st.integers(-(2**63), 2**63 - 1).map(lambda i: AnyValue(int_value=i)),
    doubles.map(lambda f: AnyValue(double_value=f)),
    st.booleans().map(lambda b: AnyValue(bool_value=b)),
    st.binary(max_size=8).map(lambda b: AnyValue(bytes_value=b)),
    st.just(AnyValue()),
)
# Few distinct keys, so repeated keys (the last value wins) come up.
attributes = st.lists(st.builds(KeyValue, key=st.sampled_from(["a", "b", "c", "", "service.name"]), value=scalar))
trace_id = st.binary(min_size=16, max_size=16).filter(any)
span_id = st.binary(min_size=8, max_size=8).filter(any)
times = st.integers(0, (1 << 63) - 1)
spans = st.builds(
    Span,
    trace_id=trace_id,
    span_id=span_id,
    parent_span_id=st.one_of(st.just(b""), span_id),
    trace_state=text,
    name=text,
    kind=st.integers(0, 7),
    start_time_unix_nano=times,
    end_time_unix_nano=times,
    attributes=attributes,
    events=st.lists(st.builds(Span.Event, time_unix_nano=times, name=text, attributes=attributes), max_size=2),
    links=st.lists(
        st.builds(Span.Link, trace_id=trace_id, span_id=span_id, trace_state=text, attributes=attributes),
        max_size=2,
    ),
    status=st.builds(Status, code=st.integers(0, 3), message=text),
)
requests = st.builds(
    ExportTraceServiceRequest,
    resource_spans=st.lists(
        st.builds(
            ResourceSpans,
            resource=st.builds(Resource, attributes=attributes),
            scope_spans=st.lists(
                st.builds(
                    ScopeSpans,
                    scope=st.builds(InstrumentationScope, name=text, version=text),
                    spans=st.lists(spans, min_size=1, max_size=3),
                ),
                min_size=1,
                max_size=2,
            ),
        ),
        min_size=1,
        max_size=2,
    ),
)


log_records = st.builds(
    LogRecord,
    time_unix_nano=st.one_of(st.just(0), times),
    observed_time_unix_nano=times,
    severity_number=st.integers(-3, 30),
    severity_text=text,
    body=scalar,
    attributes=attributes,
    flags=st.integers(0, 2**32 - 1),
    trace_id=st.one_of(st.just(b""), st.binary(min_size=16, max_size=16)),
    span_id=st.one_of(st.just(b""), st.binary(min_size=8, max_size=8)),
    event_name=text,
)
log_requests = st.builds(
    ExportLogsServiceRequest,
    resource_logs=st.lists(
        st.builds(
            ResourceLogs,
            resource=st.builds(Resource, attributes=attributes),
            schema_url=text,
            scope_logs=st.lists(
                st.builds(
                    ScopeLogs,
                    scope=st.builds(InstrumentationScope, name=text, version=text, attributes=attributes),
                    schema_url=text,
                    log_records=st.lists(log_records, min_size=1, max_size=3),
                ),
                min_size=1,
                max_size=2,
            ),
        ),
        min_size=1,
        max_size=2,
    ),
)

# signal: (requests, table, its columns, the intake's check, the Python converter)
_CASES: dict[Signal, tuple[Any, str, tuple[str, ...], Any, Any]] = {
    Signal.TRACES: (requests, "otel_traces", TRACE_COLUMNS, fast_path_spans, convert_traces),
    Signal.LOGS: (log_requests, "otel_logs", LOG_COLUMNS, fast_path_logs, convert_logs),
}


def _rows(client: Any, database: str, table: str, columns: tuple[str, ...]) -> list[Any]:
    select = ", ".join(f"`{name}`" for name in columns)
    rows = client.query(f"SELECT {select} FROM {database}.{table}").result_rows
    return sorted((_comparable(row) for row in rows), key=repr)


def _comparable(value: Any) -> Any:
    """Maps compare as sets of items (their order is not the data); NaN equals itself."""
    if isinstance(value, dict):
        return sorted((k, _comparable(v)) for k, v in value.items())
    if isinstance(value, list | tuple):
        return [_comparable(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return value


def test_the_intake_writes_doubles_as_the_python_converter_does(chdb_dsn: str) -> None:
    """ClickHouse's toString and pdata agree on a double's digits; the intake's SQL fixes the
    rest (the exponent's sign past 1e21, non-finite values) to agree to the character."""
    values = [1.5, 0.1 + 0.2, 1e-7, 1.5e-5, 1e-6, 1e21, -1e300, 5e-324, math.inf, -math.inf, math.nan, 2.0, -0.0]
    values += [2.0**63, 4.171764250407222e19, 1e16, 123456789012345678.0, 999999999999999.9]
    client = connect(Dsn.parse(chdb_dsn))
    try:
        text = fast_path_double_text("reinterpretAsFloat64(unhex({v:String}))")
        theirs = [client.query(f"SELECT {text}", parameters={"v": _le(v).hex()}).result_rows[0][0] for v in values]
    finally:
        client.close()
    assert theirs == [float_text(v) for v in values]


def _le(value: float) -> bytes:
    import struct

    return struct.pack("<d", value)


@pytest.mark.parametrize("signal", [Signal.TRACES, Signal.LOGS])
def test_the_intake_and_the_python_converter_write_identical_rows(chdb_dsn: str, database: str, signal: Signal) -> None:
    strategy, table, columns, fast_path, convert = _CASES[signal]
    dsn = Dsn.parse(chdb_dsn)
    native, python = f"{database}_n", f"{database}_p"
    client = connect(dsn)
    for db in (native, python):
        migrate(client, SchemaOptions(database=db))
    intake_writer, python_writer = ClickHouseWriter(dsn, native), ClickHouseWriter(dsn, python)
    checked = [0]

    # No shrinking: on this schema it can run for minutes; the failing example is printed as drawn.
    @settings(
        max_examples=40,
        deadline=None,
        phases=[Phase.explicit, Phase.reuse, Phase.generate],
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(request=strategy)
    def check(request: Any) -> None:
        for db in (native, python):
            client.command(f"TRUNCATE TABLE {db}.{table}")
        count = fast_path(request)
        converted = convert(request)
        assert count == converted.accepted and converted.rejected == 0
        intake_writer.insert_otlp([request.SerializeToString()], signal=signal)
        for rows in converted.tables:
            python_writer.insert(rows)
        ours, theirs = _rows(client, native, table, columns), _rows(client, python, table, columns)
        assert len(ours) == len(theirs) == count
        for mine, reference in zip(ours, theirs, strict=True):
            diff = {name: (a, b) for name, a, b in zip(columns, mine, reference, strict=True) if a != b}
            assert not diff, diff
        checked[0] += count

    try:
        check()
        assert intake_writer.intake and intake_writer.intake_fallbacks == 0, "every batch took the intake"
        assert checked[0] > 0
    finally:
        intake_writer.close()
        python_writer.close()
        client.close()


def test_nested_attribute_values_fall_back_to_the_python_converter(chdb_dsn: str, database: str) -> None:
    dsn = Dsn.parse(chdb_dsn)
    client = connect(dsn)
    migrate(client, SchemaOptions(database=database))
    writer = ClickHouseWriter(dsn, database)
    tags = AnyValue(array_value=ArrayValue(values=[AnyValue(string_value="a"), AnyValue(int_value=2)]))
    flat = Span(trace_id=b"\x01" * 16, span_id=b"\x01" * 8, name="flat", start_time_unix_nano=1)
    nested = Span(
        trace_id=b"\x02" * 16, span_id=b"\x02" * 8, name="nested", attributes=[KeyValue(key="tags", value=tags)]
    )
    request = ExportTraceServiceRequest(resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=[flat, nested])])])
    try:
        assert fast_path_spans(request) == 2
        writer.insert_otlp([request.SerializeToString()], "nested-1")
        sql = f"SELECT SpanName, SpanAttributes FROM {database}.otel_traces ORDER BY SpanName"
        rows = client.query(sql).result_rows
        assert rows == [("flat", {}), ("nested", {"tags": '["a",2]'})]
        assert writer.intake_fallbacks == 1 and writer.intake, "one batch converted in Python; the intake stays on"
    finally:
        writer.close()
        client.close()


def test_invalid_spans_never_take_the_intake() -> None:
    good = Span(trace_id=b"\x01" * 16, span_id=b"\x01" * 8)
    for bad in (
        Span(trace_id=b"\x01" * 15, span_id=b"\x01" * 8),
        Span(trace_id=bytes(16), span_id=b"\x01" * 8),
        Span(trace_id=b"\x01" * 16, span_id=b"\x01" * 8, parent_span_id=b"\x01"),
        Span(trace_id=b"\x01" * 16, span_id=b"\x01" * 8, end_time_unix_nano=1 << 63),
        Span(trace_id=b"\x01" * 16, span_id=b"\x01" * 8, links=[Span.Link(trace_id=bytes(16), span_id=b"\x01" * 8)]),
    ):
        request = ExportTraceServiceRequest(resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=[good, bad])])])
        assert fast_path_spans(request) is None
        assert convert_traces(request).rejected == 1


def test_a_structured_log_body_falls_back_to_the_python_converter(chdb_dsn: str, database: str) -> None:
    dsn = Dsn.parse(chdb_dsn)
    client = connect(dsn)
    migrate(client, SchemaOptions(database=database))
    writer = ClickHouseWriter(dsn, database)
    structured = AnyValue(kvlist_value=KeyValueList(values=[KeyValue(key="k", value=AnyValue(int_value=2))]))
    records = [
        LogRecord(time_unix_nano=1, body=AnyValue(string_value="plain"), event_name="a"),
        LogRecord(time_unix_nano=2, body=structured, event_name="b"),
    ]
    request = ExportLogsServiceRequest(resource_logs=[ResourceLogs(scope_logs=[ScopeLogs(log_records=records)])])
    try:
        assert fast_path_logs(request) == 2
        writer.insert_otlp([request.SerializeToString()], "structured-1", signal=Signal.LOGS)
        rows = client.query(f"SELECT EventName, Body FROM {database}.otel_logs ORDER BY EventName").result_rows
        assert rows == [("a", "plain"), ("b", '{"k":2}')]
        assert writer.intake_fallbacks == 1 and writer.intake, "one batch converted in Python; the intake stays on"
    finally:
        writer.close()
        client.close()


def test_log_records_the_converter_rejects_never_take_the_intake() -> None:
    good = LogRecord(time_unix_nano=1, trace_id=b"\x01" * 16, span_id=b"\x01" * 8)
    for bad in (
        LogRecord(time_unix_nano=1, trace_id=b"\x01" * 15),
        LogRecord(time_unix_nano=1, span_id=b"\x01" * 9),
        LogRecord(time_unix_nano=1 << 63),
        LogRecord(observed_time_unix_nano=1 << 63),
    ):
        request = ExportLogsServiceRequest(
            resource_logs=[ResourceLogs(scope_logs=[ScopeLogs(log_records=[good, bad])])]
        )
        assert fast_path_logs(request) is None
        assert convert_logs(request).rejected == 1
