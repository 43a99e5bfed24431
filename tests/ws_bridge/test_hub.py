"""The hub's memory of recent events: replayable as sent, and out of the garbage collector's way."""

from __future__ import annotations

import datetime as dt
import gc
import json

from flowscope.ws_bridge.events import WIRE, event_from_wire, iso_from_ns, wire_json
from flowscope.ws_bridge.rooms import Hub
from flowscope.ws_bridge.types import LiveEvent
from tests.ws_bridge.live_events import live_event


def event(execution: str, seq: int, kind: str, **data: object) -> LiveEvent:
    node = kind.startswith("node.")
    return live_event(
        kind,
        seq,
        execution=execution,
        workflow_name="Flow",
        ts=f"2026-11-23T10:00:{seq:02d}.000000Z",
        node_id="n1" if node else None,
        node_type="code" if node else None,
        data=dict(data),
    )


async def test_recent_events_replay_as_published_and_leave_the_gc_alone() -> None:
    hub = Hub()
    published = [
        event("e1", 1, "workflow.started", nodes=[{"id": "n1", "dependsOn": [], "type": "code"}], userId="ana"),
        event("e1", 2, "node.started", attempt=1),
        event("e1", 3, "node.completed", attempt=1, durationMs=1.5, output={"rows": [1, 2, 3]}),
        event("e1", 4, "workflow.completed", durationMs=2.0),
    ]
    hub.publish([e.copy() for e in published])
    gc.collect()
    recent = hub.replay.get("e1")
    assert recent is not None
    stored = recent.events
    assert len(stored) == 4 and not any(gc.is_tracked(item) for item in stored)

    replayed = hub.recent_events("e1", 2)
    assert [{k: v for k, v in e.items() if k != WIRE} for e in replayed] == published[1:]
    # The JSON comes along, so a replayed event is not serialised again.
    assert [e[WIRE] for e in replayed] == [wire_json(e.copy()) for e in published[1:]]
    since = hub.recent_since("2026-11-23T10:00:03.000000Z", workflow_id="wf", user_id=None)
    assert [e["seq"] for e in since] == [3, 4]
    assert hub.recent_since("2026-11-23T10:00:01.000000Z", workflow_id=None, user_id="bo") == []
    hub.close()


def test_wire_json_takes_any_event() -> None:
    plain = event("e2", 1, "node.completed", output={"huge": 2**70, "text": "zürich"})
    wire = wire_json(plain)
    assert json.loads(wire)["data"]["output"] == {"huge": 2**70, "text": "zürich"}
    back = event_from_wire(wire)
    assert back[WIRE] == wire and back["data"]["output"]["huge"] == 2**70
    odd = event("e2", 2, "node.completed", when={1, 2})
    assert json.loads(wire_json(odd))["data"]["when"] == str({1, 2})


def test_event_times_are_iso_8601_to_the_microsecond() -> None:
    def reference(ns: int) -> str:
        seconds, nanos = divmod(ns, 1_000_000_000)
        stamp = dt.datetime.fromtimestamp(seconds, dt.UTC).replace(microsecond=nanos // 1000)
        return stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    base = 1_795_000_000_000_000_000
    # Within one second, across the boundary, back again, far apart: the kept second must follow.
    for ns in (base, base + 999_999_999, base + 1_000_000_000, base + 5, 0, 4_102_444_800_123_456_789, base):
        assert iso_from_ns(ns) == reference(ns)
