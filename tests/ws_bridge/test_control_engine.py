"""The engine's control channel (/control/v1/engine): its handshake, its frames, its registry."""

from __future__ import annotations

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from flowscope.ws_bridge.auth import ANONYMOUS, Principal
from tests.ws_bridge.control_peer import WF_A, control_bridge, engine_url, http, run, scripted_engine, until
from tests.ws_bridge.test_browser_guards import upgrade_headers


async def _close_code(port: int, token: str | None, **kwargs: object) -> tuple[int | None, str]:
    async with scripted_engine(port, token, **kwargs) as engine:
        with pytest.raises(ConnectionClosed) as closed:
            await engine.next()
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code, closed.value.rcvd.reason


async def test_the_handshake_needs_a_token_with_the_engine_grant_and_no_origin() -> None:
    async with control_bridge() as (bridge, port, _):
        code, reason = await _close_code(port, None)
        assert code == 4401 and reason.startswith("missing credentials")
        assert (await _close_code(port, "forged"))[0] == 4401
        for token in ("reader", "operator", "steer-a"):
            code, reason = await _close_code(port, token)
            assert code == 4403 and "lacks the 'engine' grant" in reason, token
        # A page's script always sends an Origin: refused before the WebSocket opens.
        with pytest.raises(InvalidStatus) as refused:
            async with connect(engine_url(port), additional_headers={"Authorization": "Bearer engine-token"},
                               origin=f"http://127.0.0.1:{port}"):  # type: ignore[arg-type]  # fmt: skip
                pass
        assert refused.value.response.status_code == 403
        # A rebinding page's name as Host reaches neither the channel nor the commands.
        async with http(port, "admin") as client:
            headers = upgrade_headers("evil.example") | {"authorization": "Bearer engine-token"}
            assert (await client.get("/control/v1/engine", headers=headers)).status_code == 400
            posted = await client.post("/api/v1/executions", json={"workflowId": "w"}, headers={"host": "evil.example"})
            assert posted.status_code == 400
        # A token in the query string is not taken here.
        assert (await _close_code_url(f"{engine_url(port)}?token=engine-token"))[0] == 4401
        async with scripted_engine(port, "admin") as engine:
            welcome = await engine.hello("by-admin")
        assert welcome == {"type": "welcome", "engineId": "by-admin", "heartbeatIntervalS": 2.0,
                           "lostAfterS": 10.0, "_taken": True}  # fmt: skip
        assert bridge.control.engines == {}


async def _close_code_url(url: str) -> tuple[int | None, str]:
    async with connect(url, open_timeout=10) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code, closed.value.rcvd.reason


async def test_bad_frames_get_error_frames_and_the_channel_stays_up() -> None:
    async with control_bridge(ws_max_message_bytes=64 * 1024) as (bridge, port, _), scripted_engine(port) as engine:
        await engine.ws.send(b"\x00binary")
        await engine.send("{broken")
        await engine.send("[1, 2]")
        await engine.send({"type": "heartbeat", "executions": []})
        await engine.send({"type": "hello", "engineId": ""})
        await engine.send({"type": "hello", "engineId": "e", "workflows": [{"workflowId": "w", "nodes": "x"}]})
        await engine.send({"type": "hello", "engineId": "e", "executions": [run("x", status="exploded")]})
        errors = [await engine.expect("error") for _ in range(7)]
        assert [e["code"] for e in errors] == ["bad_frame", "bad_json", "bad_request", "hello_first",
                                               "bad_request", "bad_request", "bad_request"]  # fmt: skip
        assert "the first frame must be hello" in errors[3]["message"]
        assert "'engineId' must be a non-empty printable string" in errors[4]["message"]
        assert "running or paused" in errors[6]["message"]
        assert bridge.control.engines == {}

        await engine.hello("eng", [WF_A], [run("x1")])
        await engine.send({"type": "hello", "engineId": "eng"})
        await engine.send({"type": "shout"})
        await engine.send({"type": "result", "commandId": 5, "ok": True})
        await engine.send({"type": "heartbeat", "executions": [run("x1", seq=-1)]})
        await engine.send({"type": "finished", "workflowId": "wf-a"})
        errors = [await engine.expect("error") for _ in range(5)]
        assert [e["code"] for e in errors] == ["bad_request", "unknown_type", "bad_request", "bad_request",
                                               "bad_request"]  # fmt: skip
        await engine.heartbeat([run("x1", seq=3), run("x2")])
        await until(lambda: set(bridge.control.engines["eng"].executions) == {"x1", "x2"})
        # A frame over the size limit closes the channel (1009), as on /ws.
        with pytest.raises(ConnectionClosed) as closed:
            await engine.send("x" * (64 * 1024 + 1))
            await engine.next()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        await until(lambda: "eng" not in bridge.control.engines)


async def test_an_engine_id_is_one_connection_of_one_subject() -> None:
    async with control_bridge() as (bridge, port, _), scripted_engine(port) as first:
        await first.hello("eng", [WF_A], [run("x1")])
        # Another token's engine going by the same id is another engine: it takes nothing over.
        async with scripted_engine(port, "engine-token-2") as intruder:
            await intruder.hello("eng", [], [])
            assert bridge.control.engines["eng@engine-2"].subject == "engine-2"
        assert bridge.control.engines["eng"].subject == "engine-1"
        # The same engine reconnecting replaces its old connection.
        async with scripted_engine(port) as second:
            await second.hello("eng", [WF_A], [run("x1"), run("x3")])
            with pytest.raises(ConnectionClosed) as replaced:
                await first.next()
            assert replaced.value.rcvd is not None and replaced.value.rcvd.code == 4000
            assert set(bridge.control.engines["eng"].executions) == {"x1", "x3"}
            async with http(port, "operator") as client:
                [item] = (await client.get("/api/v1/engines")).json()["items"]
            assert [e["executionId"] for e in item["executions"]] == ["x1", "x3"]
        await until(lambda: bridge.control.engines == {})


async def test_without_auth_an_engine_connects_and_anyone_may_steer() -> None:
    async with control_bridge(auth=False) as (_, port, _lost), scripted_engine(port, None) as engine:
        await engine.hello("eng", [WF_A])
        async with http(port) as client:
            me = (await client.get("/api/v1/me")).json()
            assert me["control"] == ["*"]
            response = await client.post("/api/v1/executions", json={"workflowId": "wf-missing"})
            assert response.status_code == 409


def test_grants_of_steering() -> None:
    def principal(*grants: str) -> Principal:
        return Principal("p", frozenset(grants))

    assert principal("control:*").may_control("any") and principal("admin").may_control("any")
    assert ANONYMOUS.may_control("any") and ANONYMOUS.may_serve_engine
    assert principal("control:workflow:a").may_control("a") and not principal("control:workflow:a").may_control("b")
    assert not principal("*").may_control("a") and not principal("*").may_serve_engine
    assert not principal("workflow:a").may_control("a") and not principal("ingest").may_control("a")
    assert not principal("engine").may_control("a") and principal("engine").may_serve_engine
    assert principal("admin").may_serve_engine and not principal("control:*").may_serve_engine
    assert principal("control:workflow:b", "control:workflow:a").controls == ["a", "b"]
    assert principal("control:*").controls == ["*"] and principal("*").controls == []
    # Steering and engine grants read nothing: they open no execution room.
    assert not principal("control:*").may_join("execution:x") and not principal("engine").may_join("execution:x")
    assert principal("workflow:a").may_join("execution:x")


async def test_me_says_what_the_token_may_steer() -> None:
    async with control_bridge() as (_, port, _lost):
        for token, control in [("reader", []), ("operator", ["*"]), ("admin", ["*"]), ("steer-a", ["wf-a"])]:
            async with http(port, token) as client:
                assert (await client.get("/api/v1/me")).json()["control"] == control, token
