"""Batches ClickHouse refuses for good: split until the refused rows are isolated, those kept in
the dead-letter store, everything else written; the pipeline never wedges on them."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs
from opentelemetry.proto.metrics.v1.metrics_pb2 import Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from flowscope.collector import dead_letter
from flowscope.collector.admission import OFF
from flowscope.collector.schema import SchemaOptions
from flowscope.collector.service import Collector, CollectorConfig
from tests.collector.test_end_to_end import query

DAY_NS = 86_400 * 10**9
RESOURCE = Resource(attributes=[KeyValue(key="service.name", value=AnyValue(string_value="poison"))])
SERVICES = {
    "logs": "opentelemetry.proto.collector.logs.v1.LogsService",
    "metrics": "opentelemetry.proto.collector.metrics.v1.MetricsService",
}


def logs_request(bodies: list[str], days_ago: list[int] | None = None) -> bytes:
    now = time.time_ns()
    days = days_ago or [0] * len(bodies)
    records = [
        LogRecord(time_unix_nano=now - day * DAY_NS, severity_text="INFO", body=AnyValue(string_value=body))
        for body, day in zip(bodies, days, strict=True)
    ]
    request = ExportLogsServiceRequest(
        resource_logs=[ResourceLogs(resource=RESOURCE, scope_logs=[ScopeLogs(log_records=records)])]
    )
    return bytes(request.SerializeToString())


def gauge_request(days_ago: list[int], name: str = "queue.depth") -> bytes:
    now = time.time_ns()
    points = [NumberDataPoint(time_unix_nano=now - day * DAY_NS, as_double=float(day)) for day in days_ago]
    metric = Metric(name=name, gauge=Gauge(data_points=points))
    request = ExportMetricsServiceRequest(
        resource_metrics=[ResourceMetrics(resource=RESOURCE, scope_metrics=[ScopeMetrics(metrics=[metric])])]
    )
    return bytes(request.SerializeToString())


def export(port: int, signal: str, payload: bytes) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        channel.unary_unary(f"/{SERVICES[signal]}/Export")(payload, timeout=10)


def config(chdb_dsn: str, database: str, tmp_path: Path, **overrides: Any) -> CollectorConfig:
    # The intake time window is off: these tests are about what ClickHouse refuses.
    return CollectorConfig(
        dsn=chdb_dsn, schema=SchemaOptions(database=database), grpc_port=0, http_port=0,
        spool_dir=tmp_path / "spool", time_window=OFF, **overrides,
    )  # fmt: skip


def metric_lines(metrics: str, prefix: str) -> list[str]:
    return [line for line in metrics.splitlines() if line.startswith(prefix)]


@pytest.mark.parametrize(
    ("signal", "table", "column", "payload"),
    [
        # Valid log records: ClickHouse converts the request itself (the intake).
        ("logs", "otel_logs", "Timestamp", lambda: logs_request([f"day {d}" for d in range(101)], list(range(101)))),
        # Metrics: converted in Python, inserted as columns.
        ("metrics", "otel_metrics_gauge", "TimeUnix", lambda: gauge_request(list(range(101)))),
    ],
    ids=["intake", "columns"],
)
async def test_a_batch_over_the_partition_limit_is_split_and_fully_written(
    chdb_dsn: str, database: str, tmp_path: Path, signal: str, table: str, column: str, payload: Any
) -> None:
    # 101 days: ClickHouse refuses the block whole (more than 100 partitions, code 252),
    # the same code as the transient "too many parts".
    settings = config(chdb_dsn, database, tmp_path, flush_interval_s=0.05)
    async with Collector(settings).running() as collector:
        assert collector.pipeline is not None
        await asyncio.to_thread(export, collector.grpc_port, signal, payload())
        later = logs_request(["a later request"]) if signal == "logs" else gauge_request([0], "later")
        await asyncio.to_thread(export, collector.grpc_port, signal, later)
        assert await asyncio.to_thread(collector.pipeline.flush, 20.0), "the refused batch wedged the writer"
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{collector.http_port}") as client:
            metrics = (await client.get("/metrics")).text
            ready = await client.get("/readyz")
        assert ready.status_code == 200, ready.json()
    assert query(collector, f"SELECT count(), uniqExact(toDate({column})) FROM {{db}}.{table}") == [(102, 101)]
    assert metric_lines(metrics, f'flowscope_collector_split_inserts_total{{table="{table}"}}') != []
    assert metric_lines(metrics, "flowscope_dead_letter_rows_total{") == []
    assert metric_lines(metrics, "flowscope_collector_dropped_rows_total{") == []
    assert dead_letter.read(tmp_path / "spool" / "dead-letter") == []

    # Written means checkpointed: a restart replays nothing and stores nothing twice.
    async with Collector(settings).running() as again:
        assert again.replayed == 0
    assert query(again, f"SELECT count() FROM {{db}}.{table}") == [(102,)]


async def test_rows_refused_for_good_go_to_the_dead_letter_store_and_the_rest_is_written(
    chdb_dsn: str, database: str, tmp_path: Path
) -> None:
    # A long flush interval: the three requests form one round, written by flush().
    settings = config(chdb_dsn, database, tmp_path, flush_interval_s=3600)
    async with Collector(settings).running() as collector:
        assert collector.pipeline is not None
        # Real ClickHouse refusing one row for good: a constraint it violates (code 469).
        query(collector, "ALTER TABLE {db}.otel_logs ADD CONSTRAINT no_poison CHECK Body != 'poison'")
        await asyncio.to_thread(export, collector.grpc_port, "logs", logs_request([f"first {i}" for i in range(10)]))
        mixed = [f"second {i}" for i in range(5)] + ["poison"] + [f"second {i}" for i in range(5, 9)]
        await asyncio.to_thread(export, collector.grpc_port, "logs", logs_request(mixed))
        await asyncio.to_thread(export, collector.grpc_port, "logs", logs_request([f"third {i}" for i in range(10)]))
        assert await asyncio.to_thread(collector.pipeline.flush, 20.0)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{collector.http_port}") as client:
            metrics = (await client.get("/metrics")).text
            ready = await client.get("/readyz")
        assert ready.status_code == 200, ready.json()
    stored = query(collector, "SELECT Body FROM {db}.otel_logs ORDER BY Body")
    assert len(stored) == 29
    assert ("poison",) not in stored
    assert sorted(set(stored)) == stored, "nothing stored twice"

    letters = dead_letter.read(tmp_path / "spool" / "dead-letter")
    assert len(letters) == 1
    letter = letters[0]
    assert (letter["signal"], letter["table"], letter["rows"]) == ("logs", "otel_logs", 1)
    assert "VIOLATED_CONSTRAINT" in letter["reason"] or "469" in letter["reason"]
    assert [row["Body"] for row in letter["data"]] == ["poison"]
    assert letter["data"][0]["ServiceName"] == "poison"
    assert 'flowscope_dead_letter_rows_total{table="otel_logs"} 1.0' in metrics
    assert 'flowscope_dead_letter_records_total{signal="logs"} 1.0' in metrics
    assert metric_lines(metrics, "flowscope_collector_dropped_rows_total{") == []


async def test_a_batch_refused_row_by_row_ends_in_the_dead_letter_store_not_in_a_loop(
    chdb_dsn: str, database: str, tmp_path: Path
) -> None:
    # Every row refused: the isolation ends in single rows, each kept; nothing is retried forever.
    settings = config(chdb_dsn, database, tmp_path, flush_interval_s=3600)
    async with Collector(settings).running() as collector:
        assert collector.pipeline is not None
        query(collector, "ALTER TABLE {db}.otel_logs ADD CONSTRAINT no_poison CHECK Body NOT LIKE 'poison%'")
        await asyncio.to_thread(export, collector.grpc_port, "logs", logs_request([f"poison {i}" for i in range(4)]))
        assert await asyncio.to_thread(collector.pipeline.flush, 20.0)
    letters = dead_letter.read(tmp_path / "spool" / "dead-letter")
    assert sorted(row["Body"] for letter in letters for row in letter["data"]) == [f"poison {i}" for i in range(4)]
    assert query(collector, "SELECT count() FROM {db}.otel_logs") == [(0,)]


async def test_a_store_misconfigured_under_the_collector_is_an_outage_not_poison(
    chdb_dsn: str, database: str, tmp_path: Path
) -> None:
    """A table missing (dropped, detached, not migrated), or credentials and grants refused,
    is the operator's to fix: the data waits for it, nothing is dead-lettered."""
    settings = config(chdb_dsn, database, tmp_path, flush_interval_s=0.05)
    async with Collector(settings).running() as collector:
        assert collector.pipeline is not None
        query(collector, "DETACH TABLE {db}.otel_logs")
        try:
            for i in range(3):
                payload = logs_request([f"while detached {i}.{j}" for j in range(5)])
                await asyncio.to_thread(export, collector.grpc_port, "logs", payload)
            assert not await asyncio.to_thread(collector.pipeline.flush, 2.0)
            readiness = collector.readiness()
            assert readiness["ready"] is False
            assert "UNKNOWN_TABLE" in readiness["reason"]
        finally:
            query(collector, "ATTACH TABLE {db}.otel_logs")
        assert await asyncio.to_thread(collector.pipeline.flush, 30.0)
        assert collector.readiness()["ready"] is True
        metrics = collector.metrics.render().decode()
    stored = query(collector, "SELECT Body FROM {db}.otel_logs WHERE Body LIKE 'while detached%'")
    assert len(stored) == 15
    assert dead_letter.read(tmp_path / "spool" / "dead-letter") == []
    assert metric_lines(metrics, "flowscope_dead_letter_rows_total{") == []
