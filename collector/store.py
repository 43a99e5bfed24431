"""ClickHouse access through clickhouse-connect: embedded chdb or a server, one code path."""

from __future__ import annotations

import fcntl
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import clickhouse_connect
from clickhouse_connect.driver.client import Client

from flowscope.collector.schema import MIGRATIONS, SchemaOptions, bootstrap_statements

logger = logging.getLogger(__name__)

DEFAULT_DATA_DIR = Path(".flowscope") / "data"


class StoreError(RuntimeError):
    """ClickHouse could not be reached or refused the request."""


class StoreLocked(StoreError):
    """Another process holds the embedded data directory."""


@dataclass(frozen=True)
class Dsn:
    raw: str
    embedded: bool
    path: str
    database: str | None

    @classmethod
    def parse(cls, dsn: str | None) -> Dsn:
        if not dsn:
            dsn = f"chdb://{DEFAULT_DATA_DIR.resolve()}"
        parsed = urlparse(dsn)
        if parsed.scheme == "chdb":
            path = (parsed.netloc + parsed.path) if parsed.netloc else parsed.path
            if not path:
                raise ValueError(f"chdb DSN needs a data directory path: {dsn!r}")
            absolute = str(Path(path).expanduser().resolve())
            return cls(f"chdb://{absolute}", True, absolute, None)
        if parsed.scheme in {"http", "https", "clickhouse", "clickhouses"}:
            if not parsed.hostname:
                raise ValueError(f"DSN needs a host: {dsn!r}")
            database = parsed.path.strip("/") or None
            return cls(dsn, False, "", database)
        raise ValueError(
            f"unsupported DSN scheme {parsed.scheme!r}: use chdb:///path or http(s)://user:pw@host:8123/db"
        )


def background_settings(dsn: Dsn) -> dict[str, int]:
    """Query settings for ClickHouse work nobody waits on — inserts, the bridge's ETA lookups.

    In the embedded engine that work shares the machine with the live path (the OTLP
    receiver, the WebSocket loop, often the engine itself): at a lower OS priority its
    threads yield the cores when the live path needs them (bench/README.md, live latency:
    it shortens the tail at 1,000 subscribers). ClickHouse applies it only where the process may
    renice (CAP_SYS_NICE) and ignores it elsewhere; never sent to a server, whose users'
    profiles may forbid the setting.
    """
    return {"os_thread_priority": 10} if dsn.embedded else {}


def insert_settings(dsn: Dsn) -> dict[str, int]:
    """Query settings for the collector's inserts: the background priority and, embedded,
    data-skipping indexes left to the merges.

    A merge builds the skip indexes of the part it writes from scratch, and under load the
    inserts' parts are merged continually, so building them for each insert too is mostly
    work thrown away: the contrib schema's bloom filters over every attribute key and value
    were a tenth to a sixth of the embedded collector's CPU (bench/README.md, collector ingest). A
    part not merged yet has no skip index and a query reads it whole; such parts are small
    (one insert's rows, or a quiet table's few). The pinned chdb knows the setting; a server
    may predate it, and an unknown setting fails the insert, so a server is never sent it.
    """
    if not dsn.embedded:
        return {}
    return {**background_settings(dsn), "materialize_skip_indexes_on_insert": 0}


# Table settings the embedded engine adds to the contrib DDL. A horizontal merge (ClickHouse's
# choice below 131,072 rows) writes every column stream of the part at once, each with its own
# compression and file buffers: merging six 17,000-row parts of otel_traces took 165–190 MB in
# the embedded collector, the largest allocation the engine made under load. A vertical merge
# writes one column at a time: ≈ 50 MB for the same merges (bench/README.md, collector ingest).
_EMBEDDED_TABLE_SETTINGS = "vertical_merge_algorithm_min_rows_to_activate = 1"


def tune_embedded(client: Client, database: str) -> None:
    """Apply the embedded engine's table settings to every MergeTree table of `database`.

    Idempotent and metadata-only, so it runs at every embedded start (tables created by an
    earlier version included). A server keeps the contrib DDL as it is: its memory is sized
    for merges, and its operators own its settings.
    """
    rows = client.query(
        "SELECT name FROM system.tables WHERE database = {db:String} AND engine LIKE '%MergeTree'",
        parameters={"db": database},
    ).result_rows
    for (table,) in rows:
        client.command(f"ALTER TABLE {database}.`{table}` MODIFY SETTING {_EMBEDDED_TABLE_SETTINGS}")


_OPEN_LOCK = threading.Lock()


def connect(dsn: Dsn, **settings: Any) -> Client:
    """A new client. Several clients on one chdb path from several threads are fine."""
    try:
        with _OPEN_LOCK:
            if dsn.embedded:
                Path(dsn.path).mkdir(parents=True, exist_ok=True)
            return clickhouse_connect.get_client(dsn=dsn.raw, settings=settings or None)
    except Exception as exc:
        text = str(exc)
        if "Cannot lock file" in text or (dsn.embedded and _locked_by_another_process(dsn.path)):
            raise StoreLocked(
                f"the data directory {dsn.path} is in use by another flowscope process; "
                "stop it, or use its SQL endpoint (`flowscope sql`) instead"
            ) from exc
        where = dsn.path if dsn.embedded else _redacted(dsn.raw)
        raise StoreError(f"cannot open ClickHouse at {where}: {text.splitlines()[0] if text else exc!r}") from exc


def _locked_by_another_process(path: str) -> bool:
    """chdb flocks `<data dir>/status`; a held lock means another process owns the directory."""
    status = Path(path) / "status"
    if not status.exists():
        return False
    with status.open("rb") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def _redacted(dsn: str) -> str:
    parsed = urlparse(dsn)
    if parsed.password:
        return dsn.replace(f":{parsed.password}@", ":***@")
    return dsn


def migrate(client: Client, options: SchemaOptions) -> list[int]:
    """Create or upgrade the schema; idempotent. Returns the versions applied now."""
    for statement in bootstrap_statements(options):
        client.command(statement)
    table = f"{options.database}.flowscope_schema_migrations"
    done = {int(row[0]) for row in client.query(f"SELECT Version FROM {table} FINAL").result_rows}
    applied = []
    for migration in MIGRATIONS:
        if migration.version in done:
            continue
        for statement in migration.statements(options):
            client.command(statement)
        client.insert(table, [[migration.version, migration.description]], column_names=["Version", "Description"])
        applied.append(migration.version)
        logger.info("applied schema migration %d: %s", migration.version, migration.description)
    return applied


def schema_version(client: Client, options: SchemaOptions) -> int:
    table = f"{options.database}.flowscope_schema_migrations"
    result = client.query(f"SELECT max(Version) FROM {table} FINAL")
    return int(result.result_rows[0][0] or 0)
