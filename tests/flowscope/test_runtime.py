"""The server runtime: start-up frozen, full collections on a schedule, short GIL slices, all put back."""

from __future__ import annotations

import asyncio
import gc
import sys
import weakref
from typing import Any

from flowscope.runtime import server_runtime


class Node:
    def __init__(self) -> None:
        self.other: Any = None


async def test_full_collections_run_on_schedule_and_still_free_cycles() -> None:
    before, switch = gc.get_threshold(), sys.getswitchinterval()
    collected = asyncio.Event()

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "stop" and info["generation"] == 2:
            collected.set()

    async with server_runtime(interval_s=0.05):
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold()[:2] == before[:2] and gc.get_threshold()[2] > before[2]
        assert sys.getswitchinterval() < switch
        # Cyclic garbage that only a full collection frees (it is old by the time it dies).
        a, b = Node(), Node()
        a.other, b.other = b, a
        gc.collect(1)
        gc.collect(1)  # promoted to the oldest generation
        alive = weakref.ref(a)
        del a, b
        gc.callbacks.append(on_gc)
        try:
            await asyncio.wait_for(collected.wait(), 30)
        finally:
            gc.callbacks.remove(on_gc)
        assert alive() is None
    assert gc.get_threshold() == before and sys.getswitchinterval() == switch
    assert gc.get_freeze_count() == 0
