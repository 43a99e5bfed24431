"""The ETA medians cache asks history in batches, one query at a time."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

from flowscope.ws_bridge.derive import MedianCache


class History:
    """Answers like `History.node_duration_medians_of`; records how it was asked."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.fail = fail
        self._lock = threading.Lock()

    def __call__(self, workflow_ids: Sequence[str]) -> dict[str, dict[str, float]]:
        with self._lock:
            self.calls.append(list(workflow_ids))
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.fail:
                raise ConnectionError("ClickHouse is down")
            # Only even-numbered workflows have history.
            return {w: {"n0": float(len(w))} for w in workflow_ids if int(w.split("-")[1]) % 2 == 0}
        finally:
            with self._lock:
                self.in_flight -= 1


async def settle(cache: MedianCache) -> None:
    """Until the background batches are done (the loader task is the cache's own)."""
    if cache._loader is not None:
        await asyncio.shield(cache._loader)


async def test_a_thousand_workflows_cost_a_few_batched_queries() -> None:
    history = History()
    cache = MedianCache(history)
    workflows = [f"wf-{i}" for i in range(1200)]
    for workflow_id in workflows:
        assert cache.get(workflow_id) == {}  # nothing known yet: the ETA waits, the event does not
    await settle(cache)
    assert sorted(w for call in history.calls for w in call) == sorted(workflows)
    assert len(history.calls) <= 3 and history.most_in_flight == 1
    assert cache.get("wf-4") == {"n0": 4.0} and cache.get("wf-3") == {}
    # Fresh values are not asked for again.
    asked = len(history.calls)
    cache.get("wf-4")
    await settle(cache)
    assert len(history.calls) == asked
    await cache.aclose()


async def test_live_samples_overlay_history() -> None:
    cache = MedianCache(History())
    await cache.ensure("wf-2")
    cache.observe("wf-2", "n1", 10.0)
    cache.observe("wf-2", "n1", 30.0)
    cache.observe("wf-2", "n1", 20.0)
    assert cache.get("wf-2") == {"n0": 4.0, "n1": 20.0}
    await cache.aclose()


async def test_a_failing_history_is_not_asked_again_at_once() -> None:
    history = History(fail=True)
    cache = MedianCache(history)
    for _ in range(50):
        cache.get("wf-1")
        await settle(cache)
    assert len(history.calls) == 1
    await cache.aclose()
