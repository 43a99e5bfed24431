"""OTLP receivers: hand-written OTLP/JSON, every metric type, and every bad-input path."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from typing import Any

import grpc
import httpx
from google.rpc import status_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from flowscope.collector.service import Collector
from tests.collector.test_end_to_end import query

TRACE_ID = "5b8efff798038103d269b633813fc60c"
SPAN_ID = "eee19b7ec3c1b174"
# Recent: the collector refuses records outside its time window (collector/admission.py).
NOW_NS = time.time_ns() // 10**9 * 10**9


def resource(service: str = "checkout-go") -> dict[str, Any]:
    return {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]}


def json_spans(*spans: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceSpans": [
            {
                "resource": resource(),
                "scopeSpans": [{"scope": {"name": "go.manual", "version": "1.2"}, "spans": list(spans)}],
            }
        ]
    }


def span(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "traceId": TRACE_ID,
        "spanId": SPAN_ID,
        "parentSpanId": "",
        "name": "GET /cart",
        "kind": 2,
        "startTimeUnixNano": str(NOW_NS),
        "endTimeUnixNano": str(NOW_NS + 1_500_000),
        "attributes": [
            {"key": "http.response.status_code", "value": {"intValue": "200"}},
            {"key": "cache.hit", "value": {"boolValue": True}},
            {"key": "ratio", "value": {"doubleValue": 0.25}},
            {"key": "tags", "value": {"arrayValue": {"values": [{"stringValue": "a"}, {"intValue": "2"}]}}},
        ],
        "events": [{"timeUnixNano": str(NOW_NS + 10), "name": "cache.lookup", "attributes": []}],
        "links": [{"traceId": "0af7651916cd43dd8448eb211c80319c", "spanId": "b7ad6b7169203331", "attributes": []}],
        "status": {"code": 2, "message": "upstream 503"},
        "unknownFutureField": {"ignored": True},
    }
    base.update(overrides)
    return base


async def post(collector: Collector, path: str, body: bytes, content_type: str, **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{collector.http_port}") as client:
        return await client.post(path, content=body, headers={"content-type": content_type, **headers})


async def flushed(collector: Collector) -> None:
    assert collector.pipeline is not None
    assert await asyncio.to_thread(collector.pipeline.flush, 30.0)


async def test_hand_written_otlp_json_as_another_language_sends_it(collector: Collector) -> None:
    body = json.dumps(json_spans(span())).encode()
    response = await post(collector, "/v1/traces", body, "application/json")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {}
    await flushed(collector)
    rows = query(
        collector,
        "SELECT TraceId, SpanId, SpanKind, ServiceName, ScopeName, ScopeVersion, Duration, StatusCode, StatusMessage,"
        " SpanAttributes, Events.Name, Links.TraceId, Links.SpanId FROM {db}.otel_traces",
    )
    assert rows == [
        (
            TRACE_ID,
            SPAN_ID,
            "Server",
            "checkout-go",
            "go.manual",
            "1.2",
            1_500_000,
            "Error",
            "upstream 503",
            {"http.response.status_code": "200", "cache.hit": "true", "ratio": "0.25", "tags": '["a",2]'},
            ["cache.lookup"],
            ["0af7651916cd43dd8448eb211c80319c"],
            ["b7ad6b7169203331"],
        )
    ]


async def test_gzip_protobuf_and_partial_success_for_invalid_ids(collector: Collector) -> None:
    request = ExportTraceServiceRequest()
    from google.protobuf import json_format

    from flowscope.collector.otlp_json import parse

    good = parse(json.dumps(json_spans(span(), span(spanId="00f067aa0ba902b7", traceId=TRACE_ID))).encode(),
                 ExportTraceServiceRequest)  # fmt: skip
    request.CopyFrom(good)
    bad = request.resource_spans[0].scope_spans[0].spans.add()
    bad.CopyFrom(request.resource_spans[0].scope_spans[0].spans[0])
    bad.trace_id = b"\x01\x02"
    body = gzip.compress(request.SerializeToString())
    response = await post(collector, "/v1/traces", body, "application/x-protobuf", **{"content-encoding": "gzip"})
    assert response.status_code == 200
    parsed = ExportTraceServiceResponse.FromString(response.content)
    assert parsed.partial_success.rejected_spans == 1
    assert "traceId must be 16 bytes, got 2" in parsed.partial_success.error_message
    await flushed(collector)
    assert query(collector, "SELECT count() FROM {db}.otel_traces") == [(2,)]
    assert json_format.MessageToDict(parsed)["partialSuccess"]["rejectedSpans"] == "1"


async def test_every_metric_type_from_otlp_json(collector: Collector) -> None:
    point = {"timeUnixNano": str(NOW_NS), "startTimeUnixNano": str(NOW_NS - 10**9)}
    attrs = [{"key": "queue", "value": {"stringValue": "q1"}}]
    metrics = [
        {"name": "g", "unit": "1", "gauge": {"dataPoints": [{**point, "asDouble": 1.5, "attributes": attrs}]}},
        {
            "name": "s",
            "sum": {
                "dataPoints": [{**point, "asInt": "7", "attributes": attrs}],
                "aggregationTemporality": 2,
                "isMonotonic": True,
            },
        },
        {
            "name": "h",
            "histogram": {
                "dataPoints": [
                    {
                        **point,
                        "count": "3",
                        "sum": 6.0,
                        "bucketCounts": ["1", "2"],
                        "explicitBounds": [1.0],
                        "min": 1.0,
                        "max": 3.0,
                        "exemplars": [
                            {"timeUnixNano": str(NOW_NS), "asDouble": 3.0, "traceId": TRACE_ID, "spanId": SPAN_ID}
                        ],
                    }
                ],
                "aggregationTemporality": 1,
            },
        },
        {
            "name": "e",
            "exponentialHistogram": {
                "dataPoints": [
                    {
                        **point,
                        "count": "4",
                        "sum": 10.0,
                        "scale": 2,
                        "zeroCount": "1",
                        "positive": {"offset": 3, "bucketCounts": ["1", "2"]},
                        "negative": {"offset": 0, "bucketCounts": []},
                    }
                ],
                "aggregationTemporality": 2,
            },
        },
        {
            "name": "q",
            "summary": {
                "dataPoints": [
                    {
                        **point,
                        "count": "5",
                        "sum": 9.0,
                        "quantileValues": [{"quantile": 0.5, "value": 1.0}, {"quantile": 0.99, "value": 4.0}],
                    }
                ]
            },
        },
    ]
    body = {"resourceMetrics": [{"resource": resource("svc-m"), "scopeMetrics": [{"metrics": metrics}]}]}
    response = await post(collector, "/v1/metrics", json.dumps(body).encode(), "application/json")
    assert response.status_code == 200, response.text
    await flushed(collector)
    assert query(collector, "SELECT MetricName, Value, Attributes, ServiceName FROM {db}.otel_metrics_gauge") == [
        ("g", 1.5, {"queue": "q1"}, "svc-m")
    ]
    assert query(collector, "SELECT Value, AggregationTemporality, IsMonotonic FROM {db}.otel_metrics_sum") == [
        (7.0, 2, True)
    ]
    assert query(
        collector, "SELECT Count, BucketCounts, ExplicitBounds, Exemplars.TraceId FROM {db}.otel_metrics_histogram"
    ) == [(3, [1, 2], [1.0], [TRACE_ID])]
    assert query(
        collector,
        "SELECT Scale, ZeroCount, PositiveOffset, PositiveBucketCounts FROM {db}.otel_metrics_exponential_histogram",
    ) == [(2, 1, 3, [1, 2])]
    assert query(
        collector, "SELECT Count, ValueAtQuantiles.Quantile, ValueAtQuantiles.Value FROM {db}.otel_metrics_summary"
    ) == [(5, [0.5, 0.99], [1.0, 4.0])]


async def test_bad_http_input_gets_clear_errors_and_server_keeps_serving(collector: Collector) -> None:
    garbage = await post(collector, "/v1/traces", b"\xff\x00not protobuf", "application/x-protobuf")
    assert garbage.status_code == 400
    status = status_pb2.Status.FromString(garbage.content)
    assert "malformed OTLP request" in status.message

    bad_json = await post(collector, "/v1/logs", b"{not json", "application/json")
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["message"]

    bad_hex = await post(
        collector, "/v1/traces", json.dumps(json_spans(span(traceId="zz"))).encode(), "application/json"
    )
    assert bad_hex.status_code == 400 and "traceId 'zz' is not hex" in bad_hex.json()["message"]

    all_invalid = await post(
        collector, "/v1/traces", json.dumps(json_spans(span(spanId=""))).encode(), "application/json"
    )
    assert all_invalid.status_code == 400 and "spanId must be 8 bytes" in all_invalid.json()["message"]

    wrong_type = await post(collector, "/v1/traces", b"{}", "text/plain")
    assert wrong_type.status_code == 415

    bad_gzip = await post(collector, "/v1/traces", b"not gzip", "application/json", **{"content-encoding": "gzip"})
    assert bad_gzip.status_code == 400 and "bad gzip body" in bad_gzip.json()["message"]

    bomb = gzip.compress(b"{" + b" " * (17 * 1024 * 1024) + b"}")
    too_big = await post(collector, "/v1/traces", bomb, "application/json", **{"content-encoding": "gzip"})
    assert too_big.status_code == 400 and "exceeds" in too_big.json()["message"]

    still_ok = await post(collector, "/v1/traces", json.dumps(json_spans(span())).encode(), "application/json")
    assert still_ok.status_code == 200
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{collector.http_port}/metrics")).text
    assert 'flowscope_collector_refused_requests_total{reason="malformed",signal="traces"} 4.0' in text
    assert 'flowscope_collector_rejected_items_total{reason="invalid",signal="traces"} 1.0' in text


async def test_bad_grpc_input_is_invalid_argument(collector: Collector) -> None:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{collector.grpc_port}")
    export = channel.unary_unary(
        "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
        request_serializer=None,
        response_deserializer=ExportTraceServiceResponse.FromString,
    )
    try:
        await export(b"\xff\xff\xff garbage")
        raise AssertionError("expected INVALID_ARGUMENT")
    except grpc.aio.AioRpcError as exc:
        assert exc.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed OTLP protobuf" in (exc.details() or "")
    from flowscope.collector.otlp_json import parse

    ok = parse(json.dumps(json_spans(span())).encode(), ExportTraceServiceRequest)
    response = await export(ok.SerializeToString())
    assert response.partial_success.rejected_spans == 0
    await channel.close()


async def test_timestamps_beyond_datetime64_are_rejected_not_poisoning_the_batch(collector: Collector) -> None:
    late = span(spanId="00f067aa0ba902b8", startTimeUnixNano=str(2**63 + 5))
    body = json.dumps(json_spans(span(), late)).encode()
    response = await post(collector, "/v1/traces", body, "application/json")
    assert response.status_code == 200
    assert response.json()["partialSuccess"]["rejectedSpans"] == "1"
    assert "beyond the year 2262" in response.json()["partialSuccess"]["errorMessage"]
    await flushed(collector)
    assert query(collector, "SELECT SpanId FROM {db}.otel_traces") == [(SPAN_ID,)]
