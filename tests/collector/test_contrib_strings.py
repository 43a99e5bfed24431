"""Attribute values and log bodies are stored as the contrib exporter stores them: pdata's
`Value.AsString()` (pdata/pcommon/value.go: `float64AsString`, `json.Marshal(AsRaw())`).

The expected strings are what pdata produces for each value, written out from its rules: a
double in ES6 number form, maps and arrays as Go's encoding/json writes them (keys sorted,
whole doubles without `.0`, HTML characters escaped, bytes in base64), and "" for a map
that holds a NaN (json.Marshal fails and AsString drops the error)."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2_grpc import LogsServiceStub
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc import TraceServiceStub
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from flowscope.collector.convert import any_value
from flowscope.collector.service import Collector


def d(value: float) -> AnyValue:
    return AnyValue(double_value=value)


def array(*values: AnyValue) -> AnyValue:
    return AnyValue(array_value=ArrayValue(values=list(values)))


def kvlist(**values: AnyValue) -> AnyValue:
    return AnyValue(kvlist_value=KeyValueList(values=[KeyValue(key=k, value=v) for k, v in values.items()]))


PDATA: list[tuple[AnyValue, str]] = [
    (AnyValue(), ""),
    (AnyValue(string_value="plain <b>&</b>"), "plain <b>&</b>"),
    (AnyValue(bool_value=True), "true"),
    (AnyValue(int_value=-(2**63)), "-9223372036854775808"),
    (d(2.0), "2"),
    (d(-0.0), "-0"),
    (d(0.1 + 0.2), "0.30000000000000004"),
    (d(1e20), "100000000000000000000"),
    (d(2.0**63), "9223372036854776000"),
    (d(1e21), "1e+21"),
    (d(-1.5e300), "-1.5e+300"),
    (d(1e-6), "0.000001"),
    (d(1.5e-5), "0.000015"),
    (d(1.5e-7), "1.5e-7"),
    (d(1e-10), "1e-10"),
    (d(5e-324), "5e-324"),
    (d(math.nan), "json: unsupported value: NaN"),
    (d(math.inf), "json: unsupported value: +Inf"),
    (d(-math.inf), "json: unsupported value: -Inf"),
    (AnyValue(bytes_value=b"\x00\xffhi"), "AP9oaQ=="),
    (array(d(2.0), d(1e21), AnyValue(int_value=3), AnyValue(), AnyValue(bool_value=False)), "[2,1e+21,3,null,false]"),
    (array(AnyValue(bytes_value=b"hi")), '["aGk="]'),
    (kvlist(b=d(1.0), a=AnyValue(string_value="x"), c=array()), '{"a":"x","b":1,"c":[]}'),
    (kvlist(z=kvlist(y=d(0.5), x=kvlist())), '{"z":{"x":{},"y":0.5}}'),
    (array(AnyValue(string_value='<a href="x">&\u2028\u2029\b\f\n\r\t\x01\x7f\\é')),
     '["\\u003ca href=\\"x\\"\\u003e\\u0026\\u2028\\u2029\\b\\f\\n\\r\\t\\u0001\x7f\\\\é"]'),
    (kvlist(ok=d(1.0), bad=d(math.nan)), ""),
    (array(d(math.inf)), ""),
]  # fmt: skip


@pytest.mark.parametrize(("value", "expected"), PDATA, ids=[expected[:24] or "empty" for _, expected in PDATA])
def test_values_are_written_as_pdata_writes_them(value: AnyValue, expected: str) -> None:
    assert any_value(value) == expected


async def test_stored_attributes_and_map_bodies_are_the_contrib_strings(collector: Collector) -> None:
    """Through the real gRPC receiver into ClickHouse, on both the SQL intake and the Python path."""
    cases = [(f"k{i}", value, expected) for i, (value, expected) in enumerate(PDATA) if value.WhichOneof("value")]
    scalars = [c for c in cases if c[1].WhichOneof("value") not in ("array_value", "kvlist_value")]
    attributes = [KeyValue(key=key, value=value) for key, value, _ in cases]
    scalar_attributes = [KeyValue(key=key, value=value) for key, value, _ in scalars]
    now = time.time_ns()
    span = dict(trace_id=b"\x01" * 16, start_time_unix_nano=now, end_time_unix_nano=now + 1)

    def request(*spans: Span) -> ExportTraceServiceRequest:
        return ExportTraceServiceRequest(resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=spans)])])

    # Apart: a batch holding a map or an array is converted in Python, one of scalars by the SQL intake.
    mixed = request(Span(span_id=b"\x02" * 8, name="mixed", attributes=attributes, **span))  # type: ignore[arg-type]
    plain = request(Span(span_id=b"\x03" * 8, name="scalars", attributes=scalar_attributes, **span))  # type: ignore[arg-type]
    body = kvlist(b=d(2.0), a=array(d(1e21), AnyValue(string_value="<&>")))
    logs = ExportLogsServiceRequest(
        resource_logs=[ResourceLogs(scope_logs=[ScopeLogs(log_records=[LogRecord(time_unix_nano=now, body=body)])])]
    )
    assert collector.pipeline is not None
    with grpc.insecure_channel(f"127.0.0.1:{collector.grpc_port}") as channel:
        for traces in (mixed, plain):
            TraceServiceStub(channel).Export(traces, timeout=30)  # type: ignore[no-untyped-call]
            await asyncio.to_thread(collector.pipeline.flush, 30.0)
        LogsServiceStub(channel).Export(logs, timeout=30)  # type: ignore[no-untyped-call]
    await asyncio.to_thread(collector.pipeline.flush, 30.0)

    stored = _query(collector, "SELECT SpanName, SpanAttributes FROM {db}.otel_traces ORDER BY SpanName")
    by_name: dict[str, dict[str, str]] = {name: dict(attrs) for name, attrs in stored}
    assert by_name["mixed"] == {key: expected for key, _, expected in cases}
    assert by_name["scalars"] == {key: expected for key, _, expected in scalars}
    [(stored_body,)] = _query(collector, "SELECT Body FROM {db}.otel_logs")
    assert stored_body == '{"a":[1e+21,"\\u003c\\u0026\\u003e"],"b":2}'


def _query(collector: Collector, sql: str) -> list[tuple[Any, ...]]:
    client = collector.client()
    try:
        return [tuple(row) for row in client.query(sql.replace("{db}", collector.database)).result_rows]
    finally:
        client.close()
