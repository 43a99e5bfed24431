"""The embedded checkpoint store: one SQLite file in WAL mode.

WAL because a commit appends to the log instead of rewriting pages through a rollback
journal, and readers (a `flowscope executions` command, another engine resuming a run) read
while the writer writes. `synchronous=NORMAL` (the default) makes a commit a write() to the
log, not an fsync: it survives the process being killed (the bytes are in the OS's page cache),
not the machine losing power; `synchronous=FULL` fsyncs each commit and survives both.
docs/durability.md, "Checkpoints", says why NORMAL is the default. At NORMAL, commits run on
the event loop (engine/checkpoint_commit.py says why) on a connection of their own.

The file holds the runs' inputs and outputs in clear: a directory the store creates is 0700 and
the database file is created 0600 before SQLite opens it (its -wal and -shm take its mode).
A reader (the stack's `GET …/checkpoint`, `read_only=True`) opens it read-only — a missing file
is an error, never created — and waits briefly for a locked one.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from flowscope.engine.checkpoints import NodeCheckpoint, NodeRow, RunRecord, RunRow, Stored, decode

_SYNCHRONOUS = {"normal": "NORMAL", "full": "FULL", "extra": "EXTRA"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS checkpoint_blobs (
    sha256 TEXT PRIMARY KEY,
    data BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoints (
    execution_id TEXT NOT NULL,
    node_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    workflow_id TEXT NOT NULL,
    workflow_version TEXT NOT NULL,
    stored TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT,
    data BLOB,
    reason TEXT NOT NULL,
    stored_at REAL NOT NULL,
    PRIMARY KEY (execution_id, node_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoint_runs (
    execution_id TEXT PRIMARY KEY,
    workflow_id TEXT NOT NULL,
    workflow_version TEXT NOT NULL,
    input_stored TEXT NOT NULL,
    input_size INTEGER NOT NULL,
    input_sha256 TEXT,
    input_data BLOB,
    resumed_from TEXT,
    stored_at REAL NOT NULL,
    trace_parent TEXT
) WITHOUT ROWID;
"""


def _node(n: NodeRow) -> tuple[object, ...]:
    v = n.value
    return (
        n.execution_id,
        n.node_id,
        n.attempt,
        n.workflow_id,
        n.workflow_version,
        v.stored.value,
        v.size,
        v.sha256,
        None if v.sha256 else v.data,
        v.reason,
        n.stored_at,
    )


def _run(r: RunRow) -> tuple[object, ...]:
    v = r.input
    return (
        r.execution_id,
        r.workflow_id,
        r.workflow_version,
        v.stored.value,
        v.size,
        v.sha256,
        None if v.sha256 else v.data,
        r.resumed_from,
        r.stored_at,
        r.trace_parent,
    )


_WAL_SIZE_LIMIT = 16 * 1024 * 1024
_LEVEL_NAMES = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}


# How long the stack's reader waits for a store another process holds locked: a request's worth.
READER_BUSY_TIMEOUT_MS = 250


def _create_private(file: Path) -> None:
    """The directory (0700 when created) and the file, 0600, before SQLite opens it."""
    file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):  # an existing store keeps the mode its owner gave it
        os.close(os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _connect_read_only(file: Path) -> sqlite3.Connection:
    if not file.is_file():
        raise FileNotFoundError(f"no checkpoint store file {file}")
    conn = sqlite3.connect(f"{file.as_uri()}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {READER_BUSY_TIMEOUT_MS}")
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # a file that is no database fails here
    except BaseException:
        conn.close()
        raise
    return conn


def _connect(file: Path, level: str, *, busy_timeout_ms: int, autocheckpoint: bool = True) -> sqlite3.Connection:
    # check_same_thread=False: opened here, so a bad path fails the caller; used by one thread
    # at a time from then on (the writer thread, or a loop holding the inline lock).
    conn = sqlite3.connect(file, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise ValueError(f"{file}: SQLite would not use WAL mode here (got {mode!r})")
        conn.execute(f"PRAGMA synchronous = {level}")
        # The log is reused from its start after a checkpoint; this bounds what it keeps on disk.
        conn.execute(f"PRAGMA journal_size_limit = {_WAL_SIZE_LIMIT}")
        if not autocheckpoint:
            # A WAL checkpoint fsyncs and may wait: the thread's connection does them (`maintain`).
            conn.execute("PRAGMA wal_autocheckpoint = 0")
    except BaseException:
        conn.close()
        raise
    return conn


def _write(conn: sqlite3.Connection, nodes: Sequence[NodeRow], runs: Sequence[RunRow]) -> None:
    values = [*(n.value for n in nodes), *(r.input for r in runs)]
    blobs = {v.sha256: v.data for v in values if v.sha256 and v.data}
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Each statement only when it has rows: an empty executemany still costs a statement,
        # and a chain commits one put at a time.
        if blobs:
            conn.executemany("INSERT OR IGNORE INTO checkpoint_blobs VALUES (?, ?)", blobs.items())
        if nodes:
            conn.executemany(
                "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", map(_node, nodes)
            )
        if runs:
            conn.executemany(
                "INSERT OR REPLACE INTO checkpoint_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", map(_run, runs)
            )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


class _InlineWriter:
    """Commits on the event loop, on a connection of its own that never waits for the write lock."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __call__(self, nodes: Sequence[NodeRow], runs: Sequence[RunRow]) -> bool:
        try:
            _write(self._conn, nodes, runs)
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                return False  # another writer has the database: the thread waits for it instead
            raise
        return True

    def close(self) -> None:
        self._conn.close()


class SqliteBackend:
    def __init__(self, conn: sqlite3.Connection, path: Path, inline: bool) -> None:
        self._conn = conn  # the writer thread's: reads, handed-over writes, WAL checkpoints
        self._inline = inline
        self.path = path

    @classmethod
    def open(
        cls, path: str, *, url: str, synchronous: str = "normal", commit: str | None = None, read_only: bool = False
    ) -> SqliteBackend:
        if not path:
            raise ValueError(
                f"sqlite checkpoint URL needs a file path: {url!r} (e.g. sqlite:///var/flowscope/checkpoints.db)"
            )
        level = _SYNCHRONOUS.get(synchronous.lower())
        if level is None:
            raise ValueError(f"synchronous={synchronous!r} in {url!r}: use one of {sorted(_SYNCHRONOUS)}")
        if commit not in (None, "loop", "thread"):
            raise ValueError(f"commit={commit!r} in {url!r}: use loop or thread")
        file = Path(path).expanduser().resolve()
        if file.is_dir():
            raise ValueError(f"sqlite checkpoint URL {url!r} names a directory, not a database file")
        if read_only:
            return cls(_connect_read_only(file), file, False)
        _create_private(file)
        conn = _connect(file, level, busy_timeout_ms=10_000)  # another engine on the file may be writing
        try:
            conn.executescript(_SCHEMA)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(checkpoint_runs)")}
            if "trace_parent" not in columns:  # a file written before runs kept their trace
                conn.execute("ALTER TABLE checkpoint_runs ADD COLUMN trace_parent TEXT")
        except BaseException:
            conn.close()
            raise
        # On the loop by default only when a commit cannot hold it up: no fsync per commit.
        inline = commit == "loop" or (commit is None and level == "NORMAL")
        return cls(conn, file, inline)

    def inline_writer(self) -> _InlineWriter | None:
        if not self._inline:
            return None
        level = _LEVEL_NAMES[self._conn.execute("PRAGMA synchronous").fetchone()[0]]
        return _InlineWriter(_connect(self.path, level, busy_timeout_ms=0, autocheckpoint=False))

    def write(self, nodes: Sequence[NodeRow], runs: Sequence[RunRow]) -> None:
        _write(self._conn, nodes, runs)

    def maintain(self) -> None:
        # PASSIVE: never waits for readers (a long snapshot read); it copies what they allow and
        # the next checkpoint the rest.
        self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def read_nodes(self, execution_id: str, *, with_data: bool) -> list[tuple[NodeCheckpoint, bytes | None]]:
        rows = self._conn.execute(
            "SELECT node_id, attempt, stored, size, stored_at, sha256, workflow_id, workflow_version, reason,"
            f" {'data' if with_data else 'NULL'} FROM checkpoints WHERE execution_id = ? ORDER BY stored_at, node_id",
            (execution_id,),
        ).fetchall()
        return [(NodeCheckpoint(r[0], r[1], Stored(r[2]), r[3], r[4], r[5], r[6], r[7], r[8]), r[9]) for r in rows]

    def read_run(self, execution_id: str) -> RunRecord | None:
        row = self._conn.execute(
            "SELECT r.workflow_id, r.workflow_version, r.input_stored, r.input_size, r.resumed_from, r.stored_at,"
            " coalesce(r.input_data, b.data), r.trace_parent"
            " FROM checkpoint_runs r LEFT JOIN checkpoint_blobs b ON b.sha256 = r.input_sha256"
            " WHERE r.execution_id = ?",
            (execution_id,),
        ).fetchone()
        if row is None:
            return None
        value = decode(row[6]) if row[6] is not None else None
        return RunRecord(execution_id, row[0], row[1], Stored(row[2]), row[3], row[4], row[5], value, row[7])

    def invalidate(self, execution_id: str, node_ids: Sequence[str]) -> None:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            self._conn.executemany(
                "DELETE FROM checkpoints WHERE execution_id = ? AND node_id = ?", [(execution_id, n) for n in node_ids]
            )
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise

    def read_blobs(self, digests: Sequence[str]) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        for start in range(0, len(digests), 500):  # under SQLite's bound on host parameters
            chunk = digests[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            found.update(
                self._conn.execute(
                    f"SELECT sha256, data FROM checkpoint_blobs WHERE sha256 IN ({marks})", chunk
                ).fetchall()
            )
        return found

    def close(self) -> None:
        self._conn.close()
