"""Intake refuses what the readers cannot fold — malformed lifecycle events, records outside
the time window, JSON nested beyond reason — each with a reason; and the readers tolerate
such rows stored before intake checked them."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs

from flowscope.collector.admission import OFF, TimeWindow
from flowscope.collector.convert import convert_logs
from flowscope.collector.service import Collector
from flowscope.collector.writer import ClickHouseWriter
from flowscope.config import Settings
from flowscope.ws_bridge.events import events_from_logs
from tests.collector.test_end_to_end import query
from tests.conftest import CollectorFactory, StackFactory
from tests.flowscope.test_cli import cli

DAY_NS = 86_400 * 10**9


def attr(key: str, value: Any) -> KeyValue:
    any_value = AnyValue(int_value=value) if isinstance(value, int) else AnyValue(string_value=value)
    return KeyValue(key=key, value=any_value)


def event(
    execution: str, seq: int | str, name: str, data: Any, *, at: int | None = None, workflow: str = "wf"
) -> LogRecord:
    attributes = [
        attr("workflow.execution.id", execution),
        attr("workflow.event.seq", seq),
        attr("workflow.id", workflow),
    ]
    if name.startswith("node."):
        attributes += [attr("workflow.node.id", "a"), attr("workflow.node.type", "code")]
    body = data if isinstance(data, str) else json.dumps(data)
    return LogRecord(
        time_unix_nano=time.time_ns() if at is None else at,
        event_name=name,
        body=AnyValue(string_value=body),
        attributes=attributes,
    )


def logs(*records: LogRecord) -> ExportLogsServiceRequest:
    return ExportLogsServiceRequest(resource_logs=[ResourceLogs(scope_logs=[ScopeLogs(log_records=records)])])


MALFORMED: dict[str, tuple[str, int | str, Any]] = {
    "attempt": ("node.started", 2, {"attempt": "abc"}),
    "nodes": ("workflow.started", 3, {"nodes": [{}]}),
    "seq": ("node.completed", "x1", {"attempt": 1}),
    "body": ("node.completed", 4, "[1, 2]"),
}


async def _post(collector: Collector, body: bytes, content_type: str = "application/x-protobuf") -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{collector.http_port}") as client:
        return await client.post("/v1/logs", content=body, headers={"content-type": content_type})


async def _stored_seqs(collector: Collector, execution: str) -> list[int]:
    assert collector.pipeline is not None
    assert await asyncio.to_thread(collector.pipeline.flush, 30.0)
    rows = query(
        collector, "SELECT Seq FROM {db}.workflow_events FINAL WHERE ExecutionId = {e:String} ORDER BY Seq", e=execution
    )
    return [int(r[0]) for r in rows]


async def test_malformed_lifecycle_events_are_refused_with_reasons_and_the_rest_stored(collector: Collector) -> None:
    execution = uuid.uuid4().hex
    good = event(execution, 1, "node.started", {"attempt": 1})
    bad = [event(execution, seq, name, data) for name, seq, data in MALFORMED.values()]
    response = await _post(collector, logs(good, *bad).SerializeToString())
    assert response.status_code == 200
    partial = ExportLogsServiceResponse.FromString(response.content).partial_success
    assert partial.rejected_log_records == len(MALFORMED)
    for needle in ("'attempt' must be a non-negative integer", "'id'", "workflow.event.seq", "JSON object"):
        assert needle in partial.error_message
    assert await _stored_seqs(collector, execution) == [1]


async def test_a_request_of_only_malformed_events_is_invalid_argument_over_grpc(collector: Collector) -> None:
    execution = uuid.uuid4().hex
    request = logs(event(execution, 1, "node.started", {"attempt": "abc"}))
    with grpc.insecure_channel(f"127.0.0.1:{collector.grpc_port}") as channel:
        export = channel.unary_unary(
            "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
            request_serializer=None,
            response_deserializer=ExportLogsServiceResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as refused:
            await asyncio.to_thread(export, request.SerializeToString(), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "attempt" in (refused.value.details() or "")


async def test_records_outside_the_time_window_are_refused(collector_factory: CollectorFactory) -> None:
    now = time.time_ns()
    execution = uuid.uuid4().hex
    request = logs(
        event(execution, 1, "node.started", {"attempt": 1}, at=now - 30 * DAY_NS),
        event(execution, 2, "node.started", {"attempt": 1}, at=now + 2 * DAY_NS),
        event(execution, 3, "node.started", {"attempt": 1}, at=now - 400 * DAY_NS),
        event(execution, 4, "node.started", {"attempt": 1}, at=0),
    )
    async with collector_factory() as collector:
        response = await _post(collector, request.SerializeToString())
        partial = ExportLogsServiceResponse.FromString(response.content).partial_success
        assert partial.rejected_log_records == 3
        assert "in the future" in partial.error_message and "days old" in partial.error_message
        assert await _stored_seqs(collector, execution) == [1]
    # Configurable, and 0 turns a side off.
    async with collector_factory(time_window=TimeWindow(max_future_s=3 * 86_400, max_age_days=0)) as collector:
        response = await _post(collector, request.SerializeToString())
        assert response.status_code == 200
        assert await _stored_seqs(collector, execution) == [1, 2, 3, 4]


def test_the_time_window_comes_from_flowscope_settings() -> None:
    settings = Settings.from_env({"FLOWSCOPE_INGEST_MAX_FUTURE_S": "60", "FLOWSCOPE_INGEST_MAX_AGE_DAYS": "0"})
    assert settings.time_window == TimeWindow(60.0, 0)
    assert Settings().time_window == TimeWindow(86_400.0, 365)
    assert TimeWindow(0, 0) == OFF


async def test_json_nested_3000_levels_is_a_400_and_the_collector_keeps_serving(collector: Collector) -> None:
    deep = b'{"resourceLogs": [' + b"[" * 3000 + b"]" * 3000 + b"]}"
    response = await _post(collector, deep, "application/json")
    assert response.status_code == 400
    assert response.json()["code"] == 3 and "nested deeper" in response.json()["message"]
    execution = uuid.uuid4().hex
    fine = json.dumps(
        {
            "resourceLogs": [
                {
                    "scopeLogs": [
                        {
                            "logRecords": [
                                {
                                    "timeUnixNano": str(time.time_ns()),
                                    "eventName": "node.started",
                                    "body": {"stringValue": '{"attempt": 1}'},
                                    "attributes": [
                                        {"key": "workflow.execution.id", "value": {"stringValue": execution}},
                                        {"key": "workflow.event.seq", "value": {"intValue": "1"}},
                                    ],
                                }
                            ]
                        }
                    ]
                }
            ]
        }
    ).encode()
    assert (await _post(collector, fine, "application/json")).status_code == 200
    assert await _stored_seqs(collector, execution) == [1]


async def test_rows_stored_before_validation_still_read_as_200(stack_factory: StackFactory) -> None:
    execution = uuid.uuid4().hex
    stored = logs(
        event(execution, 1, "workflow.started", {"nodes": [{}, {"id": "a", "dependsOn": "x"}], "totalNodes": "2"}),
        event(execution, 2, "node.started", {"attempt": "abc"}),
        event(execution, 3, "node.completed", {"attempt": 1, "durationMs": "slow", "usage": [1]}),
        event(execution, 4, "node.failed", "[1, 2]"),
        event(execution, "x1", "node.retrying", {"attempt": 2}),
    )
    async with stack_factory() as stack:
        assert stack.endpoints is not None and stack.bridge is not None
        # Bypassing intake, as rows written before it checked event bodies.
        writer = ClickHouseWriter(stack.collector.dsn, stack.collector.database)
        try:
            for table in convert_logs(stored).tables:
                await asyncio.to_thread(writer.insert, table)
        finally:
            writer.close()
        # The live side reads the same records (a remote feed, or a stream before this check).
        stack.bridge.hub.publish(events_from_logs(stored))
        async with httpx.AsyncClient(base_url=stack.endpoints.web) as client:
            got = await client.get(f"/api/v1/executions/{execution}")
            events = await client.get(f"/api/v1/executions/{execution}/events")
        assert got.status_code == 200, got.text
        body = got.json()
        assert [n["nodeId"] for n in body["nodes"]] == ["a"]
        assert body["nodes"][0]["dependsOn"] == [] and body["nodes"][0]["attempts"] == 1
        assert events.status_code == 200
        assert [e["seq"] for e in events.json()["items"]] == [1, 2, 3, 4]
        assert stack.bridge.hub.user_of(execution) is None


async def test_flowscope_watch_reads_rows_stored_before_validation(stack_factory: StackFactory) -> None:
    execution = uuid.uuid4().hex
    stored = logs(
        event(execution, 1, "workflow.started", {"nodes": [{}, {"id": "a", "type": 5}], "totalNodes": 1}),
        event(execution, 2, "node.started", {"attempt": "abc"}),
        event(execution, 3, "execution.progress", {"progress": "most"}),
        event(execution, 4, "node.completed", {"attempt": 1, "durationMs": "slow"}),
        event(execution, 5, "workflow.completed", {"result": "success"}),
    )
    async with stack_factory() as stack:
        assert stack.endpoints is not None
        writer = ClickHouseWriter(stack.collector.dsn, stack.collector.database)
        try:
            for table in convert_logs(stored).tables:
                await asyncio.to_thread(writer.insert, table)
        finally:
            writer.close()
        watched = await cli("watch", execution, "--server", stack.endpoints.web)
    assert watched.returncode == 0, watched.stderr
    assert "summary: success, 1/1 nodes succeeded" in watched.stdout


async def test_a_repeated_key_cannot_wave_a_malformed_event_through(collector: Collector) -> None:
    # Storage keeps a repeated key's last value; a decoy first value must not make the check
    # read the record as no lifecycle event at all.
    execution = uuid.uuid4().hex
    decoy = event(execution, "abc", "node.completed", {"durationMs": "NaN", "nodes": 7})
    decoy.attributes.insert(0, attr("workflow.execution.id", ""))
    decoy.attributes.insert(0, attr("workflow.event.seq", 1))
    response = await _post(collector, logs(decoy).SerializeToString())
    assert response.status_code == 400, response.content
    assert await _stored_seqs(collector, execution) == []


async def test_json_with_an_integer_too_long_to_convert_is_a_400(collector: Collector) -> None:
    response = await _post(collector, b'{"resourceLogs": [], "x": ' + b"9" * 5000 + b"}", "application/json")
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["message"]
