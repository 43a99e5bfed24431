"""Acknowledged means durable: kill -9 the collector mid-stream, restart, count every acknowledged
span exactly once in ClickHouse."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExportResult

from flowscope.collector.schema import SchemaOptions
from flowscope.collector.service import Collector, CollectorConfig
from flowscope.collector.types import Signal
from tests.collector.test_end_to_end import query
from tests.collector.test_poison import logs_request

ROOT = Path(__file__).parents[2]
CLI = [sys.executable, "-m", "flowscope.cli"]


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWSCOPE_", "OTEL_"))}
    return {**base, "PYTHONPATH": str(ROOT), "NO_COLOR": "1", **extra}


def request(spans: int) -> tuple[bytes, list[str]]:
    built = []
    for i in range(spans):
        rnd = os.urandom(24)
        built.append(
            Span(
                trace_id=rnd[:16], span_id=rnd[16:], name=f"op {i}", kind=Span.SPAN_KIND_INTERNAL,
                start_time_unix_nano=time.time_ns(), end_time_unix_nano=time.time_ns() + 1000,
            )
        )  # fmt: skip
    message = ExportTraceServiceRequest(
        resource_spans=[
            ResourceSpans(
                resource=Resource(attributes=[KeyValue(key="service.name", value=AnyValue(string_value="durable"))]),
                scope_spans=[ScopeSpans(spans=built)],
            )
        ]
    )
    return message.SerializeToString(), [s.span_id.hex() for s in built]


async def start_up(data: Path, spool: Path, flush_s: str, grpc_port: int = 0) -> tuple[asyncio.subprocess.Process, int]:
    process = await asyncio.create_subprocess_exec(
        *CLI, "up", "--data-dir", str(data), "--spool-dir", str(spool),
        "--http-port", "0", "--otlp-grpc-port", str(grpc_port), "--otlp-http-port", "0",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(FLOWSCOPE_FLUSH_INTERVAL_S=flush_s), cwd=ROOT,
    )  # fmt: skip
    assert process.stdout is not None
    banner = ""
    async with asyncio.timeout(90):
        while "Press Ctrl-C" not in banner:
            line = await process.stdout.readline()
            assert line, f"flowscope up exited: {banner}"
            banner += line.decode()
    port = re.search(r"gRPC http://127\.0\.0\.1:(\d+)", banner)
    assert port is not None
    return process, int(port.group(1))


def load(port: int, stop: threading.Event, acked: list[str], enough: threading.Event) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    export = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")
    while not stop.is_set():
        payload, ids = request(50)
        try:
            export(payload, timeout=5)
        except grpc.RpcError:
            continue  # not acknowledged: the generator does not count it (and does not retry)
        acked.extend(ids)
        if len(acked) >= 3_000:
            enough.set()
    channel.close()


async def stored_span_ids(data: Path) -> list[str]:
    process = await asyncio.create_subprocess_exec(
        *CLI, "sql", "SELECT SpanId FROM otel.otel_traces", "--server", "http://127.0.0.1:9",
        "--data-dir", str(data), "--format", "csv",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(), cwd=ROOT,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode()
    return out.decode().split()[1:]


@pytest.mark.slow
@pytest.mark.parametrize("flush_s", ["0.2", "3600"], ids=["rounds-in-flight", "all-in-spool"])
async def test_kill_9_loses_nothing_acknowledged_and_duplicates_nothing(tmp_path: Path, flush_s: str) -> None:
    data, spool = tmp_path / "data", tmp_path / "spool"
    first, port = await start_up(data, spool, flush_s)
    stop, enough = threading.Event(), threading.Event()
    acked: list[str] = []
    sender = threading.Thread(target=load, args=(port, stop, acked, enough))
    sender.start()
    assert await asyncio.to_thread(enough.wait, 60), "the collector acknowledged too little"
    first.send_signal(signal.SIGKILL)
    await first.wait()
    stop.set()
    await asyncio.to_thread(sender.join)
    assert acked, "the load generator must have been acknowledged before the kill"

    second, _ = await start_up(data, spool, "0.05")
    second.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(second.communicate(), 120)
    assert second.returncode == 0, err.decode()
    assert "replaying" in err.decode() or flush_s == "0.2"

    stored = await stored_span_ids(data)
    missing = set(acked) - set(stored)
    assert not missing, f"{len(missing)} acknowledged spans lost of {len(acked)}"
    duplicates = len(stored) - len(set(stored))
    assert duplicates == 0, f"{duplicates} duplicate rows after replay"
    leftover = json.loads((spool / "checkpoint.json").read_text())
    assert leftover["inflight"] is None


class CountingExporter(OTLPSpanExporter):
    """The SDK's gRPC exporter, recording which spans the collector acknowledged."""

    def __init__(self, acked: list[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.acked = acked

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = super().export(spans)
        if result is SpanExportResult.SUCCESS:
            self.acked.extend(format(s.context.span_id, "016x") for s in spans if s.context is not None)
        return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.slow
async def test_kill_9_under_the_sdk_exporter_keeps_acknowledged_spans_exactly_once(tmp_path: Path) -> None:
    data, spool, port = tmp_path / "data", tmp_path / "spool", free_port()
    first, _ = await start_up(data, spool, "0.2", grpc_port=port)
    acked: list[str] = []
    exporter = CountingExporter(acked, endpoint=f"http://127.0.0.1:{port}", insecure=True, timeout=60)
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=20, max_export_batch_size=200))
    tracer = provider.get_tracer("durability")
    stop, enough = threading.Event(), threading.Event()

    def produce() -> None:
        while not stop.is_set():
            for _ in range(100):
                tracer.start_span("load").end()
            if len(acked) >= 3_000:
                enough.set()
            time.sleep(0.005)

    producer = threading.Thread(target=produce)
    producer.start()
    assert await asyncio.to_thread(enough.wait, 60)
    first.send_signal(signal.SIGKILL)
    await first.wait()
    # The exporter keeps retrying what was not acknowledged; the collector comes back on the same port.
    second, _ = await start_up(data, spool, "0.05", grpc_port=port)
    stop.set()
    await asyncio.to_thread(producer.join)
    assert await asyncio.to_thread(provider.force_flush, 90_000)
    await asyncio.to_thread(provider.shutdown)
    second.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(second.communicate(), 120)
    assert second.returncode == 0, err.decode()
    stored = await stored_span_ids(data)
    missing = set(acked) - set(stored)
    assert not missing, f"{len(missing)} acknowledged spans lost of {len(acked)}"
    assert len(stored) == len(set(stored)), f"{len(stored) - len(set(stored))} duplicate rows"


def test_a_new_spool_on_a_used_store_never_has_its_rounds_taken_for_repeats(
    chdb_dsn: str, database: str, tmp_path: Path
) -> None:
    """Seqs start at 1 in every new spool: its tokens carry the spool's own name, or
    ClickHouse would drop its first rounds as repeats of an earlier spool's (acknowledged,
    never stored)."""
    spool_dir = tmp_path / "spool"
    bodies = []
    for run in ("first spool", "second spool"):
        collector = Collector(
            CollectorConfig(
                dsn=chdb_dsn, schema=SchemaOptions(database=database), grpc_port=0, http_port=0, spool_dir=spool_dir
            )
        )
        collector.start()
        try:
            assert collector.pipeline is not None
            raw = logs_request([run])
            collector.pipeline.consume(Signal.LOGS, ExportLogsServiceRequest.FromString(raw), raw)
            assert collector.pipeline.flush(20.0)
            bodies = [r[0] for r in query(collector, "SELECT Body FROM {db}.otel_logs ORDER BY Body")]
        finally:
            collector.close()
        shutil.rmtree(spool_dir)  # lost, cleared, or another --spool-dir
    assert bodies == ["first spool", "second spool"]
