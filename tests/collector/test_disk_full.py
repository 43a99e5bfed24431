"""Out of disk space — the spool's (a real full tmpfs) and ClickHouse's (code 243) — is an outage:
clients are pushed back with a retryable status, nothing acknowledged is lost or stored twice,
the writer survives, /readyz says why, and writing resumes by itself when space returns."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from flowscope.collector.schema import SchemaOptions
from flowscope.collector.service import Collector, CollectorConfig
from flowscope.collector.spool import Spool, SpoolUnwritable
from flowscope.collector.types import Signal
from tests.collector.test_durability import CLI, ROOT, env, stored_span_ids
from tests.collector.test_end_to_end import query

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


@contextlib.contextmanager
def small_disk(path: Path, size: str = "4m") -> Iterator[Path]:
    """A file system of `size` that a test can fill: a tmpfs, mounted (root only) and unmounted."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"a full disk needs a small tmpfs, and mounting one failed (root only): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path) -> Path:
    """Take every free byte of `disk`; returns the file to delete to give them back."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as handle:
        while True:
            try:
                handle.write(bytes(1 << 16))
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
        while True:  # the last few bytes below one chunk
            try:
                handle.write(bytes(512))
            except OSError:
                return filler


def request(spans: int) -> tuple[bytes, list[str]]:
    now = time.time_ns()
    built = [
        Span(trace_id=os.urandom(16), span_id=os.urandom(8), name=f"op {i}", start_time_unix_nano=now,
             end_time_unix_nano=now + 1000)
        for i in range(spans)
    ]  # fmt: skip
    resource = Resource(attributes=[KeyValue(key="service.name", value=AnyValue(string_value="full"))])
    message = ExportTraceServiceRequest(
        resource_spans=[ResourceSpans(resource=resource, scope_spans=[ScopeSpans(spans=built)])]
    )
    return message.SerializeToString(), [s.span_id.hex() for s in built]


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def out_of_space_view(collector: Collector) -> None:
    """ClickHouse answering "not enough space" (code 243) part-way through an insert: after
    `otel_traces` stored the block, while a view below it writes — the insert path's second step.
    On while {db}.trip has a row."""
    query(collector, "CREATE TABLE {db}.trip (on UInt8) ENGINE = Memory")
    query(
        collector,
        "CREATE TABLE {db}.after (SpanId String) ENGINE = MergeTree ORDER BY SpanId"
        " SETTINGS non_replicated_deduplication_window = 1000",
    )
    query(
        collector,
        "CREATE MATERIALIZED VIEW {db}.after_mv TO {db}.after AS SELECT SpanId FROM {db}.otel_traces"
        " WHERE throwIf((SELECT count() FROM {db}.trip) > 0, 'not enough space', toInt16(243)) = 0"
        " SETTINGS allow_custom_error_code_in_throwif = 1",
    )


@pytest.mark.slow
async def test_full_disks_push_back_keep_everything_and_resume_exactly_once(
    chdb_dsn: str, database: str, tmp_path: Path
) -> None:
    with small_disk(tmp_path / "disk") as disk:
        config = CollectorConfig(
            dsn=chdb_dsn, schema=SchemaOptions(database=database), grpc_port=0, http_port=0,
            max_queue_rows=500, flush_interval_s=0.05, spool_dir=disk / "spool", spool_max_bytes=1 << 30,
        )  # fmt: skip
        async with Collector(config).running() as collector:
            pipeline = collector.pipeline
            assert pipeline is not None
            out_of_space_view(collector)
            query(collector, "INSERT INTO {db}.trip VALUES (1)")
            channel = grpc.insecure_channel(f"127.0.0.1:{collector.grpc_port}")
            export = channel.unary_unary(EXPORT)
            http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{collector.http_port}")
            acked: list[str] = []
            try:
                # ClickHouse out of space: accepted into memory, then spilled to the spool.
                for _ in range(20):
                    payload, ids = request(50)
                    await asyncio.to_thread(export, payload, timeout=10)
                    acked.extend(ids)
                await asyncio.to_thread(wait_for, lambda: "NOT_ENOUGH_SPACE" in (pipeline.last_error or ""), "243")

                # The spool's disk full too: refused, retryably, over gRPC and HTTP.
                filler = fill(disk)
                payload, _ = request(50)
                with pytest.raises(grpc.RpcError) as refused:
                    await asyncio.to_thread(export, payload, timeout=10)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
                assert "No space left on device" in (refused.value.details() or "")
                trailers = dict(refused.value.trailing_metadata() or ())
                assert "google.rpc.retryinfo-bin" in trailers
                response = await http.post(
                    "/v1/traces", content=payload, headers={"content-type": "application/x-protobuf"}
                )
                assert response.status_code == 503
                assert int(response.headers["retry-after"]) >= 1
                ready = await http.get("/readyz")
                assert ready.status_code == 503
                state = ready.json()
                assert "spool cannot write: No space left on device" in state["reason"]
                assert "storage unavailable" in state["reason"] and "NOT_ENOUGH_SPACE" in state["reason"]
                assert state["writer"] == "running" and pipeline.writer_alive

                # ClickHouse has space again, the spool's disk is still full: the writer
                # resumes by itself and records its progress (in the space the spool set aside).
                query(collector, "TRUNCATE TABLE {db}.trip")
                assert await asyncio.to_thread(pipeline.flush, 60.0)
                assert query(collector, "SELECT count() FROM {db}.otel_traces") == [(len(acked),)]

                filler.unlink()
                payload, ids = request(50)
                await asyncio.to_thread(export, payload, timeout=10)
                acked.extend(ids)
                assert await asyncio.to_thread(pipeline.flush, 30.0)

                async def ready_again() -> bool:
                    return (await http.get("/readyz")).status_code == 200

                deadline = time.monotonic() + 20
                while not await ready_again():
                    assert time.monotonic() < deadline, (await http.get("/readyz")).json()
                    await asyncio.sleep(0.1)
                metrics = (await http.get("/metrics")).text
            finally:
                channel.close()
                await http.aclose()
        stored = query(collector, "SELECT count(), uniqExact(SpanId) FROM {db}.otel_traces")
        after = query(collector, "SELECT count(), uniqExact(SpanId) FROM {db}.after")
        stored_ids = {row[0] for row in query(collector, "SELECT SpanId FROM {db}.otel_traces")}
    # Every acknowledged span exactly once, in the table and in the view that failed part-way.
    assert stored == [(len(acked), len(acked))] == after
    assert stored_ids == set(acked)
    assert 'reason="spool_unwritable"' in metrics
    assert [line for line in metrics.splitlines() if line.startswith("flowscope_collector_dropped_rows_total{")] == []


def test_a_spool_write_the_disk_refuses_is_cut_off_and_the_spool_goes_on(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", "1m") as disk:
        spool = Spool(disk / "spool")
        try:
            first = spool.append(Signal.TRACES, b"a" * 1000)
            spool.wait_durable(first)
            filler = fill(disk)
            with pytest.raises(SpoolUnwritable, match="No space left on device"):
                spool.append(Signal.TRACES, b"b" * 200_000)
            filler.unlink()
            second = spool.append(Signal.TRACES, b"c" * 1000)
            spool.wait_durable(second)
            assert [(r.seq, r.payload[:1]) for r in spool.replay()] == [(first, b"a"), (second, b"c")]
        finally:
            spool.close()
        reopened = Spool(disk / "spool")
        try:
            # Appends to the reopened segment are visible (and durable) as soon as synced.
            third = reopened.append(Signal.TRACES, b"d" * 1000)
            reopened.wait_durable(third)
            assert [r.payload[:1] for r in reopened.replay()] == [b"a", b"c", b"d"]
        finally:
            reopened.close()


async def test_an_insert_that_fails_part_way_is_completed_not_repeated(chdb_dsn: str, database: str) -> None:
    # No spool: exactly-once must not depend on spool replay.
    config = CollectorConfig(
        dsn=chdb_dsn, schema=SchemaOptions(database=database), grpc_port=0, http_port=0, flush_interval_s=0.05
    )
    async with Collector(config).running() as collector:
        pipeline = collector.pipeline
        assert pipeline is not None
        out_of_space_view(collector)
        query(collector, "INSERT INTO {db}.trip VALUES (1)")
        acked: list[str] = []
        with grpc.insecure_channel(f"127.0.0.1:{collector.grpc_port}") as channel:
            export = channel.unary_unary(EXPORT)
            for _ in range(5):
                payload, ids = request(50)
                await asyncio.to_thread(export, payload, timeout=10)
                acked.extend(ids)
        # otel_traces has stored the rows; the view below it refuses: the insert failed part-way.
        await asyncio.to_thread(wait_for, lambda: "NOT_ENOUGH_SPACE" in (pipeline.last_error or ""), "243")
        assert query(collector, "SELECT count() FROM {db}.otel_traces")[0][0] > 0
        query(collector, "TRUNCATE TABLE {db}.trip")
        assert await asyncio.to_thread(pipeline.flush, 30.0)
    assert query(collector, "SELECT count(), uniqExact(SpanId) FROM {db}.otel_traces") == [(250, 250)]
    assert query(collector, "SELECT count(), uniqExact(SpanId) FROM {db}.after") == [(250, 250)]


@pytest.mark.slow
async def test_clickhouse_on_a_full_disk_keeps_everything_acknowledged(tmp_path: Path) -> None:
    # The real thing: `flowscope up` with its embedded ClickHouse's data on a small tmpfs,
    # filled. The spool is elsewhere, so requests are still acknowledged meanwhile.
    with small_disk(tmp_path / "disk", "64m") as disk:
        process = await asyncio.create_subprocess_exec(
            *CLI, "up", "--data-dir", str(disk / "data"), "--spool-dir", str(tmp_path / "spool"),
            "--http-port", "0", "--otlp-grpc-port", "0", "--otlp-http-port", "0",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(FLOWSCOPE_FLUSH_INTERVAL_S="0.1"), cwd=ROOT,
        )  # fmt: skip
        assert process.stdout is not None
        banner = ""
        try:
            async with asyncio.timeout(90):
                while "Press Ctrl-C" not in banner:
                    line = await process.stdout.readline()
                    assert line, f"flowscope up exited: {banner}"
                    banner += line.decode()
            grpc_port = re.search(r"gRPC http://127\.0\.0\.1:(\d+)", banner)
            web = re.search(r"ready: (http://\S+)/readyz", banner)
            assert grpc_port is not None and web is not None, banner
            filler = fill(disk)
            acked: list[str] = []
            async with httpx.AsyncClient(base_url=web.group(1)) as http:
                with grpc.insecure_channel(f"127.0.0.1:{grpc_port.group(1)}") as channel:
                    export = channel.unary_unary(EXPORT)
                    for _ in range(40):
                        payload, ids = request(50)
                        await asyncio.to_thread(export, payload, timeout=10)
                        acked.extend(ids)
                deadline = time.monotonic() + 30
                while "NOT_ENOUGH_SPACE" not in (state := (await http.get("/readyz")).json()).get("reason", ""):
                    assert time.monotonic() < deadline, state
                    await asyncio.sleep(0.1)
                assert state["writer"] == "running" and not state["ready"]
                filler.unlink()
                deadline = time.monotonic() + 60
                while not (state := (await http.get("/readyz")).json())["ready"] or state["queuedRows"]:
                    assert time.monotonic() < deadline, state
                    await asyncio.sleep(0.1)
                metrics = (await http.get("/metrics")).text
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGINT)
                await asyncio.wait_for(process.communicate(), 60)
        stored = await stored_span_ids(disk / "data")
    assert len(stored) == len(acked) and set(stored) == set(acked)
    assert [line for line in metrics.splitlines() if line.startswith("flowscope_collector_dropped_rows_total{")] == []
