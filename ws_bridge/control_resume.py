"""Continuing a failed, cancelled or lost run from its checkpoints: the stack's side
(docs/durability.md, "Resume after a crash"; docs/control.md).

A resume is not tied to the engine that ran the run: the outputs it reuses are in the checkpoint
store every engine of the deployment shares, so it goes to any connected engine serving the
run's workflow version. The stack reads that store too (`FLOWSCOPE_CHECKPOINTS`), for the
version of a run it never saw and for `GET /api/v1/executions/{id}/checkpoint`: what a resume
would reuse. It only reads; the store is opened on first use, so a stack whose store is down
still starts, and answers 503 for these until it is back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from flowscope.contract import RunStatus
from flowscope.engine.checkpoint_commit import GroupCommitStore
from flowscope.engine.checkpoints import Checkpoint, CheckpointSummary, open_checkpoint_store
from flowscope.engine.redact import redact
from flowscope.ws_bridge.auth import Principal
from flowscope.ws_bridge.control_commands import ControlOutcome, failure

if TYPE_CHECKING:
    from flowscope.ws_bridge.control import ControlHub

logger = logging.getLogger(__name__)

# An execution's stored row (history.started_run): its Status and WorkflowVersion decide a resume.
StoredRun = Callable[[str], dict[str, Any] | None]

# A stored "running" does not count: the hub knows the runs of live engines, and one no live
# engine runs is lost even before its workflow.lost is stored.
NOT_RESUMABLE = {RunStatus.SUCCESS.value: "succeeded"}


class CheckpointsUnavailable(RuntimeError):
    """No checkpoint store configured, or it cannot be opened or read: answered 503. Its text is
    for the log and for callers allowed to see the run (the URL's password masked); others get
    UNAVAILABLE."""


UNAVAILABLE = "the checkpoint store is unavailable"
NOT_CONFIGURED = "no checkpoint store is configured (FLOWSCOPE_CHECKPOINTS)"
# A store that could not be opened or read is not tried again for this long: a locked or broken
# store answers 503 at once instead of holding every request for its busy timeout.
RETRY_AFTER_S = 3.0


def redact_url(text: str, url: str | None) -> str:
    """`text` without the store URL's password (a ClickHouse DSN's, as the collector masks it)."""
    password = urlparse(url).password if url else None
    return text.replace(password, "***") if password else text


class CheckpointReader:
    """The checkpoint store at `url`, opened read-only on first use and kept open."""

    def __init__(self, url: str | None) -> None:
        self.url = url
        self._store: GroupCommitStore | None = None
        self._lock = asyncio.Lock()
        self._failed: tuple[float, str] | None = None  # (until when, why)

    @property
    def configured(self) -> bool:
        return bool(self.url)

    def _unavailable(self, what: str, exc: BaseException) -> CheckpointsUnavailable:
        why = redact_url(f"the checkpoint store cannot be {what}: {exc}", self.url)
        logger.warning("%s", why)
        self._failed = (time.monotonic() + RETRY_AFTER_S, why)
        return CheckpointsUnavailable(why)

    def _still_failing(self) -> None:
        if self._failed is not None:
            until, why = self._failed
            if time.monotonic() < until:
                raise CheckpointsUnavailable(why)
            self._failed = None

    async def _open(self) -> GroupCommitStore:
        if not self.url:
            raise CheckpointsUnavailable(NOT_CONFIGURED)
        self._still_failing()
        async with self._lock:
            if self._store is None:
                self._still_failing()
                try:
                    # Opening a ClickHouse store connects and may wait: not on the loop. Read-only:
                    # the stack never creates a store (a missing file is a missing store).
                    self._store = await asyncio.to_thread(open_checkpoint_store, self.url, read_only=True)
                except Exception as exc:  # a bad URL, a missing file or server: the store is unavailable
                    raise self._unavailable("opened", exc) from exc
            return self._store

    async def describe(self, execution_id: str) -> CheckpointSummary:
        store = await self._open()
        try:
            return await store.describe(execution_id)
        except Exception as exc:
            raise self._unavailable("read", exc) from exc

    async def load(self, execution_id: str) -> Checkpoint:
        store = await self._open()
        try:
            return await store.load(execution_id)
        except Exception as exc:
            raise self._unavailable("read", exc) from exc

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None


def snapshot(summary: CheckpointSummary, checkpoint: Checkpoint | None) -> dict[str, Any]:
    """`GET …/checkpoint`: every checkpointed node with what a resume does with it; the outputs
    (and the run's input) only when `checkpoint` — the full load — is given, with the values of
    secret-named keys masked as the telemetry masks them (engine/redact.py)."""
    run = summary.run
    nodes = []
    for node in summary.nodes:
        item: dict[str, Any] = {
            "nodeId": node.node_id,
            "stored": node.stored.value,
            "reusable": node.reusable,
            "sizeBytes": node.size,
            "attempt": node.attempt,
            "storedAt": node.stored_at,
        }
        if node.reason:
            item["reason"] = node.reason
        if checkpoint is not None and node.node_id in checkpoint.outputs:
            item["output"] = redact(checkpoint.outputs[node.node_id])
        elif checkpoint is not None and node.node_id in checkpoint.redacted:
            item["redacted"] = checkpoint.redacted[node.node_id]
        nodes.append(item)
    first = run or (summary.nodes[0] if summary.nodes else None)
    body: dict[str, Any] = {
        "executionId": summary.execution_id,
        "workflowId": first.workflow_id if first else None,
        "workflowVersion": first.workflow_version if first else None,
        "resumedFrom": run.resumed_from if run else None,
        "input": {"stored": run.input_stored.value, "sizeBytes": run.input_size} if run else None,
        "reusableNodes": [n.node_id for n in summary.nodes if n.reusable],
        "nodes": nodes,
    }
    if checkpoint is not None and checkpoint.run is not None and body["input"] is not None:
        body["input"]["value"] = redact(checkpoint.run.input)
    return body


async def checkpoint_answer(hub: ControlHub, principal: Principal, execution_id: str) -> ControlOutcome:
    """`GET /api/v1/executions/{id}/checkpoint` for `principal`: 200 with the snapshot, the
    outputs only when it may read the execution; 404 (also to a caller that may neither read nor
    steer it), or 503 (no store). The history's owner is checked before the store is touched."""
    if not hub.checkpoints.configured:
        return failure(503, NOT_CONFIGURED)
    missing = failure(404, f"no checkpoint of execution {execution_id!r}")
    owner = await _stored_owner(hub, execution_id)
    if owner is not None and not _may_look(principal, execution_id, *owner):
        return missing
    try:
        summary = await hub.checkpoints.describe(execution_id)
    except CheckpointsUnavailable as exc:
        # Why (a path, a server) only for a caller the history says may look at the run.
        return failure(503, str(exc) if owner is not None else UNAVAILABLE)
    if summary.run is None and not summary.nodes:
        return missing
    first = summary.run or summary.nodes[0]
    # The workflow that decides who may see it is the one its first stored record names.
    workflow_id, user_id = owner if owner is not None else (first.workflow_id, None)
    if not _may_look(principal, execution_id, workflow_id, user_id):
        return missing
    readable = principal.may_see({"workflowId": workflow_id, "executionId": execution_id}, user_id)
    try:
        checkpoint = await hub.checkpoints.load(execution_id) if readable else None
    except CheckpointsUnavailable as exc:
        return failure(503, str(exc))
    return ControlOutcome(200, snapshot(summary, checkpoint))


def _may_look(principal: Principal, execution_id: str, workflow_id: str, user_id: str | None) -> bool:
    readable = principal.may_see({"workflowId": workflow_id, "executionId": execution_id}, user_id)
    return readable or principal.may_control(workflow_id)


async def _stored_owner(hub: ControlHub, execution_id: str) -> tuple[str, str | None] | None:
    if hub.stored_owner is None:
        return None
    try:
        owner = await asyncio.to_thread(hub.stored_owner, execution_id)
    except Exception as exc:
        logger.warning("no stored owner of %s (%s): its checkpoint's workflow decides", execution_id, exc)
        return None
    return (owner[0], owner[1] or None) if owner is not None else None
