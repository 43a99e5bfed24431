"""Checkpoint store: node outputs written durably, so a run can resume in another process.

`open_checkpoint_store(url)` picks the backend: `sqlite:///abs/path/checkpoints.db` (embedded,
no server; engine/checkpoint_sqlite.py) or `chdb:///data/dir`, `clickhouse://…`, `http(s)://…`
(a ClickHouse several engines share; engine/checkpoint_clickhouse.py). Both sit behind one
group committer (engine/checkpoint_commit.py): `put` serialises the output on the caller's
loop, every put waiting is committed in one transaction or INSERT, and the callers' futures
are resolved only after that commit — so an acknowledged checkpoint is stored, and the cost
of a commit is shared by every put it covers. This module: the types, the protocol, what
becomes of an output (`encode`), and the URL. What is stored, what is not, and why:
docs/durability.md, "Checkpoints".
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qsl, urlparse

import orjson

from flowscope.engine.redact import REDACTED, Secret

if TYPE_CHECKING:
    from flowscope.engine.checkpoint_commit import GroupCommitStore

DEFAULT_MAX_OUTPUT_BYTES = 1024 * 1024
# Outputs up to this size are kept in their checkpoint's row; larger ones once, by sha256, in the
# blobs table. A small output costs little more than its hash and would cost the commit a
# second table: the chain of one put per commit is where that shows (bench/README.md).
INLINE_BYTES = 1024


class CheckpointError(RuntimeError):
    """The checkpoint store could not store or read checkpoints."""


class Stored(StrEnum):
    """What a checkpoint holds. Only `OUTPUT` may be reused by a resume; the others make it
    run the node again."""

    OUTPUT = "output"
    # Serialised larger than the store's bound: only its size is kept.
    TOO_LARGE = "too_large"
    # Contained a `Secret`: kept with the secret redacted, which is not the node's output.
    SECRET = "secret"
    # Not a JSON value that would come back equal (a datetime, a dataclass, a non-str key…).
    UNSERIALISABLE = "unserialisable"


@dataclass(frozen=True)
class Encoded:
    """A value as stored: its JSON bytes (None unless kept), inline when `sha256` is None,
    else in the blobs table under that digest."""

    stored: Stored
    size: int
    data: bytes | None
    sha256: str | None
    reason: str = ""


@dataclass(frozen=True)
class NodeCheckpoint:
    node_id: str
    attempt: int
    stored: Stored
    size: int
    stored_at: float  # seconds since the epoch
    sha256: str | None
    workflow_id: str
    workflow_version: str
    reason: str = ""

    @property
    def reusable(self) -> bool:
        return self.stored is Stored.OUTPUT


@dataclass(frozen=True)
class RunRecord:
    """What `put_run` stored: enough to start the run again."""

    execution_id: str
    workflow_id: str
    workflow_version: str
    input_stored: Stored
    input_size: int
    resumed_from: str | None
    stored_at: float
    input: Any = None  # the input when input_stored is OUTPUT; its redacted form when SECRET
    # W3C traceparent of the run's span: a resume in another process links its trace to it.
    trace_parent: str | None = None


@dataclass(frozen=True)
class Checkpoint:
    """What a resume of `execution_id` can reuse.

    `outputs` holds the outputs of reusable nodes only (and `encoded` their stored JSON bytes);
    `redacted` the stored form of nodes whose output held a secret — for display, never reuse.
    """

    execution_id: str
    run: RunRecord | None
    nodes: Mapping[str, NodeCheckpoint]
    outputs: Mapping[str, Any] = field(default_factory=dict)
    encoded: Mapping[str, bytes] = field(default_factory=dict)
    redacted: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointSummary:
    """`describe`: node ids, sizes and times; no outputs, no input."""

    execution_id: str
    run: RunRecord | None
    nodes: tuple[NodeCheckpoint, ...]


class CheckpointStore(Protocol):
    async def put(
        self, execution_id: str, node_id: str, output: Any, *, workflow_id: str, workflow_version: str, attempt: int
    ) -> None: ...

    async def put_run(
        self,
        execution_id: str,
        workflow_id: str,
        workflow_version: str,
        input: Any,
        resumed_from: str | None = None,
        trace_parent: str | None = None,
    ) -> None: ...

    async def load(self, execution_id: str) -> Checkpoint: ...

    async def describe(self, execution_id: str) -> CheckpointSummary: ...

    async def invalidate(self, execution_id: str, node_ids: Sequence[str]) -> None:
        """Forget these nodes' checkpoints (a rollback undid them): a resume runs them again."""

    def close(self) -> None: ...


# --- serialisation ----------------------------------------------------------------------------

_OPTIONS = orjson.OPT_PASSTHROUGH_SUBCLASS | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME


class _Unserialisable(TypeError):
    pass


def encode(value: Any, max_bytes: int) -> Encoded:
    """Serialise `value` as JSON: secrets redacted, bounded by `max_bytes`.

    Subclasses, dataclasses and datetimes reach `default` instead of orjson's own encoding, so
    that a `Secret` (a str subclass) is seen and redacted in the same single pass, and values
    that would not come back as what they were are refused rather than silently changed.
    """
    secrets = False

    def default(obj: Any) -> Any:
        nonlocal secrets
        if isinstance(obj, Secret):
            secrets = True
            return REDACTED
        if isinstance(obj, str):
            return str.__str__(obj)  # a StrEnum member or another str subclass: its plain value
        if isinstance(obj, int):
            return int(obj)
        if isinstance(obj, float):
            return float(obj)
        if isinstance(obj, list):
            return list(obj)
        if isinstance(obj, dict):
            return dict(obj)
        raise _Unserialisable(f"{type(obj).__module__}.{type(obj).__qualname__} is not a JSON value")

    try:
        data = orjson.dumps(value, default=default, option=_OPTIONS)
    except (orjson.JSONEncodeError, _Unserialisable) as exc:
        # orjson's own message never quotes the value, so no secret can leak through it.
        cause = exc.__cause__ if isinstance(exc.__cause__, _Unserialisable) else exc
        return Encoded(Stored.UNSERIALISABLE, 0, None, None, str(cause))
    if len(data) > max_bytes:
        return Encoded(Stored.TOO_LARGE, len(data), None, None, f"{len(data)} bytes > {max_bytes}")
    digest = hashlib.sha256(data).hexdigest() if len(data) > INLINE_BYTES else None
    return Encoded(Stored.SECRET if secrets else Stored.OUTPUT, len(data), data, digest)


def decode(data: bytes) -> Any:
    return orjson.loads(data)


# --- what a commit is handed ------------------------------------------------------------------


@dataclass(frozen=True)
class NodeRow:
    execution_id: str
    node_id: str
    attempt: int
    workflow_id: str
    workflow_version: str
    value: Encoded
    stored_at: float


@dataclass(frozen=True)
class RunRow:
    execution_id: str
    workflow_id: str
    workflow_version: str
    input: Encoded
    resumed_from: str | None
    stored_at: float
    trace_parent: str | None = None


class Backend(Protocol):
    """One store's storage, used from the writer thread only."""

    def write(self, nodes: Sequence[NodeRow], runs: Sequence[RunRow]) -> None:
        """Store every row durably, blobs before the rows naming them; raise if not stored."""

    def read_nodes(self, execution_id: str, *, with_data: bool) -> list[tuple[NodeCheckpoint, bytes | None]]:
        """Each node's checkpoint and, `with_data`, its inline output bytes."""

    def read_run(self, execution_id: str) -> RunRecord | None:
        """The run's record, its input decoded when stored."""

    def read_blobs(self, digests: Sequence[str]) -> dict[str, bytes]: ...

    def invalidate(self, execution_id: str, node_ids: Sequence[str]) -> None:
        """Delete these nodes' checkpoints durably; raise if not done."""

    def inline_writer(self) -> InlineWriter | None:
        """A writer cheap enough to run on the event loop, or None: commits go to the thread."""

    def maintain(self) -> None:
        """Housekeeping the writer thread runs now and then (SQLite: a WAL checkpoint)."""

    def close(self) -> None: ...


class InlineWriter(Protocol):
    def __call__(self, nodes: Sequence[NodeRow], runs: Sequence[RunRow]) -> bool:
        """Store the rows durably and return True, or return False at once, nothing stored, when
        another writer holds the store (the rows then go to the writer thread); raise on failure."""

    def close(self) -> None: ...


# --- choosing a store by URL -------------------------------------------------------------------

SQLITE_OPTIONS = {"synchronous", "commit"}


def open_checkpoint_store(
    url: str, *, max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES, database: str | None = None, read_only: bool = False
) -> GroupCommitStore:
    """The store at `url`: `sqlite:///abs/path.db` (options `?synchronous=normal|full`,
    `&commit=loop|thread`), or a ClickHouse DSN as the collector takes it (`chdb:///dir`,
    `clickhouse://user:pw@host:8123/db`, `http(s)://…`), in `database` (default: the DSN's,
    else `otel`). Raises ValueError, saying what it expected, for a URL it cannot use.
    `read_only`: a reader's — a SQLite file is opened read-only, never created."""
    from flowscope.engine.checkpoint_commit import GroupCommitStore

    if not isinstance(url, str) or not url.strip():
        raise ValueError("checkpoint store URL is empty: use sqlite:///path/checkpoints.db or chdb:///data/dir")
    parsed = urlparse(url)
    shown = _without_password(url, parsed.password)  # what an error may show of the URL
    if parsed.scheme == "sqlite":
        from flowscope.engine.checkpoint_sqlite import SqliteBackend

        options = dict(parse_qsl(parsed.query, keep_blank_values=True))
        unknown = sorted(set(options) - SQLITE_OPTIONS)
        if unknown:
            raise ValueError(
                f"unknown sqlite checkpoint option(s) {unknown} in {shown!r}: known are {sorted(SQLITE_OPTIONS)}"
            )
        backend = SqliteBackend.open(
            parsed.netloc + parsed.path,
            url=shown,
            synchronous=options.get("synchronous", "normal"),
            commit=options.get("commit"),
            read_only=read_only,
        )
        return GroupCommitStore(backend, max_output_bytes=max_output_bytes, name=f"sqlite:{backend.path}")
    if parsed.scheme in {"chdb", "clickhouse", "clickhouses", "http", "https"}:
        from flowscope.engine.checkpoint_clickhouse import ClickHouseBackend

        ch = ClickHouseBackend.open(url, database=database)
        return GroupCommitStore(ch, max_output_bytes=max_output_bytes, name=ch.where)
    raise ValueError(
        f"unsupported checkpoint store URL scheme {parsed.scheme!r} in {shown!r}: "
        "use sqlite:///path/checkpoints.db, chdb:///data/dir or clickhouse://user:pw@host:8123/db"
    )


def _without_password(url: str, password: str | None) -> str:
    # As the collector masks a DSN (collector/store.py): errors reach logs and HTTP answers.
    return url.replace(f":{password}@", ":***@") if password else url
