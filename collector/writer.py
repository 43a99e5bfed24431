"""Inserts column batches into ClickHouse; one client owned by the writer thread."""

from __future__ import annotations

import logging
import time

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import OperationalError
from clickhouse_connect.driver.insert import InsertContext

from flowscope.collector.convert import CONVERTERS, REQUESTS, Columns
from flowscope.collector.intake import INTAKES, NESTED_VALUE, frame
from flowscope.collector.store import Dsn, StoreError, connect, insert_settings
from flowscope.collector.types import Signal

logger = logging.getLogger(__name__)

# ClickHouse error codes that mean "try again" rather than "this data is wrong":
# timeouts, too many parts/queries, memory, disk space (243, and 75 for a failed write),
# network, readonly replicas, aborted or unschedulable work, shutdown.
TRANSIENT_CODES = frozenset(
    {75, 159, 164, 173, 202, 203, 209, 210, 236, 241, 242, 243, 252, 279, 285, 319, 394, 425, 439, 999, 1000}
)

# The store is misconfigured, not the data wrong: credentials, grants, or a schema that is
# missing or was changed under the collector. Fixed by an operator, then the same insert
# succeeds; refusing the data as poison would dead-letter (and in the end delete) every
# acknowledged row meanwhile. Retried, and /readyz says why.
_ENVIRONMENT_CODES = frozenset({16, 60, 81, 192, 193, 194, 497, 516})

# A code shared by a transient and a permanent condition: 252 is "too many parts" (merges
# lag behind; wait) and also "too many partitions for single INSERT block" (this batch can
# never be inserted whole; split it).
_PERMANENT_MESSAGES = ("Too many partitions for single INSERT block",)
# Resource exhaustion reported with whatever code the failing file operation had.
_TRANSIENT_MESSAGES = ("No space left on device", "Disk quota exceeded", "Not enough space")

# In a ClickHouse error, the context of a failure inside a materialized view: something
# may already be stored (the view's source table, earlier views) when it appears.
_IN_VIEW = "while pushing to view"

# The intake itself is missing (a server older than format_schema_source, or a schema
# not yet migrated): unknown setting, table or format. Converting in Python from then on.
_NO_INTAKE_CODES = frozenset({60, 73, 115})

# How often the writer hands memory back after inserts; see _release_memory.
_RELEASE_INTERVAL_S = 1.0


class ClickHouseWriter:
    def __init__(self, dsn: Dsn, database: str) -> None:
        self._dsn = dsn
        self._database = database
        self._client: Client | None = None
        # One insert context per table, reused: it holds the column types, so ClickHouse
        # is not asked to describe the table before every insert.
        self._contexts: dict[str, InsertContext] = {}
        self._released_at = 0.0
        self._purge = dsn.embedded
        self._settings = insert_settings(dsn)
        self.purges = 0
        # Signals whose intake this ClickHouse lacks: converted in Python from then on.
        self._no_intake: set[Signal] = set()
        self.intake_fallbacks = 0

    def insert(self, columns: Columns, dedup_token: str | None = None) -> None:
        client = self._connected()
        context = self._context(client, columns)
        context.settings = {**self._settings, **(_dedup(dedup_token) or {})}
        try:
            client.insert(context=context, data=columns.data)
        except Exception:
            self._failed()
            raise
        finally:
            # The context refers to itself (it keeps one of its own bound methods), so
            # whatever it holds waits for a full garbage collection unless let go here:
            # under overload that was ≈ 500 MB of batches (bench/README.md, memory).
            context.data = None
        self._inserted(client)

    def _context(self, client: Client, columns: Columns) -> InsertContext:
        table = f"{self._database}.{columns.table}"
        context = self._contexts.get(table)
        if context is None or list(context.column_names) != list(columns.names):
            context = client.create_insert_context(table, list(columns.names), column_oriented=True)
            self._contexts[table] = context
        return context

    @property
    def intake(self) -> bool:
        """Whether ClickHouse converts every signal's OTLP requests itself."""
        return not self._no_intake

    def insert_otlp(
        self, payloads: list[bytes], dedup_token: str | None = None, signal: Signal = Signal.TRACES
    ) -> None:
        """OTLP requests (protobuf) converted by ClickHouse (collector/intake.py), or, when
        it cannot, by the Python converter here: same rows either way."""
        if signal not in self._no_intake:
            intake = INTAKES[signal]
            client = self._connected()
            try:
                client.raw_insert(
                    f"{self._database}.{intake.table}",
                    None,
                    frame(payloads),
                    settings={**intake.settings, **self._settings, **(_dedup(dedup_token) or {})},
                    fmt="Protobuf",
                )
            except Exception as exc:
                if not _intake_missing(exc, intake.table) and (self.is_transient(exc) or not _nothing_stored(exc)):
                    # Part of the batch may be stored: only the same insert again, with
                    # the same deduplication token, completes it without repeating it.
                    self._failed()
                    raise
                # The view raised before storing anything (nested attribute values), or the
                # engine read the bytes differently from upb: this batch goes the Python way.
                self.intake_fallbacks += 1
                if _intake_missing(exc, intake.table):
                    self._no_intake.add(signal)
                    logger.warning("ClickHouse cannot convert OTLP %s itself; converting in Python: %s", signal, exc)
                else:
                    logger.info("batch converted in Python: %s", str(exc).splitlines()[0] if str(exc) else exc)
            else:
                self._inserted(client)
                return
        merged: Columns | None = None
        for payload in payloads:
            for columns in CONVERTERS[signal](REQUESTS[signal].FromString(payload)).tables:
                if merged is None:
                    merged = columns
                else:
                    merged.extend(columns)
        if merged is not None:
            self.insert(merged, dedup_token)

    def _connected(self) -> Client:
        if self._client is None:
            self._client = connect(self._dsn)
        return self._client

    def _failed(self) -> None:
        # A broken HTTP session is not reused; the next attempt reconnects.
        if not self._dsn.embedded:
            self._reset()

    def _inserted(self, client: Client) -> None:
        if time.monotonic() - self._released_at >= _RELEASE_INTERVAL_S:
            self._release_memory(client)

    def _release_memory(self, client: Client) -> None:
        """The embedded engine's jemalloc keeps freed pages for reuse; ask it to hand them
        back, or the process keeps the peak of every burst (bench/README.md, memory)."""
        self._released_at = time.monotonic()
        if not self._purge:
            return
        try:
            client.command("SYSTEM JEMALLOC PURGE")
            self.purges += 1
        except Exception as exc:
            # An engine built without jemalloc has nothing to purge: stop asking.
            self._purge = False
            logger.info("not purging the embedded engine's allocator: %s", exc)

    def is_transient(self, error: Exception) -> bool:
        return is_transient(error)

    def _reset(self) -> None:
        client, self._client = self._client, None
        self._contexts.clear()
        if client is not None:
            try:
                client.close()
            except Exception:
                logger.debug("closing a broken ClickHouse client failed", exc_info=True)

    def close(self) -> None:
        self._reset()


def is_transient(error: Exception) -> bool:
    """Whether ClickHouse may take the same insert later (outage, load, disk space), as
    opposed to refusing this data for good."""
    if isinstance(error, OperationalError | StoreError | ConnectionError | TimeoutError | OSError):
        return True
    message = str(error)
    if any(text in message for text in _PERMANENT_MESSAGES):
        return False
    if any(text in message for text in _TRANSIENT_MESSAGES):
        return True
    code = getattr(error, "code", None)
    return code in TRANSIENT_CODES or code in _ENVIRONMENT_CODES


def _intake_missing(error: Exception, intake_table: str) -> bool:
    """ClickHouse lacks the intake itself (its format or setting, or the intake table): the
    batch goes the Python way. A missing *target* table is an environment fault, retried."""
    code = getattr(error, "code", None)
    message = str(error)
    named = f"{intake_table} does not exist" in message or f"{intake_table} doesn't exist" in message
    return code in (73, 115) or (code == 60 and named and "Target table" not in message)


def _nothing_stored(error: Exception) -> bool:
    """Whether a failed intake insert certainly stored nothing: the intake is missing, the
    bytes failed to parse (before any view ran), or the intake view refused a nested value
    (it raises before its target is written)."""
    message = str(error)
    return getattr(error, "code", None) in _NO_INTAKE_CODES or NESTED_VALUE in message or _IN_VIEW not in message


def _dedup(token: str | None) -> dict[str, str | int] | None:
    if not token:
        return None
    return {"insert_deduplication_token": token, "deduplicate_blocks_in_dependent_materialized_views": 1}
