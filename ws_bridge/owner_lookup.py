"""Who owns an execution the hub meets for the first time: asked of the store.

An execution's owner (workflow, user) is fixed by its first stored record (collector/schema.py,
execution_owners). A hub that meets an execution mid-run — after a bridge restart, or again after
forgetting it — must not take the owner from whichever live event comes first: anyone holding
"ingest" who knows the execution's id could forge that event and have the run's live events routed
to their own rooms, or its real events dropped as foreign. So an unknown execution's events wait,
in order, until the store has said who owns it; executions the hub knows pay nothing.

One lookup at a time, off the loop, for every execution met since the last: a query costs the
embedded ClickHouse ~2.5 ms of CPU whether it asks for one execution or a hundred, and a busy
engine starts ~150 runs a second. Lookups start at most every BATCH_INTERVAL_S, so a new
execution's first events wait at most that long plus a query.

Bounded: at most MAX_PENDING executions wait at once (past it, a new execution is routed at once
and only its workflow.started can name its owner), each holds at most MAX_HELD events, and none
waits longer than TIMEOUT_S. An answer that comes after its events were let go still fixes the
owner: the store decides, whenever it answers.

Runs on the event loop only; the query runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from flowscope.ws_bridge.types import LiveEvent

logger = logging.getLogger(__name__)

# (workflow id, user id or "") of each execution stored, as its first stored record named them.
StoredOwners = Callable[[list[str]], Mapping[str, tuple[str, str]]]
OnOwner = Callable[[str, tuple[str, str]], None]
Release = Callable[[list[LiveEvent]], None]

MAX_PENDING = 1_000
MAX_HELD = 10_000
TIMEOUT_S = 5.0
BATCH_INTERVAL_S = 0.02


@dataclass
class _Pending:
    events: list[LiveEvent]
    timer: asyncio.TimerHandle


class OwnerLookups:
    """Store lookups for the executions met for the first time, their events held until answered."""

    def __init__(
        self,
        stored_owners: StoredOwners,
        on_owner: OnOwner,
        release: Release,
        *,
        max_pending: int = MAX_PENDING,
        max_held: int = MAX_HELD,
        timeout_s: float = TIMEOUT_S,
        batch_interval_s: float = BATCH_INTERVAL_S,
    ) -> None:
        self._stored_owners = stored_owners
        self._on_owner = on_owner
        self._release_events = release
        self._max_pending = max_pending
        self._max_held = max_held
        self._timeout_s = timeout_s
        self._interval_s = batch_interval_s
        self._pending: dict[str, _Pending] = {}
        # Asked for by the next lookup; answers for executions already let go still count.
        self._queued: list[str] = []
        self._worker: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self.asked = 0
        self.queries = 0
        self.failed = 0

    def __len__(self) -> int:
        return len(self._pending)

    def hold(self, event: LiveEvent) -> bool:
        """Whether `event`, of an execution the hub does not know, waits for its owner; the first
        such event of an execution queues the lookup."""
        execution_id = event["executionId"]
        pending = self._pending.get(execution_id)
        if pending is not None:
            pending.events.append(event)
            if len(pending.events) >= self._max_held:
                self._release(execution_id)
            return True
        if len(self._pending) >= self._max_pending:
            return False
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self._timeout_s, self._release, execution_id)
        self._pending[execution_id] = _Pending([event], timer)
        self._idle.clear()
        self._queued.append(execution_id)
        self.asked += 1
        if self._worker is None:
            self._worker = loop.create_task(self._lookups())
        return True

    async def _lookups(self) -> None:
        loop = asyncio.get_running_loop()
        last = -self._interval_s
        try:
            while self._queued:
                await asyncio.sleep(max(0.0, last + self._interval_s - loop.time()))
                last = loop.time()
                batch, self._queued = self._queued, []
                self._answer(batch, await self._ask(batch))
        finally:
            self._worker = None

    async def _ask(self, batch: list[str]) -> Mapping[str, tuple[str, str]]:
        self.queries += 1
        try:
            return await asyncio.to_thread(self._stored_owners, batch)
        except Exception as exc:
            # The store unreachable: routed as with no history, rather than held for good.
            self.failed += len(batch)
            logger.warning("could not read the stored owners of %d executions: %s", len(batch), exc)
            return {}

    def _answer(self, batch: list[str], owners: Mapping[str, tuple[str, str]]) -> None:
        for execution_id in batch:
            owner = owners.get(execution_id)
            if owner is not None:
                self._on_owner(execution_id, owner)
            self._release(execution_id)

    def _release(self, execution_id: str) -> None:
        pending = self._pending.pop(execution_id, None)
        if pending is None:
            return
        pending.timer.cancel()
        if not self._pending:
            self._idle.set()
        self._release_events(pending.events)

    async def settled(self) -> None:
        """Returns once no events wait for an owner: every event published so far is routed."""
        await self._idle.wait()

    def close(self) -> None:
        for pending in self._pending.values():
            pending.timer.cancel()
        self._pending.clear()
        self._queued.clear()
        self._idle.set()
        if self._worker is not None:
            self._worker.cancel()
