"""The live hub takes an execution's owner from the store, or else from its first workflow.started:
never from whichever event comes first. A bridge that restarts mid-run (or meets an execution
again after forgetting it) must not let an ingest holder who knows the execution's id redirect its
live events to their own rooms, or have its real events dropped as foreign."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from typing import Any

from clickhouse_connect.driver.exceptions import OperationalError
from websockets.asyncio.client import ClientConnection

from flowscope.stack import Stack
from flowscope.ws_bridge.history import History
from flowscope.ws_bridge.rooms import Hub
from flowscope.ws_bridge.types import LiveEvent
from tests.ws_bridge.conftest import StackFactory, recv_until, ws_client, ws_url
from tests.ws_bridge.test_owner import _event, _send, _started

TOKENS = {
    "tok-alice": ("alice", frozenset({"user:alice"})),
    "tok-mallory": ("mallory", frozenset({"user:mallory", "workflow:wf-mallory", "ingest"})),
    "tok-engine": ("engine", frozenset({"ingest"})),
}
_SETTLE_S = 30.0


async def _settled(stack: Stack, events_in: int) -> None:
    """Until the hub has taken `events_in` events and none waits for its owner."""
    assert stack.bridge is not None
    hub = stack.bridge.hub
    deadline = time.monotonic() + _SETTLE_S
    while hub.events_in < events_in or hub.stats().get("ownerLookupsPending", 0):
        assert time.monotonic() < deadline, hub.stats()
        await asyncio.sleep(0.01)


async def _subscribe(ws: ClientConnection, rooms: list[str], **extra: Any) -> list[dict[str, Any]]:
    await ws.send(json.dumps({"op": "subscribe", "id": "s", "rooms": rooms, **extra}))
    return await recv_until(ws, lambda m: m.get("type") == "replay.done")


async def _received(ws: ClientConnection, execution: str) -> list[tuple[int, str]]:
    """(seq, type) of the execution's events the client got so far (a ping/pong drains its queue)."""
    await ws.send(json.dumps({"op": "ping"}))
    messages = await recv_until(ws, lambda m: m.get("type") == "pong")
    return [(m["seq"], m["type"]) for m in messages if m.get("executionId") == execution]


async def _start_run(stack_factory: StackFactory, execution: str) -> None:
    """Alice's run starts under a bridge that then goes away: the store knows its owner."""
    async with stack_factory(auth_tokens=TOKENS) as stack:
        await _send(stack, "tok-engine", _started(execution, 1, "alice"), _event(execution, 2, "node.started", {}))


async def test_a_forged_first_event_after_a_restart_does_not_take_the_workflow(stack_factory: StackFactory) -> None:
    execution = uuid.uuid4().hex
    await _start_run(stack_factory, execution)
    async with stack_factory(auth_tokens=TOKENS) as stack:
        assert stack.bridge is not None
        hub = stack.bridge.hub
        alice_auth = {"Authorization": "Bearer tok-alice"}
        mallory_auth = {"Authorization": "Bearer tok-mallory"}
        async with (
            ws_client(ws_url(stack), additional_headers=alice_auth) as alice,
            ws_client(ws_url(stack), additional_headers=mallory_auth) as mallory,
        ):
            await _subscribe(alice, ["user:alice"])
            await _subscribe(mallory, ["user:mallory", "workflow:wf-mallory"])
            before = hub.events_in
            forged = _event(execution, 9, "node.started", {}, workflow="wf-mallory")
            await _send(stack, "tok-mallory", forged)
            await _send(stack, "tok-engine", _event(execution, 3, "node.completed", {"attempt": 1}))
            await _settled(stack, before + 2)
            assert await _received(alice, execution) == [(3, "node.completed")]
            assert await _received(mallory, execution) == []
        track = hub.replay.track_of(execution)
        assert track is not None and (track.workflow_id, track.user_id) == ("wf-a", "alice")
        assert hub.foreign_dropped == 1


async def test_a_forged_workflow_started_after_a_restart_does_not_take_the_user(stack_factory: StackFactory) -> None:
    execution = uuid.uuid4().hex
    await _start_run(stack_factory, execution)
    async with stack_factory(auth_tokens=TOKENS) as stack:
        assert stack.bridge is not None
        hub = stack.bridge.hub
        alice_auth = {"Authorization": "Bearer tok-alice"}
        mallory_auth = {"Authorization": "Bearer tok-mallory"}
        async with (
            ws_client(ws_url(stack), additional_headers=alice_auth) as alice,
            ws_client(ws_url(stack), additional_headers=mallory_auth) as mallory,
        ):
            await _subscribe(alice, ["user:alice"])
            await _subscribe(mallory, ["user:mallory"])
            before = hub.events_in
            await _send(stack, "tok-mallory", _started(execution, 1, "mallory"))
            await _send(stack, "tok-engine", _event(execution, 3, "node.completed", {"attempt": 1}))
            await _settled(stack, before + 2)
            assert hub.user_of(execution) == "alice"
            assert (3, "node.completed") in await _received(alice, execution)
            assert await _received(mallory, execution) == []
            # Nor does she get the run by asking for its replay.
            replay = await _subscribe(mallory, [f"execution:{execution}"], id="replay", fromSeq=1)
            assert [m for m in replay if m.get("executionId") == execution] == []


async def test_replay_takes_the_stored_owner_over_the_hubs(stack_factory: StackFactory) -> None:
    """A live claim the store never saw first (a remote feed's order may differ from the store's)
    gives the claimant nothing of the stored run."""
    execution = uuid.uuid4().hex
    async with stack_factory(auth_tokens=TOKENS) as stack:
        assert stack.bridge is not None
        hub = stack.bridge.hub
        claim: LiveEvent = {
            "type": "workflow.started", "seq": 5, "ts": "2026-11-23T10:00:00.000000Z", "executionId": execution,
            "workflowId": "wf-a", "workflowName": "wf-a", "nodeId": None, "nodeType": None, "traceId": "",
            "spanId": "", "data": {"userId": "mallory"},
        }  # fmt: skip
        hub.publish([claim])
        await _settled(stack, hub.events_in)
        assert hub.user_of(execution) == "mallory"
        await _send(stack, "tok-engine", _started(execution, 1, "alice"), _event(execution, 2, "node.started", {}))
        mallory_auth = {"Authorization": "Bearer tok-mallory"}
        async with ws_client(ws_url(stack), additional_headers=mallory_auth) as mallory:
            replay = await _subscribe(mallory, [f"execution:{execution}"], fromSeq=1)
        assert [m for m in replay if m.get("executionId") == execution] == []


async def test_a_run_seen_from_its_start_routes_everything_after_one_lookup(stack_factory: StackFactory) -> None:
    execution = uuid.uuid4().hex
    async with stack_factory(auth_tokens=TOKENS) as stack:
        assert stack.bridge is not None
        hub = stack.bridge.hub
        lookups = hub.stats().get("ownerLookups", 0)
        async with ws_client(ws_url(stack), additional_headers={"Authorization": "Bearer tok-alice"}) as alice:
            await _subscribe(alice, ["user:alice"])
            before = hub.events_in
            await _send(stack, "tok-engine", _started(execution, 1, "alice"), _event(execution, 2, "node.started", {}))
            await _send(
                stack,
                "tok-engine",
                _event(execution, 3, "node.completed", {"attempt": 1, "durationMs": 1.0}),
                _event(execution, 4, "workflow.completed", {"durationMs": 2.0}),
            )
            await _settled(stack, before + 4)
            received = await _received(alice, execution)
        assert [seq for seq, _ in received] == [1, 2, 3, 4]
        # Asked once for the new execution; its later events went straight through.
        assert hub.stats()["ownerLookups"] == lookups + 1
        assert (hub.foreign_dropped, hub.user_of(execution)) == (0, "alice")


def _live(execution: str, seq: int, kind: str, workflow: str, **data: object) -> LiveEvent:
    return {
        "type": kind, "seq": seq, "ts": f"2026-11-23T10:00:{seq:02d}.000000Z", "executionId": execution,
        "workflowId": workflow, "workflowName": workflow, "nodeId": "a" if kind.startswith("node.") else None,
        "nodeType": "code" if kind.startswith("node.") else None, "traceId": "", "spanId": "", "data": dict(data),
    }  # fmt: skip


async def test_without_history_only_a_workflow_started_names_the_owner() -> None:
    hub = Hub()
    hub.publish([_live("e1", 9, "node.started", "wf-mallory")])
    hub.publish([_live("e1", 1, "workflow.started", "wf-a", userId="alice"), _live("e1", 2, "node.started", "wf-a")])
    hub.publish([_live("e1", 3, "node.started", "wf-mallory")])
    track = hub.replay.track_of("e1")
    assert track is not None and (track.workflow_id, track.user_id) == ("wf-a", "alice")
    assert [e["seq"] for e in hub.recent_events("e1", 1)] == [9, 1, 2]
    assert hub.foreign_dropped == 1
    hub.close()


async def test_a_store_that_fails_or_answers_late_holds_nothing_for_good(stack: Stack) -> None:
    """Unreachable: the events go on as with no history. Slow past the timeout: they go on, and the
    store's answer, when it comes, still names the owner over a forged claim."""
    history = History(stack.collector.client, stack.collector.database)
    await _send(stack, "tok-engine", _started("slow", 1, "alice"))
    assert await asyncio.to_thread(history.owners_of, ["slow", "unknown"]) == {"slow": ("wf-a", "alice")}
    answer = threading.Event()

    def stored_owners(execution_ids: list[str]) -> dict[str, tuple[str, str]]:
        if "down" in execution_ids:
            raise OperationalError("Connection refused (simulated network outage)")
        answer.wait(_SETTLE_S)
        return history.owners_of(execution_ids)

    hub = Hub(stored_owners=stored_owners, owner_timeout_s=0.05)
    try:
        hub.publish([_live("down", 1, "workflow.started", "wf-a", userId="bo")])
        await asyncio.wait_for(hub.settled(), _SETTLE_S)
        assert (hub.user_of("down"), hub.stats()["ownerLookupsFailed"]) == ("bo", 1)

        hub.publish([_live("slow", 7, "workflow.started", "wf-a", userId="mallory")])
        await asyncio.wait_for(hub.settled(), _SETTLE_S)
        assert [e["seq"] for e in hub.recent_events("slow", 1)] == [7]
        assert hub.user_of("slow") == "mallory"
        answer.set()
        deadline = time.monotonic() + _SETTLE_S
        while hub.user_of("slow") != "alice":
            assert time.monotonic() < deadline, hub.user_of("slow")
            await asyncio.sleep(0.01)
    finally:
        answer.set()
        hub.close()
