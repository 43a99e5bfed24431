"""The write-ahead spool: an acknowledged request is in ClickHouse or fsync'd here.

Records are appended to segment files (length, CRC32, signal, seq, protobuf payload) and
made durable by a group commit: one fsync covers every record written since the last, so
a request waits a few milliseconds, not one fsync of its own. The writer records which seq
range it is about to insert (the in-flight round) and, once inserted, a checkpoint; on
restart, records after the checkpoint are replayed, the in-flight round re-formed exactly
as before with the same insert deduplication tokens, so ClickHouse keeps each row once.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from collector.types import Signal

logger = logging.getLogger(__name__)

_HEADER = struct.Struct("<IIBQ")  # payload length, crc32 of (signal, seq, payload), signal, seq
_SIGNALS = {Signal.TRACES: 1, Signal.METRICS: 2, Signal.LOGS: 3}
_BY_CODE = {code: signal for signal, code in _SIGNALS.items()}
_DEFAULT_MAX_BYTES = 1 << 30
_DEFAULT_SEGMENT_BYTES = 64 << 20


class SpoolFull(Exception):
    """The spool reached its size bound: push back until the writer catches up."""


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
        self._segments: list[tuple[int, Path]] = []  # (first seq, path)
        self._last_seq = self._recover()
        self._written_seq = self._durable_seq = self._last_seq
        self._bytes = sum(path.stat().st_size for _, path in self._segments)
        self._file = self._open_segment(self._last_seq + 1) if not self._segments else self._segments[-1][1].open("ab")
        self._closed = False
        self._syncer = threading.Thread(target=self._sync_loop, name="spool-fsync", daemon=True)
        self._syncer.start()

    # -- recovery -------------------------------------------------------------------------------

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
            self._file.flush()
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
        self._segments.append((first_seq, path))
        return path.open("ab")

    def append(self, signal: Signal, payload: bytes) -> int:
        """Write a record (not yet durable: call wait_durable before acknowledging)."""
        with self._cond:
            if self._closed:
                raise RuntimeError("Expected an open spool, but got a closed one")
            if self._bytes + len(payload) + _HEADER.size > self.max_bytes:
                raise SpoolFull(f"spool is full ({self._bytes} of {self.max_bytes} bytes)")
            seq = self._last_seq + 1
            code = _SIGNALS[signal]
            crc = zlib.crc32(payload, zlib.crc32(struct.pack("<BQ", code, seq)))
            if self._file.tell() >= self.segment_bytes:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
                self._file = self._open_segment(seq)
            self._file.write(_HEADER.pack(len(payload), crc, code, seq))
            self._file.write(payload)
            self._bytes += _HEADER.size + len(payload)
            self._last_seq = self._written_seq = seq
            self._cond.notify_all()
            return seq

    def wait_durable(self, seq: int, timeout_s: float = 10.0) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._durable_seq >= seq or self._closed, timeout_s):
                raise TimeoutError(f"spool fsync did not complete within {timeout_s}s")

    def _sync_loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._written_seq > self._durable_seq or self._closed)
                if self._closed and self._written_seq == self._durable_seq:
                    return
                target = self._written_seq
                self._file.flush()
                fd = self._file.fileno()
            # fsync outside the lock: appends continue meanwhile and ride the next commit.
            os.fsync(fd)
            with self._cond:
                self._durable_seq = max(self._durable_seq, target)
                self._cond.notify_all()

    # -- checkpoints ---------------------------------------------------------------------------

    def mark_inflight(self, first: int, last: int) -> None:
        self._write_checkpoint(Checkpoint(self.checkpoint.written, (first, last)))

    def mark_written(self, last: int) -> None:
        self._write_checkpoint(Checkpoint(max(self.checkpoint.written, last), None))
        self._truncate()

    def _write_checkpoint(self, checkpoint: Checkpoint) -> None:
        path = self.directory / "checkpoint.json"
        tmp = path.with_suffix(".tmp")
        with tmp.open("w") as handle:
            json.dump({"written": checkpoint.written, "inflight": checkpoint.inflight}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        self.checkpoint = checkpoint

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
                self._file.close()
                old = keep[0][1]
                self._segments = []
                self._file = self._open_segment(self._last_seq + 1)
                self._bytes = 0
                old.unlink()

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._syncer.join(10)
        with self._cond:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        self._lock_file.close()
