"""The shared checkpoint store: ClickHouse through clickhouse-connect, embedded chdb or a server.

Plain synchronous INSERTs (`async_insert = 0` on every insert, whatever the user's profile
says): ClickHouse answers once the part is written, so an acknowledged checkpoint is stored.
Tables are ReplacingMergeTree: a repeated write (a retry, a second attempt of a node, a blob
another engine stored too) leaves one row after merges, and reads take the latest row
explicitly (`FINAL`, `LIMIT 1 BY`) so they never see the duplicates before then. Why
ClickHouse and its limits: docs/durability.md, "Checkpoints".
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime

from clickhouse_connect.driver.client import Client

from flowscope.collector.store import Dsn, _redacted, connect
from flowscope.engine.checkpoints import Encoded, NodeCheckpoint, NodeRow, RunRecord, RunRow, Stored, decode

DEFAULT_DATABASE = "otel"
_KNOWN_BLOBS_MAX = 100_000
# A server profile with async_insert = 1 would acknowledge before the rows are written.
_INSERT_SETTINGS = {"async_insert": 0}


def _schema(db: str) -> list[str]:
    return [
        f"CREATE DATABASE IF NOT EXISTS `{db}`",
        f"""CREATE TABLE IF NOT EXISTS `{db}`.flowscope_checkpoints (
            ExecutionId String, NodeId String, Attempt UInt32,
            WorkflowId LowCardinality(String), WorkflowVersion LowCardinality(String),
            Stored LowCardinality(String), Size UInt64, Sha256 String, Data String CODEC(ZSTD(1)),
            Reason String, StoredAt DateTime64(6, 'UTC'), Version UInt64
        ) ENGINE = ReplacingMergeTree(Version) ORDER BY (ExecutionId, NodeId)""",
        f"""CREATE TABLE IF NOT EXISTS `{db}`.flowscope_checkpoint_blobs (
            Sha256 String, Data String CODEC(ZSTD(1))
        ) ENGINE = ReplacingMergeTree ORDER BY Sha256""",
        f"""CREATE TABLE IF NOT EXISTS `{db}`.flowscope_checkpoint_runs (
            ExecutionId String, WorkflowId LowCardinality(String), WorkflowVersion LowCardinality(String),
            InputStored LowCardinality(String), InputSize UInt64, InputSha256 String,
            InputData String CODEC(ZSTD(1)), ResumedFrom Nullable(String), StoredAt DateTime64(6, 'UTC'),
            Version UInt64, TraceParent String DEFAULT ''
        ) ENGINE = ReplacingMergeTree(Version) ORDER BY ExecutionId""",
        # Tables made before runs kept their trace.
        f"ALTER TABLE `{db}`.flowscope_checkpoint_runs ADD COLUMN IF NOT EXISTS TraceParent String DEFAULT ''",
    ]


def _inline(value: Encoded) -> str:
    """The output kept in the row itself: small ones; empty when in the blobs table or not kept.
    orjson writes UTF-8, so the JSON goes in as text and comes back byte-identical."""
    return value.data.decode() if value.data is not None and value.sha256 is None else ""


def _bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


class ClickHouseBackend:
    def __init__(self, client: Client, database: str, where: str) -> None:
        self._client = client
        self._db = database
        self.where = where
        # Blobs this process stored: not sent again. Across processes, ReplacingMergeTree
        # folds the repeats at merge time.
        self._known: set[str] = set()
        self._version = 0

    @classmethod
    def open(cls, url: str, *, database: str | None = None) -> ClickHouseBackend:
        dsn = Dsn.parse(url)  # ValueError for a DSN it cannot use
        db = database or dsn.database or DEFAULT_DATABASE
        if not db.replace("_", "").isalnum():
            raise ValueError(f"checkpoint database name {db!r} must be letters, digits and underscores")
        client = connect(dsn)
        for statement in _schema(db):
            client.command(statement)
        where = f"chdb:{dsn.path}/{db}" if dsn.embedded else f"{_redacted(dsn.raw)} ({db})"
        return cls(client, db, where)

    def _next_version(self) -> int:
        # Strictly increasing within the process, so a later put of the same node always wins.
        self._version = max(self._version + 1, time.time_ns())
        return self._version

    def write(self, nodes: Sequence[NodeRow], runs: Sequence[RunRow]) -> None:
        values = [*(n.value for n in nodes), *(r.input for r in runs)]
        blobs = {v.sha256: v.data for v in values if v.sha256 and v.data and v.sha256 not in self._known}
        # Blobs first: a checkpoint row is never visible before the output it names.
        if blobs:
            self._insert("flowscope_checkpoint_blobs", ["Sha256", "Data"], [[k, v.decode()] for k, v in blobs.items()])
        if nodes:
            self._insert(
                "flowscope_checkpoints",
                [
                    "ExecutionId",
                    "NodeId",
                    "Attempt",
                    "WorkflowId",
                    "WorkflowVersion",
                    "Stored",
                    "Size",
                    "Sha256",
                    "Data",
                    "Reason",
                    "StoredAt",
                    "Version",
                ],
                [
                    [
                        n.execution_id,
                        n.node_id,
                        n.attempt,
                        n.workflow_id,
                        n.workflow_version,
                        n.value.stored.value,
                        n.value.size,
                        n.value.sha256 or "",
                        _inline(n.value),
                        n.value.reason,
                        datetime.fromtimestamp(n.stored_at, UTC),
                        self._next_version(),
                    ]
                    for n in nodes
                ],
            )
        if runs:
            self._insert(
                "flowscope_checkpoint_runs",
                [
                    "ExecutionId",
                    "WorkflowId",
                    "WorkflowVersion",
                    "InputStored",
                    "InputSize",
                    "InputSha256",
                    "InputData",
                    "ResumedFrom",
                    "StoredAt",
                    "Version",
                    "TraceParent",
                ],
                [
                    [
                        r.execution_id,
                        r.workflow_id,
                        r.workflow_version,
                        r.input.stored.value,
                        r.input.size,
                        r.input.sha256 or "",
                        _inline(r.input),
                        r.resumed_from,
                        datetime.fromtimestamp(r.stored_at, UTC),
                        self._next_version(),
                        r.trace_parent or "",
                    ]
                    for r in runs
                ],
            )
        if len(self._known) + len(blobs) > _KNOWN_BLOBS_MAX:
            self._known.clear()
        self._known.update(blobs)

    def _insert(self, table: str, columns: list[str], rows: list[list[object]]) -> None:
        self._client.insert(f"`{self._db}`.{table}", rows, column_names=columns, settings=_INSERT_SETTINGS)

    def read_nodes(self, execution_id: str, *, with_data: bool) -> list[tuple[NodeCheckpoint, bytes | None]]:
        data = "Data" if with_data else "''"
        rows = self._client.query(
            f"SELECT NodeId, Attempt, Stored, Size, toUnixTimestamp64Micro(StoredAt), Sha256, WorkflowId,"
            f" WorkflowVersion, Reason, {data} FROM `{self._db}`.flowscope_checkpoints FINAL"
            " WHERE ExecutionId = {e:String} ORDER BY StoredAt, NodeId",
            parameters={"e": execution_id},
        ).result_rows
        return [
            (
                NodeCheckpoint(r[0], int(r[1]), Stored(r[2]), int(r[3]), r[4] / 1e6, r[5] or None, r[6], r[7], r[8]),
                _bytes(r[9]) if r[9] and not r[5] else None,
            )
            for r in rows
        ]

    def read_run(self, execution_id: str) -> RunRecord | None:
        rows = self._client.query(
            f"SELECT WorkflowId, WorkflowVersion, InputStored, InputSize, ResumedFrom,"
            f" toUnixTimestamp64Micro(StoredAt), InputSha256, InputData, TraceParent"
            f" FROM `{self._db}`.flowscope_checkpoint_runs FINAL"
            " WHERE ExecutionId = {e:String}",
            parameters={"e": execution_id},
        ).result_rows
        if not rows:
            return None
        r = rows[0]
        data = self.read_blobs([r[6]]).get(r[6]) if r[6] else (_bytes(r[7]) if r[7] else None)
        value = decode(data) if data is not None else None
        return RunRecord(execution_id, r[0], r[1], Stored(r[2]), int(r[3]), r[4], r[5] / 1e6, value, r[8] or None)

    def invalidate(self, execution_id: str, node_ids: Sequence[str]) -> None:
        # A lightweight delete masks the rows in every part at once; a later put of the node
        # (a resume running it again) is a new part and is seen as usual.
        self._client.command(
            f"DELETE FROM `{self._db}`.flowscope_checkpoints"
            " WHERE ExecutionId = {e:String} AND NodeId IN {n:Array(String)}",
            parameters={"e": execution_id, "n": list(node_ids)},
        )

    def read_blobs(self, digests: Sequence[str]) -> dict[str, bytes]:
        if not digests:
            return {}
        rows = self._client.query(
            f"SELECT Sha256, Data FROM `{self._db}`.flowscope_checkpoint_blobs"
            " WHERE Sha256 IN {d:Array(String)} LIMIT 1 BY Sha256",
            parameters={"d": list(digests)},
        ).result_rows
        return {r[0]: _bytes(r[1]) for r in rows}

    def close(self) -> None:
        self._client.close()

    def inline_writer(self) -> None:
        return None  # an INSERT takes milliseconds: never on the loop

    def maintain(self) -> None:
        return None
