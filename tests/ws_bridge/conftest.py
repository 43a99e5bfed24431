from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from flowscope.stack import Stack
from tests.conftest import StackFactory, stack, stack_factory


def ws_url(stack: Stack, path: str = "/ws") -> str:
    assert stack.endpoints is not None
    return f"ws://127.0.0.1:{stack.endpoints.http_port}{path}"


_RECV_TIMEOUT_S = 20.0


async def recv_json(ws: ClientConnection) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), _RECV_TIMEOUT_S))
    return message


async def recv_until(ws: ClientConnection, predicate: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """Every message up to and including the first that satisfies `predicate`."""
    seen: list[dict[str, Any]] = []
    async with asyncio.timeout(_RECV_TIMEOUT_S * 2):
        while True:
            message = await recv_json(ws)
            seen.append(message)
            if predicate(message):
                return seen


@contextlib.asynccontextmanager
async def ws_client(url: str, **kwargs: Any) -> AsyncIterator[ClientConnection]:
    async with connect(url, open_timeout=10, **kwargs) as ws:
        yield ws


__all__ = ["StackFactory", "stack", "stack_factory"]
