"""A write ClickHouse refuses for good is split until the refused rows are isolated.

A round's writes are pieces: column chunks converted in Python, or a signal's OTLP requests
for ClickHouse to convert. A piece refused for a permanent reason (invalid data, too many
partitions in one block: not an outage) is split in two and each half written, by request
first and then, for one request, by rows (converted in Python), until what is left fails
on its own; that goes to the dead-letter store (collector/dead_letter.py) and everything
else into ClickHouse. A split's halves carry deduplication tokens derived from the piece's,
so a round interrupted mid-isolation and replayed after a restart splits the same way and
ClickHouse drops the halves it already has.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from flowscope.collector.convert import CONVERTERS, REQUESTS, Columns
from flowscope.collector.dead_letter import DeadLetter, DeadLetterStore
from flowscope.collector.intake import INTAKES
from flowscope.collector.telemetry import SelfMetrics
from flowscope.collector.types import Signal

# Splits allowed per top-level piece: one refused row in 20,000 takes 15; past the budget
# what still fails goes to the dead-letter store whole rather than row by row.
_SPLIT_BUDGET = 256

_SIGNAL_OF_TABLE = {"otel_traces": Signal.TRACES, "otel_logs": Signal.LOGS}


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


class Stopped(Exception):
    """Shutdown cut the retries short: the round stays queued (and spooled)."""


@dataclass
class ColumnsPiece:
    key: str
    columns: Columns
    seqs: tuple[int, int]

    @property
    def table(self) -> str:
        return self.columns.table

    @property
    def rows(self) -> int:
        return self.columns.rows

    def write(self, writer: Writer, token: str | None) -> None:
        writer.insert(self.columns, token)

    def split(self) -> list[Piece]:
        half = self.rows // 2
        if half == 0:
            return []
        c = self.columns
        return [
            ColumnsPiece(f"{self.key}/0", Columns(c.table, c.names, [col[:half] for col in c.data]), self.seqs),
            ColumnsPiece(f"{self.key}/1", Columns(c.table, c.names, [col[half:] for col in c.data]), self.seqs),
        ]

    def dead_letter(self, reason: str) -> DeadLetter:
        signal = _SIGNAL_OF_TABLE.get(self.table, Signal.METRICS)
        data = dict(zip(self.columns.names, self.columns.data, strict=True))
        return DeadLetter(signal, self.table, reason, self.seqs, self.rows, columns=data)


@dataclass
class OtlpPiece:
    key: str
    signal: Signal
    entries: list[Entry]

    @property
    def table(self) -> str:
        return INTAKES[self.signal].target

    @property
    def rows(self) -> int:
        return sum(e.rows for e in self.entries)

    @property
    def seqs(self) -> tuple[int, int]:
        return self.entries[0].seq, self.entries[-1].seq

    def write(self, writer: Writer, token: str | None) -> None:
        writer.insert_otlp([e.otlp for e in self.entries], token, self.signal)

    def split(self) -> list[Piece]:
        if len(self.entries) > 1:
            half = len(self.entries) // 2
            return [
                OtlpPiece(f"{self.key}/0", self.signal, self.entries[:half]),
                OtlpPiece(f"{self.key}/1", self.signal, self.entries[half:]),
            ]
        # One request: its rows, converted in Python, are split next.
        entry = self.entries[0]
        tables = CONVERTERS[self.signal](REQUESTS[self.signal].FromString(entry.otlp)).tables
        return [ColumnsPiece(f"{self.key}/py{i}", columns, self.seqs) for i, columns in enumerate(tables)]

    def dead_letter(self, reason: str) -> DeadLetter:
        payloads = [e.otlp for e in self.entries]
        return DeadLetter(self.signal, self.table, reason, self.seqs, self.rows, requests=payloads)


Piece = ColumnsPiece | OtlpPiece

# Writes a piece (retrying what is transient): None once written, else the permanent
# refusal; raises Stopped when shutdown cuts the retries short.
Attempt = Callable[[Piece, str | None], Exception | None]


def round_pieces(entries: list[Entry], max_batch_rows: int) -> list[Piece]:
    """A round's writes, always the same for the same entries (their keys name the tokens)."""
    merged: dict[str, Columns] = {}
    otlp: dict[Signal, list[Entry]] = {}
    for entry in entries:
        if entry.otlp:
            otlp.setdefault(entry.signal, []).append(entry)
        for columns in entry.tables:
            target = merged.get(columns.table)
            if target is None:
                merged[columns.table] = target = Columns(columns.table, columns.names)
            target.extend(columns)
    seqs = (entries[0].seq, entries[-1].seq)
    pieces: list[Piece] = [
        ColumnsPiece(f"{table}:{index}", chunk, seqs)
        for table in sorted(merged)
        for index, chunk in enumerate(merged[table].split(max_batch_rows))
    ]
    for signal, signal_entries in sorted(otlp.items()):
        pieces.append(OtlpPiece(f"{INTAKES[signal].table}:0", signal, signal_entries))
    return pieces


class Isolation:
    """Writes pieces; on a permanent refusal, splits and dead-letters (see module doc)."""

    def __init__(self, attempt: Attempt, dead_letters: DeadLetterStore, metrics: SelfMetrics) -> None:
        self._attempt = attempt
        self._dead_letters = dead_letters
        self._metrics = metrics

    def settle(self, piece: Piece, done: set[str], token_prefix: str) -> None:
        """Write `piece`, or what of it ClickHouse takes, dead-lettering the rest; `done`
        holds the keys of pieces already settled (a retried round skips them)."""
        self._settle(piece, done, token_prefix, [_SPLIT_BUDGET])

    def _settle(self, piece: Piece, done: set[str], token_prefix: str, budget: list[int]) -> None:
        if piece.key in done:
            return
        refusal = self._attempt(piece, f"{token_prefix}:{piece.key}")
        if refusal is not None:
            parts = piece.split() if budget[0] > 0 else []
            if parts:
                budget[0] -= 1
                self._metrics.split_inserts.labels(piece.table).inc()
                for part in parts:
                    self._settle(part, done, token_prefix, budget)
            else:
                # OSError (the dead-letter disk refuses) propagates: the round is retried later.
                self._dead_letters.put(piece.dead_letter(_reason(refusal)))
        done.add(piece.key)


def _reason(error: Exception) -> str:
    text = str(error).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {first[:2000]}"
