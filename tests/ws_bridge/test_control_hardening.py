"""The control plane against a hostile or careless peer (issue 18): oversized commands, floods of
engines and runs, claims on another engine's runs, expired tokens, reused keys."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from flowscope.contract import EventName
from flowscope.ws_bridge import control_events
from flowscope.ws_bridge.app import Bridge, BridgeConfig
from flowscope.ws_bridge.auth import AuthConfig, Principal
from flowscope.ws_bridge.control_commands import parse_command
from flowscope.ws_bridge.control_events import LostEmitter, LostRun
from tests.ws_bridge.conftest import recv_until, ws_client
from tests.ws_bridge.control_peer import (
    TOKENS,
    WF_A,
    WF_B,
    ScriptedEngine,
    answering,
    control_bridge,
    engine_url,
    http,
    run,
    scripted_engine,
    until,
)
from tests.ws_bridge.live_events import live_event

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


async def test_runs_an_engine_merely_lists_are_lost_only_if_stored_and_real_ones_are_not_held_up() -> None:
    async with control_bridge() as (bridge, port, lost), http(port, "operator") as client:
        bridge.hub.publish([live_event(EventName.WORKFLOW_STARTED, 1, execution="seen", workflow="wf-a")])
        async with scripted_engine(port, "engine-token-2") as engine:
            invented = [run(f"invented-{i}") for i in range(20)]
            await engine.hello("eng", [WF_A], [*invented, run("seen")])
            starting = asyncio.create_task(client.post("/api/v1/executions", json={"workflowId": "wf-a"}))
            [command] = await answering(engine, 1)
            assert (await starting).status_code == 201
        await until(lambda: len(lost) == 22)
        known = {r.execution_id for r in lost if r.known}
        assert known == {"seen", command["executionId"]}

    # The emitter: an unknown run is looked up once and dropped; a known one goes out without waiting on them.
    sent: list[ExportLogsServiceRequest] = []
    started = live_event(EventName.WORKFLOW_STARTED, 1, execution="real", workflow="wf-a")
    emitter = LostEmitter(None, sent.append, live_started=lambda e: started if e == "real" else None,
                          lookup_timeout_s=60.0)  # fmt: skip
    for i in range(20):
        emitter(LostRun(f"invented-{i}", "wf-a", 2, "eng", "scripted eng", "closed", known=False))
    emitter(LostRun("real", "wf-a", 2, "eng", "scripted eng", "closed"))
    await until(lambda: len(sent) == 1)
    await asyncio.to_thread(emitter.close)
    record = sent[0].resource_logs[0].scope_logs[0].log_records[0]
    assert [a.value.string_value for a in record.attributes if a.key == "workflow.execution.id"] == ["real"]


async def test_the_lost_emitters_queue_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control_events, "MAX_QUEUED", 2)
    release, sent = threading.Event(), []

    def sink(request: ExportLogsServiceRequest) -> None:
        release.wait(20)
        sent.append(request)

    emitter = LostEmitter(None, sink)
    for i in range(5):
        emitter(LostRun(f"r{i}", "wf-a", 2, "eng", "scripted eng", "closed"))
    assert emitter.dropped == 3
    release.set()
    await asyncio.to_thread(emitter.close)
    assert len(sent) == 2


async def test_an_engine_of_another_subject_cannot_claim_or_hijack_runs() -> None:
    async with control_bridge() as (bridge, port, lost), http(port, "operator") as client:
        async with scripted_engine(port) as victim, scripted_engine(port, "engine-token-2") as thief:
            await _claims_are_refused(bridge, client, victim, thief)
        # The victim's runs are lost with its workflow and a seq near what was seen; the lost frame
        # is the victim's alone.
        await until(lambda: any(r.execution_id == "x1b" for r in lost))
        [x1b] = [r for r in lost if r.execution_id == "x1b"]
        assert (x1b.workflow_id, x1b.engine_id, x1b.seq) == ("wf-a", "victim", 2)
        async with scripted_engine(port, "engine-token-2") as thief:
            await thief.hello("thief", [WF_A], [run("x1b")])
            assert [f for f in await thief.sync() if f["type"] == "lost"] == []
        async with scripted_engine(port) as victim:
            await victim.hello("victim", [WF_A], [run("x1b")])
            assert (await victim.expect("lost"))["executionId"] == "x1b"


async def _claims_are_refused(bridge: Any, client: Any, victim: ScriptedEngine, thief: ScriptedEngine) -> None:
    await victim.hello("victim", [WF_A], [run("x1", seq=3), run("x1b")])
    await thief.hello("thief", [WF_A], [run("x1", seq=2**62)])
    await thief.heartbeat([run("x1", seq=2**62), run("x1b")])
    await thief.sync()
    assert bridge.control.engines["thief"].executions == {}
    # Commands go to the run's engine.
    pausing = asyncio.create_task(client.post("/api/v1/executions/x1/pause", json={}))
    [command] = await answering(victim, 1, executionId="x1", status="paused")
    assert command["op"] == "pause" and (await pausing).status_code == 200
    # A start the idle thief takes and answers with another run's id starts nothing the stack knows.
    starting = asyncio.create_task(client.post("/api/v1/executions", json={"workflowId": "wf-a"}))
    [start] = await answering(thief, 1, executionId="x1")
    response = await starting
    assert response.status_code == 502 and response.json()["code"] == "engine_error", response.text
    assert start["executionId"] != "x1" and "x1" not in bridge.control.engines["thief"].executions
    # The thief's end of x1 changes nothing: the retry goes to the victim once x1 ended there.
    await thief.send({"type": "finished", "executionId": "x1", "workflowId": "wf-b", "result": "failure"})
    await thief.sync()
    await victim.send({"type": "finished", "executionId": "x1", "workflowId": "wf-a", "result": "failure"})
    await victim.sync()
    retrying = asyncio.create_task(client.post("/api/v1/executions/x1/retry", json={}))
    [retry] = await answering(victim, 1)
    assert retry["op"] == "retry" and (await retrying).status_code == 201


_SECRET = "hardening-secret-of-at-least-32-bytes"


@contextlib.asynccontextmanager
async def _jwt_bridge() -> AsyncIterator[tuple[Bridge, int]]:
    bridge = Bridge(BridgeConfig(port=0, auth=AuthConfig(tokens=TOKENS, jwt_secret=_SECRET)), None)
    async with bridge.running(), bridge.serve() as port:
        yield bridge, port


def _jwt(subject: str, grants: list[str], exp: float) -> str:
    return jwt.encode({"sub": subject, "rooms": grants, "exp": int(exp)}, _SECRET, algorithm="HS256")


async def test_an_expired_token_steers_no_more_and_its_sockets_close() -> None:
    exp = time.time() + 2
    operator, worker = _jwt("op", ["control:*"], exp), _jwt("worker", ["engine"], exp)
    async with (
        _jwt_bridge() as (bridge, port),
        scripted_engine(port, worker) as engine,
        ws_client(f"ws://127.0.0.1:{port}/ws?token={operator}") as ws,
    ):
        await engine.hello("eng", [WF_A], [run("x1")])
        await ws.send(json.dumps({"op": "pause", "id": 1, "executionId": "x1"}))
        await answering(engine, 1, executionId="x1", status="paused")
        [*_, result] = await recv_until(ws, lambda m: m.get("type") == "control.result")
        assert result["ok"] is True
        # Past `exp` both channels close with 4401.
        with pytest.raises(ConnectionClosed) as closed:
            await recv_until(ws, lambda m: False)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
        with pytest.raises(ConnectionClosed) as closed:
            await engine.expect("never")
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
        # A command of an expired principal is refused whatever carries it.
        expired = Principal("op", frozenset({"control:*"}), time.time() - 1)
        outcome = await bridge.control.command(expired, parse_command("pause", {"executionId": "x1"}))
        assert (outcome.status, outcome.code) == (401, "unauthorized")


async def test_an_idempotency_key_reused_for_another_body_is_a_409() -> None:
    async with (
        control_bridge(control_timeout_s=2.0) as (_, port, _lost),
        http(port, "operator") as client,
        scripted_engine(port) as engine,
    ):
        await engine.hello("eng", [WF_A])
        key = {"Idempotency-Key": "k1"}
        starting = asyncio.create_task(
            client.post("/api/v1/executions", json={"workflowId": "wf-a", "input": 1}, headers=key)
        )
        await answering(engine, 1)
        first = await starting
        assert first.status_code == 201
        again = await client.post("/api/v1/executions", json={"workflowId": "wf-a", "input": 2}, headers=key)
        assert again.status_code == 409 and again.json()["code"] == "conflict", again.text
        repeating = asyncio.create_task(
            client.post("/api/v1/executions", json={"workflowId": "wf-a", "input": 1}, headers=key)
        )
        await answering(engine, 1)
        assert (await repeating).json() == first.json()


async def test_only_a_control_star_token_may_start_a_run_for_another_user() -> None:
    async with control_bridge() as (bridge, port, _lost), scripted_engine(port) as engine:
        await engine.hello("eng", [WF_A])
        async with http(port, "steer-a") as client:
            response = await client.post("/api/v1/executions", json={"workflowId": "wf-a", "userId": "mallory"})
            assert response.status_code == 403 and "for itself only" in response.text
            starting = asyncio.create_task(
                client.post("/api/v1/executions", json={"workflowId": "wf-a", "userId": "ana"})
            )
            [command] = await answering(engine, 1)
            assert command["userId"] == "ana" and (await starting).status_code == 201
        async with http(port, "operator") as client:
            starting = asyncio.create_task(
                client.post("/api/v1/executions", json={"workflowId": "wf-a", "userId": "bo"})
            )
            [command] = await answering(engine, 1)
            assert command["userId"] == "bo" and (await starting).status_code == 201
        # control:user:<id> lets a token start runs for that user (the demo's token has it).
        for_bo = Principal("ana", frozenset({"control:workflow:wf-a", "control:user:bo"}))
        direct = asyncio.create_task(
            bridge.control.command(for_bo, parse_command("start", {"workflowId": "wf-a", "userId": "bo"}))
        )
        await answering(engine, 1)
        assert (await direct).status == 201
        outcome = await bridge.control.command(for_bo, parse_command("start", {"workflowId": "wf-a", "userId": "cy"}))
        assert outcome.status == 403


async def test_a_run_the_caller_may_neither_read_nor_steer_is_a_404() -> None:
    async with control_bridge() as (_, port, _lost), scripted_engine(port) as engine:
        await engine.hello("eng", [WF_A, WF_B], [run("b1", "wf-b")])
        async with http(port, "steer-a") as client:
            response = await client.post("/api/v1/executions/b1/cancel", json={})
        assert response.status_code == 404 and "wf-b" not in response.text
        # A caller that may read it learns that it may not steer it.
        async with http(port, "steer-other") as client:
            response = await client.post("/api/v1/executions/b1/cancel", json={})
        assert response.status_code == 403 and "wf-b" in response.text


async def test_a_run_whose_events_go_on_is_not_lost_when_only_the_control_channel_is_cut() -> None:
    async with control_bridge(lost_after_s=0.5) as (bridge, port, lost):
        bridge.hub.publish([live_event(EventName.WORKFLOW_STARTED, 1, execution="x1", workflow="wf-a")])
        async with scripted_engine(port) as engine:
            await engine.hello("eng", [WF_A], [run("x1", seq=1)])
        await until(lambda: "eng" in bridge.control._gone)
        # The engine goes on exporting: its events keep arriving for longer than lost_after_s.
        for seq in range(2, 22):
            bridge.hub.publish([live_event(EventName.NODE_STARTED, seq, execution="x1", workflow="wf-a")])
            await asyncio.sleep(0.1)
            bridge.control.check_liveness()
            assert lost == [], seq
        # They stop: lost_after_s later the run is lost, after the last seq seen.
        await until(lambda: len(lost) == 1)
        assert lost[0].seq == 22


async def test_another_subject_saying_hello_with_an_absent_engines_id_does_not_lock_it_out() -> None:
    async with control_bridge(control_timeout_s=10.0) as (bridge, port, _lost), http(port, "operator") as client:
        async with scripted_engine(port) as engine:
            await engine.hello("eng", [WF_A], [run("x1")])
        await until(lambda: "eng" in bridge.control._gone)
        pausing = asyncio.create_task(client.post("/api/v1/executions/x1/pause", json={}))
        await until(lambda: bool(bridge.control._pending.get("eng")))
        async with scripted_engine(port, "engine-token-2") as squatter:
            await squatter.hello("eng", [WF_A], [])
            # The real engine comes back under its id and gets the command held for it.
            async with scripted_engine(port) as back:
                welcome = await back.hello("eng", [WF_A], [run("x1")])
                assert welcome["engineId"] == "eng"
                await answering(back, 1, executionId="x1", status="paused")
                assert (await pausing).status_code == 200
            assert [f for f in await squatter.sync() if f["type"] == "command"] == []


async def test_the_stack_stopping_declares_no_run_lost() -> None:
    lost: list[LostRun] = []
    bridge = Bridge(BridgeConfig(port=0, auth=AuthConfig(tokens=TOKENS)), None, emit_lost=lost.append)
    headers = {"Authorization": "Bearer engine-token"}
    async with bridge.running():
        async with bridge.serve() as port:
            ws = await connect(engine_url(port), additional_headers=headers, open_timeout=10)
            await ScriptedEngine(ws).hello("eng", [WF_A], [run("x1")])
        # The server closed the channel as it stopped: the engine still runs x1 and tells the next stack.
        await until(lambda: "eng" in bridge.control._gone)
        bridge.control.check_liveness()
        assert lost == []
        await ws.close()


async def test_a_heartbeat_seq_is_held_near_what_the_stack_saw() -> None:
    async with control_bridge() as (bridge, port, lost):
        bridge.hub.publish([live_event(EventName.WORKFLOW_STARTED, 1, execution="x1", workflow="wf-a")])
        bridge.hub.publish([live_event(EventName.NODE_STARTED, 2, execution="x1", workflow="wf-a")])
        async with scripted_engine(port) as engine:
            await engine.hello("eng", [WF_A], [run("x1", seq=2**62), run("x2", seq=2**62)])
        await until(lambda: len(lost) == 2)
        seqs = {r.execution_id: r.seq for r in lost}
        assert seqs == {"x1": 2 + 100_000 + 1, "x2": 2**62 - 1}
