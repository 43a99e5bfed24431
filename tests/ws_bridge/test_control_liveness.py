"""Commands across an engine's reconnect, and runs declared lost when their engine goes."""

from __future__ import annotations

import asyncio

from flowscope.contract import EventName
from tests.ws_bridge.control_peer import WF_A, answering, control_bridge, http, run, scripted_engine, until
from tests.ws_bridge.live_events import live_event


async def test_a_command_pending_when_its_engine_dropped_is_sent_again_once_on_reconnect() -> None:
    async with control_bridge(control_timeout_s=30.0) as (bridge, port, _lost), http(port, "operator") as client:
        async with scripted_engine(port) as first:
            await first.hello("eng", [WF_A], [run("x1")])
            pausing = asyncio.create_task(client.post("/api/v1/executions/x1/pause", json={}))
            delivered = await first.expect("command")
        # The engine went away before it answered; it comes back with the same engineId.
        async with scripted_engine(port) as second:
            await second.hello("eng", [WF_A], [run("x1")])
            again = await second.expect("command")
            assert again == delivered
            await second.answer(again, executionId="x1", status="paused")
            response = await pausing
            assert response.status_code == 200 and response.json() == {"executionId": "x1", "status": "paused"}
            assert len([f for f in await second.sync() if f["type"] == "command"]) == 1

        # A command for a run whose engine is gone waits for it, and leaves once it is back.
        await until(lambda: "eng" not in bridge.control.engines)
        resuming = asyncio.create_task(client.post("/api/v1/executions/x1/resume", json={}))
        await until(lambda: bool(bridge.control._pending.get("eng")))
        async with scripted_engine(port) as third:
            await third.hello("eng", [WF_A], [run("x1", status="paused")])
            [command] = await answering(third, 1, executionId="x1", status="running")
            assert command["op"] == "resume"
            assert (await resuming).json() == {"executionId": "x1", "status": "running"}
            assert len([f for f in await third.sync() if f["type"] == "command"]) == 1


async def test_past_the_timeout_the_caller_learns_whether_the_command_was_delivered() -> None:
    async with control_bridge(control_timeout_s=0.5) as (bridge, port, _lost), http(port, "operator") as client:
        async with scripted_engine(port) as engine:
            await engine.hello("eng", [WF_A], [run("x1"), run("x2")])
            # Connected, delivered, never answered.
            response = await client.post("/api/v1/executions/x1/pause", json={})
            assert response.status_code == 503 and response.headers["retry-after"] == "5"
            assert response.json()["code"] == "unavailable"
            assert "'eng' (scripted eng) did not answer within 0.5 s; the command was delivered" in response.text
            # Delivered, then the engine went away for good.
            key = {"Idempotency-Key": "pause-x2"}
            pausing = asyncio.create_task(client.post("/api/v1/executions/x2/pause", json={}, headers=key))
            delivered = await engine.expect("command", lambda f: f["executionId"] == "x2")
        response = await pausing
        assert response.status_code == 503
        assert "went away after the command was delivered and did not come back within 0.5 s" in response.text
        assert "same Idempotency-Key" in response.text

        # Gone: the command is held for the timeout, then the caller hears it never left.
        response = await client.post("/api/v1/executions/x1/cancel", json={})
        assert response.status_code == 503 and "the command never left the stack" in response.text

        # The same key once the engine is back: the same command, which the engine answers from memory.
        async with scripted_engine(port) as back:
            await back.hello("eng", [WF_A], [run("x1"), run("x2", status="paused")])
            repeating = asyncio.create_task(client.post("/api/v1/executions/x2/pause", json={}, headers=key))
            again = await back.expect("command")
            assert again["commandId"] == delivered["commandId"]
            await back.answer(again, executionId="x2", status="paused")
            assert (await repeating).status_code == 200
        assert bridge.control.engines == {}


async def test_a_closed_channel_makes_its_runs_lost_and_a_returning_engine_is_told() -> None:
    async with control_bridge() as (bridge, port, lost), http(port, "operator") as client:
        # The hub saw x1 up to seq 7; the engine's last heartbeat said 5.
        bridge.hub.publish([live_event(EventName.WORKFLOW_STARTED, 1, execution="x1", workflow="wf-a")])
        nodes = [live_event(EventName.NODE_STARTED, s, execution="x1", workflow="wf-a") for s in range(2, 8)]
        bridge.hub.publish(nodes)
        async with scripted_engine(port) as engine:
            await engine.hello("eng", [WF_A], [run("x1", seq=5), run("x2", seq=3, status="paused")])
        await until(lambda: len(lost) == 2)
        by_id = {run.execution_id: run for run in lost}
        assert (by_id["x1"].seq, by_id["x2"].seq) == (8, 4)
        assert {(r.workflow_id, r.engine_id, r.engine_name) for r in lost} == {("wf-a", "eng", "scripted eng")}
        assert by_id["x1"].reason == "the engine's control channel closed"
        assert by_id["x1"].last_heartbeat_unix_nano > 0
        bridge.control.check_liveness()
        assert len(lost) == 2  # once per run

        # The engine is back and x1 really runs: it is told which seq the lost event took.
        async with scripted_engine(port) as back:
            await back.hello("eng", [WF_A], [run("x1", seq=5)])
            assert await back.expect("lost") == {"type": "lost", "executionId": "x1", "seq": 8, "_taken": True}
            await back.heartbeat([run("x1", seq=9)])
            assert [f for f in await back.sync() if f["type"] == "lost"] == [
                {"type": "lost", "executionId": "x1", "seq": 8, "_taken": True}
            ]
            # ...and it is steerable again.
            pausing = asyncio.create_task(client.post("/api/v1/executions/x1/pause", json={}))
            await answering(back, 1, executionId="x1", status="paused")
            assert (await pausing).status_code == 200
        # x2 did not come back: its engine is gone, which a command says.
        await until(lambda: "eng" not in bridge.control.engines)
        await until(lambda: len(lost) == 3)
        assert lost[2].execution_id == "x1" and lost[2].seq == 10


async def test_a_silent_engine_makes_its_runs_lost() -> None:
    async with control_bridge(lost_after_s=0.5) as (_, port, lost), scripted_engine(port) as engine:
        welcome = await engine.hello("quiet", [WF_A], [run("x1", seq=2)])
        assert welcome["lostAfterS"] == 0.5
        await until(lambda: len(lost) == 1)
        assert lost[0].execution_id == "x1" and lost[0].seq == 3
        assert lost[0].reason.startswith("the engine sent no heartbeat for")
        # It speaks again and still runs x1.
        await engine.heartbeat([run("x1", seq=2)])
        assert (await engine.expect("lost"))["seq"] == 3
