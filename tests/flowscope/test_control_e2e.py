"""Steering runs end to end: a real `flowscope worker` process dialing out to the embedded
stack, commands over REST and the WebSocket, the runs' events read back from the history."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from flowscope.stack import Stack
from tests.conftest import StackFactory
from tests.flowscope.test_cli import FLOWSCOPE, ROOT, cli_env
from tests.helpers import eventually

pytestmark = pytest.mark.slow

ENGINE = "engine-token"
OPERATOR = "operator-token"
VIEWER = "viewer-token"
TOKENS = {
    ENGINE: ("worker", frozenset({"engine", "ingest"})),
    OPERATOR: ("operator", frozenset({"*", "control:*"})),
    VIEWER: ("viewer", frozenset({"*"})),
}
_DEADLINE_S = 60.0


class Control:
    """The stack's API as the operator (or another token) calls it."""

    def __init__(self, web: str, gates: Path, token: str = OPERATOR) -> None:
        self.web = web
        self.gates = gates
        self.http = httpx.AsyncClient(base_url=web, headers={"authorization": f"Bearer {token}"}, timeout=30)

    async def post(self, path: str, body: dict[str, Any] | None = None, token: str | None = None) -> httpx.Response:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        return await self.http.post(path, json=body or {}, headers=headers)

    async def events(self, execution_id: str) -> list[dict[str, Any]]:
        answer = await self.http.get(f"/api/v1/executions/{execution_id}/events")
        return list(answer.json()["items"]) if answer.status_code == 200 else []

    async def event(self, execution_id: str, kind: str, node: str | None = None) -> dict[str, Any]:
        async def probe() -> dict[str, Any] | None:
            for event in await self.events(execution_id):
                if event["type"] == kind and (node is None or event.get("nodeId") == node):
                    return event
            return None

        found: dict[str, Any] = await eventually(probe, f"{kind} {node or ''} of {execution_id}")
        return found

    async def status(self, execution_id: str, wanted: str) -> dict[str, Any]:
        async def probe() -> dict[str, Any] | None:
            answer = await self.http.get(f"/api/v1/executions/{execution_id}")
            body = answer.json() if answer.status_code == 200 else {}
            return body if body.get("status") == wanted else None

        found: dict[str, Any] = await eventually(probe, f"{execution_id} to become {wanted}")
        return found

    async def entered(self, execution_id: str, node: str) -> None:
        async def probe() -> bool:
            return (self.gates / f"{execution_id}.{node}.entered").exists()

        await eventually(probe, f"{node} of {execution_id} to start")

    def open(self, node: str) -> None:
        (self.gates / f"{node}.open").touch()

    def ran(self, execution_id: str) -> list[str]:
        log = self.gates / "ran.log"
        lines = log.read_text().splitlines() if log.exists() else []
        return [line.split()[1] for line in lines if line.split()[0] == execution_id]

    async def node_spans(self, stack: Stack, execution_id: str) -> set[str]:
        """Which nodes of the execution ran (have a node span), from the stored traces."""
        assert stack.collector.pipeline is not None
        await asyncio.to_thread(stack.collector.pipeline.flush, 30.0)
        rows = await asyncio.to_thread(
            stack.collector.client().query,
            f"SELECT SpanAttributes['workflow.node.id'] FROM {stack.collector.database}.otel_traces "
            "WHERE SpanAttributes['workflow.execution.id'] = {e:String} AND SpanAttributes['workflow.node.id'] != ''",
            parameters={"e": execution_id},
        )
        return {row[0] for row in rows.result_rows}


@contextlib.asynccontextmanager
async def worker(
    web: str, otlp: str, gates: Path, *, catalog: str = "catalog", checkpoints: str | None = None
) -> AsyncIterator[asyncio.subprocess.Process]:
    """A real `flowscope worker` serving `tests.flowscope.control_flows:<catalog>`, stopped with
    SIGTERM (then killed) when the block exits; its checkpoints in `gates` unless given."""
    env = cli_env(FLOWSCOPE_TOKEN=ENGINE, FLOWSCOPE_TEST_GATES=str(gates), OTEL_EXPORTER_OTLP_ENDPOINT=otlp,
                  FLOWSCOPE_CHECKPOINTS=checkpoints or f"sqlite:///{gates / 'checkpoints.db'}")  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        *FLOWSCOPE, "worker", f"tests.flowscope.control_flows:{catalog}", "--stack", web,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT,
    )  # fmt: skip
    try:
        yield process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 30)
            except TimeoutError:
                process.kill()
                await process.wait()


async def connected_engine(control: Control) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        answer = await control.http.get("/api/v1/engines")
        items = answer.json()["items"] if answer.status_code == 200 else []
        return items[0] if items and items[0]["workflows"] else None

    engine: dict[str, Any] = await eventually(probe, "the worker to connect")
    return engine


@contextlib.asynccontextmanager
async def steered(stack_factory: StackFactory, tmp_path: Path) -> AsyncIterator[tuple[Stack, Control, Any]]:
    async with stack_factory(auth_tokens=TOKENS) as stack:
        assert stack.endpoints is not None
        control = Control(stack.endpoints.web, tmp_path)
        async with worker(stack.endpoints.web, stack.endpoints.otlp_grpc, tmp_path) as process:
            await connected_engine(control)
            try:
                yield stack, control, process
            finally:
                await control.http.aclose()


async def start(control: Control, workflow_id: str) -> str:
    answer = await control.post("/api/v1/executions", {"workflowId": workflow_id, "input": {"n": 1}})
    assert answer.status_code == 201, answer.text
    execution_id: str = answer.json()["executionId"]
    return execution_id


async def test_start_by_rest_and_by_websocket_and_watch_both_finish(
    stack_factory: StackFactory, tmp_path: Path
) -> None:
    async with steered(stack_factory, tmp_path) as (stack, control, _):
        engines = (await control.http.get("/api/v1/engines")).json()["items"]
        assert {w["workflowId"] for w in engines[0]["workflows"]} == {"ctl-hold", "ctl-wide", "ctl-chain"}

        by_rest = await start(control, "ctl-chain")
        assert stack.endpoints is not None
        ws_url = stack.endpoints.web.replace("http://", "ws://") + "/ws"
        async with connect(ws_url, additional_headers={"authorization": f"Bearer {OPERATOR}"}) as ws:
            await ws.send(json.dumps({"op": "start", "id": "r1", "workflowId": "ctl-chain", "input": {"n": 2}}))
            answer = await _control_result(ws, "r1")
        assert answer["ok"] is True, answer
        by_ws = answer["executionId"]
        for execution_id in (by_rest, by_ws):
            finished = await control.status(execution_id, "success")
            assert [n["state"] for n in finished["nodes"]] == ["success"] * 3
        assert (await control.event(by_ws, "workflow.started"))["data"]["trigger"] == "api"


async def test_pause_holds_every_new_node_until_resume(stack_factory: StackFactory, tmp_path: Path) -> None:
    async with steered(stack_factory, tmp_path) as (_, control, _):
        execution_id = await start(control, "ctl-hold")
        await control.entered(execution_id, "a")
        paused = await control.post(f"/api/v1/executions/{execution_id}/pause")
        assert paused.status_code == 200, paused.text
        pause_event = await control.event(execution_id, "workflow.paused")
        control.open("a")
        a_done = await control.event(execution_id, "node.completed", "a")
        # `a` ended while paused, and `b` (ready since) has not started.
        assert not [e for e in await control.events(execution_id) if e.get("nodeId") == "b"]
        resumed = await control.post(f"/api/v1/executions/{execution_id}/resume")
        assert resumed.status_code == 200, resumed.text
        resume_event = await control.event(execution_id, "workflow.resumed")
        b_started = await control.event(execution_id, "node.started", "b")
        assert pause_event["seq"] < a_done["seq"] < resume_event["seq"] < b_started["seq"]
        await control.status(execution_id, "success")


async def test_stop_cancels_every_running_node(stack_factory: StackFactory, tmp_path: Path) -> None:
    async with steered(stack_factory, tmp_path) as (_, control, _):
        execution_id = await start(control, "ctl-wide")
        await control.entered(execution_id, "g1")
        await control.entered(execution_id, "g2")
        stopped = await control.post(f"/api/v1/executions/{execution_id}/cancel")
        assert stopped.status_code == 200, stopped.text
        await control.event(execution_id, "workflow.cancelled")
        ended = await control.status(execution_id, "cancellation")
        states = {n["nodeId"]: n["state"] for n in ended["nodes"]}
        assert states["g1"] == states["g2"] == "cancelled"
        assert states["join"] in {"pending", "cancelled", "skipped"}
        again = await control.post(f"/api/v1/executions/{execution_id}/pause")
        assert again.status_code == 409 and "ended" in again.json()["error"]


async def test_retry_from_the_failed_node_and_from_an_earlier_one(stack_factory: StackFactory, tmp_path: Path) -> None:
    async with steered(stack_factory, tmp_path) as (stack, control, _):
        (tmp_path / "flaky.broken").touch()
        failed = await start(control, "ctl-chain")
        await control.status(failed, "failure")
        (tmp_path / "flaky.broken").unlink()

        retried = await control.post(f"/api/v1/executions/{failed}/retry", {})
        assert retried.status_code == 201, retried.text
        from_failed = retried.json()["executionId"]
        assert retried.json()["fromNode"] == "flaky"
        done = await control.status(from_failed, "success")
        assert done["resumedFrom"] == failed
        assert sorted(control.ran(from_failed)) == ["flaky", "last"]
        assert await control.node_spans(stack, from_failed) == {"flaky", "last"}

        earlier = await control.post(f"/api/v1/executions/{failed}/retry", {"fromNode": "first"})
        assert earlier.status_code == 201, earlier.text
        from_first = earlier.json()["executionId"]
        await control.status(from_first, "success")
        assert sorted(control.ran(from_first)) == ["first", "flaky", "last"]
        assert await control.node_spans(stack, from_first) == {"first", "flaky", "last"}

        unknown = await control.post(f"/api/v1/executions/{failed}/retry", {"fromNode": "nope"})
        assert unknown.status_code == 400 and "nope" in unknown.json()["error"]


async def test_a_read_only_token_may_watch_but_not_steer(stack_factory: StackFactory, tmp_path: Path) -> None:
    async with steered(stack_factory, tmp_path) as (stack, control, _):
        execution_id = await start(control, "ctl-hold")
        await control.entered(execution_id, "a")

        async def watched() -> bool:
            answer = await control.http.get(f"/api/v1/executions/{execution_id}", headers=_bearer(VIEWER))
            return answer.status_code == 200

        await eventually(watched, "the viewer to see the run")
        for path in ("pause", "resume", "cancel", "retry"):
            refused = await control.post(f"/api/v1/executions/{execution_id}/{path}", token=VIEWER)
            assert refused.status_code == 403, (path, refused.text)
        refused = await control.post("/api/v1/executions", {"workflowId": "ctl-hold"}, token=VIEWER)
        assert refused.status_code == 403
        me = (await control.http.get("/api/v1/me", headers=_bearer(VIEWER))).json()
        assert not me.get("control")
        assert stack.endpoints is not None
        ws_url = stack.endpoints.web.replace("http://", "ws://") + "/ws"
        async with connect(ws_url, additional_headers=_bearer(VIEWER)) as ws:
            await ws.send(json.dumps({"op": "stop", "id": "s1", "executionId": execution_id}))
            answer = await _control_result(ws, "s1")
        assert answer["ok"] is False and answer["code"] == "forbidden"
        # Nothing was applied: the run still waits at its gate, then finishes.
        control.open("a")
        await control.status(execution_id, "success")


async def test_a_killed_worker_leaves_its_runs_lost_and_commands_get_a_clear_error(
    stack_factory: StackFactory, tmp_path: Path
) -> None:
    async with steered(stack_factory, tmp_path) as (_, control, process):
        execution_id = await start(control, "ctl-hold")
        await control.entered(execution_id, "a")
        # Killed once its start is stored: a start still in the engine's export batch dies with it.
        started = await control.event(execution_id, "workflow.started")
        os.kill(process.pid, signal.SIGKILL)
        await process.wait()
        lost = await control.status(execution_id, "lost")
        assert lost["workflowId"] == "ctl-hold"
        lost_event = await control.event(execution_id, "workflow.lost")
        assert lost_event["seq"] > started["seq"]
        listed = await control.http.get("/api/v1/executions", params={"status": "lost"})
        assert [item["executionId"] for item in listed.json()["items"]] == [execution_id]
        answer = await control.post(f"/api/v1/executions/{execution_id}/pause")
        assert answer.status_code in (409, 503), answer.text
        assert "engine" in answer.json()["error"]
        nobody = await control.post("/api/v1/executions", {"workflowId": "ctl-hold"})
        assert nobody.status_code == 409 and "ctl-hold" in nobody.json()["error"]


def _bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def _control_result(ws: Any, request_id: str) -> dict[str, Any]:
    async def read() -> dict[str, Any]:
        while True:
            frame = json.loads(await ws.recv())
            if frame.get("type") == "control.result" and frame.get("id") == request_id:
                return dict(frame)

    return await asyncio.wait_for(read(), _DEADLINE_S)
