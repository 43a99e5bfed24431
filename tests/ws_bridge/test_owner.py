"""An execution's owner (workflow, user) is fixed by its first record: a later forged
workflow.started claiming another user or workflow does not let that user read it — not
over REST (get, list, events) and not over WebSocket (replay, live)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
import uuid
from typing import Any

import httpx
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs

from flowscope.stack import Stack
from flowscope.ws_bridge.history import History
from flowscope.ws_bridge.types import LiveEvent
from tests.ws_bridge.conftest import StackFactory, recv_until, ws_client, ws_url
from tests.ws_bridge.live_events import live_event

TOKENS = {
    "tok-alice": ("alice", frozenset({"user:alice"})),
    "tok-eve": ("eve", frozenset({"user:eve", "workflow:wf-eve", "ingest"})),
    "tok-engine": ("engine", frozenset({"ingest"})),
}


def _attr(key: str, value: int | str) -> KeyValue:
    any_value = AnyValue(int_value=value) if isinstance(value, int) else AnyValue(string_value=value)
    return KeyValue(key=key, value=any_value)


def _event(execution: str, seq: int, name: str, data: dict[str, Any], workflow: str = "wf-a") -> LogRecord:
    attributes = [_attr("workflow.execution.id", execution), _attr("workflow.event.seq", seq)]
    attributes += [_attr("workflow.id", workflow), _attr("workflow.name", workflow)]
    if name.startswith("node."):
        attributes += [_attr("workflow.node.id", "a"), _attr("workflow.node.type", "code")]
    return LogRecord(
        time_unix_nano=time.time_ns(),
        event_name=name,
        body=AnyValue(string_value=json.dumps(data)),
        attributes=attributes,
    )


def _started(execution: str, seq: int, user: str, workflow: str = "wf-a") -> LogRecord:
    data = {"userId": user, "totalNodes": 1, "nodes": [{"id": "a", "type": "code", "dependsOn": []}]}
    return _event(execution, seq, "workflow.started", data, workflow)


async def _send(stack: Stack, token: str, *records: LogRecord) -> None:
    assert stack.endpoints is not None
    request = ExportLogsServiceRequest(resource_logs=[ResourceLogs(scope_logs=[ScopeLogs(log_records=records)])])
    headers = {"content-type": "application/x-protobuf", "authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=stack.endpoints.otlp_http) as client:
        response = await client.post("/v1/logs", content=request.SerializeToString(), headers=headers)
    assert response.status_code == 200, response.text
    assert stack.collector.pipeline is not None
    assert await asyncio.to_thread(stack.collector.pipeline.flush, 30.0)


async def _rest(stack: Stack, token: str, execution: str) -> tuple[int, list[str], int]:
    """(GET status, executions listed, events status) as `token` sees them."""
    assert stack.endpoints is not None
    headers = {"authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=stack.endpoints.web, headers=headers) as client:
        got = await client.get(f"/api/v1/executions/{execution}")
        listed = (await client.get("/api/v1/executions")).json()["items"]
        events = await client.get(f"/api/v1/executions/{execution}/events")
    return got.status_code, [e["executionId"] for e in listed], events.status_code


async def test_a_forged_workflow_started_does_not_hand_the_execution_to_another_user(
    stack_factory: StackFactory,
) -> None:
    execution = uuid.uuid4().hex
    async with stack_factory(auth_tokens=TOKENS) as stack:
        await _send(stack, "tok-engine", _started(execution, 1, "alice"), _event(execution, 2, "node.started", {}))
        hour_ago = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).isoformat()
        eve_headers = {"Authorization": "Bearer tok-eve"}
        async with ws_client(ws_url(stack), additional_headers=eve_headers) as eve:
            await eve.send(json.dumps({"op": "subscribe", "id": "live", "rooms": ["user:eve", "workflow:wf-eve"]}))
            await recv_until(eve, lambda m: m.get("type") == "replay.done")
            # Eve claims the run twice: replacing its first event, and as a later one of her workflow.
            await _send(stack, "tok-eve", _started(execution, 1, "eve"), _started(execution, 7, "eve", "wf-eve"))
            await _send(stack, "tok-engine", _event(execution, 3, "node.completed", {"attempt": 1}))
            await eve.send(json.dumps({"op": "ping"}))
            live = await recv_until(eve, lambda m: m.get("type") == "pong")
            await eve.send(
                json.dumps({"op": "subscribe", "id": "replay", "rooms": [f"execution:{execution}"], "fromSeq": 1})
            )
            replay = await recv_until(eve, lambda m: m.get("type") == "replay.done" and m.get("id") == "replay")
            await eve.send(json.dumps({"op": "subscribe", "id": "since", "rooms": ["user:eve"], "since": hour_ago}))
            since = await recv_until(eve, lambda m: m.get("type") == "replay.done" and m.get("id") == "since")
        # The events of her own making for her own workflow are hers to see; nothing of alice's run.
        seen = [(m["seq"], m["workflowId"]) for m in live + replay + since if m.get("executionId") == execution]
        assert all(workflow == "wf-eve" for _, workflow in seen), seen

        status, listed, events = await _rest(stack, "tok-eve", execution)
        assert (status, execution in listed, events) == (404, False, 404)
        # Alice keeps her run, its events too, though the forgery at seq 1 replaced the stored
        # workflow.started that named her: the first stored record decides, not that event.
        status, listed, events = await _rest(stack, "tok-alice", execution)
        assert (status, execution in listed, events) == (200, True, 200)

        history = History(stack.collector.client, stack.collector.database)
        assert history.owner(execution) == ("wf-a", "alice")
        assert history.get_execution(execution)["userId"] == "alice"  # type: ignore[index]
        # The forged events claim another owner: they are not this execution's.
        assert [(e["seq"], e["type"]) for e in history.events(execution)] == [
            (2, "node.started"),
            (3, "node.completed"),
        ]


async def test_the_hub_keeps_the_first_owner_after_evicting_the_execution(stack_factory: StackFactory) -> None:
    async with stack_factory() as stack:
        assert stack.bridge is not None
        hub = stack.bridge.hub

        def started(execution: str, user: str, workflow: str) -> LiveEvent:
            return live_event(
                "workflow.started", 1, execution=execution, workflow=workflow, trace_id="", span_id="",
                data={"userId": user},
            )  # fmt: skip

        hub.publish([started("x", "alice", "wf-a")])
        hub.publish([{**started("x", "eve", "wf-a"), "seq": 2}, {**started("x", "eve", "wf-eve"), "seq": 3}])
        # "x" is stored nowhere: once the store has said so, its first workflow.started names the owner.
        await asyncio.wait_for(hub.settled(), 30)
        assert hub.user_of("x") == "alice"
        assert hub.stats()["foreignDropped"] == 1
        for i in range(hub.replay.max_executions + 1):
            hub.publish([started(f"other-{i}", "bo", "wf-b")])
        await asyncio.wait_for(hub.settled(), 60)
        assert "x" not in hub.replay
        hub.publish([{**started("x", "eve", "wf-a"), "seq": 4}])
        assert hub.user_of("x") == "alice"
