"""One engine's control channel (docs/control.md, "The channel"): its frames in and out.

The engine speaks first (`hello`), then heartbeats, answers commands (`result`) and reports
ended runs (`finished`); the stack sends `welcome`, `command`, `lost` and, for a frame it cannot
take, `error` — the channel stays up. What the frames mean is the hub's (ws_bridge/control.py);
this module reads, checks and writes them. Runs on the event loop only.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from flowscope.contract import RunStatus
from flowscope.contract.rollback import SIDE_EFFECTS
from flowscope.ws_bridge.auth import Principal
from flowscope.ws_bridge.types import Message

if TYPE_CHECKING:
    from flowscope.ws_bridge.control import ControlHub

logger = logging.getLogger(__name__)

RUN_STATUSES = frozenset({RunStatus.RUNNING.value, RunStatus.PAUSED.value})
# What one engine may announce and list: its hello is kept in memory while it is connected.
MAX_WORKFLOWS = 100
MAX_NODES = 10_000
MAX_HELLO_NODES = 10_000
MAX_EXECUTIONS = 10_000
# Close codes of the channel besides the handshake's 4401/4403.
CLOSE_REPLACED = 4000
CLOSE_NO_HELLO = 4408
CLOSE_CONFLICT = 4409
CLOSE_TOO_MANY = 4429
# What the server (uvicorn) closes every WebSocket with as it shuts down.
SERVER_STOPPING = 1012


# Why the hub refused an engine's hello: the error frame's code, its message and the close code.
Refusal = tuple[str, str, int]


class FrameError(ValueError):
    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


@dataclass(frozen=True)
class RunInfo:
    """An execution as its engine's last heartbeat described it."""

    workflow_id: str
    version: str
    status: str
    seq: int

    def with_status(self, status: str) -> RunInfo:
        return replace(self, status=status)


@dataclass(eq=False)
class Pending:
    """A command not yet answered, held with the engine it is for."""

    command_id: str
    engine_id: str
    frame: Message
    future: asyncio.Future[Message | None]
    delivered: bool = False
    waiters: int = 0

    def answer(self, result: Message) -> None:
        if not self.future.done():
            self.future.set_result(result)

    def abandon(self) -> None:
        if not self.future.done():
            self.future.set_result(None)


Outbox = asyncio.Queue[tuple[Message | None, Pending | None]]


@dataclass(eq=False)
class EngineSession:
    engine_id: str
    name: str
    subject: str
    workflows: list[dict[str, Any]]
    executions: dict[str, RunInfo]
    outbox: Outbox
    connected_at: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)
    last_heartbeat_ns: int = field(default_factory=time.time_ns)
    closed_at: float | None = None
    # Executions declared lost since the engine last listed them.
    declared: set[str] = field(default_factory=set)
    replaced: str = ""
    # The id the engine said hello with; engine_id is the stack's name for it (ControlHub.attach).
    announced_id: str = ""

    def __post_init__(self) -> None:
        self.announced_id = self.announced_id or self.engine_id

    def send(self, frame: Message, pending: Pending | None = None) -> None:
        self.outbox.put_nowait((frame, pending))

    def replace(self, reason: str) -> None:
        self.replaced = reason
        self.outbox.put_nowait((None, None))

    def seen(self) -> None:
        self.last_seen = time.monotonic()
        self.last_heartbeat_ns = time.time_ns()

    def serves(self, workflow_id: str, version: str | None) -> bool:
        return any(w["workflowId"] == workflow_id and version in (None, w["version"]) for w in self.workflows)

    def version_of(self, workflow_id: str) -> str:
        return str(next(w["version"] for w in self.workflows if w["workflowId"] == workflow_id))

    def has_node(self, workflow_id: str, version: str, node_id: str) -> bool:
        """Whether the announced graph has the node; a graph not announced is the engine's to judge."""
        graphs = [w for w in self.workflows if w["workflowId"] == workflow_id and version in ("", w["version"])]
        return not graphs or any(n["id"] == node_id for w in graphs for n in w["nodes"])

    def describe(self, visible: Callable[..., bool]) -> dict[str, Any]:
        return {
            "engineId": self.engine_id,
            "name": self.name,
            "connectedAt": _iso(self.connected_at),
            "lastHeartbeat": _iso(self.last_heartbeat_ns / 1e9),
            "workflows": [w for w in self.workflows if visible(w["workflowId"])],
            "executions": [
                {"executionId": e, "workflowId": r.workflow_id, "version": r.version, "status": r.status, "seq": r.seq}
                for e, r in self.executions.items()
                if visible(r.workflow_id, e)
            ],
        }


class EngineChannel:
    """Reads one engine's frames until it goes; the hub decides what they mean."""

    def __init__(self, hub: ControlHub, websocket: WebSocket, principal: Principal) -> None:
        self.hub = hub
        self.ws = websocket
        self.principal = principal
        self.outbox: Outbox = asyncio.Queue()
        self.session: EngineSession | None = None
        # How the sender closes the socket when it meets the end of the outbox.
        self._close: tuple[int, str] = (CLOSE_CONFLICT, "engine id in use by another token subject")
        # The server closed the channel as it stops (1012): the engine did not go away.
        self.stack_stopping = False

    async def run(self) -> None:
        sender = asyncio.create_task(self._sender())
        loop = asyncio.get_running_loop()
        deadline = loop.call_later(self.hub.hello_timeout_s, self._no_hello)
        expires_at = self.principal.expires_at
        expiry = (
            loop.call_later(max(0.0, expires_at - time.time()), self.close, 4401, "the token has expired")
            if expires_at is not None
            else None
        )
        try:
            while not sender.done():
                frame = await self._receive()
                if frame is None:
                    return
                try:
                    self._take(frame)
                except FrameError as exc:
                    self._error(exc.code, str(exc))
        finally:
            deadline.cancel()
            if expiry is not None:
                expiry.cancel()
            if self.session is not None:
                self.hub.detach(self.session, stack_stopping=self.stack_stopping)
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)

    async def _receive(self) -> dict[str, Any] | None:
        """The next JSON object from the engine (errors answered on the way); None once it is gone."""
        while True:
            try:
                message = await self.ws.receive()
            except (WebSocketDisconnect, RuntimeError):
                return None
            if message["type"] == "websocket.disconnect":
                self.stack_stopping = message.get("code") == SERVER_STOPPING
                return None
            text = message.get("text")
            if text is None:
                self._error("bad_frame", "binary frames are not supported; send JSON text")
                continue
            if len(text.encode()) > self.hub.max_frame_bytes:
                self._error("frame_too_large", f"frames are limited to {self.hub.max_frame_bytes} bytes")
                continue
            try:
                frame = json.loads(text)
            except (ValueError, RecursionError) as exc:
                self._error("bad_json", f"malformed JSON: {str(exc)[:200] or 'nested too deeply'}")
                continue
            if not isinstance(frame, dict):
                self._error("bad_request", "a frame must be a JSON object with a 'type'")
                continue
            return frame

    def _take(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        session = self.session
        if kind == "hello":
            if session is not None:
                raise FrameError("bad_request", "hello was already sent on this connection")
            self._hello(frame)
            return
        if session is None:
            raise FrameError("hello_first", f"the first frame must be hello, not {str(kind)[:64]!r}")
        session.last_seen = time.monotonic()
        if kind == "heartbeat":
            self.hub.heartbeat(session, _executions(frame.get("executions")))
        elif kind == "result":
            if not isinstance(frame.get("commandId"), str) or not isinstance(frame.get("ok"), bool):
                raise FrameError("bad_request", "a result needs 'commandId' (a string) and 'ok' (a boolean)")
            self.hub.result(session, frame)
        elif kind == "finished":
            execution_id = _text(frame.get("executionId"), "executionId")
            workflow_id = _text(frame.get("workflowId"), "workflowId")
            result = frame.get("result")
            self.hub.finished(session, execution_id, workflow_id, result if isinstance(result, str) else "")
        else:
            raise FrameError("unknown_type", f"unknown frame {str(kind)[:64]!r}: use heartbeat, result or finished")

    def _no_hello(self) -> None:
        if self.session is None:
            self.close(CLOSE_NO_HELLO, f"no hello within {self.hub.hello_timeout_s:g} s")

    def close(self, code: int, reason: str) -> None:
        self._close = (code, reason[:120])
        self.outbox.put_nowait((None, None))

    def _hello(self, frame: dict[str, Any]) -> None:
        engine_id = _text(frame.get("engineId"), "engineId")
        session = EngineSession(
            engine_id=engine_id,
            name=_text(frame.get("name", engine_id), "name"),
            subject=self.principal.subject,
            workflows=_workflows(frame.get("workflows")),
            executions=_executions(frame.get("executions", [])),
            outbox=self.outbox,
        )
        refusal = self.hub.attach(session)
        if refusal is not None:
            code, message, close_code = refusal
            self._error(code, message)
            self.close(close_code, message)
            return
        self.session = session

    async def _sender(self) -> None:
        while True:
            frame, pending = await self.outbox.get()
            if frame is None:
                session = self.session
                if session is not None and session.replaced:
                    await close_quietly(self.ws, CLOSE_REPLACED, session.replaced[:120])
                else:
                    await close_quietly(self.ws, *self._close)
                return
            try:
                await self.ws.send_text(encode(frame))
            except Exception:
                # The engine is gone; the receive loop sees it and detaches the session.
                return
            if pending is not None:
                pending.delivered = True

    def _error(self, code: str, message: str) -> None:
        self.outbox.put_nowait(({"type": "error", "code": code, "message": message}, None))


def encode(frame: Message) -> str:
    """A frame as sent to an engine: non-ASCII as is (escaped, one emoji is 12 bytes)."""
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False, default=str)


def _text(value: Any, name: str, limit: int = 200) -> str:
    if not isinstance(value, str) or not value or len(value) > limit or not value.isprintable():
        raise FrameError("bad_request", f"'{name}' must be a non-empty printable string of at most {limit} characters")
    return value


def _version(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    return _text(value, "version", 64)


def _list(value: Any, name: str, limit: int) -> list[Any]:
    if not isinstance(value, list) or len(value) > limit:
        raise FrameError("bad_request", f"'{name}' must be a list of at most {limit} items")
    return value


def _workflows(value: Any) -> list[dict[str, Any]]:
    workflows = []
    items = _list(value if value is not None else [], "workflows", MAX_WORKFLOWS)
    nodes = sum(len(item["nodes"]) for item in items if isinstance(item, dict) and isinstance(item.get("nodes"), list))
    if nodes > MAX_HELLO_NODES:
        raise FrameError("bad_request", f"a hello announces at most {MAX_HELLO_NODES} nodes in all, not {nodes}")
    for item in items:
        if not isinstance(item, dict):
            raise FrameError("bad_request", "each of 'workflows' must be an object")
        name = item.get("name")
        workflows.append(
            {
                "workflowId": _text(item.get("workflowId"), "workflowId"),
                "version": _version(item.get("version", "1")),
                "name": name[:200] if isinstance(name, str) else "",
                "nodes": [_node(n) for n in _list(item.get("nodes", []), "nodes", MAX_NODES)],
            }
        )
    return workflows


def _node(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise FrameError("bad_request", "each node must be an object with an 'id'")
    depends = _list(value.get("dependsOn", []), "dependsOn", MAX_NODES)
    node_type, label = value.get("type"), value.get("label")
    side_effect = value.get("sideEffect")
    return {
        "id": _text(value.get("id"), "node id"),
        "type": node_type[:200] if isinstance(node_type, str) else "",
        "label": label[:200] if isinstance(label, str) else "",
        "dependsOn": [_text(d, "dependsOn") for d in depends],
        # What a rollback may undo (docs/durability.md, "Rollback"); an older engine says nothing.
        "sideEffect": side_effect if side_effect in SIDE_EFFECTS else "none",
        "compensable": value.get("compensable") is True,
    }


def _executions(value: Any) -> dict[str, RunInfo]:
    executions = {}
    for item in _list(value, "executions", MAX_EXECUTIONS):
        if not isinstance(item, dict):
            raise FrameError("bad_request", "each of 'executions' must be an object")
        status = item.get("status", RunStatus.RUNNING.value)
        seq = item.get("seq", 0)
        if status not in RUN_STATUSES:
            raise FrameError("bad_request", f"an execution's 'status' is running or paused, not {str(status)[:64]!r}")
        if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq <= 2**62:
            raise FrameError("bad_request", "an execution's 'seq' must be an integer from 0 to 2^62")
        run = RunInfo(_text(item.get("workflowId"), "workflowId"), _version(item.get("version", "1")), status, seq)
        executions[_text(item.get("executionId"), "executionId")] = run
    return executions


async def close_quietly(websocket: WebSocket, code: int, reason: str) -> None:
    with contextlib.suppress(Exception):
        await websocket.close(code, reason)


def _iso(unix_s: float) -> str:
    return dt.datetime.fromtimestamp(unix_s, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
