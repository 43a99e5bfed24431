"""Hypothesis-generated OTLP, valid and corrupted, through both receivers: no crash, and valid
requests round-trip into rows."""

from __future__ import annotations

import asyncio
import time

import grpc
import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from flowscope.collector.service import Collector
from tests.collector.test_end_to_end import query

text = st.text(max_size=40)
# Within the collector's default time window (collector/admission.py): a year back, a day ahead.
_NOW = time.time_ns()
stamps = st.integers(_NOW - 300 * 86_400 * 10**9, _NOW + 3_600 * 10**9)
scalar = st.one_of(
    text.map(lambda s: AnyValue(string_value=s)),
    st.integers(-(2**63), 2**63 - 1).map(lambda i: AnyValue(int_value=i)),
    st.floats(allow_nan=True).map(lambda f: AnyValue(double_value=f)),
    st.booleans().map(lambda b: AnyValue(bool_value=b)),
    st.binary(max_size=16).map(lambda b: AnyValue(bytes_value=b)),
)
value = st.one_of(scalar, st.lists(scalar, max_size=3).map(lambda vs: AnyValue(array_value=ArrayValue(values=vs))))
attributes = st.lists(st.builds(KeyValue, key=text, value=value), max_size=6)
span_id = st.binary(min_size=8, max_size=8).filter(any)
trace_id = st.binary(min_size=16, max_size=16).filter(any)
spans = st.builds(
    Span,
    trace_id=trace_id,
    span_id=span_id,
    name=text,
    kind=st.integers(0, 5),
    start_time_unix_nano=stamps,
    end_time_unix_nano=stamps,
    attributes=attributes,
)
trace_requests = st.lists(spans, min_size=1, max_size=8).map(
    lambda ss: ExportTraceServiceRequest(resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=ss)])])
)
records = st.builds(
    LogRecord,
    time_unix_nano=stamps,
    body=value,
    attributes=attributes,
    event_name=text,
    severity_number=st.integers(0, 24),
)
log_requests = st.lists(records, min_size=1, max_size=8).map(
    lambda rs: ExportLogsServiceRequest(resource_logs=[ResourceLogs(scope_logs=[ScopeLogs(log_records=rs)])])
)


def corrupt(data: bytes, position: int, junk: bytes) -> bytes:
    cut = position % (len(data) + 1)
    return data[:cut] + junk + data[cut + len(junk) :]


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


async def test_fuzzed_requests_never_crash_and_valid_ones_round_trip(collector: Collector) -> None:
    http = httpx.Client(base_url=f"http://127.0.0.1:{collector.http_port}")
    channel = grpc.insecure_channel(f"127.0.0.1:{collector.grpc_port}")
    export = channel.unary_unary(
        "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
        request_serializer=None,
        response_deserializer=ExportTraceServiceResponse.FromString,
    )
    sent_span_ids: set[str] = set()

    @FUZZ
    @given(
        request=trace_requests,
        logs=log_requests,
        position=st.integers(0, 10_000),
        junk=st.binary(min_size=1, max_size=8),
    )
    def check(request: ExportTraceServiceRequest, logs: ExportLogsServiceRequest, position: int, junk: bytes) -> None:
        raw = request.SerializeToString()
        ok = http.post("/v1/traces", content=raw, headers={"content-type": "application/x-protobuf"})
        assert ok.status_code == 200, ok.content
        sent_span_ids.update(span.span_id.hex() for span in request.resource_spans[0].scope_spans[0].spans)
        response = export(raw, timeout=10)
        assert response.partial_success.rejected_spans == 0
        logged = http.post(
            "/v1/logs", content=logs.SerializeToString(), headers={"content-type": "application/x-protobuf"}
        )
        assert logged.status_code == 200
        broken = corrupt(raw, position, junk)
        answer = http.post("/v1/traces", content=broken, headers={"content-type": "application/x-protobuf"})
        # Corrupted bytes may still parse (protobuf is permissive): either way a clear answer, never a 5xx.
        assert answer.status_code in (200, 400), answer.status_code
        try:
            export(broken, timeout=10)
        except grpc.RpcError as exc:
            assert exc.code() is grpc.StatusCode.INVALID_ARGUMENT, exc

    def run_all() -> None:
        # Blocking clients, so the whole run happens off the event loop that serves HTTP.
        try:
            check()
        finally:
            http.close()
            channel.close()

    await asyncio.to_thread(run_all)
    assert collector.pipeline is not None
    assert await asyncio.to_thread(collector.pipeline.flush, 30.0)
    stored = {row[0] for row in query(collector, "SELECT DISTINCT SpanId FROM {db}.otel_traces")}
    assert sent_span_ids <= stored, "every valid span round-trips into a row"
    metrics = collector.metrics.render().decode()
    assert "flowscope_collector_dropped_rows_total{" not in metrics
