"""A scripted stack for the control link's tests: the real WebSocket peer an engine dials,
on 127.0.0.1 port 0, speaking docs/control.md's stack side as the test tells it to."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

_DEADLINE_S = 20.0
Frame = dict[str, Any]


class ScriptedStack:
    """Records every frame an engine sends (with the connection it came on) and sends what
    the test scripts: a welcome after each hello, commands, lost frames, closes."""

    def __init__(self, heartbeat_s: float = 0.05) -> None:
        self.heartbeat_s = heartbeat_s
        self.url = ""
        self.frames: list[tuple[int, Frame]] = []
        self.authorizations: list[str | None] = []
        # Close codes for the next connections, each used once (e.g. 4403: no engine grant).
        self.refusals: list[int] = []
        self.connections: list[ServerConnection] = []
        self._changed = asyncio.Condition()

    async def _handler(self, ws: ServerConnection) -> None:
        self.authorizations.append(ws.request.headers.get("Authorization") if ws.request else None)
        if self.refusals:
            await ws.close(self.refusals.pop(0), "refused by the scripted stack")
            await self._notify()
            return
        index = len(self.connections)
        self.connections.append(ws)
        with contextlib.suppress(ConnectionClosed):
            async for message in ws:
                frame = json.loads(message)
                self.frames.append((index, frame))
                if frame.get("type") == "hello":
                    welcome = {"type": "welcome", "engineId": frame["engineId"], "heartbeatIntervalS": self.heartbeat_s}
                    await ws.send(json.dumps({**welcome, "lostAfterS": 10}))
                await self._notify()
        await self._notify()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, probe: Callable[[], Any], what: str) -> Any:
        """Waits until `probe()` is truthy (re-checked on every frame or connection change)."""
        deadline = time.monotonic() + _DEADLINE_S
        async with self._changed:
            while not (found := probe()):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {what}; frames: {self.frames}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), min(left, 0.2))
        return found

    def of_type(self, kind: str) -> list[Frame]:
        return [f for _, f in self.frames if f.get("type") == kind]

    def results(self, command_id: str) -> list[Frame]:
        return [f for f in self.of_type("result") if f.get("commandId") == command_id]

    def finished(self, execution_id: str) -> list[Frame]:
        return [f for f in self.of_type("finished") if f.get("executionId") == execution_id]

    async def hello(self, count: int = 1) -> Frame:
        hellos = await self.wait_for(lambda: len(self.of_type("hello")) >= count and self.of_type("hello"), "hello")
        frame: Frame = hellos[count - 1]
        return frame

    async def send(self, frame: Frame) -> None:
        await self.connections[-1].send(json.dumps(frame))

    async def command(self, op: str, command_id: str | None = None, **fields: Any) -> Frame:
        """Sends a command on the latest connection and returns its (newest) answer."""
        command_id = command_id or uuid.uuid4().hex
        before = len(self.results(command_id))
        await self.send({"type": "command", "commandId": command_id, "op": op, **fields})
        answers = await self.wait_for(lambda: len(self.results(command_id)) > before and self.results(command_id), op)
        answer: Frame = answers[-1]
        return answer

    async def ended(self, execution_id: str) -> Frame:
        found = await self.wait_for(lambda: self.finished(execution_id), f"finished {execution_id}")
        frame: Frame = found[0]
        return frame


@contextlib.asynccontextmanager
async def scripted_stack(heartbeat_s: float = 0.05) -> AsyncIterator[ScriptedStack]:
    stack = ScriptedStack(heartbeat_s)
    async with serve(stack._handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        stack.url = f"http://127.0.0.1:{port}"
        yield stack
