"""The hub's memory of recent executions: their events, replayed to late subscribers, and who owns them.

Bounded: events and tracks are kept for the most recently active executions (LRU), at most
`max_executions` of them and `max_recent_events` events in all. Owners are a few strings each and
outlive the buffers, so an execution evicted and seen again keeps the owner it started with. An
execution's owner comes from the store (ws_bridge/owner_lookup.py) or its first workflow.started,
never from another kind of event: those only claim it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from flowscope.ws_bridge.dedupe import SeenSeqs
from flowscope.ws_bridge.derive import ExecutionTrack
from flowscope.ws_bridge.events import event_from_wire, wire_json
from flowscope.ws_bridge.types import LiveEvent

DEFAULT_MAX_EXECUTIONS = 2_000
DEFAULT_MAX_RECENT_EVENTS = 200_000
# Owners are remembered for this many times the tracked executions.
_OWNERS_PER_EXECUTION_BOUND = 10


@dataclass
class Recent:
    """One execution as the hub remembers it."""

    track: ExecutionTrack
    # (seq, ts, JSON) per recent event. Tuples of strings and integers drop out of the
    # garbage collector's view; the events as dicts, 200,000 of them at the bound, made
    # each full collection a stall of 100–300 ms for every connection.
    events: list[tuple[int, str, str]] = field(default_factory=list)
    seen: SeenSeqs = field(default_factory=SeenSeqs)


# (workflow id, user id or None) of an execution.
Owner = tuple[str, str | None]


class Owners:
    """(workflow, user) of each execution, as the store or, failing it, the execution's first
    workflow.started named them: later claims change nothing."""

    def __init__(self, bound: int) -> None:
        self._bound = bound
        self._owners: OrderedDict[str, Owner] = OrderedDict()

    def get(self, execution_id: str) -> Owner | None:
        return self._owners.get(execution_id)

    def claim(self, execution_id: str, workflow_id: str, data: dict[str, Any]) -> Owner:
        """A workflow.started of `workflow_id`: the first names the owner. Returns the owner."""
        owner = self._owners.get(execution_id)
        if owner is None:
            user = data.get("userId")
            owner = self._set(execution_id, (workflow_id, user if isinstance(user, str) and user else None))
        return owner

    def fix(self, execution_id: str, owner: Owner) -> Owner:
        """The owner the execution's first stored record named: it overrides any live claim."""
        return self._set(execution_id, owner)

    def _set(self, execution_id: str, owner: Owner) -> Owner:
        self._owners[execution_id] = owner
        while len(self._owners) > self._bound:
            self._owners.popitem(last=False)
        return owner


class ReplayBuffer:
    def __init__(
        self, *, max_executions: int = DEFAULT_MAX_EXECUTIONS, max_recent_events: int = DEFAULT_MAX_RECENT_EVENTS
    ) -> None:
        self.max_executions = max_executions
        self._max_recent = max_recent_events
        self.recent_total = 0
        self._recent: OrderedDict[str, Recent] = OrderedDict()
        self.owners = Owners(max_executions * _OWNERS_PER_EXECUTION_BOUND)

    def __contains__(self, execution_id: object) -> bool:
        return execution_id in self._recent

    def __len__(self) -> int:
        return len(self._recent)

    def __iter__(self) -> Iterator[str]:
        return iter(self._recent)

    def get(self, execution_id: str) -> Recent | None:
        return self._recent.get(execution_id)

    def track_of(self, execution_id: str) -> ExecutionTrack | None:
        recent = self._recent.get(execution_id)
        return recent.track if recent is not None else None

    def entry(self, event: LiveEvent) -> Recent:
        """The event's execution, remembered from now on as the most recently active."""
        execution_id = event["executionId"]
        recent = self._recent.get(execution_id)
        if recent is not None:
            self._recent.move_to_end(execution_id)
            return recent
        # Until its owner is known the track names no workflow: an event of another kind claims
        # one for itself only, so a forged first event cannot make the real ones foreign.
        track = ExecutionTrack("", event.get("workflowName") or "")
        owner = self.owners.get(execution_id)
        if owner is not None:
            track.workflow_id, track.user_id = owner
        recent = self._recent[execution_id] = Recent(track)
        while len(self._recent) > self.max_executions:
            self._evict()
        return recent

    def claim(self, execution_id: str, workflow_id: str, data: dict[str, Any]) -> None:
        """A workflow.started of `workflow_id` with its `data`: names the owner unless one is known."""
        self._take(execution_id, self.owners.claim(execution_id, workflow_id, data))

    def own(self, execution_id: str, owner: Owner) -> None:
        """The owner the store names: it overrides any claim."""
        self._take(execution_id, self.owners.fix(execution_id, owner))

    def _take(self, execution_id: str, owner: Owner) -> None:
        recent = self._recent.get(execution_id)
        if recent is not None:
            recent.track.workflow_id, recent.track.user_id = owner

    def remember(self, recent: Recent, event: LiveEvent) -> None:
        recent.events.append((int(event["seq"]), event["ts"], wire_json(event)))
        self.recent_total += 1
        while self.recent_total > self._max_recent and len(self._recent) > 1:
            self._evict()

    def _evict(self) -> None:
        _, oldest = self._recent.popitem(last=False)
        oldest.track.close()
        self.recent_total -= len(oldest.events)

    # -- replay sources -------------------------------------------------------------------

    def user_of(self, execution_id: str) -> str | None:
        recent = self._recent.get(execution_id)
        if recent is not None:
            return recent.track.user_id
        owner = self.owners.get(execution_id)
        return owner[1] if owner else None

    def events(self, execution_id: str, from_seq: int) -> list[LiveEvent]:
        recent = self._recent.get(execution_id)
        if recent is None:
            return []
        return [event_from_wire(wire) for seq, _, wire in recent.events if seq >= from_seq]

    def since(self, since_iso: str, *, workflow_id: str | None, user_id: str | None) -> list[LiveEvent]:
        out: list[LiveEvent] = []
        for recent in self._recent.values():
            track = recent.track
            if workflow_id is not None and track.workflow_id != workflow_id:
                continue
            if user_id is not None and track.user_id != user_id:
                continue
            out.extend(event_from_wire(wire) for _, ts, wire in recent.events if ts >= since_iso)
        return out

    def close(self) -> None:
        for recent in self._recent.values():
            recent.track.close()
