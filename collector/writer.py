"""Inserts column batches into ClickHouse; one client owned by the writer thread."""

from __future__ import annotations

import gc
import logging
import time

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import OperationalError

from collector.convert import Columns
from collector.store import Dsn, StoreError, connect

logger = logging.getLogger(__name__)

# ClickHouse error codes that mean "try again" rather than "this data is wrong":
# timeouts, too many parts/queries, memory, network, readonly replicas, shutdown.
TRANSIENT_CODES = frozenset({159, 164, 202, 203, 209, 210, 241, 242, 252, 319, 394, 425, 999, 1000})

# How often the writer hands memory back after inserts; see _release_memory.
_RELEASE_INTERVAL_S = 1.0


class ClickHouseWriter:
    def __init__(self, dsn: Dsn, database: str) -> None:
        self._dsn = dsn
        self._database = database
        self._client: Client | None = None
        self._released_at = 0.0
        self._purge = dsn.embedded
        self.purges = 0

    def insert(self, columns: Columns, dedup_token: str | None = None) -> None:
        if self._client is None:
            self._client = connect(self._dsn)
        settings = (
            {"insert_deduplication_token": dedup_token, "deduplicate_blocks_in_dependent_materialized_views": 1}
            if dedup_token
            else None
        )
        try:
            self._client.insert(
                f"{self._database}.{columns.table}",
                columns.data,
                column_names=list(columns.names),
                column_oriented=True,
                settings=settings,
            )
        except Exception:
            # A broken HTTP session is not reused; the next attempt reconnects.
            if not self._dsn.embedded:
                self._reset()
            raise
        if time.monotonic() - self._released_at >= _RELEASE_INTERVAL_S:
            self._release_memory(self._client)

    def _release_memory(self, client: Client) -> None:
        """Two kinds of memory outlive an insert, and only an explicit step returns them.

        clickhouse-connect's InsertContext refers to itself (it stores one of its own bound
        methods), so each insert leaves its whole batch in a reference cycle that only a
        full collection frees: under overload 8 M such blocks (≈ 500 MB) waited for one.
        And the embedded engine's jemalloc keeps freed pages for reuse (measured: 585 →
        443 MB after 100k spans once purged).
        """
        self._released_at = time.monotonic()
        gc.collect()
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
        if isinstance(error, OperationalError | StoreError | ConnectionError | TimeoutError | OSError):
            return True
        code = getattr(error, "code", None)
        return code in TRANSIENT_CODES

    def _reset(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:
                logger.debug("closing a broken ClickHouse client failed", exc_info=True)

    def close(self) -> None:
        self._reset()
