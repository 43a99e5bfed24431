"""Back-pressure from the lifecycle-event queue to the runs that fill it.

Why this exists: the SDK's `BatchLogRecordProcessor` queues records for a worker thread and,
when the queue is full, drops the newest with a count (`otel.sdk.processor.log.processed`,
`error.type=queue_full`). A busy engine emits faster than that thread exports when the
machine is loaded — a thousand concurrent runs with both cores busy lost 0.5–0.8 % of their
events, each one a gap in the live protocol's per-execution `seq`. Emitting stays synchronous
(an event is a statement of what just happened); instead, before a run does more (starts, or
starts a node), it awaits room here when the queue is above its high-water mark, and goes on
once the queue is back under the low-water mark. Waiting is an asyncio wait: the loop keeps
serving everything else, and the exporter thread gets the GIL.

Runs wait only while the collector is reachable. `ExportHealth` (what `flowscope.engine.telemetry.setup()`
puts between the processor and its exporter) tells: an export failed and the collector's
address takes no TCP connection means `failing`, and runs do not wait. A collector that answers
but refuses (UNAVAILABLE while its own queue is full) is reachable: its refused batches are sent
again, and runs wait for it. Whatever the exporter, a wait ends when the queue has not shrunk
for `stall_s` (a collector that takes connections but nothing else), and the gate then stands
down until the queue is back under the low-water mark. Either way runs go on, the queue buffers
up to its capacity and the SDK then drops with its count (`otel.sdk.processor.log.processed`,
`error.type=queue_full`): a dead collector never blocks runs.

The queue length and capacity are the SDK's private `BatchProcessor._queue` and
`_max_queue_size` (the SDK has no public reading of either besides an observable gauge):
the gate exists only on an SDK that engine/sdk_compat.py verified, every part is looked up
with a guard, and without them there is no gate and the engine behaves as before (the queue
sizing of `flowscope.engine.telemetry.setup()` still applies).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Sequence, Sized
from typing import Any
from urllib.parse import urlsplit

from opentelemetry.sdk._logs import ReadableLogRecord
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, LogRecordExporter, LogRecordExportResult

from flowscope.engine import sdk_compat

logger = logging.getLogger(__name__)

# Above a quarter of the capacity runs wait; they go on again under an eighth. What is emitted
# without a wait in between (node completions, progress, a run's last event) lands above the
# high-water mark, so three quarters of the queue is headroom for those.
HIGH_WATER_FRACTION = 4
LOW_WATER_FRACTION = 8
# A wait ends when the queue has not shrunk for this long: the collector answers but takes nothing.
DEFAULT_STALL_S = 60.0
# A batch the collector refused is tried again for this long while it accepts connections.
DEFAULT_RETRY_S = 120.0
_RETRY_PAUSE_S = 1.0
_PROBE_TIMEOUT_S = 1.0
_POLL_S = 0.005


class ExportHealth(LogRecordExporter):
    """A log exporter that knows whether the collector is reachable; exports through `inner`.

    A collector that answers but refuses (UNAVAILABLE while its own queue is full) outlasts the
    OTLP exporter's six retries when it is busy for long; the exporter then drops the batch.
    Here a failed batch is tried again as long as the collector still accepts connections, for up
    to `retry_s`. `failing` is true once an export failed and the collector does not accept a
    TCP connection (or, when its address is unknown, once an export failed).
    """

    def __init__(
        self, inner: LogRecordExporter, *, address: tuple[str, int] | None = None, retry_s: float = DEFAULT_RETRY_S
    ) -> None:
        self.inner = inner
        self.failing = False
        self.retried_batches = 0
        self._address = address or _address_of(inner)
        self._retry_s = retry_s
        self._closing = threading.Event()

    def export(self, batch: Sequence[ReadableLogRecord]) -> LogRecordExportResult:
        deadline = time.monotonic() + self._retry_s
        while True:
            try:
                result = self.inner.export(batch)
            except BaseException:
                self.failing = True
                raise
            if result is LogRecordExportResult.SUCCESS:
                self.failing = False
                return result
            self.failing = not self._reachable()
            if self.failing or time.monotonic() >= deadline or self._closing.is_set():
                return result
            self.retried_batches += 1
            if self._closing.wait(_RETRY_PAUSE_S):
                return result

    def _reachable(self) -> bool:
        if self._address is None:
            return False
        try:
            socket.create_connection(self._address, timeout=_PROBE_TIMEOUT_S).close()
        except OSError:
            return False
        return True

    def shutdown(self) -> None:
        self._closing.set()
        self.inner.shutdown()  # type: ignore[no-untyped-call]

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.inner.force_flush(timeout_millis)


def _address_of(exporter: object) -> tuple[str, int] | None:
    """host and port of an OTLP exporter's endpoint (its private `_endpoint`: a URL, or gRPC's host:port)."""
    endpoint = getattr(exporter, "_endpoint", None)
    if not isinstance(endpoint, str):
        return None
    parsed = urlsplit(endpoint if "://" in endpoint else f"//{endpoint}")
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 80 if parsed.scheme == "http" else None)
    except ValueError:
        return None
    return (parsed.hostname, port) if parsed.hostname and port else None


class EventBackpressure:
    """The gate for one SDK logger's batch processors (see the module docstring)."""

    def __init__(self, multi: Any, *, stall_s: float = DEFAULT_STALL_S) -> None:
        self._multi = multi
        self._processors: object = None
        self._queues: tuple[Sized, ...] = ()
        self._health: tuple[ExportHealth, ...] = ()
        self._high = self._low = 0
        self.stall_s = stall_s
        self._armed = True
        self._episode: asyncio.Future[None] | None = None
        self._last_fill = 0
        self._progress_at = 0.0
        self.waits = 0  # episodes in which runs waited
        self.stalls = 0  # episodes ended because the queue stopped shrinking

    @classmethod
    def for_logger(cls, events: Any, *, stall_s: float = DEFAULT_STALL_S) -> EventBackpressure | None:
        """A gate for the SDK's logger, on a verified SDK that keeps the parts used here; else None."""
        if not sdk_compat.fast_path():
            return None
        multi = getattr(events, "_multi_log_record_processor", None)
        if not hasattr(multi, "_log_record_processors"):
            return None
        return cls(multi, stall_s=stall_s)

    def _refresh(self, processors: Any) -> None:
        """The batch queues behind the logger, found again whenever its processors change."""
        self._processors = processors
        batches = [getattr(p, "_batch_processor", None) for p in processors if type(p) is BatchLogRecordProcessor]
        found = [
            (queue, capacity)
            for b in batches
            if isinstance(queue := getattr(b, "_queue", None), Sized)
            and isinstance(capacity := getattr(b, "_max_queue_size", None), int)
        ]
        self._queues = tuple(q for q, _ in found)
        capacity = min((c for _, c in found), default=0)
        self._high = capacity // HIGH_WATER_FRACTION
        self._low = capacity // LOW_WATER_FRACTION
        exporters = [getattr(b, "_exporter", None) for b in batches]
        self._health = tuple(e for e in exporters if isinstance(e, ExportHealth))

    def _fill(self) -> int:
        processors = self._multi._log_record_processors
        if processors is not self._processors:
            self._refresh(processors)
        queues = self._queues
        # One queue (setup()'s) is the common case: one length read.
        return len(queues[0]) if len(queues) == 1 else max(map(len, queues), default=0)

    def _failing(self) -> bool:
        return any(h.failing for h in self._health)

    def backlogged(self) -> bool:
        """True when a run should `await wait()` before emitting more. Cheap: one length read."""
        fill = self._fill()
        if fill <= self._low:
            self._armed = True
            return False
        return self._armed and fill > self._high and not self._failing()

    async def wait(self) -> None:
        """Until the queue is under the low-water mark, the collector is unreachable, or the queue stalls."""
        while self.backlogged():
            # Shielded: a cancelled run must not cancel the wait every other run shares.
            await asyncio.shield(self._shared_episode())

    def _shared_episode(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        episode = self._episode
        if episode is None or episode.done() or episode.get_loop() is not loop:
            episode = self._episode = loop.create_future()
            self.waits += 1
            self._last_fill = self._fill()
            self._progress_at = loop.time()
            loop.call_later(_POLL_S, self._poll, episode)
        return episode

    def _poll(self, episode: asyncio.Future[None]) -> None:
        if episode.done():
            return
        loop = episode.get_loop()
        fill = self._fill()
        if fill <= self._low or self._failing():
            episode.set_result(None)
            return
        now = loop.time()
        if fill < self._last_fill:
            self._progress_at = now
        self._last_fill = fill
        if now - self._progress_at >= self.stall_s:
            # The collector takes nothing yet answers (or cannot be told apart): buffer, and when
            # the queue is full the SDK drops and counts.
            self._armed = False
            self.stalls += 1
            logger.warning(
                "event queue has not shrunk for %.0f s (%d queued): runs go on without waiting", self.stall_s, fill
            )
            episode.set_result(None)
            return
        loop.call_later(_POLL_S, self._poll, episode)
