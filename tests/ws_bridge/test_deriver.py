"""The deriver: ETA on progress, performance warnings from end events, spans and the sweep over
running attempts — each attempt warned once per level."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from flowscope.ws_bridge.derive import ExecutionTrack, MedianCache, Thresholds
from flowscope.ws_bridge.deriver import Deriver
from flowscope.ws_bridge.events import SpanFact
from flowscope.ws_bridge.types import LiveEvent

_DEADLINE_S = 10.0
NO_TRACKS: dict[str, ExecutionTrack] = {}


def event(kind: str, seq: int, node_id: str | None = None, **data: object) -> LiveEvent:
    return {
        "type": kind,
        "seq": seq,
        "ts": f"2026-11-23T10:00:{seq:02d}.000000Z",
        "executionId": "e1",
        "workflowId": "wf",
        "workflowName": "Flow",
        "nodeId": node_id,
        "nodeType": "code" if node_id else None,
        "traceId": "ab" * 16,
        "spanId": "cd" * 8,
        "data": dict(data),
    }


async def until(condition: Callable[[], bool]) -> None:
    """Wait for the loop's timers (the sweep) to make `condition` true, within a deadline."""
    async with asyncio.timeout(_DEADLINE_S):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)


class Emitted:
    def __init__(self) -> None:
        self.events: list[LiveEvent] = []

    def __call__(self, derived: LiveEvent, track: ExecutionTrack) -> None:
        self.events.append(derived)


def span(node_id: str | None, duration_ms: float, workflow_id: str = "", result: str = "success") -> SpanFact:
    return SpanFact(
        execution_id="e1",
        workflow_id=workflow_id,
        node_id=node_id,
        node_type="code" if node_id else None,
        attempt=1,
        result=result,
        duration_ms=duration_ms,
        end_ts="2026-11-23T10:01:00.000000Z",
        trace_id="ab" * 16,
        span_id="cd" * 8,
    )


async def test_a_slow_end_event_warns_once_per_level() -> None:
    track, emitted = ExecutionTrack("wf"), Emitted()
    thresholds = Thresholds(warning_ms=100, critical_ms=1_000)
    deriver = Deriver(thresholds, MedianCache(None), emitted, {"e1": track}.get, 100)
    deriver.fold(track, event("node.started", 1, "n1", attempt=1))
    _, derived = deriver.fold(track, event("node.completed", 2, "n1", attempt=1, durationMs=500.0))
    assert [(e["type"], e["data"]["running"], e["data"]["actualMs"]) for e in derived] == [
        ("performance.warning", False, 500.0)
    ]
    # The same attempt's span agrees: nothing more to say.
    deriver.observe_spans([span("n1", 500.0, "wf")])
    assert emitted.events == []
    deriver.close()


async def test_progress_carries_the_eta_along_the_critical_path() -> None:
    medians = MedianCache(None)
    medians.observe("wf", "a", 100.0)
    medians.observe("wf", "b", 250.0)
    track = ExecutionTrack("wf")
    deriver = Deriver(Thresholds(), medians, Emitted(), NO_TRACKS.get, 100)
    nodes = [{"id": "a", "type": "code"}, {"id": "b", "type": "code", "dependsOn": ["a"]}]
    deriver.fold(track, event("workflow.started", 1, nodes=nodes))
    assert track.dag == {"a": [], "b": ["a"]}
    progress, derived = deriver.fold(track, event("execution.progress", 2, progress=0.0))
    assert derived == [] and progress["data"] == {"progress": 0.0, "etaMs": 350.0}
    deriver.close()


async def test_the_sweep_warns_a_running_attempt_then_lets_it_go() -> None:
    emitted = Emitted()
    track = ExecutionTrack("wf")
    deriver = Deriver(Thresholds(warning_ms=20, critical_ms=60_000), MedianCache(None), emitted, NO_TRACKS.get, 100)
    deriver.fold(track, event("node.started", 1, "n1", attempt=1))
    assert deriver.sweeping
    await until(lambda: bool(emitted.events))
    [warning] = emitted.events
    assert (warning["type"], warning["nodeId"], warning["data"]["running"]) == ("performance.warning", "n1", True)
    # Its end event finds the level already warned; the sweep lets the ended attempt go.
    _, derived = deriver.fold(track, event("node.completed", 2, "n1", attempt=1, durationMs=50.0))
    assert derived == []
    await until(lambda: not deriver.sweeping)
    assert len(emitted.events) == 1
    deriver.close()


async def test_a_node_span_before_its_workflow_is_named_waits_then_teaches_the_medians() -> None:
    medians = MedianCache(None)
    tracks: dict[str, ExecutionTrack] = {}
    deriver = Deriver(Thresholds(), medians, Emitted(), tracks.get, 100)
    deriver.observe_spans([span("n1", 42.0)])
    assert medians.get("wf") == {}
    # The run span names the workflow: the waiting node span is read.
    deriver.observe_spans([span(None, 100.0, workflow_id="wf")])
    assert medians.get("wf") == {"n1": 42.0}
    assert deriver.spans_in == 2
    deriver.close()


async def test_closing_stops_the_sweep() -> None:
    track = ExecutionTrack("wf")
    thresholds = Thresholds(warning_ms=60_000, critical_ms=120_000)
    deriver = Deriver(thresholds, MedianCache(None), Emitted(), NO_TRACKS.get, 100)
    deriver.fold(track, event("node.started", 1, "n1", attempt=1))
    assert deriver.sweeping
    deriver.close()
    assert not deriver.sweeping


async def test_a_slow_span_warns_when_its_end_event_never_came() -> None:
    track, emitted = ExecutionTrack("wf"), Emitted()
    deriver = Deriver(Thresholds(warning_ms=100, critical_ms=300), MedianCache(None), emitted, {"e1": track}.get, 100)
    deriver.fold(track, event("node.started", 1, "n1", attempt=1))
    deriver.observe_spans([span("n1", 400.0, "wf", result="failure")])
    assert [(e["type"], e["data"]["running"]) for e in emitted.events] == [
        ("performance.warning", False),
        ("performance.critical", False),
    ]
    # The span ended the attempt: the sweep has nothing left to watch.
    await until(lambda: not deriver.sweeping)
    assert len(emitted.events) == 2
    deriver.close()
