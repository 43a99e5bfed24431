"""Runtime settings for flowscope's long-running processes (stack, bridge, engine services):
garbage collection and GIL hand-over, tuned for latency over a few percent of throughput."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sys
from collections.abc import AsyncIterator

# A full collection stops every thread of the process for as long as it walks the heap:
# 100–250 ms here once a thousand WebSocket connections are open (≈ 200 objects each).
# CPython starts one whenever a quarter of the long-lived objects is new — every few
# seconds under live load. The server runs them on its own schedule instead.
_FULL_COLLECTION_INTERVAL_S = 60.0
# Young-generation collections stay automatic; only the oldest waits for the schedule.
_NO_AUTOMATIC_FULL_COLLECTION = 1 << 30
# How long a thread holding the GIL keeps it while another waits. The stack's event
# loop shares the GIL with the OTLP receivers and the ClickHouse writer; at CPython's
# 5 ms a second's insert of events kept the loop waiting in 5 ms slices for ~100 ms, the
# live path's tail (bench/README.md, live latency).
_SWITCH_INTERVAL_S = 0.001


@contextlib.asynccontextmanager
async def server_runtime(interval_s: float = _FULL_COLLECTION_INTERVAL_S) -> AsyncIterator[None]:
    """Garbage collection and GIL hand-over for a long-running server, while the context lasts.

    What start-up built (every module, class and function of grpc, protobuf, the
    ClickHouse client, Starlette, OTel) is frozen out of the collector's view: it lives as
    long as the process. Full collections of the rest run every `interval_s` rather
    than whenever CPython's heuristic fires, so live delivery stalls once a minute at
    most. Cyclic garbage still goes: the young generations are collected as usual and
    the oldest on the schedule. Threads waiting for the GIL get it after 1 ms, not 5.
    Everything is put back on exit (tests run many stacks in one process).
    """
    gc.collect()
    gc.freeze()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(young, middle, _NO_AUTOMATIC_FULL_COLLECTION)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(_SWITCH_INTERVAL_S)

    async def collect() -> None:
        while True:
            await asyncio.sleep(interval_s)
            gc.collect()

    task = asyncio.create_task(collect())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        sys.setswitchinterval(switch)
        gc.set_threshold(young, middle, old)
        gc.unfreeze()
