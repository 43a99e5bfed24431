"""Bounded queue → batcher → writer: the collector's path from accepted request to ClickHouse.

The queue is bounded in rows and counts rows until they are written, so its
bound is the collector's memory bound. When it is full, `consume` raises
`Backpressure` and receivers answer "retry later"; nothing accepted is
dropped silently.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from flowscope.collector.convert import CONVERTERS, REQUESTS, Converted
from flowscope.collector.dead_letter import DeadLetterStore
from flowscope.collector.intake import FAST_PATHS
from flowscope.collector.isolation import Entry, Isolation, Piece, Stopped, Writer, round_pieces
from flowscope.collector.spool import Spool, SpoolFull, SpoolUnwritable
from flowscope.collector.telemetry import SelfMetrics
from flowscope.collector.types import Backpressure, Outcome, Signal, StreamSubscriber, Unsubscribe

logger = logging.getLogger(__name__)

_DEFAULT_MAX_QUEUE_ROWS = 50_000
_DEFAULT_MAX_BATCH_ROWS = 20_000
_DEFAULT_FLUSH_INTERVAL_S = 1.0
_RETRY_INITIAL_S = 0.1
_RETRY_MAX_S = 5.0
_RECENT_REQUESTS = 50_000
# Not ready once this many writes in a row failed, or no write completed for this long
# (at least) while rows wait.
_FAILED_WRITES_NOT_READY = 3
_DEFAULT_STALL_AFTER_S = 30.0
# A spool write refused this recently still makes the collector not ready.
_SPOOL_REFUSAL_MEMORY_S = 5.0

__all__ = ["Backpressure", "Entry", "Pipeline", "Writer"]


@dataclass
class _Round:
    """Entries written together. Its composition never changes once formed, so the insert
    deduplication tokens derived from it stay valid across retries and restarts."""

    entries: list[Entry]
    done: set[str] = field(default_factory=set)  # keys of the pieces already settled

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
        dead_letters: DeadLetterStore | None = None,
        stall_after_s: float | None = None,
    ) -> None:
        self._writer = writer
        self.metrics = metrics or SelfMetrics()
        self.dead_letters = dead_letters or DeadLetterStore(None, self.metrics)
        self._isolation = Isolation(self._write_with_retry, self.dead_letters, self.metrics)
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
        self._failed_writes = 0  # in a row
        # When rows last started waiting with none written since (None: nothing waits).
        self._waiting_since: float | None = None
        self.stall_after_s = stall_after_s or max(_DEFAULT_STALL_AFTER_S, 10 * self.flush_interval_s)
        self._spool_refused: tuple[float, str] | None = None
        self._instance = uuid.uuid4().hex
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

    def consume(self, signal: Signal, request: Any, raw: bytes | None = None) -> Outcome:
        """Convert and queue one OTLP request; raises Backpressure when it cannot be taken now.

        With a spool, returns only once the request is fsync'd: acknowledged means durable.
        """
        converted, rows, otlp = _convert(signal, request)
        self.metrics.received.labels(signal.value).inc(converted.accepted + converted.rejected)
        if converted.rejected:
            self.metrics.rejected.labels(signal.value, "invalid").inc(converted.rejected)
        if rows == 0:
            return converted.outcome
        # The spool and the intake take the bytes the receiver already holds; only OTLP/JSON needs encoding.
        payload = (raw if raw is not None else request.SerializeToString()) if self.spool is not None or otlp else b""
        digest = hashlib.blake2b(payload, digest_size=16).digest() if self.spool is not None else b""
        with self._cond:
            if digest and digest in self._recent:
                self.metrics.duplicate_requests.inc()
                return converted.outcome
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
            self._mark_waiting()
            self._queued_rows += rows
            self.metrics.queue_rows.set(self._queued_rows)
            self.metrics.accepted.labels(signal.value).inc(converted.accepted)
            self._fan_out(signal, request)
            if self._incoming_rows >= self.max_batch_rows:
                self._cond.notify_all()
        if self.spool is not None:
            self._wait_durable(signal, seq)
        return converted.outcome

    def _wait_durable(self, signal: Signal, seq: int) -> None:
        """A request whose fsync failed is refused (retryable). It stays queued and is
        written; the client's retry is then recognised as a duplicate and not stored again."""
        assert self.spool is not None
        try:
            self.spool.wait_durable(seq)
        except SpoolUnwritable as exc:
            raise self._spool_refusal(signal, exc) from exc

    def _spool_refusal(self, signal: Signal, exc: Exception) -> Backpressure:
        self._spool_refused = (time.monotonic(), str(exc))
        self.metrics.refused.labels(signal.value, "spool_unwritable").inc()
        logger.warning("refusing a request: %s", exc)
        return Backpressure(str(exc), retry_after_s=2.0)

    def _mark_waiting(self) -> None:
        if self._waiting_since is None:
            self._waiting_since = time.monotonic()

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
        except SpoolUnwritable as exc:
            raise self._spool_refusal(signal, exc) from exc
        self._remember(digest)
        return seq

    def _remember(self, digest: bytes) -> None:
        self._recent[digest] = None
        if len(self._recent) > _RECENT_REQUESTS:
            self._recent.popitem(last=False)

    @property
    def _spilling(self) -> bool:
        return self._spill_next != 0 and self._spill_next <= self._spill_last

    def _spill(self, signal: Signal, request: Any, payload: bytes, digest: bytes, converted: Converted) -> Outcome:
        """Accept into the spool only (called with the lock held); the writer reads it back later."""
        assert self.spool is not None
        seq = self._append_to_spool(signal, payload, digest)
        if not self._spilling:
            self._spill_next = seq
        self._spill_last = seq
        self._mark_waiting()
        self.metrics.accepted.labels(signal.value).inc(converted.accepted)
        self.metrics.spilled.inc()
        self._fan_out(signal, request)
        self._cond.release()
        try:
            self._wait_durable(signal, seq)
        finally:
            self._cond.acquire()
        return converted.outcome

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
                self._mark_waiting()
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

    @property
    def writer_alive(self) -> bool:
        return self._thread.is_alive()

    def problems(self) -> list[str]:
        """Why this collector should not be sent traffic now; empty when ready."""
        out: list[str] = []
        now = time.monotonic()
        if not self._thread.is_alive() and not self._closing:
            out.append("writer thread stopped")
        if not self._store_ok:
            out.append(f"storage unavailable: {self._last_error}")
        elif self._failed_writes >= _FAILED_WRITES_NOT_READY:
            out.append(f"the last {self._failed_writes} writes failed: {self._last_error}")
        since = self._waiting_since
        if since is not None and now - since > self.stall_after_s and (self._queued_rows > 0 or self._spilling):
            out.append(f"writing stalled: nothing written for {now - since:.0f}s while rows wait")
        refused = self._spool_refused
        if refused is not None and now - refused[0] <= _SPOOL_REFUSAL_MEMORY_S:
            out.append(refused[1])
        if self.spool is not None and self.spool.size_bytes >= 0.9 * self.spool.max_bytes:
            out.append(f"spool nearly full ({self.spool.size_bytes} of {self.spool.max_bytes} bytes)")
        if self._queued_rows >= 0.9 * self.max_queue_rows:
            out.append(f"queue nearly full ({self._queued_rows} of {self.max_queue_rows} rows)")
        return out

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
        """The writer thread. Nothing may end it but shutdown: an unexpected error (the spool's
        disk refusing a checkpoint, a bug) is logged and counted, and the loop goes on after a pause."""
        next_flush = time.monotonic() + self.flush_interval_s
        delay = _RETRY_INITIAL_S
        while True:
            try:
                if self._step(next_flush):
                    return
                delay = _RETRY_INITIAL_S
            except Exception as exc:
                self.metrics.writer_errors.inc()
                self._note_failure(exc)
                logger.exception("writer error; retrying in %.1fs", delay)
                if self._closing and time.monotonic() >= self._drain_deadline:
                    return
                with self._cond:
                    self._cond.wait(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, _RETRY_MAX_S)
            next_flush = time.monotonic() + self.flush_interval_s

    def _step(self, next_flush: float) -> bool:
        """Write one round; True when the writer is done (shut down)."""
        current, closing = self._next_round(next_flush)
        if current is None:
            return closing
        try:
            written = self._write_round(current)
        except BaseException:
            self._requeue(current)
            raise
        if not written:
            self._requeue(current)
            return closing or self._closing
        return False

    def _requeue(self, current: _Round) -> None:
        with self._cond:
            self._rounds.appendleft(current)

    def _write_round(self, current: _Round) -> bool:
        """True once every piece is settled (written, or isolated and dead-lettered)."""
        if self.spool is not None:
            self.spool.mark_inflight(current.first, current.last)
        # Spooled rounds keep their tokens across restarts (replay re-forms them exactly),
        # named by their spool; without a spool, seqs restart at 1, so the tokens are this
        # pipeline's own.
        token_prefix = f"{current.first}-{current.last}"
        if self.spool is None:
            token_prefix = f"{self._instance}:{token_prefix}"
        elif self.spool.identity:
            token_prefix = f"{self.spool.identity}:{token_prefix}"
        try:
            for piece in round_pieces(current.entries, self.max_batch_rows):
                self._isolation.settle(piece, current.done, token_prefix)
        except Stopped:
            return False
        if self.spool is not None:
            self.spool.mark_written(current.last)
        with self._cond:
            self._queued_rows -= current.rows
            self.metrics.queue_rows.set(self._queued_rows)
            self._waiting_since = time.monotonic() if self._queued_rows > 0 or self._spilling else None
            self._cond.notify_all()
        return True

    def _write_with_retry(self, piece: Piece, token: str | None) -> Exception | None:
        """None once written; the error when ClickHouse refuses it for good. Transient
        failures are retried (backing off) until they pass or shutdown's deadline: Stopped."""
        delay = _RETRY_INITIAL_S
        while True:
            started = time.perf_counter()
            try:
                piece.write(self._writer, token)
            except Exception as exc:
                self.metrics.insert_errors.labels(piece.table).inc()
                self._note_failure(exc)
                if not self._writer.is_transient(exc):
                    logger.warning("ClickHouse refused %d rows for %s: %s", piece.rows, piece.table, self._last_error)
                    return exc
                if self._store_ok:
                    logger.warning("ClickHouse unavailable, retrying: %s", self._last_error)
                self._store_ok = False
                if self._closing and time.monotonic() >= self._drain_deadline:
                    raise Stopped from exc
                # Jittered, bounded, and cut short by shutdown so a drain can retry at once.
                with self._cond:
                    self._cond.wait(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, _RETRY_MAX_S)
                continue
            self.metrics.insert_seconds.labels(piece.table).observe(time.perf_counter() - started)
            self.metrics.written.labels(piece.table).inc(piece.rows)
            if not self._store_ok:
                logger.warning("ClickHouse available again")
            self._store_ok = True
            self._last_error = None
            self._failed_writes = 0
            return None

    def _note_failure(self, exc: Exception) -> None:
        text = str(exc).strip()
        self._last_error = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
        self._failed_writes += 1


def _convert(signal: Signal, request: Any) -> tuple[Converted, int, bool]:
    """(outcome, rows to queue, whether ClickHouse converts the request's bytes itself).

    A trace or log request whose every record is valid is only counted: collector/intake.py."""
    fast_path = FAST_PATHS.get(signal)
    if fast_path is not None:
        count = fast_path(request)
        if count is not None:
            return Converted([], accepted=count), count, True
    converted = CONVERTERS[signal](request)
    return converted, converted.rows, False
