"""Checkpoint store: node outputs written durably, so a run can resume in another process.

`open_checkpoint_store(url)` picks the backend: `sqlite:///abs/path/checkpoints.db` (embedded,
no server; engine/checkpoint_sqlite.py) or `chdb:///data/dir`, `clickhouse://…`, `http(s)://…`
(a ClickHouse several engines share; engine/checkpoint_clickhouse.py). Both sit behind one
group committer: `put` serialises the output on the caller's loop, hands it to one writer
thread that commits every put waiting in one transaction or INSERT, and resolves the callers'
futures only after that commit — so an acknowledged checkpoint is on disk, and the cost of a
commit is shared by every put it covers. What is stored, what is not, and why: docs/durability.md,
"Checkpoints".
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlparse

import orjson

from flowscope.engine.redact import REDACTED, Secret

logger = logging.getLogger(__name__)

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
    ) -> None: ...

    async def load(self, execution_id: str) -> Checkpoint: ...

    async def describe(self, execution_id: str) -> CheckpointSummary: ...

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


# --- what the writer thread is handed ----------------------------------------------------------


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


class Backend(Protocol):
    """One store's storage, used from the writer thread only."""

    def write(self, nodes: Sequence[NodeRow], runs: Sequence[RunRow]) -> None:
        """Store every row durably, blobs before the rows naming them; raise if not stored."""

    def read_nodes(self, execution_id: str, *, with_data: bool) -> list[tuple[NodeCheckpoint, bytes | None]]:
        """Each node's checkpoint and, `with_data`, its inline output bytes."""

    def read_run(self, execution_id: str) -> RunRecord | None:
        """The run's record, its input decoded when stored."""

    def read_blobs(self, digests: Sequence[str]) -> dict[str, bytes]: ...

    def close(self) -> None: ...


@dataclass
class _Waiter:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]


@dataclass
class _Write:
    row: NodeRow | RunRow
    waiter: _Waiter


@dataclass
class _Read:
    call: Callable[[], Any]
    waiter: _Waiter


_STOP = object()


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled; the checkpoint is stored all the same
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _settle_all(settled: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, result, error in settled:
        _settle(future, result, error)


class GroupCommitStore:
    """A `CheckpointStore` over a `Backend`: one writer thread, one commit per batch of puts.

    Reads go through the same thread after the writes queued before them, so `load` sees every
    put that was acknowledged before it was called.
    """

    def __init__(self, backend: Backend, *, max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES, name: str) -> None:
        if max_output_bytes <= 0:
            raise ValueError(f"max_output_bytes must be positive, got {max_output_bytes}")
        self.max_output_bytes = max_output_bytes
        self.name = name
        self._backend = backend
        # A SimpleQueue, not a Condition over a list: its put and get are C calls, a large part
        # of what a put costs the loop when puts come one at a time.
        self._queue: queue.SimpleQueue[_Write | _Read | object] = queue.SimpleQueue()
        self._closed = False
        self.commits = 0  # batches committed: puts per commit = puts / commits
        self.rows = 0
        self._thread = threading.Thread(target=self._run, name=f"checkpoints-{name}", daemon=True)
        self._thread.start()

    async def put(
        self, execution_id: str, node_id: str, output: Any, *, workflow_id: str, workflow_version: str, attempt: int
    ) -> None:
        value = encode(output, self.max_output_bytes)
        if value.stored is Stored.UNSERIALISABLE:
            logger.warning(
                "checkpoint of node %r (execution %s) keeps no output: %s", node_id, execution_id, value.reason
            )
        row = NodeRow(execution_id, node_id, attempt, workflow_id, workflow_version, value, time.time())
        await self._submit(lambda waiter: _Write(row, waiter))

    async def put_run(
        self,
        execution_id: str,
        workflow_id: str,
        workflow_version: str,
        input: Any,
        resumed_from: str | None = None,
    ) -> None:
        row = RunRow(
            execution_id, workflow_id, workflow_version, encode(input, self.max_output_bytes), resumed_from, time.time()
        )
        await self._submit(lambda waiter: _Write(row, waiter))

    async def load(self, execution_id: str) -> Checkpoint:
        result: Checkpoint = await self._submit(lambda waiter: _Read(lambda: self._load(execution_id), waiter))
        return result

    async def describe(self, execution_id: str) -> CheckpointSummary:
        def read() -> CheckpointSummary:
            nodes = [node for node, _ in self._backend.read_nodes(execution_id, with_data=False)]
            run = self._backend.read_run(execution_id)
            if run is not None:
                run = RunRecord(**{**run.__dict__, "input": None})
            return CheckpointSummary(execution_id, run, tuple(nodes))

        result: CheckpointSummary = await self._submit(lambda waiter: _Read(read, waiter))
        return result

    def close(self) -> None:
        """Write what is queued, then stop the writer. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join()
        self._backend.close()

    async def _submit(self, make: Callable[[_Waiter], _Write | _Read]) -> Any:
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop, loop.create_future())
        if self._closed:
            raise CheckpointError(f"checkpoint store {self.name} is closed")
        self._queue.put(make(waiter))
        return await waiter.future

    def _load(self, execution_id: str) -> Checkpoint:
        read = self._backend.read_nodes(execution_id, with_data=True)
        nodes = {n.node_id: n for n, _ in read}
        inline = {n.node_id: data for n, data in read if data is not None}
        run = self._backend.read_run(execution_id)
        blobs = self._backend.read_blobs(sorted({n.sha256 for n in nodes.values() if n.sha256}))
        outputs: dict[str, Any] = {}
        encoded: dict[str, bytes] = {}
        redacted: dict[str, Any] = {}
        for node in nodes.values():
            data = blobs.get(node.sha256) if node.sha256 else inline.get(node.node_id)
            if data is None:
                continue
            if node.reusable:
                encoded[node.node_id] = data
                outputs[node.node_id] = decode(data)
            elif node.stored is Stored.SECRET:
                redacted[node.node_id] = decode(data)
        return Checkpoint(execution_id, run, nodes, outputs, encoded, redacted)

    def _take(self) -> list[_Write | _Read | object]:
        """Block for one item, then take every item waiting behind it: one commit for all."""
        taken = [self._queue.get()]
        while True:
            try:
                taken.append(self._queue.get_nowait())
            except queue.Empty:
                return taken

    def _run(self) -> None:
        while True:
            taken = self._take()
            writes = [item for item in taken if isinstance(item, _Write)]
            reads = [item for item in taken if isinstance(item, _Read)]
            if writes:
                self._commit(writes)
            for read in reads:
                self._answer(read)
            if _STOP in taken:
                self._refuse_late()
                return

    def _refuse_late(self) -> None:
        """Fail what raced with `close()` past its check, so no caller waits forever."""
        error = CheckpointError(f"checkpoint store {self.name} is closed")
        for item in self._take_nowait():
            if isinstance(item, _Write | _Read):
                _call_soon(item.waiter.loop, _settle, item.waiter.future, None, error)

    def _take_nowait(self) -> list[_Write | _Read | object]:
        taken: list[_Write | _Read | object] = []
        while True:
            try:
                taken.append(self._queue.get_nowait())
            except queue.Empty:
                return taken

    def _commit(self, writes: list[_Write]) -> None:
        nodes = [w.row for w in writes if isinstance(w.row, NodeRow)]
        runs = [w.row for w in writes if isinstance(w.row, RunRow)]
        error: BaseException | None = None
        try:
            self._backend.write(nodes, runs)
            self.commits += 1
            self.rows += len(writes)
        except Exception as exc:
            logger.exception("checkpoint store %s: a commit of %d rows failed", self.name, len(writes))
            error = CheckpointError(f"checkpoints not stored in {self.name}: {exc}")
        for loop, group in _by_loop(w.waiter for w in writes):
            settled = [(w.future, None, error) for w in group]
            _call_soon(loop, _settle_all, settled)

    def _answer(self, read: _Read) -> None:
        try:
            result, error = read.call(), None
        except Exception as exc:
            logger.exception("checkpoint store %s: a read failed", self.name)
            result, error = None, CheckpointError(f"checkpoints not readable from {self.name}: {exc}")
        _call_soon(read.waiter.loop, _settle, read.waiter.future, result, error)


def _by_loop(waiters: Iterator[_Waiter]) -> list[tuple[asyncio.AbstractEventLoop, list[_Waiter]]]:
    """One wake-up of each loop per commit, not one per put."""
    groups: dict[int, tuple[asyncio.AbstractEventLoop, list[_Waiter]]] = {}
    for waiter in waiters:
        groups.setdefault(id(waiter.loop), (waiter.loop, []))[1].append(waiter)
    return list(groups.values())


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop closed while its callers waited: nobody to tell
        loop.call_soon_threadsafe(callback, *args)


# --- choosing a store by URL -------------------------------------------------------------------

SQLITE_OPTIONS = {"synchronous"}


def open_checkpoint_store(
    url: str, *, max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES, database: str | None = None
) -> GroupCommitStore:
    """The store at `url`: `sqlite:///abs/path.db` (`?synchronous=normal|full`), or a ClickHouse
    DSN as the collector takes it (`chdb:///dir`, `clickhouse://user:pw@host:8123/db`,
    `http(s)://…`), in `database` (default: the DSN's, else `otel`). Raises ValueError for
    a URL it cannot use."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError("checkpoint store URL is empty: use sqlite:///path/checkpoints.db or chdb:///data/dir")
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        from flowscope.engine.checkpoint_sqlite import SqliteBackend

        path = parsed.netloc + parsed.path
        options = dict(parse_qsl(parsed.query, keep_blank_values=True))
        unknown = sorted(set(options) - SQLITE_OPTIONS)
        if unknown:
            raise ValueError(
                f"unknown sqlite checkpoint option(s) {unknown} in {url!r}: known are {sorted(SQLITE_OPTIONS)}"
            )
        backend = SqliteBackend.open(path, url=url, synchronous=options.get("synchronous", "normal"))
        return GroupCommitStore(backend, max_output_bytes=max_output_bytes, name=f"sqlite:{backend.path}")
    if parsed.scheme in {"chdb", "clickhouse", "clickhouses", "http", "https"}:
        from flowscope.engine.checkpoint_clickhouse import ClickHouseBackend

        ch = ClickHouseBackend.open(url, database=database)
        return GroupCommitStore(ch, max_output_bytes=max_output_bytes, name=ch.where)
    raise ValueError(
        f"unsupported checkpoint store URL scheme {parsed.scheme!r} in {url!r}: "
        "use sqlite:///path/checkpoints.db, chdb:///data/dir or clickhouse://user:pw@host:8123/db"
    )
