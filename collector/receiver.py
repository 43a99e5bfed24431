"""OTLP receivers: gRPC (trace, metrics, logs services) and HTTP (/v1/traces|metrics|logs).

Both hand parsed requests to one consumer and map its outcome onto the codes
OTLP clients act on: permanent errors (bad data) → INVALID_ARGUMENT / 400,
never retried; transient ones (queue full, storage down) → UNAVAILABLE / 503
with a retry hint, retried by every OTLP exporter.

With an `authorize` hook, every request's `Authorization` header (gRPC metadata
`authorization`, as OTEL_EXPORTER_OTLP_HEADERS sends it) is checked before its body
is read: missing or invalid credentials → UNAUTHENTICATED / 401, credentials that
may not write → PERMISSION_DENIED / 403. Who may write is the caller's business
(the bridge's tokens: flowscope/stack.py); this package only asks.
"""

from __future__ import annotations

import gzip
import logging
import zlib
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import DecodeError, Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest, ExportLogsServiceResponse
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from flowscope.collector import otlp_json
from flowscope.collector.types import Backpressure, Outcome, Signal

logger = logging.getLogger(__name__)

_DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class SignalSpec:
    signal: Signal
    request: type[Message]
    response: type[Message]
    grpc_service: str
    rejected_field: str


SPECS = {
    Signal.TRACES: SignalSpec(
        Signal.TRACES,
        ExportTraceServiceRequest,
        ExportTraceServiceResponse,
        "opentelemetry.proto.collector.trace.v1.TraceService",
        "rejected_spans",
    ),
    Signal.METRICS: SignalSpec(
        Signal.METRICS,
        ExportMetricsServiceRequest,
        ExportMetricsServiceResponse,
        "opentelemetry.proto.collector.metrics.v1.MetricsService",
        "rejected_data_points",
    ),
    Signal.LOGS: SignalSpec(
        Signal.LOGS,
        ExportLogsServiceRequest,
        ExportLogsServiceResponse,
        "opentelemetry.proto.collector.logs.v1.LogsService",
        "rejected_log_records",
    ),
}


class Consume(Protocol):
    """Takes a parsed request; `raw` is its protobuf encoding when the receiver already has it.
    Answers with what became of the request's items, or raises Backpressure (retry later)."""

    def __call__(self, signal: Signal, request: Any, raw: bytes | None = None) -> Outcome: ...


class RejectedError(ValueError):
    """Nothing in the request could be accepted."""


class Unauthenticated(Exception):
    """No credentials, or credentials nobody issued."""


class Forbidden(Exception):
    """Valid credentials without the right to write telemetry."""


# Takes the request's Authorization header (None when absent); raises Unauthenticated or Forbidden.
Authorize = Callable[[str | None], None]


def build_response(spec: SignalSpec, outcome: Outcome) -> Message:
    if outcome.rejected and not outcome.accepted:
        raise RejectedError("; ".join(outcome.reasons) or "every item was invalid")
    response = spec.response()
    if outcome.rejected:
        partial = response.partial_success
        setattr(partial, spec.rejected_field, outcome.rejected)
        partial.error_message = "; ".join(outcome.reasons)
    return response


# -- gRPC ---------------------------------------------------------------------------------------


class GrpcReceiver:
    """An OTLP/gRPC server; requests are parsed here so malformed bytes get INVALID_ARGUMENT."""

    def __init__(
        self,
        consume: Consume,
        *,
        host: str = "127.0.0.1",
        port: int = 4317,
        max_message_bytes: int | None = None,
        max_workers: int = 8,
        counters: Callable[[Signal, str], None] | None = None,
        authorize: Authorize | None = None,
    ) -> None:
        self._consume = consume
        self._count_refusal = counters or (lambda signal, reason: None)
        self._authorize = authorize
        limit = max_message_bytes or _DEFAULT_MAX_MESSAGE_BYTES
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="otlp-grpc"),
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # gRPC binds with SO_REUSEPORT by default: a second collector on the same port
                # would start and silently take half the traffic instead of failing.
                ("grpc.so_reuseport", 0),
            ],
        )
        for spec in SPECS.values():
            handler = grpc.unary_unary_rpc_method_handler(
                self._handler(spec),
                request_deserializer=None,
                response_serializer=lambda message: message.SerializeToString(),
            )
            self._server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(spec.grpc_service, {"Export": handler}),)
            )
        try:
            self.port = self._server.add_insecure_port(f"{host}:{port}")
        except RuntimeError as exc:  # grpc's way of saying the address is in use
            self.port = 0
            cause: Exception | None = exc
        else:
            cause = None
        if self.port == 0:
            raise OSError(f"cannot bind OTLP/gRPC on {host}:{port}: address in use or unavailable") from cause
        self.host = host

    def _handler(self, spec: SignalSpec) -> Callable[[bytes, grpc.ServicerContext], Message]:
        def export(raw: bytes, context: grpc.ServicerContext) -> Message:
            if self._authorize is not None:
                self._check(spec, context)
            try:
                request = spec.request.FromString(raw)
            except DecodeError as exc:
                self._count_refusal(spec.signal, "malformed")
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed OTLP protobuf: {exc}")
            try:
                return build_response(spec, self._consume(spec.signal, request, raw))
            except Backpressure as bp:
                context.set_trailing_metadata((("google.rpc.retryinfo-bin", _retry_info(bp.retry_after_s)),))
                context.abort(grpc.StatusCode.UNAVAILABLE, bp.reason)
            except RejectedError as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise AssertionError("unreachable: abort raises")

        return export

    def _check(self, spec: SignalSpec, context: grpc.ServicerContext) -> None:
        assert self._authorize is not None
        header = next((str(v) for k, v in context.invocation_metadata() if k == "authorization"), None)
        try:
            self._authorize(header)
        except Unauthenticated as exc:
            self._count_refusal(spec.signal, "unauthenticated")
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        except Forbidden as exc:
            self._count_refusal(spec.signal, "forbidden")
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))

    def start(self) -> None:
        self._server.start()

    def stop(self, grace_s: float = 5.0) -> None:
        self._server.stop(grace_s).wait(grace_s + 1.0)


def _retry_info(seconds: float) -> bytes:
    whole = int(seconds)
    delay = Duration(seconds=whole, nanos=int((seconds - whole) * 1e9))
    return bytes(error_details_pb2.RetryInfo(retry_delay=delay).SerializeToString())


# -- HTTP ---------------------------------------------------------------------------------------

_PROTOBUF = "application/x-protobuf"
_JSON = "application/json"


def http_routes(
    consume: Consume,
    *,
    max_message_bytes: int | None = None,
    count_refusal: Callable[[Signal, str], None] | None = None,
    authorize: Authorize | None = None,
) -> list[Route]:
    """Starlette routes for OTLP/HTTP; mount them in any app (the collector's or the bridge's)."""
    limit = max_message_bytes or _DEFAULT_MAX_MESSAGE_BYTES
    refuse = count_refusal or (lambda signal, reason: None)

    def endpoint(spec: SignalSpec) -> Callable[[Request], Any]:
        async def export(request: Request) -> Response:
            content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if authorize is not None:
                refusal = _refusal(authorize, request.headers.get("authorization"))
                if refusal is not None:
                    refuse(spec.signal, "unauthenticated" if refusal[0] == 401 else "forbidden")
                    answer = content_type if content_type in (_PROTOBUF, _JSON) else _JSON
                    challenge = {"WWW-Authenticate": 'Bearer realm="otlp"'} if refusal[0] == 401 else None
                    return _status(refusal[0], refusal[1], answer, headers=challenge)
            if content_type not in (_PROTOBUF, _JSON):
                refuse(spec.signal, "unsupported_media_type")
                return _status(415, f"unsupported content type {content_type!r}: use {_PROTOBUF} or {_JSON}", _JSON)
            declared = request.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > limit:
                refuse(spec.signal, "too_large")
                return _status(413, f"request of {declared} bytes exceeds the {limit}-byte limit", content_type)
            body = await _read_body(request, limit)
            if body is None:
                refuse(spec.signal, "too_large")
                return _status(413, f"request exceeds the {limit}-byte limit", content_type)
            try:
                body = _decompress(body, request.headers.get("content-encoding", "").lower(), limit)
                message = (
                    spec.request.FromString(body) if content_type == _PROTOBUF else otlp_json.parse(body, spec.request)
                )
            except (DecodeError, otlp_json.InvalidJson, _BadEncoding) as exc:
                refuse(spec.signal, "malformed")
                return _status(400, f"malformed OTLP request: {exc}", content_type)
            try:
                raw = body if content_type == _PROTOBUF else None
                outcome = await run_in_threadpool(consume, spec.signal, message, raw)
                response = build_response(spec, outcome)
            except Backpressure as bp:
                code = 503
                return _status(
                    code, bp.reason, content_type, headers={"Retry-After": str(max(1, round(bp.retry_after_s)))}
                )
            except RejectedError as exc:
                return _status(400, str(exc), content_type)
            return _encode(response, content_type, 200)

        return export

    return [
        Route(f"/v1/{signal.value}", endpoint(spec), methods=["POST"], name=f"otlp_{signal.value}")
        for signal, spec in SPECS.items()
    ]


def _refusal(authorize: Authorize, header: str | None) -> tuple[int, str] | None:
    try:
        authorize(header)
    except Unauthenticated as exc:
        return 401, str(exc)
    except Forbidden as exc:
        return 403, str(exc)
    return None


class _BadEncoding(ValueError):
    pass


async def _read_body(request: Request, limit: int) -> bytes | None:
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise _BadEncoding(f"unsupported content-encoding {encoding!r}")
    try:
        # Bounded inflate: a small bomb must not allocate gigabytes.
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
        out = inflater.decompress(body, limit + 1)
        if len(out) > limit or inflater.unconsumed_tail:
            raise _BadEncoding(f"decompressed request exceeds the {limit}-byte limit")
        return out
    except (zlib.error, gzip.BadGzipFile, EOFError) as exc:
        raise _BadEncoding(f"bad {encoding} body: {exc}") from exc


def _encode(message: Message, content_type: str, status_code: int, headers: dict[str, str] | None = None) -> Response:
    if content_type == _JSON:
        return Response(otlp_json.dump(message), status_code, headers=headers, media_type=_JSON)
    return Response(message.SerializeToString(), status_code, headers=headers, media_type=_PROTOBUF)


def _status(code: int, message: str, content_type: str, headers: dict[str, str] | None = None) -> Response:
    rpc_code = {
        400: code_pb2.INVALID_ARGUMENT,
        401: code_pb2.UNAUTHENTICATED,
        403: code_pb2.PERMISSION_DENIED,
        413: code_pb2.INVALID_ARGUMENT,
        415: code_pb2.INVALID_ARGUMENT,
        429: code_pb2.RESOURCE_EXHAUSTED,
        503: code_pb2.UNAVAILABLE,
    }.get(code, code_pb2.UNKNOWN)
    return _encode(status_pb2.Status(code=rpc_code, message=message), content_type, code, headers)
