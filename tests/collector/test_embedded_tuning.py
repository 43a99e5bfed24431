"""The embedded engine's additions to the contrib DDL: skip indexes left to the merges, vertical merges.

Queries see the same rows either way."""

from __future__ import annotations

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from flowscope.collector.schema import SchemaOptions
from flowscope.collector.service import Collector
from flowscope.collector.store import Dsn, connect, insert_settings, migrate, tune_embedded
from flowscope.collector.writer import ClickHouseWriter


def test_only_the_embedded_engine_is_asked() -> None:
    embedded = insert_settings(Dsn.parse("chdb:///tmp/x"))
    assert embedded == {"os_thread_priority": 10, "materialize_skip_indexes_on_insert": 0}
    # A server may predate the setting, and an unknown setting fails the insert.
    assert insert_settings(Dsn.parse("http://u:p@clickhouse:8123/db")) == {}


def _request(first: int) -> bytes:
    spans = [
        Span(
            trace_id=(first + i + 1).to_bytes(16, "big"),
            span_id=(first + i + 1).to_bytes(8, "big"),
            name="step",
            start_time_unix_nano=1_700_000_000_000_000_000 + i,
            end_time_unix_nano=1_700_000_000_000_001_000 + i,
            attributes=[KeyValue(key="workflow.node.id", value=AnyValue(string_value=f"n{first + i}"))],
        )
        for i in range(100)
    ]
    request = ExportTraceServiceRequest(resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=spans)])])
    return bytes(request.SerializeToString())


def _index_bytes(client: object, database: str) -> list[int]:
    sql = (
        "SELECT secondary_indices_compressed_bytes FROM system.parts"
        " WHERE database = {db:String} AND table = 'otel_traces' AND active ORDER BY name"
    )
    return [row[0] for row in client.query(sql, parameters={"db": database}).result_rows]  # type: ignore[attr-defined]


def test_parts_get_their_skip_indexes_from_the_merge(chdb_dsn: str, database: str) -> None:
    dsn = Dsn.parse(chdb_dsn)
    client = connect(dsn)
    migrate(client, SchemaOptions(database=database))
    writer = ClickHouseWriter(dsn, database)
    find = (
        f"SELECT SpanName FROM {database}.otel_traces WHERE SpanAttributes['workflow.node.id'] = 'n150'"
        " SETTINGS use_skip_indexes = 1"
    )
    try:
        writer.insert_otlp([_request(0)])
        writer.insert_otlp([_request(100)])
        assert _index_bytes(client, database) == [0, 0], "inserted parts carry no skip index"
        assert client.query(find).result_rows == [("step",)]

        client.command(f"OPTIMIZE TABLE {database}.otel_traces FINAL")
        merged = _index_bytes(client, database)
        assert len(merged) == 1 and merged[0] > 0, "the merge built them"
        assert client.query(find).result_rows == [("step",)]
        count = client.query(f"SELECT count() FROM {database}.otel_traces").result_rows[0][0]
        assert count == 200
    finally:
        writer.close()
        client.close()


def test_the_embedded_collector_merges_its_tables_vertically(collector: Collector) -> None:
    client = collector.client()
    try:
        rows = client.query(
            "SELECT name, engine_full FROM system.tables WHERE database = {db:String} AND engine LIKE '%MergeTree'",
            parameters={"db": collector.database},
        ).result_rows
        assert {"otel_traces", "otel_logs", "node_executions"} <= {name for name, _ in rows}
        assert all("vertical_merge_algorithm_min_rows_to_activate = 1" in engine for _, engine in rows)
        # The contrib table settings stay as they were.
        traces = next(engine for name, engine in rows if name == "otel_traces")
        assert "ttl_only_drop_parts = 1" in traces and "index_granularity = 8192" in traces
    finally:
        client.close()


def test_vertically_merged_parts_hold_the_same_rows(chdb_dsn: str, database: str) -> None:
    dsn = Dsn.parse(chdb_dsn)
    client = connect(dsn)
    migrate(client, SchemaOptions(database=database))
    tune_embedded(client, database)
    tune_embedded(client, database)  # idempotent: every embedded start applies it
    writer = ClickHouseWriter(dsn, database)
    columns = "SpanId, SpanName, SpanAttributes, Duration"
    try:
        for first in (0, 100, 200):
            writer.insert_otlp([_request(first)])
        sql = f"SELECT {columns} FROM {database}.otel_traces ORDER BY SpanId"
        before = client.query(sql).result_rows
        client.command(f"OPTIMIZE TABLE {database}.otel_traces FINAL")
        assert len(_index_bytes(client, database)) == 1, "merged into one part"
        assert client.query(sql).result_rows == before and len(before) == 300
    finally:
        writer.close()
        client.close()
