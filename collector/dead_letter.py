"""Where rows ClickHouse refuses for good go: JSON-lines files a user can read and replay.

A batch ClickHouse refuses permanently is split until the refused rows are isolated
(collector/isolation.py); those rows land here, everything else in ClickHouse. The store is
a directory of files, not a table, because ClickHouse may be what refuses: the dead-letter
path must not depend on it. Files are `dead-letter-<first record time ns>.jsonl`, one JSON
object a line (docs/durability.md lists the fields); a file is closed at `segment_bytes`,
and the oldest files are deleted once the directory exceeds `max_bytes` (counted in
`flowscope_dead_letter_discarded_records_total`).
Without a directory (no spool and none configured) a record is only logged at ERROR.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowscope.collector.telemetry import SelfMetrics
from flowscope.collector.types import Signal

logger = logging.getLogger(__name__)

_DEFAULT_MAX_BYTES = 256 << 20
_DEFAULT_SEGMENT_BYTES = 16 << 20
_PREFIX = "dead-letter-"


@dataclass(frozen=True)
class DeadLetter:
    """Rows (or whole OTLP requests) ClickHouse refused, with why."""

    signal: Signal
    table: str
    reason: str
    seqs: tuple[int, int]  # spool (or intake) sequence numbers of the requests they came from
    rows: int
    requests: Sequence[bytes] = ()  # whole OTLP protobuf requests, when a request failed whole
    columns: dict[str, list[Any]] | None = None  # else the refused rows, column by column

    def to_json(self) -> str:
        record: dict[str, Any] = {
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            "signal": self.signal.value,
            "table": self.table,
            "reason": self.reason,
            "seqs": list(self.seqs),
            "rows": self.rows,
        }
        if self.requests:
            record["otlp"] = [base64.b64encode(payload).decode() for payload in self.requests]
        if self.columns is not None:
            names = list(self.columns)
            record["data"] = [dict(zip(names, row, strict=True)) for row in zip(*self.columns.values(), strict=True)]
        return json.dumps(record, default=_jsonable, separators=(",", ":"))


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    return str(value)


class DeadLetterStore:
    """Appends dead letters; `put` raises OSError when the file system refuses (the caller
    keeps the rows and retries: nothing acknowledged is dropped without a trace)."""

    def __init__(
        self,
        directory: Path | None,
        metrics: SelfMetrics,
        max_bytes: int | None = None,
        segment_bytes: int | None = None,
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes or _DEFAULT_MAX_BYTES
        self.segment_bytes = segment_bytes or _DEFAULT_SEGMENT_BYTES
        self._metrics = metrics
        self._lock = threading.Lock()
        self._current: Path | None = None
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            files = self.files()
            self._current = files[-1] if files else None
            self._metrics.dead_letter_bytes.set(sum(path.stat().st_size for path in files))

    def files(self) -> list[Path]:
        """The dead-letter files, oldest first."""
        if self.directory is None:
            return []
        return sorted(self.directory.glob(f"{_PREFIX}*.jsonl"))

    def put(self, letter: DeadLetter) -> None:
        line = letter.to_json() + "\n"
        if self.directory is None:
            logger.error("dead letter (no dead-letter directory configured): %s", line.strip())
        else:
            with self._lock:
                self._append(line.encode())
        self._metrics.dead_letter_rows.labels(letter.table).inc(letter.rows)
        self._metrics.dead_letter_records.labels(letter.signal.value).inc()
        logger.error(
            "ClickHouse refused %d %s rows for good (%s); kept in the dead-letter store",
            letter.rows,
            letter.table,
            letter.reason,
        )

    def _append(self, data: bytes) -> None:
        assert self.directory is not None
        current = self._current
        if current is None or not current.exists() or current.stat().st_size + len(data) > self.segment_bytes:
            current = self._current = self.directory / f"{_PREFIX}{time.time_ns():020d}.jsonl"
        fd = os.open(current, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                os.write(fd, data)
                os.fsync(fd)
            except OSError:
                # A torn line would make the file unreadable as JSON lines.
                os.ftruncate(fd, start)
                raise
        finally:
            os.close(fd)
        self._rotate()

    def _rotate(self) -> None:
        files = self.files()
        sizes = [path.stat().st_size for path in files]
        total = sum(sizes)
        while len(files) > 1 and total > self.max_bytes:
            oldest = files.pop(0)
            with oldest.open("rb") as handle:
                discarded = sum(1 for _ in handle)
            oldest.unlink()
            total -= sizes.pop(0)
            self._metrics.dead_letter_discarded.inc(discarded)
            logger.warning("dead-letter store over %d bytes: deleted %s", self.max_bytes, oldest.name)
        self._metrics.dead_letter_bytes.set(total)


def read(directory: Path) -> list[dict[str, Any]]:
    """Every dead letter in `directory`, oldest first (for inspection and tests)."""
    out: list[dict[str, Any]] = []
    for path in sorted(directory.glob(f"{_PREFIX}*.jsonl")):
        with path.open() as handle:
            out.extend(json.loads(line) for line in handle if line.strip())
    return out
