"""Storage unavailable: back-pressure, then full recovery with nothing accepted lost or doubled."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from clickhouse_connect.driver.exceptions import OperationalError
from clickhouse_connect.driver.insert import InsertContext
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from flowscope.collector import otlp_json
from flowscope.collector.convert import Columns, convert_traces
from flowscope.collector.schema import SchemaOptions
from flowscope.collector.service import Collector, CollectorConfig
from flowscope.collector.store import Dsn, StoreError, connect, migrate
from flowscope.collector.types import Signal
from flowscope.collector.writer import ClickHouseWriter
from tests.collector.test_end_to_end import query
from tests.collector.test_receivers import json_spans, span


class OutageWriter(ClickHouseWriter):
    """The real writer, behind a switch standing for the network path to ClickHouse."""

    def __init__(self, dsn: Dsn, database: str) -> None:
        super().__init__(dsn, database)
        self.down = threading.Event()
        self.failures = 0

    def insert(self, columns: Columns, dedup_token: str | None = None) -> None:
        if self.down.is_set():
            self.failures += 1
            raise OperationalError("Connection refused (simulated network outage)")
        super().insert(columns, dedup_token)

    def insert_otlp(
        self, payloads: list[bytes], dedup_token: str | None = None, signal: Signal = Signal.TRACES
    ) -> None:
        if self.down.is_set():
            self.failures += 1
            raise OperationalError("Connection refused (simulated network outage)")
        super().insert_otlp(payloads, dedup_token, signal)


def outage_factory(writers: list[OutageWriter]) -> Callable[[Dsn, str], OutageWriter]:
    """Writers that start with ClickHouse unreachable; the test switches them back on."""

    def factory(dsn: Dsn, db: str) -> OutageWriter:
        writers.append(OutageWriter(dsn, db))
        writers[-1].down.set()
        return writers[-1]

    return factory


def request_body(batch: int) -> bytes:
    spans = [span(spanId=os.urandom(8).hex(), name=f"op-{batch}-{i}") for i in range(10)]
    return json.dumps(json_spans(*spans)).encode()


async def test_outage_pushes_back_then_recovers_without_loss(chdb_dsn: str, database: str) -> None:
    writers: list[OutageWriter] = []
    factory = outage_factory(writers)

    config = CollectorConfig(
        dsn=chdb_dsn, schema=SchemaOptions(database=database), grpc_port=0, http_port=0,
        max_queue_rows=100, flush_interval_s=0.02,
    )  # fmt: skip
    async with Collector(config, factory).running() as collector:
        base = f"http://127.0.0.1:{collector.http_port}"
        accepted = 0
        refused: httpx.Response | None = None
        async with httpx.AsyncClient(base_url=base) as client:
            for batch in range(30):
                response = await client.post(
                    "/v1/traces", content=request_body(batch), headers={"content-type": "application/json"}
                )
                if response.status_code == 200:
                    accepted += 10
                else:
                    refused = response
                    break
            assert refused is not None, "the queue bound must push back"
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "1"
            assert "storage unavailable" in refused.json()["message"]
            ready = await client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["storage"].startswith("unavailable: OperationalError")
            assert accepted == 100
            # The memory bound holds: accepted-but-unwritten rows never exceed the configured queue.
            assert collector.pipeline is not None
            assert collector.pipeline.queued_rows <= collector.pipeline.max_queue_rows == 100

            writers[0].down.clear()
            assert collector.pipeline is not None
            assert await asyncio.to_thread(collector.pipeline.flush, 30.0)
            assert (await client.get("/readyz")).status_code == 200
            after = await client.post(
                "/v1/traces", content=request_body(99), headers={"content-type": "application/json"}
            )
            assert after.status_code == 200
            assert await asyncio.to_thread(collector.pipeline.flush, 30.0)
            metrics = (await client.get("/metrics")).text
    assert writers[0].failures > 0
    rows = query(collector, "SELECT count(), uniqExact(SpanId) FROM {db}.otel_traces")
    assert rows == [(accepted + 10, accepted + 10)]
    assert 'flowscope_collector_refused_requests_total{reason="storage_unavailable",signal="traces"} 1.0' in metrics
    dropped = [line for line in metrics.splitlines() if line.startswith("flowscope_collector_dropped_rows_total{")]
    assert dropped == []


async def test_clean_shutdown_drains_everything_accepted(chdb_dsn: str, database: str) -> None:
    # A long flush interval: only the shutdown drain can write these rows.
    config = CollectorConfig(
        dsn=chdb_dsn, schema=SchemaOptions(database=database), grpc_port=0, http_port=0, flush_interval_s=3600
    )
    async with Collector(config).running() as collector:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{collector.http_port}") as client:
            for batch in range(5):
                response = await client.post(
                    "/v1/traces", content=request_body(batch), headers={"content-type": "application/json"}
                )
                assert response.status_code == 200
        assert query(collector, "SELECT count() FROM {db}.otel_traces") == [(0,)]
    assert query(collector, "SELECT count() FROM {db}.otel_traces") == [(50,)]


def test_unreachable_server_dsn_is_a_clear_error(database: str) -> None:
    collector = Collector(CollectorConfig(dsn="http://default:pw@127.0.0.1:9/otel", grpc_port=0, http_port=0))
    with pytest.raises(StoreError, match=r"cannot open ClickHouse at http://default:\*\*\*@127.0.0.1:9/otel"):
        collector.start()


def test_bad_dsn_scheme_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unsupported DSN scheme 'mysql'"):
        Collector(CollectorConfig(dsn="mysql://x"))


async def test_outage_with_spool_accepts_beyond_memory_then_drains_exactly_once(
    chdb_dsn: str, database: str, tmp_path: Path
) -> None:
    writers: list[OutageWriter] = []
    factory = outage_factory(writers)

    config = CollectorConfig(
        dsn=chdb_dsn, schema=SchemaOptions(database=database), grpc_port=0, http_port=0,
        max_queue_rows=100, flush_interval_s=0.02, spool_dir=tmp_path / "spool", spool_max_bytes=60_000,
    )  # fmt: skip
    async with Collector(config, factory).running() as collector:
        assert collector.pipeline is not None
        accepted = 0
        refused: httpx.Response | None = None
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{collector.http_port}") as client:
            for batch in range(200):
                response = await client.post(
                    "/v1/traces", content=request_body(batch), headers={"content-type": "application/json"}
                )
                if response.status_code != 200:
                    refused = response
                    break
                accepted += 10
                assert collector.pipeline.queued_rows <= 100, "memory stays within its bound"
            assert accepted > 100, "the spool takes what memory cannot"
            assert refused is not None and refused.status_code == 503
            assert "spool is full" in refused.json()["message"]
            metrics = (await client.get("/metrics")).text
            assert "flowscope_collector_spilled_requests_total" in metrics
            writers[0].down.clear()
            assert await asyncio.to_thread(collector.pipeline.flush, 60.0)
    rows = query(collector, "SELECT count(), uniqExact(SpanId) FROM {db}.otel_traces")
    assert rows == [(accepted, accepted)]


def test_the_embedded_writer_hands_freed_memory_back(chdb_dsn: str, database: str) -> None:
    dsn = Dsn.parse(chdb_dsn)
    client = connect(dsn)
    migrate(client, SchemaOptions(database=database))
    writer = ClickHouseWriter(dsn, database)
    try:
        body = json_spans(*[span(spanId=os.urandom(8).hex(), name=f"op-{i}") for i in range(50)])
        request = otlp_json.parse(json.dumps(body).encode(), ExportTraceServiceRequest)
        writer.insert(convert_traces(request).tables[0])
        # The embedded engine supports the purge (else the writer would have stopped asking).
        assert writer.purges == 1
        body = json_spans(*[span(spanId=os.urandom(8).hex(), name=f"again-{i}") for i in range(50)])
        writer.insert(convert_traces(otlp_json.parse(json.dumps(body).encode(), ExportTraceServiceRequest)).tables[0])
        # One insert context for the table, reused, and no batch left behind in it
        # (clickhouse-connect's context refers to itself: what it holds waits for a full GC).
        gc.collect()  # what is left is alive, not garbage waiting for a collection
        contexts = [o for o in gc.get_objects() if isinstance(o, InsertContext)]
        assert len(contexts) == 1
        assert contexts[0].empty and contexts[0].data is None
        rows = client.query(f"SELECT count() FROM {database}.otel_traces").result_rows
        assert rows == [(100,)]
    finally:
        writer.close()
        client.close()
