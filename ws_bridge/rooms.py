"""The hub: routes each live event to the rooms it belongs to.

Between the feed and the rooms, an event passes the dedupe (ws_bridge/dedupe.py), is folded into
what is known of its execution (ws_bridge/deriver.py: ETA, performance warnings), and is
remembered for replay (ws_bridge/replay.py); this module holds the subscriptions and the routing.
An execution the hub does not know waits for its owner from the store (ws_bridge/owner_lookup.py).

Runs on the event loop only.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flowscope.contract import EventName
from flowscope.ws_bridge.dedupe import Dedupe
from flowscope.ws_bridge.derive import ExecutionTrack, MedianCache, Thresholds
from flowscope.ws_bridge.deriver import Deriver
from flowscope.ws_bridge.events import SpanFact
from flowscope.ws_bridge.owner_lookup import TIMEOUT_S as OWNER_TIMEOUT_S
from flowscope.ws_bridge.owner_lookup import OwnerLookups, StoredOwners
from flowscope.ws_bridge.replay import DEFAULT_MAX_EXECUTIONS, DEFAULT_MAX_RECENT_EVENTS, ReplayBuffer
from flowscope.ws_bridge.types import LiveEvent

if TYPE_CHECKING:
    from flowscope.ws_bridge.connection import Connection

logger = logging.getLogger(__name__)


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


class Hub:
    def __init__(
        self,
        thresholds: Thresholds | None = None,
        medians: MedianCache | None = None,
        *,
        max_executions: int = DEFAULT_MAX_EXECUTIONS,
        max_recent_events: int = DEFAULT_MAX_RECENT_EVENTS,
        stored_owners: StoredOwners | None = None,
        owner_timeout_s: float = OWNER_TIMEOUT_S,
    ) -> None:
        self.medians = medians or MedianCache(None)
        self.replay = ReplayBuffer(max_executions=max_executions, max_recent_events=max_recent_events)
        self.dedupe = Dedupe()
        self.deriver = Deriver(
            thresholds or Thresholds(), self.medians, self.dispatch, self.replay.track_of, max_executions
        )
        # With no store, an execution's owner comes from its first workflow.started alone.
        self.lookups = None
        if stored_owners is not None:
            self.lookups = OwnerLookups(stored_owners, self._own, self._route_all, timeout_s=owner_timeout_s)
        self._rooms: dict[str, set[Subscription]] = {}
        self.events_in = 0

    @property
    def thresholds(self) -> Thresholds:
        return self.deriver.thresholds

    @thresholds.setter
    def thresholds(self, value: Thresholds) -> None:
        self.deriver.thresholds = value

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
        if (
            self.lookups is not None
            and execution_id not in self.replay
            and self.replay.owners.get(execution_id) is None
            and self.lookups.hold(event)
        ):
            return
        self._route(event)

    def _own(self, execution_id: str, stored: tuple[str, str]) -> None:
        workflow_id, user_id = stored
        self.replay.own(execution_id, (workflow_id, user_id or None))

    def _route_all(self, events: list[LiveEvent]) -> None:
        for event in events:
            self._route(event)

    def _route(self, event: LiveEvent) -> None:
        recent = self.replay.entry(event)
        track = recent.track
        if not self.dedupe.admit(track, recent.seen, event):
            return
        track.last_seq = max(track.last_seq, int(event["seq"]))
        if event["type"] == EventName.WORKFLOW_STARTED:
            data = event.get("data")
            data = data if isinstance(data, dict) else {}
            self.replay.claim(event["executionId"], event.get("workflowId") or "", data)
        event, derived = self.deriver.fold(track, event)
        self.replay.remember(recent, event)
        self.dispatch(event, track)
        for extra in derived:
            self.dispatch(extra, track)
        self.deriver.adopt_orphans(event["executionId"])

    async def settled(self) -> None:
        """Returns once every event published so far is routed: none waits for its owner."""
        if self.lookups is not None:
            await self.lookups.settled()

    def observe_spans(self, facts: Iterable[SpanFact]) -> None:
        """Ended spans, for the derivations (ws_bridge/deriver.py)."""
        self.deriver.observe_spans(facts)

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
        return self.replay.user_of(execution_id)

    def last_seq(self, execution_id: str) -> int:
        """The highest seq routed for an execution the hub still tracks, else 0."""
        track = self.replay.track_of(execution_id)
        return track.last_seq if track is not None else 0

    def recent_events(self, execution_id: str, from_seq: int) -> list[LiveEvent]:
        return self.replay.events(execution_id, from_seq)

    def recent_since(self, since_iso: str, *, workflow_id: str | None, user_id: str | None) -> list[LiveEvent]:
        return self.replay.since(since_iso, workflow_id=workflow_id, user_id=user_id)

    # -- state -----------------------------------------------------------------------------

    @property
    def duplicates_dropped(self) -> int:
        return self.dedupe.duplicates_dropped

    @property
    def foreign_dropped(self) -> int:
        return self.dedupe.foreign_dropped

    @property
    def spans_in(self) -> int:
        return self.deriver.spans_in

    def close(self) -> None:
        if self.lookups is not None:
            self.lookups.close()
        self.replay.close()
        self.deriver.close()

    def stats(self) -> dict[str, Any]:
        lookups = self.lookups
        return {
            "executionsTracked": len(self.replay),
            "recentEvents": self.replay.recent_total,
            "subscriptions": self.subscription_count,
            "eventsIn": self.events_in,
            "spansIn": self.spans_in,
            "duplicatesDropped": self.duplicates_dropped,
            "foreignDropped": self.foreign_dropped,
            "ownerLookups": lookups.asked if lookups is not None else 0,
            "ownerQueries": lookups.queries if lookups is not None else 0,
            "ownerLookupsPending": len(lookups) if lookups is not None else 0,
            "ownerLookupsFailed": lookups.failed if lookups is not None else 0,
        }
