"""Lifecycle events: their names, their shape, and the in-process subscription API."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from flowscope.contract.events import EventName
from flowscope.engine.types import EventCallback

logger = logging.getLogger(__name__)


# The lifecycle event names are the contract's (contract/events.py), under the engine's name.
EventType = EventName


@dataclass(frozen=True)
class WorkflowEvent:
    type: EventType
    seq: int
    ts_ns: int
    execution_id: str
    workflow_id: str
    workflow_name: str
    trace_id: str
    span_id: str
    node_id: str = ""
    node_type: str = ""
    data: dict[str, Any] = field(default_factory=dict)


_DEFAULT_SUBSCRIBER_QUEUE = 10_000


class EventBus:
    """Fan-out of events to in-process watchers: callbacks and async iterators.

    A watcher that falls behind loses its oldest events rather than growing
    memory without bound; `dropped` says how many.
    """

    def __init__(self) -> None:
        self._callbacks: list[EventCallback] = []
        self._queues: list[asyncio.Queue[WorkflowEvent | None]] = []
        self.dropped = 0

    @property
    def active(self) -> bool:
        return bool(self._callbacks or self._queues)

    def add_callback(self, callback: EventCallback) -> None:
        self._callbacks.append(callback)

    def remove_callback(self, callback: EventCallback) -> None:
        self._callbacks.remove(callback)

    def publish(self, event: WorkflowEvent) -> None:
        for callback in self._callbacks:
            try:
                callback(event)
            except Exception:
                # A watcher's bug must not fail the workflow it watches.
                logger.exception("event callback %r failed", callback)
        for queue in self._queues:
            if queue.full():
                queue.get_nowait()
                self.dropped += 1
            queue.put_nowait(event)

    @contextlib.asynccontextmanager
    async def subscribe(self, maxsize: int = _DEFAULT_SUBSCRIBER_QUEUE) -> AsyncIterator[AsyncIterator[WorkflowEvent]]:
        queue: asyncio.Queue[WorkflowEvent | None] = asyncio.Queue(maxsize)
        self._queues.append(queue)

        async def iterate() -> AsyncIterator[WorkflowEvent]:
            while (event := await queue.get()) is not None:
                yield event

        try:
            yield iterate()
        finally:
            self._queues.remove(queue)
