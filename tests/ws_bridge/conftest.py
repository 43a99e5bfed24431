from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from flowscope.config import Settings
from flowscope.stack import Stack

StackFactory = Callable[..., AbstractAsyncContextManager[Stack]]


@pytest.fixture
def stack_factory(chdb_dsn: str, database: str) -> StackFactory:
    @contextlib.asynccontextmanager
    async def make(**overrides: Any) -> AsyncIterator[Stack]:
        settings = Settings(
            clickhouse_dsn=chdb_dsn,
            database=database,
            otlp_grpc_port=0,
            otlp_http_port=0,
            http_port=0,
            flush_interval_s=0.05,
        ).with_overrides(**overrides)
        async with Stack(settings).running() as stack:
            yield stack

    return make


@pytest.fixture
async def stack(stack_factory: StackFactory) -> AsyncIterator[Stack]:
    async with stack_factory() as running:
        yield running


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
