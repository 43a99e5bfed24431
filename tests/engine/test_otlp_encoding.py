"""engine/otlp_encoding.py builds the very requests the SDK's OTLP encoders build.

Records come from the engine itself (both record paths) and from plain SDK calls that
reach what the engine never emits: several resources and scopes, schema URLs, remote
parents, trace state, links, array/map/bytes/None values, log bodies of every shape,
unset severities and ids, dropped counts. Each batch is encoded both ways and compared
as messages and as bytes.
"""

from __future__ import annotations

import enum
import logging
from typing import Any

import grpc
import pytest
from opentelemetry._logs import LogRecord, SeverityNumber
from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs as sdk_encode_logs
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode_spans
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk._logs import LoggerProvider, ReadableLogRecord
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    set_span_in_context,
)
from opentelemetry.trace.span import TraceState

from flowscope.engine import Engine, Telemetry
from flowscope.engine.otlp_encoding import GrpcLogExporter, GrpcSpanExporter, encode_logs, encode_spans
from tests.engine.test_sdk_direct import providers, workflow


def assert_same(ours: Any, theirs: Any) -> None:
    assert ours == theirs
    assert ours.SerializeToString(deterministic=True) == theirs.SerializeToString(deterministic=True)


async def engine_records(direct: bool) -> tuple[list[ReadableSpan], list[ReadableLogRecord]]:
    resource = Resource.create({"service.name": "encoding-check", "deployment.environment": "test"})
    tracer_provider, logger_provider, spans, logs = providers(resource)
    engine = Engine(Telemetry(tracer_provider, logger_provider, MeterProvider(), direct_records=direct))
    # Parallel branches, a retried node, a failure, a skipped branch, user attributes of
    # every type, a span event, an LLM node: the direct-path test's workflow.
    failed = await engine.run(workflow())
    # A resume links its run span to the failed run.
    await engine.resume(failed).result()
    await engine.aclose()
    return list(spans.get_finished_spans()), list(logs.get_finished_logs())


@pytest.mark.parametrize("direct", [True, False], ids=["direct-records", "sdk-api"])
async def test_engine_records_encode_as_the_sdk_encodes_them(direct: bool) -> None:
    spans, logs = await engine_records(direct)
    assert len(spans) >= 8 and len(logs) >= 20
    assert any(span.links for span in spans) and any(span.events for span in spans)
    assert_same(encode_spans(spans), sdk_encode_spans(spans))
    assert_same(encode_logs(logs), sdk_encode_logs(logs))


def sdk_spans() -> list[ReadableSpan]:
    exporter = InMemorySpanExporter()
    first = TracerProvider(resource=Resource({"service.name": "a", "k": 1}, schema_url="https://s/1"))
    second = TracerProvider(resource=Resource({"service.name": "b"}), span_limits=SpanLimits(max_attributes=2))
    for provider in (first, second):
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    remote = SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0xB7AD6B7169203331,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
        trace_state=TraceState([("vendor", "x1"), ("other", "y")]),
    )
    local_link = SpanContext(trace_id=7, span_id=9, is_remote=False)
    scoped = first.get_tracer("lib.one", "1.2.3", schema_url="https://s/scope", attributes={"scope.attr": "v"})
    plain = first.get_tracer("lib.two")
    limited = second.get_tracer("lib.three")
    with scoped.start_as_current_span(
        "server",
        context=set_span_in_context(NonRecordingSpan(remote)),
        kind=SpanKind.SERVER,
        attributes={"s": "x", "i": -3, "f": 1.5, "b": False, "ls": ("a", "b"), "li": [1, 2], "lf": [0.5], "lb": [True]},
        links=[Link(remote, {"link.kind": "follows"}), Link(local_link)],
    ) as span:
        span.add_event("with attributes", {"n": 1, "names": ["x"]})
        span.add_event("bare")
        span.set_status(Status(StatusCode.ERROR, "went wrong"))
        with plain.start_as_current_span("child", kind=SpanKind.CLIENT) as child:
            child.set_status(Status(StatusCode.OK))
        with scoped.start_as_current_span("producer", kind=SpanKind.PRODUCER):
            pass
    with limited.start_as_current_span("limited", kind=SpanKind.CONSUMER, attributes={"a": 1, "b": 2, "c": 3}):
        pass
    with plain.start_as_current_span("root again"):
        pass
    return list(exporter.get_finished_spans())


def test_spans_of_every_shape_encode_as_the_sdk_encodes_them() -> None:
    spans = sdk_spans()
    assert len({span.resource for span in spans}) == 2
    assert any(span.dropped_attributes for span in spans)
    ours, theirs = encode_spans(spans), sdk_encode_spans(spans)
    assert_same(ours, theirs)
    assert len(ours.resource_spans) == 2 and len(ours.resource_spans[0].scope_spans) == 2


def sdk_logs() -> list[ReadableLogRecord]:
    exporter = InMemoryLogRecordExporter()  # type: ignore[no-untyped-call]
    first = LoggerProvider(resource=Resource({"service.name": "a"}, schema_url="https://s/1"))
    second = LoggerProvider(resource=Resource({"service.name": "b"}))
    for provider in (first, second):
        provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    scoped = first.get_logger("lib.one", "1.0", schema_url="https://s/scope", attributes={"scope.attr": 1})
    plain = second.get_logger("lib.two")
    remote = SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, True, TraceFlags(1))
    bodies: list[Any] = [
        "text",
        None,
        {"nested": {"list": [1, "two", 3.0, None], "flag": True}, "raw": b"\x00\x01"},
        [1, 2, 3],
        42,
        2.5,
        True,
        b"bytes",
    ]
    for i, body in enumerate(bodies):
        logger = scoped if i % 2 else plain
        logger.emit(
            LogRecord(
                timestamp=1_700_000_000_000_000_000 + i,
                observed_timestamp=1_700_000_000_000_000_500 + i,
                context=set_span_in_context(NonRecordingSpan(remote)) if i % 3 else None,
                severity_text="WARN" if i % 2 else None,
                severity_number=SeverityNumber.WARN if i % 2 else None,
                body=body,
                attributes={"i": i, "s": "x", "seq": [1, 2], "map": {"k": "v"}, "raw": b"\xff"},
                event_name=f"event.{i}" if i % 4 else None,
            )
        )
    return list(exporter.get_finished_logs())


def test_logs_of_every_shape_encode_as_the_sdk_encodes_them() -> None:
    logs = sdk_logs()
    ours, theirs = encode_logs(logs), sdk_encode_logs(logs)
    assert_same(ours, theirs)
    assert len(ours.resource_logs) == 2
    bodies = [record.body for rl in ours.resource_logs for sl in rl.scope_logs for record in sl.log_records]
    assert {body.WhichOneof("value") for body in bodies} == {
        None, "string_value", "kvlist_value", "array_value", "int_value", "double_value", "bool_value", "bytes_value"
    }  # fmt: skip


def test_a_value_of_unknown_type_is_left_out_as_the_sdk_leaves_it(caplog: pytest.LogCaptureFixture) -> None:
    """Attributes set after a record is built skip the SDK's cleaning (the engine's direct
    path does this); an unencodable value must cost that one attribute, not the batch."""
    record = ReadableLogRecord(
        LogRecord(timestamp=1, body="b", event_name="e"),
        resource=Resource({"service.name": "a"}),
        instrumentation_scope=InstrumentationScope("lib"),
    )
    # Enum members encode as their base type, as the SDK's isinstance chain has them.
    record.log_record.attributes = {
        "before": 1,
        "bad": object(),  # type: ignore[dict-item]
        "after": "kept",
        "level": Level.HIGH,
        "mode": Mode.FAST,
    }
    with caplog.at_level(logging.ERROR):
        ours = encode_logs([record])
    assert_same(ours, sdk_encode_logs([record]))
    keys = [kv.key for kv in ours.resource_logs[0].scope_logs[0].log_records[0].attributes]
    assert keys == ["before", "after", "level", "mode"]
    assert any("Failed to encode key bad" in message for message in caplog.messages)


class Level(enum.IntEnum):
    HIGH = 3


class Mode(enum.StrEnum):
    FAST = "fast"


class Receiver:
    """A real OTLP/gRPC receiver on port 0 that keeps what arrives."""

    def __init__(self) -> None:
        from concurrent import futures

        self.traces: list[ExportTraceServiceRequest] = []
        self.logs: list[ExportLogsServiceRequest] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        handlers: dict[str, tuple[list[Any], Any]] = {
            "opentelemetry.proto.collector.trace.v1.TraceService": (
                self.traces,
                ExportTraceServiceRequest,
            ),
            "opentelemetry.proto.collector.logs.v1.LogsService": (self.logs, ExportLogsServiceRequest),
        }
        for service, (sink, message) in handlers.items():
            self.server.add_generic_rpc_handlers(
                [grpc.method_handlers_generic_handler(service, {"Export": self._handler(sink, message)})]
            )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @staticmethod
    def _handler(sink: list[Any], message: Any) -> grpc.RpcMethodHandler:
        def export(request: Any, context: grpc.ServicerContext) -> bytes:
            sink.append(request)
            return b""

        return grpc.unary_unary_rpc_method_handler(
            export, request_deserializer=message.FromString, response_serializer=lambda b: b
        )


def test_grpc_exporters_send_the_in_place_encoding() -> None:
    receiver = Receiver()
    try:
        spans, logs = sdk_spans(), sdk_logs()
        endpoint = f"http://127.0.0.1:{receiver.port}"
        span_exporter, log_exporter = (
            GrpcSpanExporter(endpoint=endpoint, insecure=True),
            GrpcLogExporter(endpoint=endpoint, insecure=True),
        )
        assert span_exporter.export(spans).name == "SUCCESS"
        assert log_exporter.export(logs).name == "SUCCESS"
        span_exporter.shutdown()
        log_exporter.shutdown()
    finally:
        receiver.server.stop(None)
    assert_same(receiver.traces[0], sdk_encode_spans(spans))
    assert_same(receiver.logs[0], sdk_encode_logs(logs))
