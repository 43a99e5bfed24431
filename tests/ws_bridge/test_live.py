"""The live protocol end to end: engine → OTLP → collector → bridge → real WebSocket clients."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest

from flowscope.engine import Engine, EventType, NodeContext, WorkflowBuilder, WorkflowEvent
from flowscope.stack import Stack
from flowscope.ws_bridge.client import LiveClient
from flowscope.ws_bridge.types import LiveEvent
from tests.collector.otlp import OtlpProviders, otlp_providers
from tests.collector.test_outage import OutageWriter, outage_factory
from tests.helpers import Gate
from tests.ws_bridge.conftest import StackFactory, recv_json, recv_until, ws_client, ws_url

TERMINAL = {"workflow.completed", "workflow.failed", "workflow.cancelled"}


async def quick(ctx: NodeContext) -> int:
    return 1


@pytest.fixture
async def providers(stack: Stack) -> AsyncIterator[OtlpProviders]:
    made = otlp_providers(stack.collector, "grpc")
    yield made
    await asyncio.to_thread(made.shutdown)


def gated_workflow(gate: Gate) -> Any:
    return (
        WorkflowBuilder("gated", "Gated")
        .code("a", quick)
        .code("b", quick, depends_on=["a"])
        .code("wait", gate, depends_on=["b"])
        .code("c", quick, depends_on=["wait"])
        .llm("d", "tiny", "summarise {{ nodes.c }}", depends_on=["c"])
        .build()
    )


def engine_events(seqs: list[int]) -> list[int]:
    return sorted(seqs)


async def test_replay_then_live_is_complete_in_order_without_duplicates(stack: Stack, providers: OtlpProviders) -> None:
    gate = Gate()
    engine = Engine(providers.telemetry())
    handle = engine.start(gated_workflow(gate))
    await gate.entered.wait()
    # Part of the run is history (in ClickHouse or in flight) before anyone subscribes.
    await asyncio.to_thread(providers.flush)
    async with ws_client(ws_url(stack, f"/ws/executions/{handle.execution_id}?fromSeq=1")) as ws:
        first = await recv_json(ws)
        assert first == {
            "type": "subscribed",
            "id": "execution",
            "rooms": [f"execution:{handle.execution_id}"],
            "fromSeq": 1,
        }
        gate.release.set()
        seen: set[str] = set()

        def finished(message: dict[str, Any]) -> bool:
            seen.add(message["type"])
            return "replay.done" in seen and bool(seen & TERMINAL)

        messages = await recv_until(ws, finished)
    result = await handle.result()
    await engine.aclose()
    events = [m for m in messages if "seq" in m and not m.get("derived")]
    assert [e["seq"] for e in events] == list(range(1, result.events_emitted + 1))
    assert any(m["type"] == "replay.done" for m in messages)
    assert events[0]["type"] == "workflow.started" and events[-1]["type"] == "workflow.completed"
    completed = [e for e in events if e["type"] == "node.completed"]
    assert [e["nodeId"] for e in completed] == ["a", "b", "wait", "c", "d"]
    llm = completed[-1]
    assert llm["nodeType"] == "llm" and llm["data"]["usage"]["outputTokens"] > 0
    assert len(llm["traceId"]) == 32 and len(llm["spanId"]) == 16
    assert llm["ts"].endswith("Z")
    assert all(e["sub"] == "execution" for e in events)


async def test_reconnect_resumes_from_last_seq(stack: Stack, providers: OtlpProviders) -> None:
    gate = Gate()
    engine = Engine(providers.telemetry())
    handle = engine.start(gated_workflow(gate))
    await gate.entered.wait()
    await asyncio.to_thread(providers.flush)
    url = ws_url(stack, f"/ws/executions/{handle.execution_id}?fromSeq=1")
    async with ws_client(url) as ws:
        before = await recv_until(ws, lambda m: m.get("type") == "replay.done")
    last = max(m["seq"] for m in before if m.get("type") not in ("subscribed", "replay.done"))
    gate.release.set()
    async with ws_client(ws_url(stack, f"/ws/executions/{handle.execution_id}?fromSeq={last + 1}")) as ws:
        after = await recv_until(ws, lambda m: m.get("type") in TERMINAL)
    result = await handle.result()
    await engine.aclose()
    seqs = [m["seq"] for m in before + after if "seq" in m and not m.get("derived")]
    assert seqs == list(range(1, result.events_emitted + 1))


async def test_live_client_survives_a_dropped_connection(stack: Stack, providers: OtlpProviders) -> None:
    gate = Gate()
    engine = Engine(providers.telemetry())
    handle = engine.start(gated_workflow(gate))
    assert stack.endpoints is not None
    client = LiveClient(stack.endpoints.web, execution_id=handle.execution_id)
    seen: list[int] = []
    dropped = False
    async for event in client:
        seen.append(event["seq"])
        if event["type"] == "node.started" and event["nodeId"] == "wait" and not dropped:
            dropped = True
            await client.drop_connection()
            gate.release.set()
    result = await handle.result()
    await engine.aclose()
    assert dropped
    assert seen == list(range(1, result.events_emitted + 1))


async def test_type_and_node_type_filters(stack: Stack, providers: OtlpProviders) -> None:
    engine = Engine(providers.telemetry())
    wf = WorkflowBuilder("filtered").code("a", quick).llm("b", "tiny", "x", depends_on=["a"]).build()
    async with ws_client(ws_url(stack)) as ws:
        await ws.send(json.dumps({"op": "subscribe", "id": "f", "rooms": ["workflow:filtered"],
                                  "types": ["node.completed"], "nodeTypes": ["llm"]}))  # fmt: skip
        assert (await recv_json(ws))["type"] == "subscribed"
        assert (await recv_json(ws))["type"] == "replay.done"
        await engine.run(wf)
        await asyncio.to_thread(providers.flush)
        event = await recv_json(ws)
        assert (event["type"], event["nodeId"], event["nodeType"]) == ("node.completed", "b", "llm")
        await ws.send('{"op": "ping"}')
        assert (await recv_json(ws))["type"] == "pong", "nothing else may have been sent"
    await engine.aclose()


async def test_bad_input_gets_errors_and_the_connection_stays_usable(stack: Stack) -> None:
    async with ws_client(ws_url(stack)) as ws:
        cases: list[tuple[str, str]] = [
            ("not json", "bad_json"),
            ("[1, 2]", "bad_request"),
            ('{"op": "dance"}', "unknown_op"),
            ('{"op": "subscribe", "id": "s", "rooms": ["galaxy:1"]}', "unknown_room"),
            ('{"op": "subscribe", "id": "s", "rooms": []}', "bad_request"),
            ('{"op": "subscribe", "id": "s", "rooms": ["all"], "types": ["node.exploded"]}', "bad_request"),
            ('{"op": "subscribe", "id": "s", "rooms": ["all"], "fromSeq": 3}', "bad_request"),
            ('{"op": "subscribe", "id": "s", "rooms": ["execution:x"], "fromSeq": -1}', "bad_request"),
            ('{"op": "subscribe", "id": "s", "rooms": ["all"], "since": "yesterday"}', "bad_request"),
            ('{"op": "unsubscribe", "id": "nope"}', "unknown_subscription"),
            ("x" * 70_000, "frame_too_large"),
        ]
        for frame, code in cases:
            await ws.send(frame)
            reply = await recv_json(ws)
            assert (reply["type"], reply["code"]) == ("error", code), frame[:60]
            assert reply["message"]
        await ws.send(b"\x00binary")
        assert (await recv_json(ws))["code"] == "bad_frame"
        for i in range(16):
            await ws.send(json.dumps({"op": "subscribe", "id": f"s{i}", "rooms": ["all"]}))
            assert (await recv_json(ws))["type"] == "subscribed"
            assert (await recv_json(ws))["type"] == "replay.done"
        await ws.send(json.dumps({"op": "subscribe", "id": "s16", "rooms": ["all"]}))
        too_many = await recv_json(ws)
        assert (too_many["code"], too_many["id"]) == ("too_many_subscriptions", "s16")
        await ws.send(json.dumps({"op": "subscribe", "id": "s3", "rooms": ["all"]}))
        assert (await recv_json(ws))["code"] == "duplicate_subscription"
        await ws.send('{"op": "unsubscribe", "id": "s3"}')
        assert await recv_json(ws) == {"type": "unsubscribed", "id": "s3"}
        await ws.send('{"op": "ping"}')
        assert (await recv_json(ws))["type"] == "pong"


async def test_workflow_room_replays_since_and_dedupes(stack: Stack, providers: OtlpProviders) -> None:
    engine = Engine(providers.telemetry())
    wf = WorkflowBuilder("replayed").code("a", quick).build()
    first = await engine.run(wf)
    await asyncio.to_thread(providers.flush)
    assert stack.collector.pipeline is not None
    await asyncio.to_thread(stack.collector.pipeline.flush, 30.0)
    async with ws_client(ws_url(stack)) as ws:
        await ws.send(json.dumps({"op": "subscribe", "id": "w", "rooms": ["workflow:replayed"],
                                  "since": "2000-01-01T00:00:00Z"}))  # fmt: skip
        messages = await recv_until(ws, lambda m: m.get("type") == "replay.done")
    events = [m for m in messages if m.get("executionId") == first.execution_id]
    assert [e["seq"] for e in events] == list(range(1, first.events_emitted + 1))
    # The same events fed twice (a retried export) reach subscribers once.
    assert stack.bridge is not None
    before = stack.bridge.hub.duplicates_dropped
    # What the bridge sent is a live event: fed back, it is one already seen.
    stack.bridge.hub.publish([cast(LiveEvent, {**events[0], "data": {}})])
    assert stack.bridge.hub.duplicates_dropped == before + 1
    await engine.aclose()


async def test_all_room_replays_since_from_store_and_memory(stack_factory: StackFactory) -> None:
    """`all` with `since`: stored runs come from ClickHouse, runs not stored yet (ClickHouse
    unreachable here) from the bridge's recent events, each event once; `types` filters both."""
    writers: list[OutageWriter] = []
    async with stack_factory(writer_factory=outage_factory(writers)) as stack:
        assert stack.collector.pipeline is not None
        providers = otlp_providers(stack.collector, "grpc")
        engine = Engine(providers.telemetry())
        since = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        for writer in writers:
            writer.down.clear()
        stored = await engine.run(WorkflowBuilder("stored").code("a", quick).build())
        await asyncio.to_thread(providers.flush)
        assert await asyncio.to_thread(stack.collector.pipeline.flush, 30.0)
        for writer in writers:
            writer.down.set()
        unstored = await engine.run(WorkflowBuilder("unstored").code("a", quick).build())
        await asyncio.to_thread(providers.flush)
        assert stack.bridge is not None
        await stack.bridge.hub.settled()  # the new run's events wait for its stored owner
        kinds = ["workflow.started", "workflow.completed"]
        async with ws_client(ws_url(stack)) as ws:
            await ws.send(json.dumps({"op": "subscribe", "id": "l", "rooms": ["all"], "since": since, "types": kinds}))
            messages = await recv_until(ws, lambda m: m.get("type") == "replay.done")
        replayed = sorted((m["executionId"], m["type"]) for m in messages if m.get("executionId"))
        assert replayed == sorted((x.execution_id, kind) for x in (stored, unstored) for kind in kinds)
        assert stack.bridge is not None and stack.bridge.history is not None
        in_store = stack.bridge.history.events_since(dt.datetime.fromisoformat(since))
        assert {e["executionId"] for e in in_store} == {stored.execution_id}, "the other run is in memory only"
        for writer in writers:
            writer.down.clear()
        await asyncio.to_thread(providers.shutdown)
        await engine.aclose()


async def test_in_process_events_match_the_wire(stack: Stack, providers: OtlpProviders) -> None:
    engine = Engine(providers.telemetry())
    local: list[WorkflowEvent] = []
    engine.events.add_callback(local.append)
    wf = WorkflowBuilder("twin").code("a", quick).build()
    async with ws_client(ws_url(stack)) as ws:
        await ws.send(json.dumps({"op": "subscribe", "id": "t", "rooms": ["workflow:twin"]}))
        await recv_until(ws, lambda m: m.get("type") == "replay.done")
        result = await engine.run(wf)
        await asyncio.to_thread(providers.flush)
        wire = await recv_until(ws, lambda m: m.get("type") == "workflow.completed")
    assert [(e["seq"], e["type"]) for e in wire] == [
        (e.seq, e.type.value) for e in local if e.execution_id == result.execution_id
    ]
    assert local[-1].type is EventType.WORKFLOW_COMPLETED
    await engine.aclose()
