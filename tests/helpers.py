"""Real servers on 127.0.0.1:0 for tests."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from flowscope.collector.serving import serve_asgi as _serve


@contextlib.asynccontextmanager
async def serve_asgi(app: Any) -> AsyncIterator[str]:
    """Serve `app` on an ephemeral port; yields its base URL."""
    async with _serve(app, "127.0.0.1", 0) as port:
        yield f"http://127.0.0.1:{port}"


class Gate:
    """A node function that blocks until released, so a test can act mid-run."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, ctx: object) -> str:
        self.entered.set()
        await self.release.wait()
        return "released"


_DEADLINE_S = 60.0


async def eventually(probe: Callable[[], Awaitable[Any]], what: str) -> Any:
    """Polls `probe` until it returns something truthy; fails naming `what` past the deadline."""
    deadline = time.monotonic() + _DEADLINE_S
    while time.monotonic() < deadline:
        found = await probe()
        if found:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
