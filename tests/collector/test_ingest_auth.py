"""OTLP needs a bearer token with the "ingest" grant once auth is configured: gRPC metadata and
HTTP alike, as the SDK's OTEL_EXPORTER_OTLP_HEADERS sends it; no read grant implies it."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import jwt
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from flowscope.cli import send_token, with_demo_token
from flowscope.config import Settings
from flowscope.samples import catalog
from flowscope.stack import Stack
from flowscope.ws_bridge.app import Bridge, BridgeConfig
from flowscope.ws_bridge.auth import AuthConfig
from flowscope.ws_bridge.history import History
from tests.conftest import StackFactory
from tests.flowscope.test_cli import WORKFLOW, cli, cli_env

SECRET = "s3cret-for-tests-only-32-bytes-long!"
TOKENS = {
    "reader": ("ann", frozenset({"*"})),
    "writer": ("engine-1", frozenset({"ingest"})),
    "root": ("ops", frozenset({"admin"})),
}
EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


def _request() -> bytes:
    now = time.time_ns()
    span = Span(trace_id=b"\x01" * 16, span_id=b"\x02" * 8, name="s", start_time_unix_nano=now, end_time_unix_nano=now)
    request = ExportTraceServiceRequest(resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=[span])])])
    return bytes(request.SerializeToString())


def _grpc_export(port: int, token: str | None) -> grpc.StatusCode:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        export = channel.unary_unary(EXPORT, request_serializer=None, response_deserializer=None)
        metadata = (("authorization", f"Bearer {token}"),) if token is not None else None
        try:
            export(_request(), metadata=metadata, timeout=10)
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            return code
    return grpc.StatusCode.OK


def _refused(stack: Stack, reason: str) -> float:
    value = stack.collector.metrics.refused.labels("traces", reason)._value.get()
    return float(value)


async def _post(stack: Stack, token: str | None) -> httpx.Response:
    assert stack.endpoints is not None
    headers = {"content-type": "application/x-protobuf"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    async with httpx.AsyncClient(base_url=stack.endpoints.otlp_http) as client:
        return await client.post("/v1/traces", content=_request(), headers=headers)


def _jwt(rooms: list[str]) -> str:
    return jwt.encode({"sub": "svc", "exp": int(time.time()) + 600, "rooms": rooms}, SECRET, algorithm="HS256")


async def test_grpc_needs_a_token_with_the_ingest_grant(stack_factory: StackFactory) -> None:
    async with stack_factory(auth_tokens=TOKENS, jwt_secret=SECRET) as stack:
        port = stack.collector.grpc_port
        outcomes = {
            token: await asyncio.to_thread(_grpc_export, port, token)
            for token in (None, "nobody", "reader", "writer", "root", _jwt(["ingest"]), _jwt(["*"]))
        }
        assert list(outcomes.values()) == [
            grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.PERMISSION_DENIED,  # "*" reads everything but writes nothing
            grpc.StatusCode.OK,
            grpc.StatusCode.OK,
            grpc.StatusCode.OK,
            grpc.StatusCode.PERMISSION_DENIED,
        ]
        assert _refused(stack, "unauthenticated") == 2
        assert _refused(stack, "forbidden") == 2


async def test_http_answers_401_with_a_challenge_and_403_without_the_grant(stack_factory: StackFactory) -> None:
    async with stack_factory(auth_tokens=TOKENS) as stack:
        missing, invalid, reader, writer = [await _post(stack, t) for t in (None, "nobody", "reader", "writer")]
        assert missing.status_code == invalid.status_code == 401
        assert missing.headers["www-authenticate"].startswith("Bearer")
        assert reader.status_code == 403
        assert "ingest" in reader.text
        assert writer.status_code == 200
        assert _refused(stack, "unauthenticated") == 2
        assert _refused(stack, "forbidden") == 1


async def test_admin_reads_everything_and_ingest_reads_nothing(stack_factory: StackFactory) -> None:
    async with stack_factory(auth_tokens=TOKENS) as stack:
        assert stack.endpoints is not None
        async with httpx.AsyncClient(base_url=stack.endpoints.web) as client:
            answers = {}
            for token in ("writer", "root"):
                headers = {"authorization": f"Bearer {token}"}
                me = (await client.get("/api/v1/me", headers=headers)).json()
                sql = await client.post("/api/v1/sql", json={"sql": "SELECT 1"}, headers=headers)
                answers[token] = (me["unrestricted"], me["rooms"], sql.status_code)
        assert answers == {"writer": (False, [], 403), "root": (True, ["all"], 200)}


@pytest.mark.parametrize("protocol", ["grpc", "http"])
async def test_the_sdk_sends_the_token_from_otel_exporter_otlp_headers(
    stack_factory: StackFactory, monkeypatch: pytest.MonkeyPatch, protocol: str
) -> None:
    async with stack_factory(auth_tokens=TOKENS) as stack:
        assert stack.endpoints is not None
        monkeypatch.delenv("OTEL_EXPORTER_OTLP_HEADERS", raising=False)
        results = []
        for token in (None, "writer"):
            send_token(token)
            results.append(await asyncio.to_thread(_sdk_export, stack, protocol))
        assert results == [SpanExportResult.FAILURE, SpanExportResult.SUCCESS]


def _sdk_export(stack: Stack, protocol: str) -> SpanExportResult:
    assert stack.endpoints is not None
    exporter: Any = (
        OTLPSpanExporter(endpoint=stack.endpoints.otlp_grpc, insecure=True, timeout=5)
        if protocol == "grpc"
        else HttpSpanExporter(endpoint=f"{stack.endpoints.otlp_http}/v1/traces", timeout=5)
    )
    provider = TracerProvider()
    captured: list[Any] = []
    provider.add_span_processor(SimpleSpanProcessor(_Capture(captured)))
    provider.get_tracer("t").start_span("step").end()
    try:
        result: SpanExportResult = exporter.export(captured)
        return result
    finally:
        exporter.shutdown()
        provider.shutdown()


class _Capture(SpanExporter):
    def __init__(self, into: list[Any]) -> None:
        self.into = into

    def export(self, spans: Any) -> SpanExportResult:
        self.into.extend(spans)
        return SpanExportResult.SUCCESS


def test_send_token_keeps_other_headers_and_replaces_an_old_token() -> None:
    env = {"OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=a,Authorization=Bearer%20old"}
    send_token("new token", env)
    assert env["OTEL_EXPORTER_OTLP_HEADERS"] == "x-tenant=a,authorization=Bearer%20new%20token"
    untouched = {"OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=a"}
    send_token(None, untouched)
    assert untouched == {"OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=a"}


async def test_the_demo_mints_a_token_for_its_samples_alone_that_its_stack_accepts(stack_factory: StackFactory) -> None:
    open_settings, none = with_demo_token(Settings())
    assert none is None and open_settings.auth_tokens == {}, "an open stack stays open"
    settings, token = with_demo_token(Settings(auth_tokens=TOKENS))
    assert token is not None
    samples = [wf.id for wf in catalog().workflows]
    grants = {"ingest", "engine", *(f"workflow:{w}" for w in samples), *(f"control:workflow:{w}" for w in samples)}
    grants |= {"control:user:ana", "control:user:bo", "control:user:chen"}
    assert settings.auth_tokens[token] == ("flowscope-demo", frozenset(grants))
    async with stack_factory(auth_tokens=settings.auth_tokens) as stack:
        assert await asyncio.to_thread(_grpc_export, stack.collector.grpc_port, token) == grpc.StatusCode.OK
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{stack.endpoints.http_port}") as client:  # type: ignore[union-attr]
            me = await client.get("/api/v1/me", headers={"authorization": f"Bearer {token}"})
        assert me.json()["rooms"] == sorted(f"workflow:{w}" for w in samples) and me.json()["unrestricted"] is False
        assert sorted(me.json()["control"]) == sorted(samples)


async def test_flowscope_run_sends_its_token(stack_factory: StackFactory, tmp_path: Path) -> None:
    flow = tmp_path / "flow.yaml"
    flow.write_text(WORKFLOW)
    async with stack_factory(auth_tokens=TOKENS) as stack:
        assert stack.endpoints is not None
        args = ("run", str(flow), "--otlp-endpoint", stack.endpoints.otlp_grpc)
        with_flag = await cli(*args, "--token", "writer")
        from_env = await cli(*args, env=cli_env(FLOWSCOPE_TOKEN="writer"))
        without = await cli(*args)
        ids = [_execution_id(ran.stdout) for ran in (with_flag, from_env, without)]
        assert stack.collector.pipeline is not None
        assert await asyncio.to_thread(stack.collector.pipeline.flush, 30.0)
        history = History(stack.collector.client, stack.collector.database)
        stored = [history.get_execution(i) is not None for i in ids]
        assert stored == [True, True, False]


def _execution_id(stdout: str) -> str:
    found = re.search(r"execution ([0-9a-f]{32})", stdout)
    assert found is not None, stdout
    return found.group(1)


async def test_the_bridges_remote_feed_needs_an_ingest_token_too() -> None:
    bridge = Bridge(BridgeConfig(otlp_port=0, auth=AuthConfig(tokens=TOKENS)), None)
    async with bridge.running():
        outcomes = [await asyncio.to_thread(_grpc_export, bridge.otlp_port, t) for t in (None, "reader", "writer")]
    assert outcomes == [grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.OK]
