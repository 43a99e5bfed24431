"""Bounded queue → batcher → writer: the collector's path from accepted request to ClickHouse.

The queue is bounded in rows and counts rows until they are written, so its
bound is the collector's memory bound. When it is full, `consume` raises
`Backpressure` and receivers answer "retry later"; nothing accepted is
dropped silently.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import random
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from collector.convert import CONVERTERS, REQUESTS, Columns, Converted
from collector.intake import FAST_PATHS, INTAKES
from collector.spool import Spool, SpoolFull
from collector.telemetry import SelfMetrics
from collector.types import Signal, StreamSubscriber, Unsubscribe

logger = logging.getLogger(__name__)

_DEFAULT_MAX_QUEUE_ROWS = 50_000
_DEFAULT_MAX_BATCH_ROWS = 20_000
_DEFAULT_FLUSH_INTERVAL_S = 1.0
_RETRY_INITIAL_S = 0.1
_RETRY_MAX_S = 5.0
# A batch ClickHouse keeps refusing for reasons other than reachability is
# poison (a bug, not an outage): after this many attempts it is dropped and counted.
_MAX_POISON_ATTEMPTS = 8
_RECENT_REQUESTS = 50_000


class Backpressure(Exception):
    """The collector cannot take more now; the client should retry after `retry_after_s`."""

    def __init__(self, reason: str, retry_after_s: float = 1.0) -> None:
        self.reason = reason
        self.retry_after_s = retry_after_s
        super().__init__(reason)


class Writer(Protocol):
    def insert(self, columns: Columns, dedup_token: str | None = None) -> None: ...

    def insert_otlp(
        self, payloads: list[bytes], dedup_token: str | None = None, signal: Signal = Signal.TRACES
    ) -> None: ...

    def is_transient(self, error: Exception) -> bool: ...

    def close(self) -> None: ...


@dataclass
class Entry:
    """The rows of one accepted request, with its spool (or intake) sequence number: converted
    to columns, or, for valid trace and log requests, its protobuf bytes for ClickHouse to convert."""

    seq: int
    tables: list[Columns]
    rows: int
    otlp: bytes = b""
    signal: Signal = Signal.TRACES


@dataclass
class _Round:
    """Entries written together. Its composition never changes once formed, so the insert
    deduplication tokens derived from it stay valid across retries and restarts."""

    entries: list[Entry]
    done: set[tuple[str, int]] = field(default_factory=set)

    @property
    def first(self) -> int:
        return self.entries[0].seq

    @property
    def last(self) -> int:
        return self.entries[-1].seq

    @property
    def rows(self) -> int:
        return sum(e.rows for e in self.entries)


class Pipeline:
    def __init__(
        self,
        writer: Writer,
        metrics: SelfMetrics | None = None,
        *,
        max_queue_rows: int | None = None,
        max_batch_rows: int | None = None,
        flush_interval_s: float | None = None,
        spool: Spool | None = None,
    ) -> None:
        self._writer = writer
        self.metrics = metrics or SelfMetrics()
        self.max_queue_rows = max_queue_rows or _DEFAULT_MAX_QUEUE_ROWS
        self.max_batch_rows = max_batch_rows or _DEFAULT_MAX_BATCH_ROWS
        self.flush_interval_s = _DEFAULT_FLUSH_INTERVAL_S if flush_interval_s is None else flush_interval_s
        self.spool = spool
        self._cond = threading.Condition()
        self._incoming: list[Entry] = []
        self._incoming_rows = 0
        self._rounds: deque[_Round] = deque()
        self._queued_rows = 0
        self._seq = 0
        self._subscribers: list[StreamSubscriber] = []
        self._closing = False
        self._store_ok = True
        self._last_error: str | None = None
        self._flush_requested = False
        # Spilling: once memory is full, records live only in the spool until the writer
        # reads them back, oldest first, [spill_next, spill_last].
        self._spill_next = 0
        self._spill_last = 0
        self._spill_inflight: tuple[int, int] | None = None
        # Hashes of recently spooled requests: an exporter retrying a request whose
        # acknowledgement was lost (a crash after the fsync) must not store it twice.
        self._recent: OrderedDict[bytes, None] = OrderedDict()
        self.metrics.queue_capacity.set(self.max_queue_rows)
        self._thread = threading.Thread(target=self._run, name="flowscope-writer", daemon=True)
        self._thread.start()

    # -- intake ------------------------------------------------------------------------------

    def consume(self, signal: Signal, request: Any, raw: bytes | None = None) -> Converted:
        """Convert and queue one OTLP request; raises Backpressure when it cannot be taken now.

        With a spool, returns only once the request is fsync'd: acknowledged means durable.
        """
        converted, rows, otlp = _convert(signal, request)
        self.metrics.received.labels(signal.value).inc(converted.accepted + converted.rejected)
        if converted.rejected:
            self.metrics.rejected.labels(signal.value, "invalid").inc(converted.rejected)
        if rows == 0:
            return converted
        # The spool and the intake take the bytes the receiver already holds; only OTLP/JSON needs encoding.
        payload = (raw if raw is not None else request.SerializeToString()) if self.spool is not None or otlp else b""
        digest = hashlib.blake2b(payload, digest_size=16).digest() if self.spool is not None else b""
        with self._cond:
            if digest and digest in self._recent:
                self.metrics.duplicate_requests.inc()
                return converted
            if self._closing:
                self.metrics.refused.labels(signal.value, "shutting_down").inc()
                raise Backpressure("collector is shutting down", retry_after_s=2.0)
            memory_full = self._queued_rows + rows > self.max_queue_rows and self._queued_rows > 0
            if self.spool is not None and (memory_full or self._spilling):
                return self._spill(signal, request, payload, digest, converted)
            if memory_full:
                reason = "storage unavailable" if not self._store_ok else "queue full"
                self.metrics.refused.labels(signal.value, reason.replace(" ", "_")).inc()
                raise Backpressure(f"{reason}: {self._queued_rows} rows waiting (bound {self.max_queue_rows})")
            if self.spool is not None:
                seq = self._append_to_spool(signal, payload, digest)
            else:
                self._seq += 1
                seq = self._seq
            self._incoming.append(Entry(seq, converted.tables, rows, payload if otlp else b"", signal))
            self._incoming_rows += rows
            self._queued_rows += rows
            self.metrics.queue_rows.set(self._queued_rows)
            self.metrics.accepted.labels(signal.value).inc(converted.accepted)
            self._fan_out(signal, request)
            if self._incoming_rows >= self.max_batch_rows:
                self._cond.notify_all()
        if self.spool is not None:
            self.spool.wait_durable(seq)
        return converted

    def _fan_out(self, signal: Signal, request: Any) -> None:
        """Called with the lock held: subscribers see requests in acceptance order."""
        for subscriber in self._subscribers:
            try:
                subscriber(signal, request)
            except Exception:
                self.metrics.subscriber_errors.inc()
                logger.exception("stream subscriber %r failed", subscriber)

    def _append_to_spool(self, signal: Signal, payload: bytes, digest: bytes) -> int:
        """Called with the lock held: the request is durable-to-be once this returns its seq."""
        assert self.spool is not None
        try:
            seq = self.spool.append(signal, payload)
        except SpoolFull as exc:
            self.metrics.refused.labels(signal.value, "spool_full").inc()
            raise Backpressure(str(exc)) from exc
        self._remember(digest)
        return seq

    def _remember(self, digest: bytes) -> None:
        self._recent[digest] = None
        if len(self._recent) > _RECENT_REQUESTS:
            self._recent.popitem(last=False)

    @property
    def _spilling(self) -> bool:
        return self._spill_next != 0 and self._spill_next <= self._spill_last

    def _spill(self, signal: Signal, request: Any, payload: bytes, digest: bytes, converted: Converted) -> Converted:
        """Accept into the spool only (called with the lock held); the writer reads it back later."""
        assert self.spool is not None
        seq = self._append_to_spool(signal, payload, digest)
        if not self._spilling:
            self._spill_next = seq
        self._spill_last = seq
        self.metrics.accepted.labels(signal.value).inc(converted.accepted)
        self.metrics.spilled.inc()
        self._fan_out(signal, request)
        self._cond.release()
        try:
            self.spool.wait_durable(seq)
        finally:
            self._cond.acquire()
        return converted

    def resume_from_spool(self) -> int:
        """After a restart: everything past the checkpoint is read back from the spool, the
        interrupted round first and exactly as it was. Returns how many records wait."""
        assert self.spool is not None
        checkpoint = self.spool.checkpoint
        for record in self.spool.records_from(max(1, checkpoint.written - _RECENT_REQUESTS)):
            self._remember(hashlib.blake2b(record.payload, digest_size=16).digest())
        with self._cond:
            if self.spool.last_seq > checkpoint.written:
                self._spill_next = checkpoint.written + 1
                self._spill_last = self.spool.last_seq
                self._spill_inflight = checkpoint.inflight
                self._cond.notify_all()
            return max(0, self.spool.last_seq - checkpoint.written)

    def _load_spilled(self) -> _Round | None:
        """Read the next spilled records back (called by the writer, lock not held)."""
        assert self.spool is not None
        with self._cond:
            start, last, inflight = self._spill_next, self._spill_last, self._spill_inflight
        entries: list[Entry] = []
        rows = 0
        stop = inflight[1] if inflight is not None and inflight[0] <= start <= inflight[1] else last
        for record in self.spool.records_from(start):
            if record.seq > stop:
                break
            converted, count, otlp = _convert(record.signal, REQUESTS[record.signal].FromString(record.payload))
            entries.append(Entry(record.seq, converted.tables, count, record.payload if otlp else b"", record.signal))
            rows += count
            if inflight is None and rows >= self.max_batch_rows:
                break
        if not entries:
            return None
        with self._cond:
            self._spill_next = entries[-1].seq + 1
            self._spill_inflight = None
            self._queued_rows += rows
            self.metrics.queue_rows.set(self._queued_rows)
        return _Round(entries)

    def subscribe(self, subscriber: StreamSubscriber) -> Unsubscribe:
        with self._cond:
            self._subscribers.append(subscriber)

        def unsubscribe() -> None:
            with self._cond:
                if subscriber in self._subscribers:
                    self._subscribers.remove(subscriber)

        return unsubscribe

    # -- state -------------------------------------------------------------------------------

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    @property
    def store_ok(self) -> bool:
        return self._store_ok

    @property
    def last_error(self) -> str | None:
        return self._last_error

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Write everything queued now; True when the queue emptied within the timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._flush_requested = True
            self._cond.notify_all()
            while self._queued_rows > 0 or self._spilling:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.05))
        return True

    def close(self, timeout_s: float = 30.0) -> int:
        """Stop intake, drain what was accepted, stop the writer. Returns rows left unwritten."""
        with self._cond:
            if self._closing and not self._thread.is_alive():
                return self._queued_rows
            self._closing = True
            self._drain_deadline = time.monotonic() + timeout_s
            self._cond.notify_all()
        self._thread.join(timeout_s + 1.0)
        self._writer.close()
        if self.spool is not None:
            self.spool.close()
        left = self._queued_rows
        if left:
            kept = " (kept in the spool for the next start)" if self.spool is not None else ""
            logger.error("collector stopped with %d accepted rows unwritten%s", left, kept)
        return left

    _drain_deadline = float("inf")

    # -- the writer thread -----------------------------------------------------------------

    def _next_round(self, next_flush: float) -> tuple[_Round | None, bool]:
        with self._cond:
            spilled_ready = self._spilling and not self._incoming and not self._rounds
        if spilled_ready:
            loaded = self._load_spilled()
            if loaded is not None:
                return loaded, self._closing
        with self._cond:
            while not (self._rounds or self._closing or self._flush_requested or self._spilling):
                if self._incoming and (self._incoming_rows >= self.max_batch_rows or time.monotonic() >= next_flush):
                    break
                wait = next_flush - time.monotonic()
                self._cond.wait(wait if wait > 0 else self.flush_interval_s)
            self._flush_requested = False
            if self._rounds:
                return self._rounds.popleft(), self._closing
            if self._incoming:
                formed = _Round(self._incoming)
                self._incoming = []
                self._incoming_rows = 0
                return formed, self._closing
            return None, self._closing

    def _run(self) -> None:
        next_flush = time.monotonic() + self.flush_interval_s
        while True:
            current, closing = self._next_round(next_flush)
            next_flush = time.monotonic() + self.flush_interval_s
            if current is None:
                if closing:
                    return
                continue
            if not self._write_round(current):
                with self._cond:
                    self._rounds.appendleft(current)
                if closing or self._closing:
                    return

    def _write_round(self, current: _Round) -> bool:
        if self.spool is not None:
            self.spool.mark_inflight(current.first, current.last)
        merged: dict[str, Columns] = {}
        otlp: dict[Signal, list[Entry]] = {}
        for entry in current.entries:
            if entry.otlp:
                otlp.setdefault(entry.signal, []).append(entry)
            for columns in entry.tables:
                target = merged.get(columns.table)
                if target is None:
                    merged[columns.table] = target = Columns(columns.table, columns.names)
                target.extend(columns)
        # (insert target, chunk index, table the rows land in, rows, the insert)
        writes: list[tuple[str, int, str, int, Callable[[str | None], None]]] = [
            (table, index, table, chunk.rows, functools.partial(self._writer.insert, chunk))
            for table in sorted(merged)
            for index, chunk in enumerate(merged[table].split(self.max_batch_rows))
        ]
        for signal, entries in sorted(otlp.items()):
            intake = INTAKES[signal]
            insert = functools.partial(self._writer.insert_otlp, [e.otlp for e in entries], signal=signal)
            writes.append((intake.table, 0, intake.target, sum(e.rows for e in entries), insert))
        for into, index, table, rows, write in writes:
            if (into, index) in current.done:
                continue
            token = f"{current.first}-{current.last}:{into}:{index}" if self.spool is not None else None
            if not self._write_with_retry(table, rows, write, token):
                return False
            current.done.add((into, index))
        with self._cond:
            self._queued_rows -= current.rows
            self.metrics.queue_rows.set(self._queued_rows)
            self._cond.notify_all()
        if self.spool is not None:
            self.spool.mark_written(current.last)
        return True

    def _write_with_retry(self, table: str, rows: int, write: Callable[[str | None], None], token: str | None) -> bool:
        """True when the chunk is done with (written, or dropped as poison and counted)."""
        delay = _RETRY_INITIAL_S
        poison_attempts = 0
        while True:
            started = time.perf_counter()
            try:
                write(token)
            except Exception as exc:
                self.metrics.insert_errors.labels(table).inc()
                self._last_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                if self._writer.is_transient(exc):
                    if self._store_ok:
                        logger.warning("ClickHouse unavailable, retrying: %s", self._last_error)
                    self._store_ok = False
                else:
                    poison_attempts += 1
                    logger.exception("ClickHouse refused %d rows for %s", rows, table)
                    if poison_attempts >= _MAX_POISON_ATTEMPTS:
                        self.metrics.dropped.labels(table).inc(rows)
                        return True
                if self._closing and time.monotonic() >= self._drain_deadline:
                    return False
                # Jittered, bounded, and cut short by shutdown so a drain can retry at once.
                with self._cond:
                    self._cond.wait(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, _RETRY_MAX_S)
                continue
            self.metrics.insert_seconds.labels(table).observe(time.perf_counter() - started)
            self.metrics.written.labels(table).inc(rows)
            if not self._store_ok:
                logger.warning("ClickHouse available again")
            self._store_ok = True
            self._last_error = None
            return True


def _convert(signal: Signal, request: Any) -> tuple[Converted, int, bool]:
    """(outcome, rows to queue, whether ClickHouse converts the request's bytes itself).

    A trace or log request whose every record is valid is only counted: collector/intake.py."""
    fast_path = FAST_PATHS.get(signal)
    if fast_path is not None:
        count = fast_path(request)
        if count is not None:
            return Converted([], count, 0, []), count, True
    converted = CONVERTERS[signal](request)
    return converted, converted.rows, False
