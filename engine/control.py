"""The engine's end of the control plane (docs/control.md): what its frames say.

`Commands` applies the stack's commands to an engine, each once: a repeated command id —
the stack resends what it has not seen answered after a reconnect — gets the stored answer.
The frames describing the engine's workflows and runs are built here too; the connection
that carries them is engine/control_link.py.
"""

from __future__ import annotations

import inspect
import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from flowscope.contract.states import RunStatus
from flowscope.engine.catalog import NotResumable, UnknownNode, retry_plan
from flowscope.engine.checkpoints import CheckpointError
from flowscope.engine.dag import Workflow
from flowscope.engine.results import ExecutionResult, Result

if TYPE_CHECKING:
    from flowscope.engine.scheduler import Engine, Execution

__all__ = ["CONTROL_PATH", "CommandError", "Commands", "control_url", "execution_frame", "workflow_frame"]

logger = logging.getLogger(__name__)

CONTROL_PATH = "/control/v1/engine"
_MAX_COMMANDS = 10_000


def control_url(stack: str) -> str:
    """The control WebSocket of a stack given by its web address (http→ws, https→wss)."""
    base = stack.rstrip("/")
    for web, ws in (("https://", "wss://"), ("http://", "ws://")):
        if base.startswith(web):
            base = ws + base[len(web) :]
    if not base.startswith(("ws://", "wss://")):
        raise ValueError(f"the stack's address must start with http(s):// or ws(s)://, not {stack!r}")
    return base if base.endswith(CONTROL_PATH) else base + CONTROL_PATH


class CommandError(Exception):
    """A command that cannot apply: its `code` is the protocol's (bad_request, conflict, …)."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


class Commands:
    """Applies the stack's commands to one engine, each command id at most once."""

    def __init__(self, engine: Engine, capacity: int = _MAX_COMMANDS) -> None:
        self._engine = engine
        self._capacity = capacity
        self._answers: OrderedDict[str, dict[str, Any]] = OrderedDict()

    async def handle(self, frame: dict[str, Any]) -> dict[str, Any]:
        """The `result` frame answering a `command` frame."""
        command_id = frame.get("commandId")
        if not isinstance(command_id, str) or not command_id:
            return _result(command_id, error=CommandError("bad_request", "a command needs a commandId"))
        stored = self._answers.get(command_id)
        if stored is not None:
            self._answers.move_to_end(command_id)
            return stored
        try:
            answer = _result(command_id, fields=await self.apply(frame))
        except CommandError as exc:
            answer = _result(command_id, error=exc)
        except Exception as exc:
            logger.exception("control command %s failed", command_id)
            answer = _result(command_id, error=CommandError("unavailable", f"the engine failed to apply it: {exc}"))
        self._answers[command_id] = answer
        while len(self._answers) > self._capacity:
            self._answers.popitem(last=False)
        return answer

    async def apply(self, frame: dict[str, Any]) -> dict[str, Any]:
        op = frame.get("op")
        execution_id = frame.get("executionId")
        if not isinstance(execution_id, str) or not execution_id:
            raise CommandError("bad_request", "a command needs an executionId")
        if op == "start":
            return self._start(frame, execution_id)
        if op == "retry":
            return await self._retry(frame, execution_id)
        if op == "resume" and "newExecutionId" in frame:
            return await self._continue(frame, execution_id)
        if op == "rollback":
            from flowscope.engine.rollback import rollback_command  # it imports CommandError from here

            return rollback_command(self._engine, frame, await self._previous(execution_id, "roll back"))
        if op in ("pause", "resume", "stop"):
            execution = self._running(execution_id)
            return self._steer(op, execution)
        raise CommandError("bad_request", f"unknown op {op!r} (start, pause, resume, stop, retry, rollback)")

    def _start(self, frame: dict[str, Any], execution_id: str) -> dict[str, Any]:
        workflow_id, version = frame.get("workflowId"), frame.get("version")
        if not isinstance(workflow_id, str) or (version is not None and not isinstance(version, str)):
            raise CommandError("bad_request", "start needs a workflowId (and a string version, if any)")
        workflow = self._engine.served_workflow(workflow_id, version)
        if workflow is None:
            which = workflow_id if version is None else f"{workflow_id} version {version}"
            raise CommandError("conflict", f"this engine does not serve workflow {which}")
        self._unused(execution_id)
        trigger, user_id = frame.get("trigger") or "api", frame.get("userId")
        self._engine.start(
            workflow,
            frame.get("input"),
            execution_id=execution_id,
            trigger=str(trigger),
            user_id=str(user_id) if user_id else None,
        )
        return {"executionId": execution_id}

    async def _retry(self, frame: dict[str, Any], execution_id: str) -> dict[str, Any]:
        new_id, from_node = frame.get("newExecutionId"), frame.get("fromNode")
        if not isinstance(new_id, str) or not new_id:
            raise CommandError("bad_request", "retry needs a newExecutionId")
        if from_node is not None and not isinstance(from_node, str):
            raise CommandError("bad_request", "fromNode must be a node id")
        previous = await self._previous(execution_id, "retry")
        self._unused(new_id)
        try:
            start, _ = retry_plan(previous, from_node)
        except UnknownNode as exc:
            raise CommandError("bad_request", str(exc)) from exc
        user_id = frame.get("userId")
        self._engine.retry(previous, start, new_id, user_id=str(user_id) if user_id else None)
        return {"executionId": new_id, "retryOf": execution_id, "fromNode": start}

    async def _continue(self, frame: dict[str, Any], execution_id: str) -> dict[str, Any]:
        """Resume an ended or lost run as a new one: checkpointed nodes are reused, the rest run."""
        new_id = frame.get("newExecutionId")
        if not isinstance(new_id, str) or not new_id:
            raise CommandError("bad_request", "resume of an ended run needs a newExecutionId")
        previous = await self._previous(execution_id, "resume")
        if previous.result is Result.SUCCESS:
            raise CommandError("conflict", f"execution {execution_id} succeeded; there is nothing to resume")
        _same_workflow(frame, previous)
        self._unused(new_id)
        user_id = frame.get("userId")
        self._engine.resume(previous, execution_id=new_id, user_id=str(user_id) if user_id else None)
        return {"executionId": new_id, "resumedFrom": execution_id}

    async def _previous(self, execution_id: str, op: str) -> ExecutionResult:
        """The ended run a retry or resume continues, from the engine's memory or its checkpoints."""
        from flowscope.engine.rollback import rolling_back  # it imports CommandError from here

        if self._engine.get(execution_id) is not None:
            raise CommandError("conflict", f"execution {execution_id} is still running; stop it first")
        if rolling_back(self._engine, execution_id):
            # Its compensations still run: what a retry or resume would reuse may be undone under it.
            raise CommandError(
                "conflict", f"execution {execution_id} is being rolled back: no {op} before its workflow.rolled_back"
            )
        try:
            found = self._engine.retry_source.previous(execution_id)
            previous = await found if inspect.isawaitable(found) else found
        except NotResumable as exc:
            raise CommandError("conflict", str(exc)) from exc
        except CheckpointError as exc:
            raise CommandError("unavailable", f"the checkpoint store could not be read: {exc}") from exc
        if previous is None:
            where = "and no checkpoint of it" if self._engine.checkpoints is not None else "(no checkpoint store)"
            raise CommandError("conflict", f"this engine holds no ended execution {execution_id} {where} to {op}")
        return previous

    def _running(self, execution_id: str) -> Execution:
        execution = self._engine.get(execution_id)
        if execution is not None and not execution.finished:
            return execution
        ended = self._engine.finished.previous(execution_id)
        if ended is not None:
            raise CommandError("conflict", f"execution {execution_id} already ended ({ended.result.value})")
        raise CommandError("conflict", f"execution {execution_id} is not running on this engine")

    @staticmethod
    def _steer(op: str, execution: Execution) -> dict[str, Any]:
        execution_id = execution.execution_id
        if op == "stop":
            execution.cancel("stopped by request")
            return {"executionId": execution_id, "status": "cancelling"}
        if execution.cancelling:
            raise CommandError("conflict", f"execution {execution_id} is being cancelled")
        if op == "pause":
            if execution.paused:
                raise CommandError("conflict", f"execution {execution_id} is already paused")
            execution.pause()
            return {"executionId": execution_id, "status": RunStatus.PAUSED.value}
        if not execution.paused:
            raise CommandError("conflict", f"execution {execution_id} is not paused")
        execution.resume()
        return {"executionId": execution_id, "status": RunStatus.RUNNING.value}

    def _unused(self, execution_id: str) -> None:
        if self._engine.get(execution_id) is not None or self._engine.finished.previous(execution_id) is not None:
            raise CommandError("conflict", f"execution {execution_id} already exists on this engine")


def _same_workflow(frame: dict[str, Any], previous: ExecutionResult) -> None:
    """The stack names the workflow (and version) it will file the new run under: one that is not
    the run's would run one workflow's checkpoints under another's name."""
    workflow_id, version = frame.get("workflowId"), frame.get("version")
    workflow = previous.workflow
    if workflow_id not in (None, workflow.id) or version not in (None, "", workflow.version):
        raise CommandError(
            "conflict",
            f"execution {previous.execution_id} is a run of workflow {workflow.id} version {workflow.version}, "
            f"not of {workflow_id} version {version}",
        )


def _result(
    command_id: Any, *, fields: dict[str, Any] | None = None, error: CommandError | None = None
) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "result", "commandId": command_id, "ok": error is None}
    frame.update(fields or {})
    if error is not None:
        frame["error"] = str(error)
        frame["code"] = error.code
    return frame


def execution_frame(execution: Execution) -> dict[str, Any]:
    return {
        "executionId": execution.execution_id,
        "workflowId": execution.workflow.id,
        "version": execution.workflow.version,
        "status": (RunStatus.PAUSED if execution.paused else RunStatus.RUNNING).value,
        "seq": execution.seq,
    }


def workflow_frame(workflow: Workflow) -> dict[str, Any]:
    return {
        "workflowId": workflow.id,
        "version": workflow.version,
        "name": workflow.name,
        "nodes": [
            {
                "id": n.id,
                "type": n.type,
                "label": n.display_label,
                "dependsOn": list(n.depends_on),
                "sideEffect": n.side_effect,
                "compensable": n.compensable,
            }
            for n in workflow.nodes
        ],
    }
