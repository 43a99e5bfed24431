"""A command as callers send it (REST body, WebSocket op) and its answer (docs/control.md, "Commands").

parse_command reads and checks what a caller asked for; ControlOutcome is what the caller gets
back, an HTTP status and a JSON body, which the WebSocket turns into a `control.result`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from flowscope.contract import RunStatus
from flowscope.ws_bridge.types import Message

OPS = ("start", "pause", "resume", "stop", "retry", "rollback")
_STATUS_OF_CODE = {
    "bad_request": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "conflict": 409,
    "too_large": 413,
    "engine_error": 502,
    "unavailable": 503,
}
_CODE_OF_STATUS = {v: k for k, v in _STATUS_OF_CODE.items()}
AFTER = {"pause": RunStatus.PAUSED.value, "resume": RunStatus.RUNNING.value, "stop": "cancelling"}


@dataclass(frozen=True)
class CommandRequest:
    """One command as a caller asked for it, validated (parse_command)."""

    op: str
    execution_id: str | None = None
    workflow_id: str | None = None
    version: str | None = None
    input: Any = None
    trigger: str | None = None
    user_id: str | None = None
    from_node: str | None = None
    idempotency_key: str | None = None
    # rollback (ws_bridge/control_rollback.py); after_seq: the run's last stored seq, the stack's own
    to_node: str | None = None
    force: bool = False
    resume: bool = False
    after_seq: int = 0


class BadCommand(ValueError):
    """A command the stack cannot read: answered 400 / `bad_request`."""


def _non_finite(text: str) -> float:
    raise ValueError(f"{text} is not a JSON number: non-finite numbers (NaN, Infinity, 1e999) are refused")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        _non_finite(text[:40])
    return value


def loads(text: str | bytes | bytearray) -> Any:
    """JSON as the standard allows it: Python's NaN, Infinity and overflowing numbers are refused,
    as no engine or reader could take them back."""
    return json.loads(text, parse_constant=_non_finite, parse_float=_finite)


def parse_command(op: str, body: Any, idempotency_key: str | None = None) -> CommandRequest:
    """The command in a REST body or a WebSocket op's fields; BadCommand says what is wrong."""
    if not isinstance(body, dict):
        raise BadCommand(f"the {op} command's body must be a JSON object")

    def text(name: str, required: bool = False, limit: int = 200) -> str | None:
        value = body.get(name)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value or len(value) > limit or not value.isprintable():
            raise BadCommand(f"'{name}' must be a non-empty string of at most {limit} printable characters")
        return value

    if idempotency_key is not None and (
        not idempotency_key or len(idempotency_key) > 200 or not idempotency_key.isascii()
    ):
        raise BadCommand("'Idempotency-Key' must be 1-200 ASCII characters")
    if op == "start":
        version = body.get("version")
        return CommandRequest(
            op,
            workflow_id=text("workflowId", required=True),
            version=str(version) if isinstance(version, int) and not isinstance(version, bool) else text("version"),
            input=body.get("input"),
            trigger=text("trigger", limit=64),
            user_id=text("userId"),
            idempotency_key=idempotency_key,
        )
    if op == "rollback":
        flags = {name: body.get(name, False) for name in ("force", "resume")}
        if not all(isinstance(flag, bool) for flag in flags.values()):
            raise BadCommand("'force' and 'resume' must be true or false")
        execution_id, to_node = text("executionId", required=True), text("toNode", required=True)
        return CommandRequest(op, execution_id=execution_id, to_node=to_node, idempotency_key=idempotency_key, **flags)
    from_node = text("fromNode") if op == "retry" else None
    return CommandRequest(
        op, execution_id=text("executionId", required=True), from_node=from_node, idempotency_key=idempotency_key
    )


@dataclass(frozen=True)
class ControlOutcome:
    """The answer to a command: an HTTP status and its JSON body ({error, code} when it failed)."""

    status: int
    body: dict[str, Any]

    @property
    def ok(self) -> bool:
        return self.status < 400

    @property
    def code(self) -> str | None:
        return None if self.ok else _CODE_OF_STATUS.get(self.status, "conflict")

    @property
    def error(self) -> str | None:
        return None if self.ok else str(self.body.get("error", ""))


def failure(status: int, message: str) -> ControlOutcome:
    return ControlOutcome(status, {"error": message, "code": _CODE_OF_STATUS.get(status, "conflict")})


def outcome_of(command: Message, answer: Message, engine_id: str) -> ControlOutcome:
    op = command["op"]
    if answer.get("ok") is not True:
        code = answer.get("code")
        status = _STATUS_OF_CODE.get(code, 409) if isinstance(code, str) else 409
        error = answer.get("error")
        return failure(status, str(error)[:1000] if error else f"the engine refused to {op} the run")
    execution_id = answer.get("executionId")
    if op == "start":
        return ControlOutcome(201, {"executionId": execution_id or command["executionId"], "engineId": engine_id})
    if op == "resume" and "newExecutionId" in command:
        body = {"executionId": execution_id or command["newExecutionId"], "resumedFrom": command["executionId"]}
        return ControlOutcome(201, body)
    if op == "rollback":
        # Checked and started: the run's events say how the compensations go (docs/durability.md).
        return ControlOutcome(202, {k: v for k, v in answer.items() if k not in ("type", "commandId", "ok")})
    if op == "retry":
        body = {
            "executionId": execution_id or command["newExecutionId"],
            "retryOf": command["executionId"],
            "fromNode": answer.get("fromNode", command.get("fromNode")),
        }
        return ControlOutcome(201, body)
    return ControlOutcome(200, {"executionId": command["executionId"], "status": AFTER[op]})
