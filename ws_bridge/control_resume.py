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
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flowscope.contract import RunStatus
from flowscope.engine.checkpoint_commit import GroupCommitStore
from flowscope.engine.checkpoints import Checkpoint, CheckpointSummary, open_checkpoint_store
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
    """No checkpoint store configured, or it cannot be opened or read: answered 503."""


class CheckpointReader:
    """The checkpoint store at `url`, opened on first use and kept open."""

    def __init__(self, url: str | None) -> None:
        self.url = url
        self._store: GroupCommitStore | None = None
        self._lock = asyncio.Lock()

    @property
    def configured(self) -> bool:
        return bool(self.url)

    async def _open(self) -> GroupCommitStore:
        if not self.url:
            raise CheckpointsUnavailable("no checkpoint store is configured (FLOWSCOPE_CHECKPOINTS)")
        async with self._lock:
            if self._store is None:
                try:
                    # Opening a ClickHouse store connects and may wait: not on the loop.
                    self._store = await asyncio.to_thread(open_checkpoint_store, self.url)
                except Exception as exc:  # a bad URL, a missing server: the store is unavailable
                    logger.warning("the checkpoint store cannot be opened: %s", exc)
                    raise CheckpointsUnavailable(f"the checkpoint store cannot be opened: {exc}") from exc
            return self._store

    async def describe(self, execution_id: str) -> CheckpointSummary:
        store = await self._open()
        try:
            return await store.describe(execution_id)
        except Exception as exc:
            raise CheckpointsUnavailable(f"the checkpoint store cannot be read: {exc}") from exc

    async def load(self, execution_id: str) -> Checkpoint:
        store = await self._open()
        try:
            return await store.load(execution_id)
        except Exception as exc:
            raise CheckpointsUnavailable(f"the checkpoint store cannot be read: {exc}") from exc

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None


def snapshot(summary: CheckpointSummary, checkpoint: Checkpoint | None) -> dict[str, Any]:
    """`GET …/checkpoint`: every checkpointed node with what a resume does with it; the outputs
    (and the run's input) only when `checkpoint` — the full load — is given."""
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
            item["output"] = checkpoint.outputs[node.node_id]
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
        body["input"]["value"] = checkpoint.run.input
    return body


async def checkpoint_answer(hub: ControlHub, principal: Principal, execution_id: str) -> ControlOutcome:
    """`GET /api/v1/executions/{id}/checkpoint` for `principal`: 200 with the snapshot, the
    outputs only when it may read the execution; 403, 404, or 503 (no store)."""
    try:
        summary = await hub.checkpoints.describe(execution_id)
    except CheckpointsUnavailable as exc:
        return failure(503, str(exc))
    if summary.run is None and not summary.nodes:
        return failure(404, f"no checkpoint of execution {execution_id!r}")
    first = summary.run or summary.nodes[0]
    workflow_id, user_id = first.workflow_id, None
    if hub.stored_owner is not None:
        # The workflow that decides who may see it is the one its first stored record names.
        try:
            owner = await asyncio.to_thread(hub.stored_owner, execution_id)
        except Exception as exc:
            logger.warning("no stored owner of %s (%s): its checkpoint's workflow decides", execution_id, exc)
            owner = None
        if owner is not None:
            workflow_id, user_id = owner[0], owner[1] or None
    readable = principal.may_see({"workflowId": workflow_id, "executionId": execution_id}, user_id)
    if not (readable or principal.may_control(workflow_id)):
        return failure(403, f"{principal.subject!r} may neither read nor steer runs of workflow {workflow_id!r}")
    try:
        checkpoint = await hub.checkpoints.load(execution_id) if readable else None
    except CheckpointsUnavailable as exc:
        return failure(503, str(exc))
    return ControlOutcome(200, snapshot(summary, checkpoint))
