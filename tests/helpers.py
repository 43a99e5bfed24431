"""Real servers on 127.0.0.1:0 for tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
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
