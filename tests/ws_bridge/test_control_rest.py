"""The control plane's REST commands (docs/control.md), steering a scripted engine over a real channel."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from tests.ws_bridge.control_peer import (
    WF_A,
    WF_B,
    ScriptedEngine,
    answering,
    control_bridge,
    http,
    run,
    scripted_engine,
)


async def test_every_rest_command_is_routed_to_its_engine_and_answered() -> None:
    async with (
        control_bridge() as (bridge, port, _),
        scripted_engine(port) as busy,
        scripted_engine(port) as idle,
        http(port, "operator") as client,
    ):
        await busy.hello("busy", [WF_A], [run("x1"), run("x2")])
        await idle.hello("idle", [WF_A, WF_B])

        # Start: the least loaded engine serving the workflow; the stack picks the execution id.
        starting = asyncio.create_task(
            client.post("/api/v1/executions", json={"workflowId": "wf-a", "input": {"n": 3}, "userId": "ana"})
        )
        [command] = await answering(idle, 1)
        response = await starting
        assert response.status_code == 201, response.text
        assert response.json() == {"executionId": command["executionId"], "engineId": "idle"}
        assert command["op"] == "start" and len(command["executionId"]) == 32
        assert (command["workflowId"], command["version"], command["input"]) == ("wf-a", "1", {"n": 3})
        assert (command["trigger"], command["userId"]) == ("api", "ana")
        started = command["executionId"]

        # pause / resume / cancel go to the engine whose heartbeat lists the run.
        for path, op, status in [("pause", "pause", "paused"), ("resume", "resume", "running"),
                                 ("cancel", "stop", "cancelling")]:  # fmt: skip
            sending = asyncio.create_task(client.post(f"/api/v1/executions/x2/{path}", json={}))
            [command] = await answering(busy, 1)
            assert (command["op"], command["executionId"]) == (op, "x2")
            response = await sending
            assert response.status_code == 200 and response.json() == {"executionId": "x2", "status": status}
        # The run the stack started is known to its engine at once, before any heartbeat.
        sending = asyncio.create_task(client.post(f"/api/v1/executions/{started}/pause", json={}))
        [command] = await answering(idle, 1)
        assert (await sending).status_code == 200 and command["executionId"] == started

        # Retry goes to the engine that ran the execution, with a new id chosen by the stack.
        await idle.send({"type": "finished", "executionId": started, "workflowId": "wf-a", "result": "failure"})
        retrying = asyncio.create_task(client.post(f"/api/v1/executions/{started}/retry", json={"fromNode": "store"}))
        [command] = await answering(idle, 1)
        assert (command["op"], command["executionId"], command["fromNode"]) == ("retry", started, "store")
        response = await retrying
        assert response.status_code == 201
        assert response.json() == {"executionId": command["newExecutionId"], "retryOf": started, "fromNode": "store"}
        # Without fromNode the engine picks (its first failed node) and says which.
        retrying = asyncio.create_task(client.post(f"/api/v1/executions/{started}/retry", json={}))
        [command] = await answering(idle, 1, fromNode="fetch")
        assert "fromNode" not in command
        assert (await retrying).json()["fromNode"] == "fetch"
        assert bridge.control.engines.keys() == {"busy", "idle"}


async def test_command_errors_are_the_documented_statuses() -> None:
    async with (
        control_bridge() as (_, port, _lost),
        scripted_engine(port) as engine,
        http(port, "operator") as client,
    ):
        await engine.hello("eng", [WF_A], [run("live"), run("done")])
        await engine.send({"type": "finished", "executionId": "done", "workflowId": "wf-a", "result": "success"})
        await engine.sync()

        async def post(path: str, body: object = None, **kwargs: object) -> httpx.Response:
            return await client.post(path, json={} if body is None else body, **kwargs)  # type: ignore[arg-type]

        cases = [
            (await post("/api/v1/executions/nope/pause"), 404, "no execution 'nope'"),
            (await post("/api/v1/executions", {"workflowId": "wf-z"}), 409, "no connected engine serves workflow"),
            (await post("/api/v1/executions", {"workflowId": "wf-a", "version": "9"}), 409, "version '9'"),
            (await post("/api/v1/executions/done/pause"), 409, "already ended (success)"),
            (await post("/api/v1/executions/live/retry"), 409, "still running"),
            (await post("/api/v1/executions/done/retry", {"fromNode": "ghost"}), 400, "no node 'ghost'"),
            (await post("/api/v1/executions", [1, 2]), 400, "must be a JSON object"),
            (await post("/api/v1/executions", {"workflowId": 7}), 400, "'workflowId' must be a non-empty string"),
            (await post("/api/v1/executions", {}), 400, "'workflowId'"),
            (await post("/api/v1/executions/done/retry", {"fromNode": ["a"]}), 400, "'fromNode'"),
            (await client.post("/api/v1/executions", content=b"{", headers={"content-type": "application/json"}),
             400, "must be a JSON object"),
            (await client.post("/api/v1/executions", content=b'{"workflowId": "wf-a"}',
                               headers={"content-type": "text/plain"}), 415, "Content-Type: application/json"),
            (await client.post("/api/v1/executions/live/pause"), 415, "not 'none'"),
            (await post("/api/v1/executions", {"workflowId": "wf-a", "input": "x" * (1 << 20)}), 400, "larger than"),
        ]  # fmt: skip
        for response, status, message in cases:
            assert response.status_code == status, (response.status_code, response.text)
            assert message in response.json()["error"], response.text
        assert {r.json()["code"] for r, s, _ in cases if s == 409} == {"conflict"}
        assert engine.taken("command") == []  # nothing refused reached the engine

        # What the engine refuses comes back with its code.
        pausing = asyncio.create_task(post("/api/v1/executions/live/resume"))
        command = await engine.expect("command")
        await engine.answer(command, ok=False, code="conflict", error="execution live is not paused")
        response = await pausing
        assert response.status_code == 409 and response.json() == {
            "error": "execution live is not paused",
            "code": "conflict",
        }


async def test_control_needs_a_control_grant_for_the_workflow() -> None:
    async with control_bridge() as (_, port, _lost), scripted_engine(port) as engine:
        await engine.hello("eng", [WF_A, WF_B], [run("a1"), run("b1", "wf-b")])
        async with http(port) as anonymous:
            response = await anonymous.post("/api/v1/executions", json={"workflowId": "wf-a"})
            assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        for token, path, body in [
            ("reader", "/api/v1/executions", {"workflowId": "wf-a"}),
            ("reader", "/api/v1/executions/a1/pause", {}),
            ("reader", "/api/v1/executions/unknown/pause", {}),
            ("watch-a", "/api/v1/executions/a1/cancel", {}),
            ("steer-other", "/api/v1/executions", {"workflowId": "wf-a"}),
            ("steer-other", "/api/v1/executions/a1/retry", {}),
            ("steer-a", "/api/v1/executions", {"workflowId": "wf-b"}),
        ]:
            async with http(port, token) as client:
                response = await client.post(path, json=body)
            assert response.status_code == 403, (token, path, response.text)
            assert response.json()["code"] == "forbidden"
        # Neither readable nor steerable by it: no such execution, and no workflow named.
        async with http(port, "steer-a") as client:
            response = await client.post("/api/v1/executions/b1/pause", json={})
        assert response.status_code == 404 and "wf-b" not in response.text
        assert engine.taken("command") == []

        # control:workflow:wf-a steers wf-a's runs.
        async with http(port, "steer-a") as client:
            pausing = asyncio.create_task(client.post("/api/v1/executions/a1/pause", json={}))
            [command] = await answering(engine, 1)
            assert command["executionId"] == "a1" and (await pausing).status_code == 200


async def test_engines_listing_is_filtered_by_grants() -> None:
    async with control_bridge() as (_, port, _lost), scripted_engine(port) as engine:
        await engine.hello("eng", [WF_A, WF_B], [run("a1", seq=4), run("b1", "wf-b", status="paused")])
        async with http(port, "operator") as client:
            [item] = (await client.get("/api/v1/engines")).json()["items"]
        assert item["engineId"] == "eng" and item["name"] == "scripted eng"
        assert item["connectedAt"].endswith("Z") and item["lastHeartbeat"].endswith("Z")
        assert [w["workflowId"] for w in item["workflows"]] == ["wf-a", "wf-b"]
        store = {"id": "store", "type": "code", "label": "Store", "dependsOn": ["fetch"], "sideEffect": "none",
                 "compensable": False}  # fmt: skip
        assert item["workflows"][0]["nodes"][1] == store
        assert item["executions"] == [
            {"executionId": "a1", "workflowId": "wf-a", "version": "1", "status": "running", "seq": 4},
            {"executionId": "b1", "workflowId": "wf-b", "version": "1", "status": "paused", "seq": 1},
        ]
        async with http(port, "steer-a") as client:
            [mine] = (await client.get("/api/v1/engines")).json()["items"]
        assert [w["workflowId"] for w in mine["workflows"]] == ["wf-a"]
        assert [e["executionId"] for e in mine["executions"]] == ["a1"]
        async with http(port, "reader") as client:
            assert len((await client.get("/api/v1/engines")).json()["items"][0]["executions"]) == 2
        async with http(port, "watch-a") as client:
            response = await client.get("/api/v1/engines")
            assert response.status_code == 403 and "control grant" in response.json()["error"]


async def test_start_shares_the_executions_path_with_the_list_and_openapi_lists_both() -> None:
    async with control_bridge() as (_, port, _lost), http(port, "admin") as client:
        # The GET list is still the history's (503 here: this bridge has no store), not a 405.
        listed = await client.get("/api/v1/executions")
        assert listed.status_code == 503 and "history is not available" in listed.json()["error"]
        schema = (await client.get("/openapi.json")).json()
        paths = schema["paths"]
        assert set(paths["/api/v1/executions"]) == {"get", "post"}
        start = paths["/api/v1/executions"]["post"]
        assert set(start["responses"]) == {"201", "400", "401", "403", "409", "413", "415", "502", "503"}
        assert start["requestBody"]["content"]["application/json"]["schema"]["required"] == ["workflowId"]
        for op in ("pause", "resume", "cancel", "retry"):
            responses = paths[f"/api/v1/executions/{{execution_id}}/{op}"]["post"]["responses"]
            assert {"400", "401", "403", "404", "409", "415", "503"} <= set(responses), op
        assert "requestBody" in paths["/api/v1/executions/{execution_id}/retry"]["post"]
        assert set(paths["/api/v1/engines"]["get"]["responses"]) == {"200", "401", "403"}


async def test_an_idempotency_key_makes_a_repeated_start_the_same_command() -> None:
    async with (
        control_bridge() as (_, port, _lost),
        scripted_engine(port) as one,
        scripted_engine(port) as two,
        http(port, "operator") as client,
    ):
        await one.hello("one", [WF_A])
        await two.hello("two", [WF_A])
        headers = {"Idempotency-Key": "order-17"}
        first = asyncio.create_task(client.post("/api/v1/executions", json={"workflowId": "wf-a"}, headers=headers))
        command = await asyncio.wait_for(_first_command(one, two), 20)
        engine = one if command in one.frames else two
        await engine.answer(command, executionId=command["executionId"])
        assert (await first).status_code == 201
        # The same key again: the same frame to the same engine, which answers from its memory.
        again = asyncio.create_task(client.post("/api/v1/executions", json={"workflowId": "wf-a"}, headers=headers))
        repeat = await engine.expect("command")
        assert {k: v for k, v in repeat.items() if k != "_taken"} == {k: v for k, v in command.items() if k != "_taken"}
        await engine.answer(repeat, executionId=command["executionId"])
        assert (await again).json()["executionId"] == command["executionId"]
        # Another caller's same key is another command.
        async with http(port, "admin") as other:
            third = asyncio.create_task(other.post("/api/v1/executions", json={"workflowId": "wf-a"}, headers=headers))
            fresh = await asyncio.wait_for(_first_command(one, two), 20)
            assert fresh["commandId"] != command["commandId"]
            await (one if fresh in one.frames else two).answer(fresh)
            assert (await third).status_code == 201
        reused = await client.post("/api/v1/executions/x/pause", json={}, headers=headers)
        assert reused.status_code == 409 and "different command" in reused.json()["error"]


async def _first_command(*engines: ScriptedEngine) -> dict[str, Any]:
    tasks = [asyncio.create_task(e.expect("command")) for e in engines]
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    result: dict[str, Any] = next(iter(done)).result()
    return result
