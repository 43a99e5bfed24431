"""Rollback with compensation, end to end: a real `flowscope worker` (checkpointing to SQLite)
steered through the embedded stack over REST — the rollback points, a refusal naming the external
nodes, a forced rollback whose compensations run latest first, their events in the run's own
sequence and their rows in the history views, and resumes after it that rerun what was undone,
on the same worker and on another one that only has the checkpoint store."""

from __future__ import annotations

import asyncio
import json
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from flowscope.stack import Stack
from tests.conftest import StackFactory
from tests.flowscope.test_control_e2e import ENGINE, OPERATOR, VIEWER, Control, _control_result
from tests.flowscope.test_control_e2e import worker as e2e_worker
from tests.helpers import eventually

pytestmark = pytest.mark.slow

STEER_OTHER = "steer-other-token"
TOKENS = {
    ENGINE: ("worker", frozenset({"engine", "ingest"})),
    OPERATOR: ("operator", frozenset({"*", "control:*"})),
    VIEWER: ("viewer", frozenset({"*"})),
    STEER_OTHER: ("other", frozenset({"control:workflow:ctl-hold"})),
}


def worker(stack: Stack, gates: Path, checkpoints: str) -> AbstractAsyncContextManager[asyncio.subprocess.Process]:
    assert stack.endpoints is not None
    web, otlp = stack.endpoints.web, stack.endpoints.otlp_grpc
    return e2e_worker(web, otlp, gates, catalog="rollback_catalog", checkpoints=checkpoints)


async def serving(control: Control) -> None:
    async def probe() -> bool:
        answer = await control.http.get("/api/v1/engines")
        items = answer.json()["items"] if answer.status_code == 200 else []
        return any(w["workflowId"] == "ctl-saga" for e in items for w in e["workflows"])

    await eventually(probe, "a worker serving ctl-saga")


async def run_saga(control: Control, wanted: str) -> str:
    answer = await control.post("/api/v1/executions", {"workflowId": "ctl-saga", "input": {"order": 7}})
    assert answer.status_code == 201, answer.text
    execution_id: str = answer.json()["executionId"]
    await control.status(execution_id, wanted)
    return execution_id


def undone(gates: Path, execution_id: str) -> list[str]:
    log = gates / "undone.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return [line.split()[1] for line in lines if line.split()[0] == execution_id]


async def rows(stack: Stack, sql: str, execution_id: str) -> list[tuple[Any, ...]]:
    assert stack.collector.pipeline is not None
    await asyncio.to_thread(stack.collector.pipeline.flush, 30.0)
    result = await asyncio.to_thread(
        stack.collector.client().query, sql.replace("{db}", stack.collector.database), parameters={"e": execution_id}
    )
    return [tuple(r) for r in result.result_rows]


async def test_a_refused_rollback_names_its_external_nodes_and_force_runs_it(
    stack_factory: StackFactory, tmp_path: Path
) -> None:
    checkpoints = f"sqlite:///{tmp_path}/checkpoints.db"
    async with stack_factory(auth_tokens=TOKENS, checkpoints=checkpoints) as stack:
        assert stack.endpoints is not None
        control = Control(stack.endpoints.web, tmp_path)
        try:
            async with worker(stack, tmp_path, checkpoints):
                await serving(control)
                run = await run_saga(control, "success")
                completed = await control.event(run, "workflow.completed")

                points = (await control.http.get(f"/api/v1/executions/{run}/rollback-points")).json()
                by_node = {p["toNode"]: p for p in points["points"]}
                assert list(by_node) == ["order", "reserve", "charge", "email", "ship"]
                assert by_node["order"]["compensate"] == ["charge", "reserve"]
                assert by_node["order"]["cannotUndo"] == ["email"] and by_node["order"]["skipped"] == ["ship"]
                assert by_node["email"]["cannotUndo"] == [] and by_node["ship"]["steps"] == []
                assert {n["nodeId"]: n["sideEffect"] for n in points["nodes"]}["charge"] == "external"

                refused = await control.post(f"/api/v1/executions/{run}/rollback", {"toNode": "order"})
                assert refused.status_code == 409, refused.text
                assert "email" in refused.json()["error"] and "charge" not in refused.json()["error"]
                assert undone(tmp_path, run) == []
                # The live WebSocket's op says the same.
                ws_url = stack.endpoints.web.replace("http://", "ws://") + "/ws"
                async with connect(ws_url, additional_headers={"authorization": f"Bearer {OPERATOR}"}) as ws:
                    op = {"op": "rollback", "id": "r1", "executionId": run, "toNode": "order"}
                    await ws.send(json.dumps(op))
                    result = await _control_result(ws, "r1")
                assert result["ok"] is False and result["code"] == "conflict" and "email" in result["error"]

                # Bad input, unknown nodes and missing grants are the caller's errors, never a 500.
                for body, status in (({}, 400), ({"toNode": 3}, 400), ({"toNode": "order", "force": "yes"}, 400),
                                     ({"toNode": "nope"}, 400)):  # fmt: skip
                    answer = await control.post(f"/api/v1/executions/{run}/rollback", body)
                    assert answer.status_code == status, (body, answer.text)
                assert (await control.post("/api/v1/executions/nope/rollback", {"toNode": "order"})).status_code == 404
                for token in (VIEWER, STEER_OTHER):
                    answer = await control.post(f"/api/v1/executions/{run}/rollback", {"toNode": "order"}, token=token)
                    # A token that may neither read nor steer the run learns nothing of it (404).
                    assert answer.status_code == (403 if token == VIEWER else 404), answer.text
                hidden = await control.http.get(
                    f"/api/v1/executions/{run}/rollback-points", headers={"authorization": f"Bearer {STEER_OTHER}"}
                )
                assert hidden.status_code == 404 and "ctl-saga" not in hidden.text, hidden.text

                forced = await control.post(f"/api/v1/executions/{run}/rollback", {"toNode": "order", "force": True})
                assert forced.status_code == 202, forced.text
                assert forced.json()["compensate"] == ["charge", "reserve"] and forced.json()["forced"] is True
                ended = await control.event(run, "workflow.rolled_back")
                assert ended["data"]["result"] == "success" and ended["data"]["cannotUndo"] == ["email"]

                # Latest first, each with the output the node returned in the run.
                assert undone(tmp_path, run) == ["charge", "reserve"]
                events = [e for e in await control.events(run) if e["seq"] > completed["seq"]]
                assert [(e["type"], e["nodeId"]) for e in events] == [
                    ("node.compensating", "charge"),
                    ("node.compensated", "charge"),
                    ("node.compensating", "reserve"),
                    ("node.compensated", "reserve"),
                    ("workflow.rolled_back", None),
                ]
                # The run's own sequence, numbered on after its last event without a gap.
                assert [e["seq"] for e in events] == list(range(completed["seq"] + 1, completed["seq"] + 6))

                execution = (await control.http.get(f"/api/v1/executions/{run}")).json()
                nodes = {n["nodeId"]: n for n in execution["nodes"]}
                assert nodes["charge"]["compensation"]["state"] == "compensated" and nodes["charge"]["undone"]
                assert nodes["ship"]["undone"] and "compensation" not in nodes["ship"]
                assert "undone" not in nodes["order"] and execution["status"] == "success"

                compensations = await rows(
                    stack,
                    "SELECT NodeId, Status, SideEffect, TraceId FROM {db}.node_compensations FINAL"
                    " WHERE ExecutionId = {e:String} ORDER BY StartTime",
                    run,
                )
                assert [r[:3] for r in compensations] == [("charge", "success", "external"),
                                                          ("reserve", "success", "reversible")]  # fmt: skip
                rollbacks = await rows(
                    stack,
                    "SELECT ToNode, Forced, Status, TraceId FROM {db}.workflow_rollbacks FINAL"
                    " WHERE ExecutionId = {e:String}",
                    run,
                )
                assert rollbacks == [("order", True, "success", compensations[0][3])]
                # A compensation is no attempt of its node.
                attempts = await rows(
                    stack, "SELECT count() FROM {db}.node_executions FINAL WHERE ExecutionId = {e:String}", run
                )
                assert attempts == [(5,)]

                # What was undone is no longer a rollback point; what remains has nothing after it.
                points = (await control.http.get(f"/api/v1/executions/{run}/rollback-points")).json()
                assert [(p["toNode"], p["steps"]) for p in points["points"]] == [("order", [])]
        finally:
            await control.http.aclose()


async def test_a_resume_after_rollback_reruns_what_was_undone(stack_factory: StackFactory, tmp_path: Path) -> None:
    checkpoints = f"sqlite:///{tmp_path}/checkpoints.db"
    (tmp_path / "ship.broken").touch()
    async with stack_factory(auth_tokens=TOKENS, checkpoints=checkpoints) as stack:
        assert stack.endpoints is not None
        control = Control(stack.endpoints.web, tmp_path)
        try:
            async with worker(stack, tmp_path, checkpoints):
                await serving(control)
                failed = await run_saga(control, "failure")
                assert control.ran(failed) == ["order", "reserve", "charge", "email", "ship"]
                answer = await control.post(
                    f"/api/v1/executions/{failed}/rollback", {"toNode": "reserve", "force": True, "resume": True}
                )
                assert answer.status_code == 202, answer.text
                again = answer.json()["resumeExecutionId"]
                await control.event(failed, "workflow.rolled_back")
                await control.status(again, "failure")  # still broken: the resume ran up to ship again
                assert undone(tmp_path, failed) == ["charge"]
                assert control.ran(again) == ["charge", "email", "ship"]
                started = await control.event(again, "workflow.started")
                assert started["data"]["trigger"] == "rollback" and started["data"]["resumedFrom"] == failed

                # Rolled back again, then resumed by another worker that only has the checkpoint store.
                body = {"toNode": "reserve", "force": True}
                answer = await control.post(f"/api/v1/executions/{again}/rollback", body)
                assert answer.status_code == 202, answer.text
                await control.event(again, "workflow.rolled_back")
                assert undone(tmp_path, again) == ["charge"]
            (tmp_path / "ship.broken").unlink()
            async with worker(stack, tmp_path, checkpoints):
                await serving(control)
                resumed = await control.post(f"/api/v1/executions/{again}/resume")
                assert resumed.status_code == 201, resumed.text
                third = resumed.json()["executionId"]
                await control.status(third, "success")
                # order and reserve are reused from the store; charge (compensated) and email (passed,
                # forced) lost their checkpoints in the rollback and run again.
                assert control.ran(third) == ["charge", "email", "ship"]
        finally:
            await control.http.aclose()


async def test_nothing_continues_a_run_while_it_is_rolled_back(stack_factory: StackFactory, tmp_path: Path) -> None:
    checkpoints = f"sqlite:///{tmp_path}/checkpoints.db"
    (tmp_path / "ship.broken").touch()
    async with stack_factory(auth_tokens=TOKENS, checkpoints=checkpoints) as stack:
        assert stack.endpoints is not None
        control = Control(stack.endpoints.web, tmp_path)
        try:
            async with worker(stack, tmp_path, checkpoints):
                await serving(control)
                failed = await run_saga(control, "failure")
                (tmp_path / "undo.hold").touch()
                answer = await control.post(
                    f"/api/v1/executions/{failed}/rollback", {"toNode": "reserve", "force": True}
                )
                assert answer.status_code == 202, answer.text

                async def undoing() -> bool:
                    return (tmp_path / f"{failed}.charge.undoing").exists()

                await eventually(undoing, "the compensation of charge to hold")
                # The refund is under way: a resume or retry would reuse the charge it undoes.
                for op, body in (("resume", None), ("retry", None), ("rollback", {"toNode": "order", "force": True})):
                    refused = await control.post(f"/api/v1/executions/{failed}/{op}", body)
                    assert refused.status_code == 409, (op, refused.text)
                    # The stack answers, whichever engine would get it: one rollback per run, across engines.
                    assert "workflow.rolled_back is in" in refused.json()["error"], refused.text
                assert control.ran(failed) == ["order", "reserve", "charge", "email", "ship"]

                (tmp_path / "undo.hold").unlink()
                await control.event(failed, "workflow.rolled_back")
                assert undone(tmp_path, failed) == ["charge"]
                resumed = await control.post(f"/api/v1/executions/{failed}/resume")
                assert resumed.status_code == 201, resumed.text
                await control.status(resumed.json()["executionId"], "failure")
                assert control.ran(resumed.json()["executionId"]) == ["charge", "email", "ship"]
        finally:
            await control.http.aclose()


async def test_a_worker_killed_mid_rollback_leaves_nothing_it_was_undoing_reusable(
    stack_factory: StackFactory, tmp_path: Path
) -> None:
    checkpoints = f"sqlite:///{tmp_path}/checkpoints.db"
    (tmp_path / "ship.broken").touch()
    async with stack_factory(auth_tokens=TOKENS, checkpoints=checkpoints) as stack:
        assert stack.endpoints is not None
        control = Control(stack.endpoints.web, tmp_path)
        try:
            async with worker(stack, tmp_path, checkpoints) as process:
                await serving(control)
                failed = await run_saga(control, "failure")
                (tmp_path / "undo.hold").touch()
                answer = await control.post(f"/api/v1/executions/{failed}/rollback", {"toNode": "order", "force": True})
                assert answer.status_code == 202, answer.text

                async def undoing() -> bool:
                    return (tmp_path / f"{failed}.charge.undoing").exists()

                await eventually(undoing, "the compensation of charge to hold")
                process.kill()  # mid-refund: whether the card was refunded is unknown
                await process.wait()
            (tmp_path / "undo.hold").unlink()
            (tmp_path / "ship.broken").unlink()
            async with worker(stack, tmp_path, checkpoints):
                await serving(control)

                async def resumed() -> str | None:
                    answer = await control.post(f"/api/v1/executions/{failed}/resume")
                    return str(answer.json()["executionId"]) if answer.status_code == 201 else None

                again = await eventually(resumed, "a resume once the killed worker's rollback is over")
                await control.status(again, "success")
                # charge was being compensated and email passed: neither is reused, both run again.
                assert control.ran(again) == ["charge", "email", "ship"]
        finally:
            await control.http.aclose()
