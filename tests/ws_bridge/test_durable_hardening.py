"""The stack's guards around rollback and resume (docs/durability.md, "Rollback"): one rollback
per run across engines, held from its routing until its `workflow.rolled_back` arrives on the
live feed (or its engine is gone); a seq past the protocol's range — only a forged event reaches
it — is not where a rollback numbers on. Scripted engines over the real control channel, events
through the bridge's real OTLP feed."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs
from websockets.asyncio.client import ClientConnection

from flowscope.collector.types import Signal
from flowscope.contract import attributes as t
from flowscope.contract.rollback import MAX_AFTER_SEQ
from flowscope.engine.checkpoints import open_checkpoint_store
from flowscope.ws_bridge import control_resume
from flowscope.ws_bridge.app import Bridge
from flowscope.ws_bridge.control_rollback import forgotten_nodes as forgotten
from flowscope.ws_bridge.control_rollback import points_of
from tests.ws_bridge.conftest import recv_until, ws_client
from tests.ws_bridge.control_peer import WF_A, ScriptedEngine, control_bridge, http, run, scripted_engine, until


async def _op(ws: ClientConnection, **request: Any) -> dict[str, Any]:
    await ws.send(json.dumps(request))
    [*_, result] = await recv_until(ws, lambda m: m.get("type") in ("control.result", "error"))
    return result


def feed_event(bridge: Bridge, execution_id: str, kind: str, seq: int, data: dict[str, Any]) -> None:
    """One workflow event into the bridge's live feed, as the collector hands it over."""
    attrs = [
        KeyValue(key=t.EXECUTION_ID, value=AnyValue(string_value=execution_id)),
        KeyValue(key=t.WORKFLOW_ID, value=AnyValue(string_value="wf-a")),
        KeyValue(key=t.EVENT_SEQ, value=AnyValue(string_value=str(seq))),
    ]
    record = LogRecord(event_name=kind, attributes=attrs, body=AnyValue(string_value=json.dumps(data)))
    request = ExportLogsServiceRequest(resource_logs=[ResourceLogs(scope_logs=[ScopeLogs(log_records=[record])])])
    bridge.feed(Signal.LOGS, request)


async def ended_on_a_gone_engine(port: int, execution_id: str) -> None:
    async with scripted_engine(port) as ran:
        await ran.hello("eng-a", [WF_A], [run(execution_id)])
        await ran.send({"type": "finished", "executionId": execution_id, "workflowId": "wf-a", "result": "failure"})
        await ran.sync()


async def commands(*engines: ScriptedEngine) -> list[dict[str, Any]]:
    for engine in engines:
        await engine.sync()
    return [c for engine in engines for c in engine.taken("command")]


async def test_one_rollback_per_run_across_engines_until_its_rolled_back_arrives() -> None:
    async with (
        control_bridge() as (bridge, port, _lost),
        ws_client(f"ws://127.0.0.1:{port}/ws?token=operator") as ws,
        ws_client(f"ws://127.0.0.1:{port}/ws?token=operator") as other,
    ):
        await ended_on_a_gone_engine(port, "r1")
        async with scripted_engine(port) as b, scripted_engine(port) as c:
            await b.hello("eng-b", [WF_A])
            await c.hello("eng-c", [WF_A])
            first = asyncio.create_task(_op(ws, op="rollback", id="1", executionId="r1", toNode="fetch"))
            await until(lambda: "r1" in bridge.control.rollbacks)
            # Both engines serve the run's workflow: the second rollback is the stack's 409, sent to none.
            second = await _op(other, op="rollback", id="2", executionId="r1", toNode="fetch")
            assert (second["ok"], second["code"]) == (False, "conflict") and "being rolled back" in second["error"]
            [command] = await commands(b, c)
            engine = b if command in b.taken("command") else c
            await engine.answer(command, executionId="r1", rollbackId="rb-1", toNode="fetch", compensate=["store"])
            assert (await first)["ok"] is True

            # Compensating now: neither a resume nor another rollback may start from what it undoes.
            for op in ("resume", "rollback"):
                refused = await _op(ws, op=op, id=op, executionId="r1", toNode="fetch")
                assert (refused["ok"], refused["code"]) == (False, "conflict"), refused
            assert len(await commands(b, c)) == 1

            feed_event(bridge, "r1", "workflow.rolled_back", 7, {"rollbackId": "another", "result": "success"})
            feed_event(bridge, "r1", "workflow.rolled_back", 8, {"rollbackId": "rb-1", "result": "success"})
            await until(lambda: "r1" not in bridge.control.rollbacks)
            resuming = asyncio.create_task(_op(ws, op="resume", id="3", executionId="r1"))
            async with asyncio.timeout(20):
                while not [f for f in await commands(b, c) if f["op"] == "resume"]:
                    assert not resuming.done(), resuming.result()
            resuming.cancel()


async def test_a_rollback_whose_engine_is_gone_holds_the_run_no_more() -> None:
    async with (
        control_bridge(control_timeout_s=0.2) as (bridge, port, _lost),
        ws_client(f"ws://127.0.0.1:{port}/ws?token=operator") as ws,
    ):
        await ended_on_a_gone_engine(port, "r2")
        async with scripted_engine(port) as b:
            await b.hello("eng-b", [WF_A])
            first = asyncio.create_task(_op(ws, op="rollback", id="1", executionId="r2", toNode="fetch"))
            command = await b.expect("command")
            await b.answer(command, executionId="r2", rollbackId="rb-2", toNode="fetch")
            assert (await first)["ok"] is True
            refused = await _op(ws, op="resume", id="2", executionId="r2")
            assert (refused["ok"], refused["code"]) == (False, "conflict"), refused
        await until(lambda: "eng-b" not in bridge.control.engines)

        # Its compensations died with it (once it may no longer come back): the run is free.
        def refused_no_more() -> bool:
            return bridge.control.rollbacks.refusal(bridge.control, "r2", "resume") is None

        await until(refused_no_more)
        assert "r2" not in bridge.control.rollbacks


async def test_a_forged_seq_past_the_protocols_range_is_not_where_a_rollback_numbers_on() -> None:
    async with control_bridge() as (bridge, port, _lost), ws_client(f"ws://127.0.0.1:{port}/ws?token=operator") as ws:
        await ended_on_a_gone_engine(port, "r3")
        feed_event(bridge, "r3", "node.completed", 5, {})
        feed_event(bridge, "r3", "node.completed", 2**63 - 5, {})  # an ingest token can write any seq
        await until(lambda: bridge.hub.last_seq("r3") == 2**63 - 5)
        async with scripted_engine(port) as b:
            await b.hello("eng-b", [WF_A])
            sending = asyncio.create_task(_op(ws, op="rollback", id="1", executionId="r3", toNode="fetch"))
            command = await b.expect("command")
            assert command["afterSeq"] <= MAX_AFTER_SEQ
            await b.answer(command, executionId="r3", rollbackId="rb-3", toNode="fetch")
            assert (await sending)["ok"] is True


async def stored(url: str, execution_id: str, run_input: Any, output: Any) -> None:
    store = open_checkpoint_store(url)
    try:
        await store.put_run(execution_id, "wf-a", "1", run_input)
        await store.put(execution_id, "fetch", output, workflow_id="wf-a", workflow_version="1", attempt=1)
    finally:
        store.close()


async def test_the_checkpoint_snapshot_masks_secret_named_keys(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'checkpoints.db'}"
    await stored(url, "s1", {"user": "ann", "password": "pw-IN"}, {"rows": 3, "auth": {"api_token": "t0k-OUT"}})
    async with control_bridge(checkpoints_url=url) as (_, port, _lost), http(port, "reader") as reader:
        answer = await reader.get("/api/v1/executions/s1/checkpoint")
        assert answer.status_code == 200, answer.text
        body = answer.json()
        # As the history and the telemetry show them: the values of secret-named keys never leave.
        assert body["input"]["value"] == {"user": "ann", "password": "[REDACTED]"}
        assert body["nodes"][0]["output"] == {"rows": 3, "auth": {"api_token": "[REDACTED]"}}
        assert "pw-IN" not in answer.text and "t0k-OUT" not in answer.text


async def test_a_store_error_shows_no_password_and_a_missing_store_is_not_created(tmp_path: Path) -> None:
    for url, told in (
        ("postgres://admin:hunter2pw@127.0.0.1/x", "unsupported checkpoint store URL scheme"),
        (f"sqlite:///{tmp_path / 'missing' / 'checkpoints.db'}", "no checkpoint store file"),
    ):
        async with control_bridge(checkpoints_url=url) as (_, port, _lost):
            for token in ("reader", "engine-token", "operator"):
                async with http(port, token) as client:
                    answer = await client.get("/api/v1/executions/s1/checkpoint")
                assert answer.status_code == 503, answer.text
                assert "hunter2pw" not in answer.text and told not in answer.text, answer.text
                # No history here to say who may look at the run: everyone gets the same short answer.
                assert answer.json()["error"] == "the checkpoint store is unavailable"
    assert not (tmp_path / "missing").exists()


async def test_a_locked_store_answers_503_and_is_not_tried_again_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control_resume, "RETRY_AFTER_S", 3600.0)
    file = tmp_path / "checkpoints.db"
    await stored(f"sqlite:///{file}", "s1", {"n": 1}, {"rows": 3})
    holder = sqlite3.connect(file, isolation_level=None)
    holder.execute("PRAGMA locking_mode = EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")  # another process holds the store
    try:
        async with control_bridge(checkpoints_url=f"sqlite:///{file}") as (bridge, port, _), http(port, "reader") as c:
            answer = await c.get("/api/v1/executions/s1/checkpoint")
            assert answer.status_code == 503 and answer.json()["error"] == "the checkpoint store is unavailable"
            holder.execute("ROLLBACK")
            holder.close()
            # The failure is remembered: the next request does not wait on the store again.
            again = await c.get("/api/v1/executions/s1/checkpoint")
            assert again.status_code == 503, again.text
            control_resume.RETRY_AFTER_S = 0.0
            bridge.control.checkpoints._failed = None
            assert (await c.get("/api/v1/executions/s1/checkpoint")).status_code == 200
    finally:
        holder.close()


async def test_a_node_compensated_by_a_rollback_that_never_ended_is_no_rollback_point() -> None:
    saga = {
        "workflowId": "wf-a",
        "version": "1",
        "name": "A",
        "nodes": [
            {"id": "fetch", "type": "code", "dependsOn": []},
            {"id": "pay", "type": "code", "dependsOn": ["fetch"], "sideEffect": "external", "compensable": True},
            {"id": "mail", "type": "code", "dependsOn": ["pay"], "sideEffect": "external", "compensable": True},
        ],
    }
    # The history of a run whose engine died mid-rollback: mail compensated, pay being compensated,
    # and no workflow.rolled_back to say so.
    execution = {
        "executionId": "k1",
        "workflowId": "wf-a",
        "workflowVersion": "1",
        "nodes": [
            {"nodeId": "fetch", "state": "success"},
            {"nodeId": "pay", "state": "success", "compensation": {"state": "compensating"}},
            {"nodeId": "mail", "state": "success", "compensation": {"state": "compensated"}},
        ],
    }
    async with control_bridge() as (bridge, port, _lost), scripted_engine(port) as engine:
        await engine.hello("eng", [saga])
        outcome = points_of(bridge.control, execution)
    assert outcome.status == 200
    assert {n["nodeId"]: (n["completed"], n["undone"]) for n in outcome.body["nodes"]} == {
        "fetch": (True, False),
        "pay": (False, True),
        "mail": (False, True),
    }
    assert [p["toNode"] for p in outcome.body["points"]] == ["fetch"]


async def test_a_node_whose_checkpoint_a_rollback_deleted_is_no_rollback_point(tmp_path: Path) -> None:
    # The engine died before exporting its rollback's events: the history still says all three
    # completed, the store (which lost pay's and mail's checkpoints first) knows better.
    url = f"sqlite:///{tmp_path / 'checkpoints.db'}"
    await stored(url, "k2", {"n": 1}, {"rows": 3})
    saga = {"workflowId": "wf-a", "version": "1", "name": "A", "nodes": [
        {"id": "fetch", "type": "code", "dependsOn": []},
        {"id": "pay", "type": "code", "dependsOn": ["fetch"], "sideEffect": "external", "compensable": True},
        {"id": "mail", "type": "code", "dependsOn": ["pay"], "sideEffect": "external", "compensable": True},
    ]}  # fmt: skip
    nodes = [{"nodeId": n, "state": "success"} for n in ("fetch", "pay", "mail")]
    execution = {"executionId": "k2", "workflowId": "wf-a", "workflowVersion": "1", "nodes": nodes}
    async with control_bridge(checkpoints_url=url) as (bridge, port, _lost), scripted_engine(port) as engine:
        await engine.hello("eng", [saga])
        outcome = points_of(bridge.control, execution, await forgotten(bridge.control, execution))
        assert [p["toNode"] for p in outcome.body["points"]] == ["fetch"]
        assert [n["nodeId"] for n in outcome.body["nodes"] if n["undone"]] == ["pay", "mail"]
        # A run the store holds nothing of tells nothing: the history decides.
        other = {**execution, "executionId": "not-checkpointed"}
        assert await forgotten(bridge.control, other) == frozenset()


async def test_without_a_history_store_rollback_answers_503_and_a_bad_resume_body_is_a_400() -> None:
    """The rollback routes need the history (completed nodes); a bridge without one says so
    rather than failing. A resume body that is not a JSON object is the caller's error."""
    async with control_bridge() as (_, port, _lost), http(port, "operator") as client:
        points = await client.get("/api/v1/executions/x1/rollback-points")
        assert points.status_code == 503 and "history is not available" in points.json()["error"]
        rolled = await client.post("/api/v1/executions/x1/rollback", json={"toNode": "a"})
        assert rolled.status_code == 503 and "history is not available" in rolled.json()["error"]
        for body in (b"[1, 2]", b"{", b'"x"'):
            resumed = await client.post(
                "/api/v1/executions/x1/resume", content=body, headers={"content-type": "application/json"}
            )
            assert resumed.status_code == 400, (body, resumed.text)
