"""The engine's connection to the stack's control plane (docs/control.md).

`ControlLink` dials the stack (`GET /control/v1/engine`, a WebSocket on the bridge's HTTP
port: an engine never listens), says `hello` with the workflows it serves and the runs it
has, heartbeats those runs, reports each run's end (`finished`) and answers the stack's
commands (`result`, applied by engine/control.py's `Commands`), reconnecting with jittered
backoff for as long as the engine is open.
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
from collections import deque
from typing import TYPE_CHECKING, Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from flowscope.contract.states import RunStatus
from flowscope.engine.catalog import DEFAULT_FINISHED_RUNS
from flowscope.engine.control import Commands, control_url, execution_frame, workflow_frame
from flowscope.engine.dag import Workflow
from flowscope.engine.results import ExecutionResult, Result

if TYPE_CHECKING:
    from flowscope.engine.scheduler import Engine

__all__ = ["ControlLink"]

logger = logging.getLogger(__name__)

# Run ends told while the link is down wait for the next connection; past this, the oldest go.
_MAX_OUTBOX = 10_000
_DEFAULT_HEARTBEAT_S = 2.0
_BACKOFF_BASE_S = 0.1
_BACKOFF_CAP_S = 5.0
# A refused token does not fix itself within seconds: retry slowly, without flooding the log.
_AUTH_RETRY_S = 30.0
_FLUSH_ON_CLOSE_S = 1.0
# Well above the stack's limit on a command frame (1 MiB encoded), so a command it sends is never
# a frame this end closes the link over.
_MAX_FRAME_BYTES = 4 << 20
# The stack's frame is named for the status it gave the run.
_LOST = RunStatus.LOST.value
_AUTH_REFUSALS = {
    4401: "the stack refused the engine's token (4401: bad or missing token; set FLOWSCOPE_TOKEN)",
    4403: "the engine's token lacks the 'engine' grant (4403)",
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
        # Retries by id need the ended runs: an engine given a link later keeps them from now on.
        engine.finished.capacity = max(engine.finished.capacity, DEFAULT_FINISHED_RUNS)
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
                welcomed = self.connections
                await self._session()
                # A stack that closes before welcoming the engine is backed off like a refusal.
                failures = 0 if self.connections > welcomed else failures + 1
                delay = self._backoff(failures)
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
            async with connect(self.url, additional_headers=headers, open_timeout=10, max_size=_MAX_FRAME_BYTES) as ws:
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
                    await self._send(ws, await self.commands.handle(frame))
                elif kind == _LOST:
                    self._lost(frame)
                elif kind == "error":
                    logger.warning("control link: the stack says %s: %s", frame.get("code"), frame.get("message"))
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
            # Ended here (its `finished`, queued or sent, tells the stack) or never ran here.
            logger.info("control link: execution %s, declared lost, is not running here", execution_id)

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
        # In order, each dropped only once sent: what a broken connection did not take goes on
        # the next one (this task carries on there if the engine reconnected meanwhile).
        while self._outbox and (ws := self._ws) is not None:
            try:
                await self._send(ws, self._outbox[0])
            except ConnectionClosed:
                if self._ws is ws:
                    return
                continue
            if self._outbox:
                self._outbox.popleft()

    @staticmethod
    async def _send(ws: ClientConnection, frame: dict[str, Any]) -> None:
        await ws.send(json.dumps(frame, separators=(",", ":"), ensure_ascii=False, default=str))


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
