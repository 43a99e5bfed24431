"""The control plane against a hostile or careless peer (issue 18): oversized commands, floods of
engines and runs, claims on another engine's runs, expired tokens, reused keys."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from tests.ws_bridge.control_peer import WF_A, answering, control_bridge, http, scripted_engine, until

JSON = {"content-type": "application/json"}


async def test_a_start_input_of_emoji_reaches_an_engine_with_a_1_mib_frame_limit() -> None:
    # The engine takes frames of at most 1 MiB (websockets' default), as older engines do.
    async with (
        control_bridge() as (_, port, _lost),
        http(port, "operator") as client,
        scripted_engine(port, max_size=1 << 20) as engine,
    ):
        await engine.hello("eng", [WF_A])
        emoji = "\U0001f600" * 100_000  # 400 KB as UTF-8; 1.2 MB if escaped as \\ud83d\\ude00
        starting = asyncio.create_task(client.post("/api/v1/executions", json={"workflowId": "wf-a", "input": emoji}))
        [command] = await answering(engine, 1)
        assert command["input"] == emoji
        response = await starting
        assert response.status_code == 201 and response.json()["executionId"] == command["executionId"]


async def test_a_command_too_large_for_an_engine_is_refused_before_it_is_sent() -> None:
    async with (
        control_bridge(control_timeout_s=2.0) as (_, port, _lost),
        http(port, "operator") as client,
        scripted_engine(port, max_size=4 << 20) as engine,
    ):
        await engine.hello("eng", [WF_A])
        body = json.dumps({"workflowId": "wf-a", "input": "x" * ((1 << 20) - 40)})
        assert len(body) <= 1 << 20
        response = await client.post("/api/v1/executions", content=body, headers=JSON)
        assert response.status_code == 413, response.text
        assert response.json()["code"] == "too_large" and "engines take at most 1048576" in response.text
        assert [f for f in await engine.sync() if f["type"] == "command"] == []


async def test_non_finite_numbers_in_a_body_are_a_400() -> None:
    async with control_bridge() as (_, port, _lost), http(port, "operator") as client, scripted_engine(port) as engine:
        await engine.hello("eng", [WF_A])
        for number in ("NaN", "Infinity", "-Infinity", "1e999"):
            body = '{"workflowId": "wf-a", "input": {"x": NUMBER}}'.replace("NUMBER", number)
            response = await client.post("/api/v1/executions", content=body, headers=JSON)
            assert response.status_code == 400, (number, response.text)
            assert "non-finite" in response.json()["error"]
        assert [f for f in await engine.sync() if f["type"] == "command"] == []


def _workflow(workflow_id: str, nodes: int) -> dict[str, Any]:
    return {"workflowId": workflow_id, "version": "1", "nodes": [{"id": f"n{i}"} for i in range(nodes)]}


async def test_a_hello_is_bounded_and_a_gone_engine_keeps_no_graph() -> None:
    async with control_bridge() as (bridge, port, _lost), scripted_engine(port) as engine:
        hellos: list[tuple[dict[str, Any], str]] = [
            ({"workflows": [_workflow("w1", 6_000), _workflow("w2", 6_000)]}, "at most 10000 nodes in all"),
            ({"workflows": [_workflow(f"w{i}", 1) for i in range(101)]}, "'workflows' must be a list of at most 100"),
            ({"name": "bad\x00name"}, "'name' must be a non-empty printable string"),
            ({"name": "n" * 201}, "'name' must be a non-empty printable string"),
        ]
        for hello, why in hellos:
            await engine.send({"type": "hello", "engineId": "eng", **hello})
            error = await engine.expect("error")
            assert error["code"] == "bad_request" and why in error["message"], error
        assert bridge.control.engines == {}
        await engine.hello("eng", [_workflow("w1", 5_000), _workflow("w2", 5_000)])
    await until(lambda: "eng" in bridge.control._gone)
    assert bridge.control._gone["eng"].workflows == []


async def test_one_token_subject_holds_a_bounded_number_of_engines() -> None:
    async with control_bridge() as (bridge, port, _lost):
        bridge.control.max_engines_per_subject = 2
        async with scripted_engine(port) as first, scripted_engine(port) as second, scripted_engine(port) as third:
            await first.hello("e1")
            await second.hello("e2")
            await third.send({"type": "hello", "engineId": "e3", "workflows": [WF_A]})
            error = await third.expect("error")
            assert error["code"] == "too_many_engines"
            with pytest.raises(ConnectionClosed) as closed:
                await third.next()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4429
            # The same engine reconnecting replaces itself: it is not one more.
            async with scripted_engine(port) as again:
                await again.hello("e2")
        async with scripted_engine(port, "admin") as other:
            await other.hello("e4")
        assert set(bridge.control.engines) <= {"e1", "e2"}


async def test_a_connection_that_says_no_hello_is_closed() -> None:
    async with control_bridge() as (bridge, port, _lost), scripted_engine(port) as engine:
        bridge.control.hello_timeout_s = 0.2
        async with scripted_engine(port) as silent:
            with pytest.raises(ConnectionClosed) as closed:
                await silent.next()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4408
            assert "no hello within 0.2 s" in closed.value.rcvd.reason
        # One that says hello in time stays.
        await engine.hello("eng")
        await engine.sync()
