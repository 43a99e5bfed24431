"""Group commit: every put waiting is committed in one transaction or INSERT, and acknowledged
only after it.

Two paths to a commit. The writer thread takes every put queued since its last commit,
commits them, and resolves their futures on their loops (`call_soon_threadsafe`, one wake-up
of each loop per commit); ClickHouse and SQLite at `synchronous=FULL` always use it, because
their commits block for milliseconds (a part written, an fsync). A SQLite commit at
`synchronous=NORMAL` is a write() to the WAL, tens of microseconds: cheaper than the two thread
switches of a hand-off, which in a chain of nodes (one put per commit, nothing to share it
with) were most of a put's cost. So by default those commits run on the event loop, on a
connection that never waits for a lock (if another writer holds the database, the batch goes
to the thread, which waits): the puts of one loop iteration are gathered and committed by one
callback at its end — or, when nothing else is queued to run in the iteration (a chain), at
once, since no other put could join. Reads always go through the thread, after every write
queued before them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from flowscope.engine.checkpoints import (
    DEFAULT_MAX_OUTPUT_BYTES,
    Backend,
    Checkpoint,
    CheckpointError,
    CheckpointSummary,
    NodeRow,
    RunRecord,
    RunRow,
    Stored,
    decode,
    encode,
)

logger = logging.getLogger(__name__)

# Commits between two WAL checkpoints by the thread: the loop's connection never checkpoints
# (that fsyncs), and a WAL nobody checkpoints grows without bound.
_MAINTAIN_EVERY = 1024


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
    waiter: _Waiter | None  # None: housekeeping nobody waits for


_STOP = object()
_Item = _Write | _Read | object


class GroupCommitStore:
    """A `CheckpointStore` over a `Backend`. `commits` counts commits, `rows` the puts they held,
    `handed_over` the loop's batches that found the store busy and went to the thread."""

    def __init__(self, backend: Backend, *, max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES, name: str) -> None:
        if max_output_bytes <= 0:
            raise ValueError(f"max_output_bytes must be positive, got {max_output_bytes}")
        self.max_output_bytes = max_output_bytes
        self.name = name
        self.commits = 0
        self.rows = 0
        self.handed_over = 0
        self._backend = backend
        self._inline = backend.inline_writer()
        self._inline_lock = threading.Lock()  # one loop at a time on the inline connection
        self._pending: dict[asyncio.AbstractEventLoop, list[_Write]] = {}
        self._since_maintained = 0
        # C calls both ways: a Condition over a list cost the loop more per put than the commit.
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"checkpoints-{name}", daemon=True)
        self._thread.start()

    # --- the CheckpointStore API ---------------------------------------------------------------

    async def put(
        self, execution_id: str, node_id: str, output: Any, *, workflow_id: str, workflow_version: str, attempt: int
    ) -> None:
        # Serialised now, on the caller's loop: what is stored is the output as the node returned it.
        value = encode(output, self.max_output_bytes)
        if value.stored is Stored.UNSERIALISABLE:
            logger.warning(
                "checkpoint of node %r (execution %s) keeps no output: %s", node_id, execution_id, value.reason
            )
        await self._write(NodeRow(execution_id, node_id, attempt, workflow_id, workflow_version, value, time.time()))

    async def put_run(
        self,
        execution_id: str,
        workflow_id: str,
        workflow_version: str,
        input: Any,
        resumed_from: str | None = None,
        trace_parent: str | None = None,
    ) -> None:
        value = encode(input, self.max_output_bytes)
        row = RunRow(execution_id, workflow_id, workflow_version, value, resumed_from, time.time(), trace_parent)
        await self._write(row)

    async def load(self, execution_id: str) -> Checkpoint:
        result: Checkpoint = await self._read(lambda: self._load(execution_id))
        return result

    async def describe(self, execution_id: str) -> CheckpointSummary:
        def read() -> CheckpointSummary:
            nodes = tuple(node for node, _ in self._backend.read_nodes(execution_id, with_data=False))
            run = self._backend.read_run(execution_id)
            if run is not None:
                run = RunRecord(**{**run.__dict__, "input": None})
            return CheckpointSummary(execution_id, run, nodes)

        result: CheckpointSummary = await self._read(read)
        return result

    async def invalidate(self, execution_id: str, node_ids: Sequence[str]) -> None:
        """Forget these nodes' checkpoints, after every write queued before (a rollback undid them)."""
        nodes = list(node_ids)
        if nodes:
            await self._read(lambda: self._backend.invalidate(execution_id, nodes))

    def close(self) -> None:
        """Commit every put already made, then stop the writer. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for loop in list(self._pending):  # gathered for an inline commit that has not run yet
            for write in self._pending.pop(loop, []):
                self._queue.put(write)
        self._queue.put(_STOP)
        self._thread.join()
        with self._inline_lock:
            if self._inline is not None:
                self._inline.close()
        self._backend.close()

    # --- the loop's side -----------------------------------------------------------------------

    async def _write(self, row: NodeRow | RunRow) -> None:
        loop = asyncio.get_running_loop()
        write = _Write(row, _Waiter(loop, loop.create_future()))
        if self._closed:
            raise CheckpointError(f"checkpoint store {self.name} is closed")
        if self._inline is None:
            self._queue.put(write)
        else:
            pending = self._pending.get(loop)
            if pending is None:
                if _nothing_else_ready(loop) and self._commit_alone(write):
                    return
                pending = self._pending[loop] = []
                loop.call_soon(self._flush, loop)  # after the puts of this loop iteration
            pending.append(write)
        await write.waiter.future

    def _commit_alone(self, write: _Write) -> bool:
        """Commit one put now, if the inline connection is free: True once it is stored."""
        written, error = self._commit_inline([write])
        if error is not None:
            raise error
        return written

    def _commit_inline(self, writes: list[_Write]) -> tuple[bool, CheckpointError | None]:
        """(True, None) once stored; (False, None) when the store is busy; (False, error)."""
        if self._inline is None or not self._inline_lock.acquire(blocking=False):
            return False, None
        try:
            written = self._inline(*_split(writes))
        except Exception as exc:
            logger.exception("checkpoint store %s: a commit of %d rows failed", self.name, len(writes))
            return False, CheckpointError(f"checkpoints not stored in {self.name}: {exc}")
        finally:
            self._inline_lock.release()
        if written:
            self._counted(len(writes))
        return written, None

    async def _read(self, call: Callable[[], Any]) -> Any:
        loop = asyncio.get_running_loop()
        read = _Read(call, _Waiter(loop, loop.create_future()))
        if self._closed:
            raise CheckpointError(f"checkpoint store {self.name} is closed")
        self._queue.put(read)
        assert read.waiter is not None
        return await read.waiter.future

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        writes = self._pending.pop(loop, [])
        if not writes:  # close() handed them to the thread
            return
        written, error = self._commit_inline(writes)
        if written or error is not None:
            for write in writes:
                _settle(write.waiter.future, None, error)
            return
        if self._closed:  # the thread is gone or going: tell the callers rather than leave them waiting
            for write in writes:
                _settle(write.waiter.future, None, CheckpointError(f"checkpoint store {self.name} is closed"))
            return
        self.handed_over += 1
        for write in writes:
            self._queue.put(write)

    def _counted(self, rows: int) -> None:
        self.commits += 1
        self.rows += rows
        self._since_maintained += 1
        if self._since_maintained >= _MAINTAIN_EVERY:
            self._since_maintained = 0
            self._queue.put(_Read(self._backend.maintain, None))

    # --- the writer thread ---------------------------------------------------------------------

    def _take(self, block: bool) -> list[_Item]:
        """Every item waiting (blocking for the first if `block`): one commit for all."""
        taken = [self._queue.get()] if block else []
        while True:
            try:
                taken.append(self._queue.get_nowait())
            except queue.Empty:
                return taken

    def _run(self) -> None:
        while True:
            taken = self._take(block=True)
            writes = [item for item in taken if isinstance(item, _Write)]
            if writes:
                self._commit(writes)
            for item in taken:
                if isinstance(item, _Read):
                    self._answer(item)
            if _STOP in taken:
                self._refuse_late()
                return

    def _commit(self, writes: list[_Write]) -> None:
        error: BaseException | None = None
        try:
            self._backend.write(*_split(writes))
            self._counted(len(writes))
        except Exception as exc:
            logger.exception("checkpoint store %s: a commit of %d rows failed", self.name, len(writes))
            error = CheckpointError(f"checkpoints not stored in {self.name}: {exc}")
        for loop, group in _by_loop(w.waiter for w in writes):
            _call_soon(loop, _settle_all, [(w.future, None, error) for w in group])

    def _answer(self, read: _Read) -> None:
        if read.waiter is None:
            self._maintain(read.call)
            return
        try:
            result, error = read.call(), None
        except Exception as exc:
            logger.exception("checkpoint store %s: a read failed", self.name)
            result, error = None, CheckpointError(f"checkpoints not readable from {self.name}: {exc}")
        if read.waiter is not None:
            _call_soon(read.waiter.loop, _settle, read.waiter.future, result, error)

    def _maintain(self, call: Callable[[], Any]) -> None:
        """Housekeeping, twice: alongside the loop's commits (a WAL checkpoint copies the bulk of
        the log, fsyncs included), then with the loop's connection held idle, so that it copies
        the few commits made meanwhile and completes — one racing a steady stream of commits
        never catches up, and the log is only reused from its start once one has. While the
        lock is held, the loop's commits come here and wait behind it: a short while."""
        try:
            call()
            with self._inline_lock:
                call()
        except Exception:
            logger.exception("checkpoint store %s: housekeeping failed", self.name)

    def _refuse_late(self) -> None:
        """Fail what raced with `close()` past its check, so no caller waits forever."""
        error = CheckpointError(f"checkpoint store {self.name} is closed")
        for item in self._take(block=False):
            if isinstance(item, _Write | _Read) and item.waiter is not None:
                _call_soon(item.waiter.loop, _settle, item.waiter.future, None, error)

    def _load(self, execution_id: str) -> Checkpoint:
        read = self._backend.read_nodes(execution_id, with_data=True)
        nodes = {node.node_id: node for node, _ in read}
        inline = {node.node_id: data for node, data in read if data is not None}
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


def _nothing_else_ready(loop: asyncio.AbstractEventLoop) -> bool:
    """True when no callback is queued to run in this loop iteration, so no other put can join a
    commit deferred to its end: a chain's put is then committed at once, without the two loop
    iterations a deferred commit and its acknowledgement take. asyncio's own loops keep that
    queue in `_ready`; other loops (uvloop) are asked nothing and always defer."""
    ready = getattr(loop, "_ready", None)
    return ready is not None and not ready


def _split(writes: list[_Write]) -> tuple[list[NodeRow], list[RunRow]]:
    nodes = [w.row for w in writes if isinstance(w.row, NodeRow)]
    runs = [w.row for w in writes if isinstance(w.row, RunRow)]
    return nodes, runs


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


def _by_loop(waiters: Iterator[_Waiter]) -> list[tuple[asyncio.AbstractEventLoop, list[_Waiter]]]:
    """One wake-up of each loop per commit, not one per put."""
    groups: dict[int, tuple[asyncio.AbstractEventLoop, list[_Waiter]]] = {}
    for waiter in waiters:
        groups.setdefault(id(waiter.loop), (waiter.loop, []))[1].append(waiter)
    return list(groups.values())


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop closed while its callers waited: nobody to tell
        loop.call_soon_threadsafe(callback, *args)
