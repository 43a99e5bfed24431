"""Which live events the hub lets through: each event of an execution once, and only events that
claim the execution's own workflow.

The same event reaches the bridge twice when it travels two paths (spans and logs) or an exporter
retries a request; an event naming another workflow than its execution's owner (the store's, or its
first workflow.started's: ws_bridge/replay.py) is a forgery or a mix-up, not one of its events.
"""

from __future__ import annotations

from flowscope.ws_bridge.derive import ExecutionTrack
from flowscope.ws_bridge.types import LiveEvent

# Seqs remembered per execution: memory stays bounded however long a run is (past the
# bound, a duplicate goes through).
MAX_SEEN_PER_EXECUTION = 20_000


class SeenSeqs:
    """The seqs of one execution already let through, up to MAX_SEEN_PER_EXECUTION."""

    __slots__ = ("_seqs",)

    def __init__(self) -> None:
        self._seqs: set[int] = set()

    def first_time(self, seq: int) -> bool:
        if seq in self._seqs:
            return False
        if len(self._seqs) < MAX_SEEN_PER_EXECUTION:
            self._seqs.add(seq)
        return True

    def __len__(self) -> int:
        return len(self._seqs)


class Dedupe:
    """Drops duplicates and foreign events, counting each."""

    def __init__(self) -> None:
        self.duplicates_dropped = 0
        self.foreign_dropped = 0

    def admit(self, track: ExecutionTrack, seen: SeenSeqs, event: LiveEvent) -> bool:
        if track.workflow_id and event.get("workflowId") not in (None, "", track.workflow_id):
            self.foreign_dropped += 1
            return False
        if not seen.first_time(int(event["seq"])):
            self.duplicates_dropped += 1
            return False
        return True
