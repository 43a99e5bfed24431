"""Who owns an execution the hub meets for the first time: asked of the store.

An execution's owner (workflow, user) is fixed by its first stored record (collector/schema.py,
execution_owners). A hub that meets an execution mid-run — after a bridge restart, or again after
forgetting it — must not take the owner from whichever live event comes first: anyone holding
"ingest" who knows the execution's id could forge that event and have the run's live events routed
to their own rooms, or its real events dropped as foreign. So the first event of an unknown
execution starts one lookup, off the loop, and that execution's events wait for the answer, in
order; executions the hub knows pay nothing.

Bounded: at most MAX_PENDING executions wait at once (past it, a new execution is routed at once
and only its workflow.started can name its owner), each holds at most MAX_HELD events, and none
waits longer than TIMEOUT_S. An answer that comes after its events were let go still fixes the
owner: the store decides, whenever it answers.

Runs on the event loop only; the lookup itself runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from ws_bridge.types import LiveEvent

logger = logging.getLogger(__name__)

# (workflow id, user id or "") of an execution as its first stored record named them, or None.
StoredOwner = Callable[[str], tuple[str, str] | None]
OnOwner = Callable[[str, tuple[str, str]], None]
Release = Callable[[list[LiveEvent]], None]

MAX_PENDING = 1_000
MAX_HELD = 10_000
TIMEOUT_S = 5.0


@dataclass
class _Pending:
    events: list[LiveEvent]
    task: asyncio.Task[None]
    timer: asyncio.TimerHandle


class OwnerLookups:
    """One store lookup per execution met for the first time, its events held until it answers."""

    def __init__(
        self,
        stored_owner: StoredOwner,
        on_owner: OnOwner,
        release: Release,
        *,
        max_pending: int = MAX_PENDING,
        max_held: int = MAX_HELD,
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        self._stored_owner = stored_owner
        self._on_owner = on_owner
        self._release_events = release
        self._max_pending = max_pending
        self._max_held = max_held
        self._timeout_s = timeout_s
        self._pending: dict[str, _Pending] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        # Lookups still running after their events were let go: their answers still count.
        self._tasks: set[asyncio.Task[None]] = set()
        self.asked = 0
        self.failed = 0

    def __len__(self) -> int:
        return len(self._pending)

    def hold(self, event: LiveEvent) -> bool:
        """Whether `event`, of an execution the hub does not know, waits for its owner; the first
        such event of an execution starts the lookup."""
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
        task = loop.create_task(self._ask(execution_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        timer = loop.call_later(self._timeout_s, self._release, execution_id)
        self._pending[execution_id] = _Pending([event], task, timer)
        self._idle.clear()
        self.asked += 1
        return True

    async def _ask(self, execution_id: str) -> None:
        try:
            owner = await asyncio.to_thread(self._stored_owner, execution_id)
        except Exception as exc:
            # The store unreachable: routed as with no history, rather than held for good.
            self.failed += 1
            logger.warning("could not read the stored owner of execution %r: %s", execution_id[:64], exc)
            owner = None
        try:
            if owner is not None:
                self._on_owner(execution_id, owner)
        finally:
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
        self._idle.set()
        for task in self._tasks:
            task.cancel()
