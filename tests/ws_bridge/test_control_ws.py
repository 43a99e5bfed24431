"""Steering ops on the live WebSocket (/ws): start, pause, resume, stop, retry, each answered by a
control.result carrying the op's id."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from websockets.asyncio.client import ClientConnection

from tests.ws_bridge.conftest import recv_json, recv_until, ws_client
from tests.ws_bridge.control_peer import WF_A, answering, control_bridge, run, scripted_engine, until


async def _op(ws: ClientConnection, **request: Any) -> dict[str, Any]:
    await ws.send(json.dumps(request))
    [*_, result] = await recv_until(ws, lambda m: m.get("type") in ("control.result", "error"))
    return result


async def test_every_ws_op_is_routed_and_answered() -> None:
    async with (
        control_bridge() as (_, port, _lost),
        scripted_engine(port) as engine,
        ws_client(f"ws://127.0.0.1:{port}/ws?token=operator") as ws,
    ):
        await engine.hello("eng", [WF_A], [run("x1")])
        sending = asyncio.create_task(_op(ws, op="start", id="s1", workflowId="wf-a", input=[1, 2]))
        [command] = await answering(engine, 1, executionId=None)
        assert (command["op"], command["workflowId"], command["input"]) == ("start", "wf-a", [1, 2])
        assert await sending == {"type": "control.result", "id": "s1", "ok": True,
                                 "executionId": command["executionId"], "engineId": "eng"}  # fmt: skip
        for op, status in [("pause", "paused"), ("resume", "running"), ("stop", "cancelling")]:
            sending = asyncio.create_task(_op(ws, op=op, id=7, executionId="x1"))
            [command] = await answering(engine, 1)
            assert (command["op"], command["executionId"]) == (op, "x1")
            assert await sending == {"type": "control.result", "id": 7, "ok": True, "executionId": "x1",
                                     "status": status}  # fmt: skip
        await engine.send({"type": "finished", "executionId": "x1", "workflowId": "wf-a", "result": "cancellation"})
        sending = asyncio.create_task(_op(ws, op="retry", id="r", executionId="x1", fromNode="fetch"))
        [command] = await answering(engine, 1, fromNode="fetch")
        result = await sending
        assert result["ok"] and result["executionId"] == command["newExecutionId"] and result["retryOf"] == "x1"

        # Failures are results too, with the REST status's code.
        assert await _op(ws, op="pause", id="p", executionId="ghost") == {
            "type": "control.result", "id": "p", "ok": False, "code": "not_found", "error": "no execution 'ghost'"
        }  # fmt: skip
        refused = await _op(ws, op="start", id="n", workflowId="wf-none")
        assert (refused["ok"], refused["code"]) == (False, "conflict")
        bad = await _op(ws, op="retry", id="b", executionId="x1", fromNode=3)
        assert (bad["ok"], bad["code"]) == (False, "bad_request") and "'fromNode'" in bad["error"]
        missing = await _op(ws, op="pause", executionId="x1")
        assert missing["type"] == "error" and missing["code"] == "bad_request" and "needs an 'id'" in missing["message"]
        unknown = await _op(ws, op="explode", id="u")
        assert unknown["code"] == "unknown_op" and "start, pause, resume, stop or retry" in unknown["message"]
        assert len(engine.taken("command")) == 5


async def test_a_read_only_token_gets_forbidden_for_every_op() -> None:
    async with (
        control_bridge() as (_, port, _lost),
        scripted_engine(port) as engine,
        ws_client(f"ws://127.0.0.1:{port}/ws?token=reader") as ws,
    ):
        await engine.hello("eng", [WF_A], [run("x1")])
        for op, fields in [("start", {"workflowId": "wf-a"}), ("pause", {"executionId": "x1"}),
                           ("resume", {"executionId": "x1"}), ("stop", {"executionId": "x1"}),
                           ("retry", {"executionId": "x1"})]:  # fmt: skip
            result = await _op(ws, op=op, id=op, **fields)
            assert (result["id"], result["ok"], result["code"]) == (op, False, "forbidden")
            assert "needs a control grant" in result["error"]
        assert engine.taken("command") == []


async def test_a_command_waiting_for_its_engine_does_not_hold_up_other_frames() -> None:
    async with (
        control_bridge() as (_, port, _lost),
        scripted_engine(port) as engine,
        ws_client(f"ws://127.0.0.1:{port}/ws?token=admin") as ws,
    ):
        await engine.hello("eng", [WF_A], [run("x1")])
        await ws.send(json.dumps({"op": "pause", "id": "slow", "executionId": "x1"}))
        command = await engine.expect("command")
        # The engine has not answered: the connection still serves pings and subscriptions.
        await ws.send(json.dumps({"op": "ping"}))
        assert (await recv_json(ws))["type"] == "pong"
        await ws.send(json.dumps({"op": "subscribe", "id": "s", "rooms": ["all"]}))
        assert (await recv_json(ws))["type"] == "subscribed"
        await engine.answer(command, executionId="x1", status="paused")
        [*_, result] = await recv_until(ws, lambda m: m.get("type") == "control.result")
        assert (result["id"], result["ok"]) == ("slow", True)


async def test_a_command_whose_caller_left_is_not_sent_again() -> None:
    async with control_bridge(control_timeout_s=30.0) as (bridge, port, _lost):
        async with scripted_engine(port) as engine:
            await engine.hello("eng", [WF_A], [run("x1")])
            async with ws_client(f"ws://127.0.0.1:{port}/ws?token=operator") as ws:
                await ws.send(json.dumps({"op": "pause", "id": "p", "executionId": "x1"}))
                await engine.expect("command")
            # The caller is gone before the engine answered: nobody waits for the command any more.
            await until(lambda: not bridge.control._pending)
        async with scripted_engine(port) as back:
            await back.hello("eng", [WF_A], [run("x1")])
            assert [f for f in await back.sync() if f["type"] == "command"] == []
