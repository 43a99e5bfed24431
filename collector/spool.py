"""The write-ahead spool: an acknowledged request is in ClickHouse or fsync'd here.

Records are appended to segment files (length, CRC32, signal, seq, protobuf payload) and
made durable by a group commit: one fsync covers every record written since the last, so
a request waits a few milliseconds, not one fsync of its own. The writer records which seq
range it is about to insert (the in-flight round) and, once inserted, a checkpoint; on
restart, records after the checkpoint are replayed, the in-flight round re-formed exactly
as before with the same insert deduplication tokens, so ClickHouse keeps each row once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import struct
import threading
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowscope.collector.types import Signal

logger = logging.getLogger(__name__)

_HEADER = struct.Struct("<IIBQ")  # payload length, crc32 of (signal, seq, payload), signal, seq
_SIGNALS = {Signal.TRACES: 1, Signal.METRICS: 2, Signal.LOGS: 3}
_BY_CODE = {code: signal for signal, code in _SIGNALS.items()}
_DEFAULT_MAX_BYTES = 1 << 30
_DEFAULT_SEGMENT_BYTES = 64 << 20
# Space set aside so a checkpoint can still be written on a full disk: without it the
# writer could not record progress, so it could not delete the segments that filled it.
_RESERVE_BYTES = 64 << 10
# After a failed fsync, how long the syncer waits before trying again.
_SYNC_RETRY_S = 0.2


class SpoolFull(Exception):
    """The spool reached its size bound: push back until the writer catches up."""


class SpoolUnwritable(Exception):
    """The file system refused a write or an fsync (no space, quota, I/O error): push back,
    nothing is acknowledged that is not durable."""

    def __init__(self, error: OSError | str) -> None:
        reason = f"{error.strerror or error}" if isinstance(error, OSError) else error
        super().__init__(f"spool cannot write: {reason}")


@dataclass(frozen=True)
class Record:
    seq: int
    signal: Signal
    payload: bytes


@dataclass(frozen=True)
class Checkpoint:
    written: int  # every record with seq <= written is in ClickHouse
    inflight: tuple[int, int] | None  # the round being inserted when the process stopped


class Spool:
    def __init__(self, directory: Path, max_bytes: int | None = None, segment_bytes: int | None = None) -> None:
        self.directory = directory
        self.max_bytes = max_bytes or _DEFAULT_MAX_BYTES
        self.segment_bytes = segment_bytes or _DEFAULT_SEGMENT_BYTES
        directory.mkdir(parents=True, exist_ok=True)
        self._lock_file = (directory / "LOCK").open("a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise RuntimeError(f"spool {directory} is in use by another collector") from exc
        self._cond = threading.Condition()
        self.checkpoint = self._read_checkpoint()
        self.identity = self._identity()
        self._segments: list[tuple[int, Path]] = []  # (first seq, path)
        self._last_seq = self._recover()
        self._written_seq = self._durable_seq = self._last_seq
        self._bytes = sum(path.stat().st_size for _, path in self._segments)
        self._file = (
            self._open_segment(self._last_seq + 1)
            if not self._segments
            else self._segments[-1][1].open("ab", buffering=0)
        )
        self._closed = False
        self._sync_error: OSError | None = None
        self._reserve = directory / "reserve"
        self._reserve_missing = False
        self._make_reserve()
        self._syncer = threading.Thread(target=self._sync_loop, name="spool-fsync", daemon=True)
        self._syncer.start()

    # -- recovery -------------------------------------------------------------------------------

    def _identity(self) -> str:
        """This spool's own name, part of every insert deduplication token it leads to.

        Seqs start at 1 in every new spool directory, and ClickHouse remembers recent tokens
        per table: without the name, a spool made anew (deleted, on tmpfs, another
        --spool-dir, a second collector on the same server) would have its first rounds
        taken for repeats of an older spool's and silently dropped. A spool written before
        names existed keeps the empty name, so its in-flight round replays with the token
        it was first sent with."""
        path = self.directory / "spool-id"
        if path.exists():
            return path.read_text().strip()
        legacy = self.checkpoint != Checkpoint(0, None) or any(self.directory.glob("seg-*.wal"))
        identity = "" if legacy else uuid.uuid4().hex
        tmp = path.with_suffix(".tmp")
        with tmp.open("w") as handle:
            handle.write(identity)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        return identity

    def _read_checkpoint(self) -> Checkpoint:
        path = self.directory / "checkpoint.json"
        if not path.exists():
            return Checkpoint(0, None)
        data = json.loads(path.read_text())
        inflight = tuple(data["inflight"]) if data.get("inflight") else None
        return Checkpoint(int(data["written"]), inflight)

    def _recover(self) -> int:
        last = self.checkpoint.written
        for path in sorted(self.directory.glob("seg-*.wal")):
            first = int(path.stem.split("-")[1])
            self._segments.append((first, path))
            valid_end = 0
            for record, end in self._read(path):
                last = max(last, record.seq)
                valid_end = end
            if valid_end < path.stat().st_size:
                # A torn tail from a crash mid-write: never acknowledged, so cut it off.
                logger.warning("spool %s: truncating a torn tail at byte %d", path.name, valid_end)
                with path.open("r+b") as handle:
                    handle.truncate(valid_end)
        return last

    def _read(self, path: Path) -> Iterator[tuple[Record, int]]:
        with path.open("rb") as handle:
            data = handle.read()
        offset = 0
        while offset + _HEADER.size <= len(data):
            length, crc, code, seq = _HEADER.unpack_from(data, offset)
            start = offset + _HEADER.size
            payload = data[start : start + length]
            if len(payload) < length or code not in _BY_CODE:
                return
            if zlib.crc32(payload, zlib.crc32(struct.pack("<BQ", code, seq))) != crc:
                return
            offset = start + length
            yield Record(seq, _BY_CODE[code], payload), offset

    def replay(self) -> Iterator[Record]:
        """Records not yet known to be in ClickHouse, in seq order."""
        return self.records_from(self.checkpoint.written + 1)

    def records_from(self, seq: int, limit: int | None = None) -> Iterator[Record]:
        """Durable records with seq >= `seq`, in order (at most `limit`)."""
        with self._cond:
            segments = list(self._segments)
            durable = self._durable_seq
        count = 0
        for index, (_first, path) in enumerate(segments):
            next_first = segments[index + 1][0] if index + 1 < len(segments) else None
            if next_first is not None and next_first <= seq:
                continue
            for record, _end in self._read(path):
                if record.seq < seq:
                    continue
                if record.seq > durable or (limit is not None and count >= limit):
                    return
                count += 1
                yield record

    @property
    def last_seq(self) -> int:
        return self._last_seq

    # -- appending ------------------------------------------------------------------------------

    def _open_segment(self, first_seq: int) -> Any:
        path = self.directory / f"seg-{first_seq:020d}.wal"
        # Unbuffered: a write the file system refuses fails here, in `append`, where the
        # request can still be refused, not later in a flush nobody can answer for.
        handle = path.open("ab", buffering=0)
        self._segments.append((first_seq, path))
        return handle

    def append(self, signal: Signal, payload: bytes) -> int:
        """Write a record (not yet durable: call wait_durable before acknowledging).

        Raises SpoolFull at the size bound, SpoolUnwritable when the file system refuses."""
        with self._cond:
            if self._closed:
                raise RuntimeError("Expected an open spool, but got a closed one")
            if self._bytes + len(payload) + _HEADER.size > self.max_bytes:
                raise SpoolFull(f"spool is full ({self._bytes} of {self.max_bytes} bytes)")
            seq = self._last_seq + 1
            code = _SIGNALS[signal]
            crc = zlib.crc32(payload, zlib.crc32(struct.pack("<BQ", code, seq)))
            try:
                if self._file.tell() >= self.segment_bytes:
                    os.fsync(self._file.fileno())
                    self._file = self._rotate(seq)
                self._write_record(_HEADER.pack(len(payload), crc, code, seq) + payload)
            except OSError as exc:
                raise SpoolUnwritable(exc) from exc
            self._bytes += _HEADER.size + len(payload)
            self._last_seq = self._written_seq = seq
            self._cond.notify_all()
            return seq

    def _rotate(self, seq: int) -> Any:
        handle = self._open_segment(seq)
        self._file.close()
        return handle

    def _write_record(self, record: bytes) -> None:
        """All of the record or none of it: a refused write is cut back off the segment."""
        start = self._file.tell()
        try:
            view = memoryview(record)
            while view:
                written = self._file.write(view)
                view = view[written or 0 :]
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._file.fileno(), start)
            raise

    def wait_durable(self, seq: int, timeout_s: float = 10.0) -> None:
        """Raises SpoolUnwritable when the fsync fails or does not complete in time."""
        with self._cond:
            self._cond.wait_for(
                lambda: self._durable_seq >= seq or self._closed or self._sync_error is not None, timeout_s
            )
            if self._durable_seq >= seq or self._closed:
                return
            raise SpoolUnwritable(self._sync_error or f"fsync did not complete within {timeout_s}s")

    @property
    def healthy(self) -> bool:
        """False while the last fsync failed."""
        return self._sync_error is None

    def _sync_loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._written_seq > self._durable_seq or self._closed)
                if self._closed and self._written_seq == self._durable_seq:
                    return
                target = self._written_seq
                fd = self._file.fileno()
            # fsync outside the lock: appends continue meanwhile and ride the next commit.
            try:
                os.fsync(fd)
            except OSError as exc:
                # The waiting requests are refused (retryable); the records stay and are
                # synced by a later attempt, so the syncer itself never stops.
                logger.error("spool fsync failed: %s", exc)
                with self._cond:
                    self._sync_error = exc
                    self._cond.notify_all()
                    self._cond.wait(_SYNC_RETRY_S)
                continue
            with self._cond:
                self._sync_error = None
                self._durable_seq = max(self._durable_seq, target)
                self._cond.notify_all()

    # -- checkpoints ---------------------------------------------------------------------------

    def mark_inflight(self, first: int, last: int) -> None:
        self._write_checkpoint(Checkpoint(self.checkpoint.written, (first, last)))

    def mark_written(self, last: int) -> None:
        self._write_checkpoint(Checkpoint(max(self.checkpoint.written, last), None))
        self._truncate()
        self._make_reserve()

    def _write_checkpoint(self, checkpoint: Checkpoint) -> None:
        try:
            self._replace_checkpoint(checkpoint)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or not self._reserve.exists():
                raise
            # The disk is full: give up the reserve so progress can be recorded (and the
            # segments it covers deleted); it is set aside again once space returns.
            logger.warning("spool: disk full, using the reserved space for the checkpoint")
            self._reserve.unlink()
            self._replace_checkpoint(checkpoint)
        self.checkpoint = checkpoint

    def _replace_checkpoint(self, checkpoint: Checkpoint) -> None:
        path = self.directory / "checkpoint.json"
        tmp = path.with_suffix(".tmp")
        try:
            with tmp.open("w") as handle:
                json.dump({"written": checkpoint.written, "inflight": checkpoint.inflight}, handle)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        os.replace(tmp, path)

    def _make_reserve(self) -> None:
        if self._reserve.exists():
            return
        try:
            with self._reserve.open("wb") as handle:
                handle.write(bytes(_RESERVE_BYTES))
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            if not self._reserve_missing:
                logger.warning("spool: cannot set space aside for checkpoints yet: %s", exc)
            self._reserve_missing = True
            with contextlib.suppress(OSError):
                self._reserve.unlink()
            return
        self._reserve_missing = False

    def _truncate(self) -> None:
        """Delete segments every record of which is in ClickHouse (never the open one)."""
        with self._cond:
            keep: list[tuple[int, Path]] = []
            for index, (first, path) in enumerate(self._segments):
                next_first = self._segments[index + 1][0] if index + 1 < len(self._segments) else None
                if next_first is not None and next_first - 1 <= self.checkpoint.written:
                    self._bytes -= path.stat().st_size
                    path.unlink()
                else:
                    keep.append((first, path))
            self._segments = keep
            if len(keep) == 1 and self._last_seq <= self.checkpoint.written and self._file.tell() > 0:
                # Everything is written: start a fresh segment and drop the old one.
                self._segments = []
                try:
                    fresh = self._open_segment(self._last_seq + 1)
                except OSError:
                    self._segments = keep
                    raise
                self._file.close()
                keep[0][1].unlink()
                self._bytes = 0
                self._file = fresh

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._syncer.join(10)
        with self._cond:
            try:
                os.fsync(self._file.fileno())
            except OSError as exc:
                logger.error("spool fsync at close failed: %s", exc)
            self._file.close()
        fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        self._lock_file.close()
