"""The engine's end of the control plane (docs/control.md).

`ControlLink` dials the stack (`GET /control/v1/engine`, a WebSocket on the bridge's HTTP
port: an engine never listens), says `hello` with the workflows it serves and the runs it
has, heartbeats those runs, reports each run's end (`finished`) and answers the stack's
commands (`result`), reconnecting with jittered backoff for as long as the engine is open.
`Commands` applies a command to the engine once: a repeated command id — the stack
resends what it has not seen answered after a reconnect — gets the stored answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import socket
import uuid
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from flowscope.engine.catalog import UnknownNode, retry_plan
from flowscope.engine.dag import Workflow
from flowscope.engine.results import ExecutionResult, Result

if TYPE_CHECKING:
    from flowscope.engine.scheduler import Engine, Execution

__all__ = ["CommandError", "Commands", "ControlLink", "control_url"]

logger = logging.getLogger(__name__)

CONTROL_PATH = "/control/v1/engine"
_MAX_COMMANDS = 10_000
# Run ends told while the link is down wait for the next connection; past this, the oldest go.
_MAX_OUTBOX = 10_000
_DEFAULT_HEARTBEAT_S = 2.0
_BACKOFF_BASE_S = 0.1
_BACKOFF_CAP_S = 5.0
# A refused token does not fix itself within seconds: retry slowly, without flooding the log.
_AUTH_RETRY_S = 30.0
_FLUSH_ON_CLOSE_S = 1.0
_AUTH_REFUSALS = {
    4401: "the stack refused the engine's token (4401: bad or missing token; set FLOWSCOPE_TOKEN)",
    4403: "the engine's token lacks the 'engine' grant (4403)",
}


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

    def handle(self, frame: dict[str, Any]) -> dict[str, Any]:
        """The `result` frame answering a `command` frame."""
        command_id = frame.get("commandId")
        if not isinstance(command_id, str) or not command_id:
            return _result(command_id, error=CommandError("bad_request", "a command needs a commandId"))
        stored = self._answers.get(command_id)
        if stored is not None:
            self._answers.move_to_end(command_id)
            return stored
        try:
            answer = _result(command_id, fields=self.apply(frame))
        except CommandError as exc:
            answer = _result(command_id, error=exc)
        except Exception as exc:
            logger.exception("control command %s failed", command_id)
            answer = _result(command_id, error=CommandError("unavailable", f"the engine failed to apply it: {exc}"))
        self._answers[command_id] = answer
        while len(self._answers) > self._capacity:
            self._answers.popitem(last=False)
        return answer

    def apply(self, frame: dict[str, Any]) -> dict[str, Any]:
        op = frame.get("op")
        execution_id = frame.get("executionId")
        if not isinstance(execution_id, str) or not execution_id:
            raise CommandError("bad_request", "a command needs an executionId")
        if op == "start":
            return self._start(frame, execution_id)
        if op == "retry":
            return self._retry(frame, execution_id)
        if op in ("pause", "resume", "stop"):
            execution = self._running(execution_id)
            return self._steer(op, execution)
        raise CommandError("bad_request", f"unknown op {op!r} (start, pause, resume, stop, retry)")

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

    def _retry(self, frame: dict[str, Any], execution_id: str) -> dict[str, Any]:
        new_id, from_node = frame.get("newExecutionId"), frame.get("fromNode")
        if not isinstance(new_id, str) or not new_id:
            raise CommandError("bad_request", "retry needs a newExecutionId")
        if from_node is not None and not isinstance(from_node, str):
            raise CommandError("bad_request", "fromNode must be a node id")
        if self._engine.get(execution_id) is not None:
            raise CommandError("conflict", f"execution {execution_id} is still running; stop it first")
        previous = self._engine.retry_source.previous(execution_id)
        if previous is None:
            raise CommandError("conflict", f"this engine holds no ended execution {execution_id} to retry")
        self._unused(new_id)
        try:
            start, _ = retry_plan(previous, from_node)
        except UnknownNode as exc:
            raise CommandError("bad_request", str(exc)) from exc
        self._engine.retry(previous, start, new_id, user_id=frame.get("userId") or None)
        return {"executionId": new_id, "retryOf": execution_id, "fromNode": start}

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
            return {"executionId": execution_id, "status": "paused"}
        if not execution.paused:
            raise CommandError("conflict", f"execution {execution_id} is not paused")
        execution.resume()
        return {"executionId": execution_id, "status": "running"}

    def _unused(self, execution_id: str) -> None:
        if self._engine.get(execution_id) is not None or self._engine.finished.previous(execution_id) is not None:
            raise CommandError("conflict", f"execution {execution_id} already exists on this engine")


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
        "status": "paused" if execution.paused else "running",
        "seq": execution.seq,
    }


def workflow_frame(workflow: Workflow) -> dict[str, Any]:
    return {
        "workflowId": workflow.id,
        "version": workflow.version,
        "name": workflow.name,
        "nodes": [
            {"id": n.id, "type": n.type, "label": n.display_label, "dependsOn": list(n.depends_on)}
            for n in workflow.nodes
        ],
    }


class _AuthRefused(Exception):
    pass


class ControlLink:
    """One engine's WebSocket to the stack, kept up until `aclose()` (see the module docstring)."""

    def __init__(
        self,
        engine: Engine,
        stack: str,
        token: str | None = None,
        *,
        name: str | None = None,
        backoff_cap_s: float = _BACKOFF_CAP_S,
        auth_retry_s: float = _AUTH_RETRY_S,
    ) -> None:
        self.engine = engine
        self.url = control_url(stack)
        self._token = token if token is not None else os.environ.get("FLOWSCOPE_TOKEN")
        # The stack knows the engine again by this id when it reconnects.
        self.engine_id = uuid.uuid4().hex
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.commands = Commands(engine)
        self._backoff_cap_s = backoff_cap_s
        self._auth_retry_s = auth_retry_s
        self._outbox: deque[dict[str, Any]] = deque(maxlen=_MAX_OUTBOX)
        self._ws: ClientConnection | None = None
        self._flushing: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None
        # Set while a connection is up and the stack has welcomed this engine.
        self.connected = asyncio.Event()
        self.connections = 0

    def start(self) -> None:
        if self._task is None or self._task.done():
            self.engine.add_finish_listener(self._run_ended)
            self._task = asyncio.create_task(self._run(), name="flowscope-control-link")

    async def aclose(self) -> None:
        """Tell the stack what ended (briefly, if it is connected), then close the link."""
        self.engine.remove_finish_listener(self._run_ended)
        self._kick()
        if self._flushing is not None and not self._flushing.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._flushing), _FLUSH_ON_CLOSE_S)
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._flushing is not None:
            self._flushing.cancel()
            await asyncio.gather(self._flushing, return_exceptions=True)

    # -- the connection --------------------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                await self._session()
                failures = 0
                delay = self._backoff(0)
                logger.warning("control link to %s closed; reconnecting", self.url)
            except _AuthRefused as exc:
                logger.error("control link to %s: %s; retrying in %.0f s", self.url, exc, self._auth_retry_s)
                delay = self._auth_retry_s
            except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as exc:
                log = logger.warning if failures == 0 else logger.debug
                log("control link to %s is down (%s); reconnecting", self.url, exc or type(exc).__name__)
                delay = self._backoff(failures)
                failures += 1
            except Exception:
                logger.exception("control link to %s failed; reconnecting", self.url)
                delay = self._backoff_cap_s
            finally:
                self._ws = None
                self.connected.clear()
            await asyncio.sleep(delay)

    def _backoff(self, failures: int) -> float:
        return min(self._backoff_cap_s, _BACKOFF_BASE_S * 2.0**failures) * random.uniform(0.5, 1.0)

    async def _session(self) -> None:
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        try:
            async with connect(self.url, additional_headers=headers, open_timeout=10) as ws:
                await self._serve(ws)
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                raise _AuthRefused(_AUTH_REFUSALS[4000 + status]) from exc
            raise
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else None
            if code in _AUTH_REFUSALS:
                raise _AuthRefused(_AUTH_REFUSALS[code]) from exc
            raise

    async def _serve(self, ws: ClientConnection) -> None:
        await self._send(ws, self._hello())
        heartbeat: asyncio.Task[None] | None = None
        try:
            async for message in ws:
                frame = _parse(message)
                if frame is None:
                    continue
                kind = frame.get("type")
                if kind == "welcome":
                    heartbeat = self._welcomed(ws, frame, heartbeat)
                elif kind == "command":
                    await self._send(ws, self.commands.handle(frame))
                elif kind == "lost":
                    self._lost(frame)
                else:
                    logger.warning("control link: ignoring a %r frame from the stack", kind)
            # The stack closed the connection: say why when it refused this engine.
            code = ws.close_code
            if code in _AUTH_REFUSALS:
                raise _AuthRefused(_AUTH_REFUSALS[code])
        finally:
            if heartbeat is not None:
                heartbeat.cancel()
                await asyncio.gather(heartbeat, return_exceptions=True)

    def _welcomed(
        self, ws: ClientConnection, frame: dict[str, Any], heartbeat: asyncio.Task[None] | None
    ) -> asyncio.Task[None]:
        interval = frame.get("heartbeatIntervalS")
        interval_s = float(interval) if isinstance(interval, int | float) and interval > 0 else _DEFAULT_HEARTBEAT_S
        if heartbeat is not None:
            heartbeat.cancel()
        self._ws = ws
        self.connections += 1
        self.connected.set()
        logger.info("control link: connected to %s as %s (%s)", self.url, self.name, self.engine_id)
        self._kick()
        return asyncio.create_task(self._heartbeat(ws, interval_s))

    async def _heartbeat(self, ws: ClientConnection, interval_s: float) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await asyncio.sleep(interval_s)
                await self._send(ws, {"type": "heartbeat", "executions": self._executions()})

    def _lost(self, frame: dict[str, Any]) -> None:
        execution_id, seq = frame.get("executionId"), frame.get("seq")
        if not isinstance(execution_id, str) or not isinstance(seq, int) or isinstance(seq, bool):
            logger.warning("control link: malformed lost frame %r", frame)
            return
        execution = self.engine.get(execution_id)
        if execution is None or not execution.recovered(seq):
            # Ended: its `finished` (queued or sent) tells the stack.
            logger.info("control link: execution %s declared lost has already ended", execution_id)

    # -- frames ----------------------------------------------------------------------------

    def _hello(self) -> dict[str, Any]:
        return {
            "type": "hello",
            "engineId": self.engine_id,
            "name": self.name,
            "workflows": [workflow_frame(wf) for wf in self.engine.served],
            "executions": self._executions(),
        }

    def _executions(self) -> list[dict[str, Any]]:
        return [execution_frame(e) for e in self.engine.executions if not e.finished]

    def _run_ended(self, execution_id: str, workflow: Workflow, result: ExecutionResult | None) -> None:
        outcome = result.result.value if result is not None else Result.ERROR.value
        frame = {"type": "finished", "executionId": execution_id, "workflowId": workflow.id, "result": outcome}
        if result is not None and result.error:
            frame["error"] = result.error
        self._outbox.append(frame)
        self._kick()

    def _kick(self) -> None:
        if self._ws is not None and self._outbox and (self._flushing is None or self._flushing.done()):
            self._flushing = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        # In order, each dropped only once sent: what a broken connection did not take goes next time.
        while self._outbox and self._ws is not None:
            try:
                await self._send(self._ws, self._outbox[0])
            except ConnectionClosed:
                return
            if self._outbox:
                self._outbox.popleft()

    @staticmethod
    async def _send(ws: ClientConnection, frame: dict[str, Any]) -> None:
        await ws.send(json.dumps(frame, separators=(",", ":"), default=str))


def _parse(message: str | bytes) -> dict[str, Any] | None:
    try:
        frame = json.loads(message)
    except ValueError:
        logger.warning("control link: the stack sent a frame that is not JSON")
        return None
    if not isinstance(frame, dict):
        logger.warning("control link: the stack sent a frame that is not an object")
        return None
    return frame
