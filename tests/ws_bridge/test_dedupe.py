"""The dedupe lets each event of an execution through once, and only its own workflow's."""

from __future__ import annotations

from typing import cast

from flowscope.ws_bridge.dedupe import MAX_SEEN_PER_EXECUTION, Dedupe, SeenSeqs
from flowscope.ws_bridge.derive import ExecutionTrack
from flowscope.ws_bridge.types import LiveEvent
from tests.ws_bridge.live_events import live_event


def event(seq: int, workflow_id: str | None = "wf") -> LiveEvent:
    one = live_event("node.started", seq)
    # None: an event whose JSON says null there, which the type does not admit but the dedupe takes as no claim.
    one["workflowId"] = cast(str, workflow_id)
    return one


def test_an_event_goes_through_once_and_repeats_are_counted() -> None:
    dedupe, seen, track = Dedupe(), SeenSeqs(), ExecutionTrack("wf")
    assert [dedupe.admit(track, seen, event(s)) for s in (1, 2, 1, 3, 2)] == [True, True, False, True, False]
    assert (dedupe.duplicates_dropped, dedupe.foreign_dropped) == (2, 0)


def test_an_event_claiming_another_workflow_is_dropped() -> None:
    dedupe, seen, track = Dedupe(), SeenSeqs(), ExecutionTrack("wf")
    assert not dedupe.admit(track, seen, event(1, "wf-other"))
    # Not naming a workflow is no claim; a foreign event does not use up its seq.
    assert dedupe.admit(track, seen, event(1, None))
    assert dedupe.admit(track, seen, event(2, ""))
    assert (dedupe.duplicates_dropped, dedupe.foreign_dropped) == (0, 1)
    # Before the execution's workflow is known, any claim goes.
    assert Dedupe().admit(ExecutionTrack(""), SeenSeqs(), event(1, "wf-any"))


def test_the_memory_of_seqs_is_bounded() -> None:
    seen = SeenSeqs()
    assert all(seen.first_time(seq) for seq in range(MAX_SEEN_PER_EXECUTION + 10))
    assert len(seen) == MAX_SEEN_PER_EXECUTION
    assert not seen.first_time(0)
    # Past the bound a seq is not remembered: its repeat goes through rather than the memory growing.
    assert seen.first_time(MAX_SEEN_PER_EXECUTION + 5)
