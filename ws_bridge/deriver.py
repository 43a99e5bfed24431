"""What the hub derives from the stream: an execution's DAG and node states, the ETA on progress
events, and performance warnings for slow nodes — from their end events, their spans, and a sweep
over the attempts still running.

Runs on the event loop only. The hub hands it each admitted event (`fold`) and every ended span
(`observe_spans`); warnings noticed outside `fold` (the sweep, a span) go out through `emit`.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from flowscope.contract import TERMINAL_EVENTS, EventName, NodeState, Result, node_state
from flowscope.ws_bridge.derive import (
    ExecutionTrack,
    MedianCache,
    NodeTrack,
    Thresholds,
    WarningBase,
    estimate_eta_ms,
    performance_event,
)
from flowscope.ws_bridge.events import SpanFact
from flowscope.ws_bridge.shapes import node_specs, number, whole
from flowscope.ws_bridge.types import LiveEvent

# Node spans waiting for their workflow to be named: a batch's worth, not a history.
_MAX_ORPHAN_EXECUTIONS = 256
_MAX_ORPHANS_PER_EXECUTION = 256
# How often running nodes are checked against their thresholds: a warning comes at most
# this late. One sweep for all, where a timer per node and level cost a heap push and a
# cancellation per node step (≈ 10 % of the bridge's time at 800 node steps/s).
SWEEP_INTERVAL_S = 0.1
_LEVELS = ("warning", "critical")
# States of an attempt whose time still counts towards its thresholds.
_WATCHED = frozenset({NodeState.RUNNING, NodeState.WAITING})

# A derived event and the execution it belongs to, for routing.
Emit = Callable[[LiveEvent, ExecutionTrack], None]
TrackOf = Callable[[str], ExecutionTrack | None]


class Deriver:
    def __init__(self, thresholds: Thresholds, medians: MedianCache, emit: Emit, track_of: TrackOf, bound: int) -> None:
        self.thresholds = thresholds
        self.medians = medians
        self._emit = emit
        self._track_of = track_of
        self._bound = bound
        self.spans_in = 0
        # Run spans name their workflow; node spans only their execution. Bounded like the tracks.
        self._workflow_of: OrderedDict[str, str] = OrderedDict()
        self._orphans: OrderedDict[str, list[SpanFact]] = OrderedDict()
        # Attempts running, swept for thresholds passed; bounded by the tracked executions.
        self._running: dict[NodeTrack, ExecutionTrack] = {}
        self._sweep_handle: asyncio.TimerHandle | None = None

    # -- events -----------------------------------------------------------------------------

    def fold(self, track: ExecutionTrack, event: LiveEvent) -> tuple[LiveEvent, list[LiveEvent]]:
        """Fold the event into what is known of its execution: the event as sent on (with its
        ETA on progress), and the events derived from it at once."""
        derived = self._track(track, event)
        if event["type"] == EventName.EXECUTION_PROGRESS:
            # An execution whose owner is not known yet has no workflow to ask medians of.
            medians = self.medians.get(track.workflow_id) if track.workflow_id else {}
            eta = estimate_eta_ms(track, medians, time.monotonic())
            event = {**event, "data": {**event["data"], "etaMs": eta}}
        return event, derived

    def _track(self, track: ExecutionTrack, event: LiveEvent) -> list[LiveEvent]:
        kind = event["type"]
        data = event.get("data")
        if not isinstance(data, dict):
            data = {}
        if kind == EventName.WORKFLOW_STARTED:
            for spec in node_specs(data.get("nodes")):
                depends = spec.get("dependsOn")
                track.dag[spec["id"]] = [d for d in depends if isinstance(d, str)] if isinstance(depends, list) else []
                track.types[spec["id"]] = spec["type"] if isinstance(spec.get("type"), str) else ""
            return []
        if kind in TERMINAL_EVENTS:
            track.close()
            return []
        state = node_state(kind, data)
        node_id = event.get("nodeId")
        if state is None or not node_id:
            return []
        node = track.nodes.setdefault(node_id, NodeTrack())
        node.state = state
        attempt = whole(data.get("attempt")) or node.attempt
        if kind == EventName.NODE_STARTED:
            self._watch(track, node, attempt, event)
            return []
        if kind in (EventName.NODE_COMPLETED, EventName.NODE_FAILED):
            node.cancel()
            actual = float(number(data.get("durationMs")) or 0.0)
            limits = self.thresholds.for_type(event.get("nodeType"))
            return [
                self._warned(node, attempt, event, level, limit, actual, running=False)
                for level, limit in zip(_LEVELS, limits, strict=True)
                if actual >= limit and (attempt, level) not in node.warned
            ]
        return []

    # -- the sweep over running attempts ------------------------------------------------------

    def _watch(self, track: ExecutionTrack, node: NodeTrack, attempt: int, started: LiveEvent) -> None:
        node.attempt = attempt
        node.started = time.monotonic()
        node.watched = started
        self._running[node] = track
        if self._sweep_handle is None:
            self._sweep_handle = asyncio.get_running_loop().call_later(SWEEP_INTERVAL_S, self._sweep)

    def _sweep(self) -> None:
        """Warn for running attempts past a threshold; forget those ended or warned twice."""
        self._sweep_handle = None
        now = time.monotonic()
        for node, track in list(self._running.items()):
            started = node.watched
            if started is None or node.started is None or node.state not in _WATCHED:
                del self._running[node]
                continue
            actual = (now - node.started) * 1000
            waiting = False
            for level, limit in zip(_LEVELS, self.thresholds.for_type(started.get("nodeType")), strict=True):
                if (node.attempt, level) in node.warned:
                    continue
                if actual < limit:
                    waiting = True
                    continue
                base: LiveEvent = {**started, "seq": track.last_seq}
                self._emit(self._warned(node, node.attempt, base, level, limit, actual, running=True), track)
            if not waiting:
                del self._running[node]
        if self._running:
            self._sweep_handle = asyncio.get_running_loop().call_later(SWEEP_INTERVAL_S, self._sweep)

    @property
    def sweeping(self) -> bool:
        return self._sweep_handle is not None

    def _warned(
        self, node: NodeTrack, attempt: int, base: WarningBase, level: str, limit: float, actual: float, running: bool
    ) -> LiveEvent:
        node.warned.add((attempt, level))
        return performance_event(base, level, limit, actual, running)

    # -- spans ----------------------------------------------------------------------------------

    def observe_spans(self, facts: Iterable[SpanFact]) -> None:
        """Ended spans: run spans map executions to workflows, successful node spans teach
        the ETA medians, and a node span past its threshold warns if nothing else already
        did for that attempt (its events may have been dropped by a full export queue).
        Spans and events travel in separate requests, so a node span can arrive before
        anything names its workflow: it waits (bounded) until something does."""
        facts = list(facts)
        self.spans_in += len(facts)
        for fact in facts:
            if fact.workflow_id:
                self._workflow_of[fact.execution_id] = fact.workflow_id
                if len(self._workflow_of) > self._bound:
                    self._workflow_of.popitem(last=False)
        for fact in facts:
            if fact.node_id is not None:
                self._node_span(fact)
        for fact in facts:
            if fact.workflow_id:
                self.adopt_orphans(fact.execution_id)

    def adopt_orphans(self, execution_id: str) -> None:
        """Node spans of `execution_id` that waited for its workflow to be named."""
        for fact in self._orphans.pop(execution_id, []):
            self._node_span(fact)

    def _node_span(self, fact: SpanFact) -> None:
        assert fact.node_id is not None
        track = self._track_of(fact.execution_id)
        workflow_id = track.workflow_id if track else self._workflow_of.get(fact.execution_id)
        if not workflow_id:
            orphans = self._orphans.setdefault(fact.execution_id, [])
            if len(orphans) < _MAX_ORPHANS_PER_EXECUTION:
                orphans.append(fact)
            while len(self._orphans) > _MAX_ORPHAN_EXECUTIONS:
                self._orphans.popitem(last=False)
            return
        if fact.result == Result.SUCCESS:
            self.medians.observe(workflow_id, fact.node_id, fact.duration_ms)
        if track is not None:
            self._warn_from_span(track, fact)

    def _warn_from_span(self, track: ExecutionTrack, fact: SpanFact) -> None:
        assert fact.node_id is not None
        node = track.nodes.setdefault(fact.node_id, NodeTrack())
        if fact.attempt == node.attempt and node.state in _WATCHED:
            node.cancel()  # the span says this attempt ended; its running timers are moot
        base: WarningBase = {
            "seq": track.last_seq,
            "ts": fact.end_ts,
            "executionId": fact.execution_id,
            "workflowId": track.workflow_id,
            "workflowName": track.workflow_name,
            "nodeId": fact.node_id,
            "nodeType": fact.node_type or track.types.get(fact.node_id),
            "traceId": fact.trace_id,
            "spanId": fact.span_id,
        }
        for level, limit in zip(_LEVELS, self.thresholds.for_type(base["nodeType"]), strict=True):
            if fact.duration_ms >= limit and (fact.attempt, level) not in node.warned:
                node.warned.add((fact.attempt, level))
                self._emit(performance_event(base, level, limit, fact.duration_ms, running=False), track)

    def close(self) -> None:
        self._running.clear()
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None
