"""A public bind without auth is refused before anything listens, and a second OTLP/gRPC
receiver on a port in use fails instead of sharing it."""

from __future__ import annotations

import asyncio
import socket
import time

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from flowscope.collector.convert import Converted
from flowscope.collector.receiver import GrpcReceiver
from flowscope.collector.types import Signal
from tests.conftest import StackFactory

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


async def test_a_public_bind_without_auth_is_refused_before_otlp_listens(stack_factory: StackFactory) -> None:
    # The gRPC port is taken: a stack that bound before checking would fail on it (OSError)
    # instead of refusing the configuration.
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match="without authentication"):
            async with stack_factory(host="0.0.0.0", otlp_grpc_port=port):
                pass


def _count(signal: Signal, request: object, raw: bytes | None = None) -> Converted:
    return Converted([], accepted=1, rejected=0, reasons=[])


def _export(port: int) -> grpc.StatusCode:
    now = time.time_ns()
    span = Span(trace_id=b"\x01" * 16, span_id=b"\x02" * 8, name="s", start_time_unix_nano=now)
    request = ExportTraceServiceRequest(resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=[span])])])
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        export = channel.unary_unary(EXPORT, request_serializer=None, response_deserializer=None)
        try:
            export(request.SerializeToString(), timeout=10)
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            return code
    return grpc.StatusCode.OK


async def test_a_second_grpc_receiver_on_a_used_port_fails_and_the_first_keeps_serving() -> None:
    first = GrpcReceiver(_count, port=0)
    first.start()
    try:
        with pytest.raises(OSError, match="cannot bind"):
            GrpcReceiver(_count, port=first.port)
        assert await asyncio.to_thread(_export, first.port) == grpc.StatusCode.OK
    finally:
        first.stop(0.5)
