"""Serving an ASGI app with uvicorn inside the running event loop, with explicit readiness."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import uvicorn


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket for a server to accept on.

    proto=IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on sockets that say
    they are TCP, and accepted sockets inherit the listener's proto. Without it, Nagle holds a
    response's second write until the client's delayed ACK (~40 ms on Linux) — on every REST
    answer and many WebSocket frames."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    return sock


@contextlib.asynccontextmanager
async def serve_asgi(app: Any, host: str = "127.0.0.1", port: int = 0, **options: Any) -> AsyncIterator[int]:
    """Serve `app` until the block exits; yields the bound port (useful with port 0)."""
    sock = listening_socket(host, port)
    bound = sock.getsockname()[1]
    options.setdefault("log_level", "warning")
    config = uvicorn.Config(app, lifespan="off", **options)
    server = uvicorn.Server(config)
    # The socket is bound before serving starts, so the port is known and
    # reserved without polling; uvicorn starts accepting on it below.
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
                raise OSError(f"server on {host}:{bound} stopped during start-up")
            await asyncio.sleep(0.005)
        yield bound
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sock.close()
