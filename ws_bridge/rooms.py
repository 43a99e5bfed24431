"""The hub: dedupes the event stream, derives events, and routes each event to the rooms it belongs to.

Runs on the event loop only. Memory is bounded: recent events and execution
tracks are kept for a bounded number of recent executions (LRU).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from collector.history import NODE_STATES, node_specs, number, whole
from ws_bridge.derive import ExecutionTrack, MedianCache, NodeTrack, Thresholds, estimate_eta_ms, performance_event
from ws_bridge.events import SpanFact, event_from_wire, wire_json
from ws_bridge.types import LiveEvent

if TYPE_CHECKING:
    from ws_bridge.connection import Connection

logger = logging.getLogger(__name__)

_DEFAULT_MAX_EXECUTIONS = 2_000
_DEFAULT_MAX_RECENT_EVENTS = 200_000
_MAX_SEEN_PER_EXECUTION = 20_000
# Node spans waiting for their workflow to be named: a batch's worth, not a history.
_MAX_ORPHAN_EXECUTIONS = 256
_MAX_ORPHANS_PER_EXECUTION = 256
_TERMINAL = frozenset({"workflow.completed", "workflow.failed", "workflow.cancelled"})
# How often running nodes are checked against their thresholds: a warning comes at most
# this late. One sweep for all, where a timer per node and level cost a heap push and a
# cancellation per node step (≈ 10 % of the bridge's time at 800 node steps/s).
_SWEEP_INTERVAL_S = 0.1
# Owners are a few strings each: remembered for this many times the tracked executions.
_OWNERS_PER_EXECUTION_BOUND = 10


@dataclass(eq=False)
class Subscription:
    id: str
    rooms: frozenset[str]
    types: frozenset[str] | None
    node_types: frozenset[str] | None
    connection: Connection
    replaying: bool = True
    held: list[tuple[LiveEvent, str | None]] = field(default_factory=list)
    last_seq: OrderedDict[str, int] = field(default_factory=OrderedDict)

    def wants(self, event: LiveEvent) -> bool:
        if self.types is not None and event["type"] not in self.types:
            return False
        return self.node_types is None or event.get("nodeType") in self.node_types

    def mark_sent(self, execution_id: str, seq: int) -> None:
        self.last_seq[execution_id] = seq
        self.last_seq.move_to_end(execution_id)
        if len(self.last_seq) > 10_000:
            self.last_seq.popitem(last=False)


@dataclass
class _Buffer:
    track: ExecutionTrack
    # (seq, ts, JSON) per recent event. Tuples of strings and integers drop out of the
    # garbage collector's view; the events as dicts, 200,000 of them at the bound, made
    # each full collection a stall of 100–300 ms for every connection.
    events: list[tuple[int, str, str]] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)


class Hub:
    def __init__(
        self,
        thresholds: Thresholds | None = None,
        medians: MedianCache | None = None,
        *,
        max_executions: int = _DEFAULT_MAX_EXECUTIONS,
        max_recent_events: int = _DEFAULT_MAX_RECENT_EVENTS,
    ) -> None:
        self.thresholds = thresholds or Thresholds()
        self.medians = medians or MedianCache(None)
        self._max_executions = max_executions
        self._max_recent = max_recent_events
        self._recent_total = 0
        self._buffers: OrderedDict[str, _Buffer] = OrderedDict()
        self._rooms: dict[str, set[Subscription]] = {}
        self.duplicates_dropped = 0
        self.events_in = 0
        self.spans_in = 0
        # Run spans name their workflow; node spans only their execution. Bounded like the buffers.
        self._workflow_of: OrderedDict[str, str] = OrderedDict()
        # (workflow, user) of each execution as its first workflow.started named them: later
        # claims change nothing. Kept longer than the buffers, so an execution evicted and
        # seen again keeps its owner.
        self._owners: OrderedDict[str, tuple[str, str | None]] = OrderedDict()
        self.foreign_dropped = 0
        self._orphans: OrderedDict[str, list[SpanFact]] = OrderedDict()
        # Attempts running, swept for thresholds passed; bounded by the tracked executions.
        self._running: dict[NodeTrack, ExecutionTrack] = {}
        self._sweep_handle: asyncio.TimerHandle | None = None

    # -- subscriptions ----------------------------------------------------------------------

    def register(self, sub: Subscription) -> None:
        for room in sub.rooms:
            self._rooms.setdefault(room, set()).add(sub)

    def unregister(self, sub: Subscription) -> None:
        for room in sub.rooms:
            members = self._rooms.get(room)
            if members is not None:
                members.discard(sub)
                if not members:
                    del self._rooms[room]

    @property
    def subscription_count(self) -> int:
        return len({s for members in self._rooms.values() for s in members})

    # -- intake ---------------------------------------------------------------------------

    def publish(self, events: Iterable[LiveEvent]) -> None:
        for event in events:
            self._ingest(event)

    def _ingest(self, event: LiveEvent) -> None:
        self.events_in += 1
        execution_id = event["executionId"]
        buffer = self._buffer(execution_id, event)
        if buffer.track.workflow_id and event.get("workflowId") not in (None, "", buffer.track.workflow_id):
            # Claims another workflow than the execution's own: not one of its events.
            self.foreign_dropped += 1
            return
        seq = int(event["seq"])
        if seq in buffer.seen:
            # The same event through two paths (spans and logs, a retried export): once is enough.
            self.duplicates_dropped += 1
            return
        if len(buffer.seen) < _MAX_SEEN_PER_EXECUTION:
            buffer.seen.add(seq)
        track = buffer.track
        track.last_seq = max(track.last_seq, seq)
        derived = self._track(track, event)
        if event["type"] == "execution.progress":
            eta = estimate_eta_ms(track, self.medians.get(track.workflow_id), time.monotonic())
            event = {**event, "data": {**event["data"], "etaMs": eta}}
        self._remember(buffer, event)
        self.dispatch(event, track)
        for extra in derived:
            self.dispatch(extra, track)
        if execution_id in self._orphans:
            self._adopt_orphans(execution_id)

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
                if len(self._workflow_of) > self._max_executions:
                    self._workflow_of.popitem(last=False)
        for fact in facts:
            if fact.node_id is not None:
                self._node_span(fact)
        for fact in facts:
            if fact.workflow_id:
                self._adopt_orphans(fact.execution_id)

    def _node_span(self, fact: SpanFact) -> None:
        assert fact.node_id is not None
        buffer = self._buffers.get(fact.execution_id)
        workflow_id = buffer.track.workflow_id if buffer else self._workflow_of.get(fact.execution_id)
        if not workflow_id:
            orphans = self._orphans.setdefault(fact.execution_id, [])
            if len(orphans) < _MAX_ORPHANS_PER_EXECUTION:
                orphans.append(fact)
            while len(self._orphans) > _MAX_ORPHAN_EXECUTIONS:
                self._orphans.popitem(last=False)
            return
        if fact.result == "success":
            self.medians.observe(workflow_id, fact.node_id, fact.duration_ms)
        if buffer is not None:
            self._warn_from_span(buffer.track, fact)

    def _adopt_orphans(self, execution_id: str) -> None:
        for fact in self._orphans.pop(execution_id, []):
            self._node_span(fact)

    def _warn_from_span(self, track: ExecutionTrack, fact: SpanFact) -> None:
        assert fact.node_id is not None
        node = track.nodes.setdefault(fact.node_id, NodeTrack())
        if fact.attempt == node.attempt and node.state in ("running", "waiting"):
            node.cancel()  # the span says this attempt ended; its running timers are moot
        base: LiveEvent = {
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
        for level, limit in zip(("warning", "critical"), self.thresholds.for_type(base["nodeType"]), strict=True):
            if fact.duration_ms >= limit and (fact.attempt, level) not in node.warned:
                node.warned.add((fact.attempt, level))
                self.dispatch(performance_event(base, level, limit, fact.duration_ms, running=False), track)

    def _buffer(self, execution_id: str, event: LiveEvent) -> _Buffer:
        buffer = self._buffers.get(execution_id)
        if buffer is None:
            track = ExecutionTrack(event.get("workflowId") or "", event.get("workflowName") or "")
            owner = self._owners.get(execution_id)
            if owner is not None:
                track.workflow_id, track.user_id = owner
            buffer = _Buffer(track)
            self._buffers[execution_id] = buffer
            while len(self._buffers) > self._max_executions:
                self._evict()
        else:
            self._buffers.move_to_end(execution_id)
        return buffer

    def _remember(self, buffer: _Buffer, event: LiveEvent) -> None:
        buffer.events.append((int(event["seq"]), event["ts"], wire_json(event)))
        self._recent_total += 1
        while self._recent_total > self._max_recent and len(self._buffers) > 1:
            self._evict()

    def _evict(self) -> None:
        _, oldest = self._buffers.popitem(last=False)
        oldest.track.close()
        self._recent_total -= len(oldest.events)

    def _track(self, track: ExecutionTrack, event: LiveEvent) -> list[LiveEvent]:
        """Fold the event into what is known of its execution; returns events derived at once."""
        kind = event["type"]
        data = event.get("data")
        if not isinstance(data, dict):
            data = {}
        if kind == "workflow.started":
            self._own(event["executionId"], track, data)
            for spec in node_specs(data.get("nodes")):
                depends = spec.get("dependsOn")
                track.dag[spec["id"]] = [d for d in depends if isinstance(d, str)] if isinstance(depends, list) else []
                track.types[spec["id"]] = spec["type"] if isinstance(spec.get("type"), str) else ""
            return []
        if kind in _TERMINAL:
            track.close()
            return []
        state = NODE_STATES.get(kind)
        node_id = event.get("nodeId")
        if state is None or not node_id:
            return []
        node = track.nodes.setdefault(node_id, NodeTrack())
        node.state = state
        warn_ms, critical_ms = self.thresholds.for_type(event.get("nodeType"))
        attempt = whole(data.get("attempt")) or node.attempt
        if kind == "node.started":
            node.attempt = attempt
            node.started = time.monotonic()
            node.watched = event
            self._running[node] = track
            if self._sweep_handle is None:
                self._sweep_handle = asyncio.get_running_loop().call_later(_SWEEP_INTERVAL_S, self._sweep)
            return []
        if kind in ("node.completed", "node.failed"):
            node.cancel()
            actual = float(number(data.get("durationMs")) or 0.0)
            return [
                self._warned(node, attempt, event, level, limit, actual, running=False)
                for level, limit in (("warning", warn_ms), ("critical", critical_ms))
                if actual >= limit and (attempt, level) not in node.warned
            ]
        return []

    def _own(self, execution_id: str, track: ExecutionTrack, data: dict[str, Any]) -> None:
        owner = self._owners.get(execution_id)
        if owner is None:
            user = data.get("userId")
            owner = self._owners[execution_id] = (track.workflow_id, user if isinstance(user, str) and user else None)
            while len(self._owners) > self._max_executions * _OWNERS_PER_EXECUTION_BOUND:
                self._owners.popitem(last=False)
        track.workflow_id, track.user_id = owner

    def _sweep(self) -> None:
        """Warn for running attempts past a threshold; forget those ended or warned twice."""
        self._sweep_handle = None
        now = time.monotonic()
        for node, track in list(self._running.items()):
            started = node.watched
            if started is None or node.started is None or node.state not in ("running", "waiting"):
                del self._running[node]
                continue
            actual = (now - node.started) * 1000
            waiting = False
            for level, limit in zip(
                ("warning", "critical"), self.thresholds.for_type(started.get("nodeType")), strict=True
            ):
                if (node.attempt, level) in node.warned:
                    continue
                if actual < limit:
                    waiting = True
                    continue
                base = {**started, "seq": track.last_seq}
                self.dispatch(self._warned(node, node.attempt, base, level, limit, actual, running=True), track)
            if not waiting:
                del self._running[node]
        if self._running:
            self._sweep_handle = asyncio.get_running_loop().call_later(_SWEEP_INTERVAL_S, self._sweep)

    def _warned(
        self, node: NodeTrack, attempt: int, base: LiveEvent, level: str, limit: float, actual: float, running: bool
    ) -> LiveEvent:
        node.warned.add((attempt, level))
        return performance_event(base, level, limit, actual, running)

    # -- routing ---------------------------------------------------------------------------

    def dispatch(self, event: LiveEvent, track: ExecutionTrack | None = None) -> None:
        user = track.user_id if track else None
        rooms = [f"execution:{event['executionId']}", f"workflow:{event.get('workflowId')}", "all"]
        if user:
            rooms.append(f"user:{user}")
        targets: set[Subscription] = set()
        for room in rooms:
            members = self._rooms.get(room)
            if members:
                targets.update(members)
        for sub in targets:
            sub.connection.offer(sub, event, user)

    # -- replay sources -------------------------------------------------------------------

    def user_of(self, execution_id: str) -> str | None:
        buffer = self._buffers.get(execution_id)
        if buffer is not None:
            return buffer.track.user_id
        owner = self._owners.get(execution_id)
        return owner[1] if owner else None

    def recent_events(self, execution_id: str, from_seq: int) -> list[LiveEvent]:
        buffer = self._buffers.get(execution_id)
        if buffer is None:
            return []
        return [event_from_wire(wire) for seq, _, wire in buffer.events if seq >= from_seq]

    def recent_since(self, since_iso: str, *, workflow_id: str | None, user_id: str | None) -> list[LiveEvent]:
        out: list[LiveEvent] = []
        for buffer in self._buffers.values():
            track = buffer.track
            if workflow_id is not None and track.workflow_id != workflow_id:
                continue
            if user_id is not None and track.user_id != user_id:
                continue
            out.extend(event_from_wire(wire) for _, ts, wire in buffer.events if ts >= since_iso)
        return out

    def close(self) -> None:
        for buffer in self._buffers.values():
            buffer.track.close()
        self._running.clear()
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None

    def stats(self) -> dict[str, Any]:
        return {
            "executionsTracked": len(self._buffers),
            "recentEvents": self._recent_total,
            "subscriptions": self.subscription_count,
            "eventsIn": self.events_in,
            "spansIn": self.spans_in,
            "duplicatesDropped": self.duplicates_dropped,
            "foreignDropped": self.foreign_dropped,
        }
