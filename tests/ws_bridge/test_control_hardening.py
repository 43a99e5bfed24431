"""The control plane against a hostile or careless peer (issue 18): oversized commands, floods of
engines and runs, claims on another engine's runs, expired tokens, reused keys."""

from __future__ import annotations

import asyncio
import json

from tests.ws_bridge.control_peer import WF_A, answering, control_bridge, http, scripted_engine

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
