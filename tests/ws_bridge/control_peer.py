"""A scripted engine speaking docs/control.md's channel over a real WebSocket, and a bridge to
serve it: the peer the control-plane tests steer (a peer, not a mock of the bridge)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect

from flowscope.ws_bridge.app import Bridge, BridgeConfig
from flowscope.ws_bridge.auth import AuthConfig

TOKENS = {
    "engine-token": ("engine-1", frozenset({"engine", "ingest"})),
    "engine-token-2": ("engine-2", frozenset({"engine"})),
    "operator": ("operator", frozenset({"control:*"})),
    "admin": ("root", frozenset({"admin"})),
    "reader": ("reader", frozenset({"*"})),
    "steer-a": ("ana", frozenset({"control:workflow:wf-a", "workflow:wf-a"})),
    "steer-other": ("olaf", frozenset({"control:workflow:other", "*"})),
    "watch-a": ("wanda", frozenset({"workflow:wf-a"})),
}

_TIMEOUT_S = 20.0

WF_A = {
    "workflowId": "wf-a",
    "version": "1",
    "name": "A",
    "nodes": [
        {"id": "fetch", "type": "code", "label": "Fetch", "dependsOn": []},
        {"id": "store", "type": "code", "label": "Store", "dependsOn": ["fetch"]},
    ],
}
WF_B = {"workflowId": "wf-b", "version": "2", "name": "B", "nodes": [{"id": "only", "type": "code", "dependsOn": []}]}


def run(execution_id: str, workflow_id: str = "wf-a", *, seq: int = 1, status: str = "running") -> dict[str, Any]:
    return {"executionId": execution_id, "workflowId": workflow_id, "version": "1", "status": status, "seq": seq}


class ScriptedEngine:
    """One engine connection: sends what the test says, keeps what the stack sends, in order."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []

    async def send(self, frame: dict[str, Any] | str) -> None:
        await self.ws.send(frame if isinstance(frame, str) else json.dumps(frame))

    async def hello(
        self, engine_id: str = "eng-1", workflows: list[Any] | None = None, executions: list[Any] | None = None
    ) -> dict[str, Any]:
        frame: dict[str, Any] = {"type": "hello", "engineId": engine_id, "name": f"scripted {engine_id}"}
        frame |= {"workflows": [WF_A] if workflows is None else workflows, "executions": executions or []}
        await self.send(frame)
        return await self.expect("welcome")

    async def heartbeat(self, executions: list[dict[str, Any]]) -> None:
        await self.send({"type": "heartbeat", "executions": executions})

    async def next(self) -> dict[str, Any]:
        frame: dict[str, Any] = json.loads(await asyncio.wait_for(self.ws.recv(), _TIMEOUT_S))
        self.frames.append(frame)
        return frame

    async def expect(self, kind: str, predicate: Callable[[dict[str, Any]], bool] = lambda f: True) -> dict[str, Any]:
        """The next frame of this type (and predicate) not yet taken; frames of other types are kept."""
        for frame in self.frames:
            if frame.get("type") == kind and not frame.get("_taken") and predicate(frame):
                frame["_taken"] = True
                return frame
        while True:
            frame = await self.next()
            if frame.get("type") == kind and predicate(frame):
                frame["_taken"] = True
                return frame

    async def answer(self, command: dict[str, Any], ok: bool = True, **fields: Any) -> None:
        await self.send({"type": "result", "commandId": command["commandId"], "ok": ok, **fields})

    async def sync(self) -> list[dict[str, Any]]:
        """Every frame the stack sent before this point: a frame it cannot read is answered in order."""
        await self.send("{not json")
        await self.expect("error", lambda f: f["code"] == "bad_json")
        return [f for f in self.frames if f.get("type") != "error"]

    def taken(self, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("type") == kind]


def engine_url(port: int) -> str:
    return f"ws://127.0.0.1:{port}/control/v1/engine"


@contextlib.asynccontextmanager
async def scripted_engine(
    port: int, token: str | None = "engine-token", **kwargs: Any
) -> AsyncIterator[ScriptedEngine]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with connect(engine_url(port), additional_headers=headers, open_timeout=10, **kwargs) as ws:
        yield ScriptedEngine(ws)


async def answering(engine: ScriptedEngine, count: int, **fields: Any) -> list[dict[str, Any]]:
    """Answers the next `count` commands ok, each with `fields`; returns them."""
    commands = []
    for _ in range(count):
        command = await engine.expect("command")
        await engine.answer(command, **fields)
        commands.append(command)
    return commands


@contextlib.asynccontextmanager
async def control_bridge(auth: bool = True, **config: Any) -> AsyncIterator[tuple[Bridge, int, list[Any]]]:
    """A bridge on 127.0.0.1:0 with these tokens; yields it, its port, and the runs it declared lost."""
    lost: list[Any] = []
    bridge = Bridge(
        BridgeConfig(port=0, auth=AuthConfig(tokens=TOKENS if auth else None), **config), None, emit_lost=lost.append
    )
    async with bridge.running(), bridge.serve() as port:
        yield bridge, port, lost


def http(port: int, token: str | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=_TIMEOUT_S)


async def until(predicate: Callable[[], bool], timeout_s: float = _TIMEOUT_S) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110 - a bounded wait on a condition, not a guess
            await asyncio.sleep(0.01)
