"""The HTTP/WebSocket listener: what its accepted connections are set up with."""

from __future__ import annotations

import asyncio
import socket

from flowscope.collector.serving import listening_socket


async def test_accepted_connections_send_small_writes_at_once() -> None:
    """TCP_NODELAY on every accepted connection: with Nagle on, a response written in two
    parts (uvicorn writes headers, then body) waits for the client's delayed ACK."""
    loop = asyncio.get_running_loop()
    nodelay: asyncio.Future[int] = loop.create_future()

    class Probe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            accepted: socket.socket = transport.get_extra_info("socket")
            nodelay.set_result(accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    sock = listening_socket("127.0.0.1", 0)
    server = await loop.create_server(Probe, sock=sock)
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
        assert await asyncio.wait_for(nodelay, 10) != 0
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
