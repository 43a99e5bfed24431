"""The replay buffer: recent events per execution, bounded by executions and by events, and owners
that outlive the buffers."""

from __future__ import annotations

from flowscope.ws_bridge.replay import ReplayBuffer
from flowscope.ws_bridge.types import LiveEvent
from tests.ws_bridge.live_events import live_event


def event(execution: str, seq: int, workflow_id: str = "wf") -> LiveEvent:
    ts = f"2026-11-23T10:00:{seq:02d}.000000Z"
    return live_event("node.started", seq, execution=execution, workflow=workflow_id, workflow_name="Flow", ts=ts)


def keep(replay: ReplayBuffer, *events: LiveEvent) -> None:
    for one in events:
        replay.remember(replay.entry(one), one)


def test_the_least_recently_active_execution_goes_first() -> None:
    replay = ReplayBuffer(max_executions=2)
    keep(replay, event("a", 1), event("b", 1), event("a", 2), event("c", 1))
    assert list(replay) == ["a", "c"] and "b" not in replay
    assert [e["seq"] for e in replay.events("a", 1)] == [1, 2]
    assert replay.events("b", 1) == []
    assert replay.recent_total == 3


def test_the_event_bound_evicts_whole_executions_but_never_the_last() -> None:
    replay = ReplayBuffer(max_recent_events=3)
    keep(replay, event("a", 1), event("a", 2), event("b", 1), event("b", 2))
    assert list(replay) == ["b"] and replay.recent_total == 2
    keep(replay, *(event("b", s) for s in range(3, 6)))
    assert list(replay) == ["b"] and replay.recent_total == 5


def test_an_evicted_execution_keeps_its_first_owner() -> None:
    replay = ReplayBuffer(max_executions=1)
    keep(replay, event("x", 1, "wf-a"))
    replay.claim("x", "wf-a", {"userId": "alice"})
    replay.claim("x", "wf-eve", {"userId": "eve"})
    assert replay.user_of("x") == "alice"
    keep(replay, event("other", 1))
    assert "x" not in replay and replay.user_of("x") == "alice"
    again = replay.entry(event("x", 2, "wf-eve"))
    assert (again.track.workflow_id, again.track.user_id) == ("wf-a", "alice")


def test_since_filters_by_time_workflow_and_user() -> None:
    replay = ReplayBuffer()
    keep(replay, event("a", 1), event("a", 2))
    replay.claim("a", "wf", {"userId": "ana"})
    keep(replay, event("b", 3, "wf-b"))
    replay.claim("b", "wf-b", {})
    since = "2026-11-23T10:00:02.000000Z"
    assert [(e["executionId"], e["seq"]) for e in replay.since(since, workflow_id=None, user_id=None)] == [
        ("a", 2),
        ("b", 3),
    ]
    assert [e["seq"] for e in replay.since(since, workflow_id="wf-b", user_id=None)] == [3]
    assert [e["seq"] for e in replay.since(since, workflow_id=None, user_id="ana")] == [2]
