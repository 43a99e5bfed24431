"""Auth denial with zero leaked events; a stalled client while 200 others keep receiving."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import time
from typing import Any

import httpx
import jwt
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from flowscope.stack import Stack
from flowscope.ws_bridge.auth import AuthConfig, require_auth_on_public_bind
from flowscope.ws_bridge.types import LiveEvent
from tests.ws_bridge.conftest import StackFactory, recv_json, recv_until, ws_client, ws_url
from tests.ws_bridge.live_events import live_event

SECRET = "test-secret-of-at-least-thirty-two-bytes!"
TOKENS = {"tok-alice": ("alice", frozenset({"workflow:wa"})), "tok-admin": ("admin", frozenset({"*"}))}


def synthetic(execution_id: str, workflow_id: str, seq: int, kind: str = "execution.log", pad: int = 0) -> LiveEvent:
    return live_event(
        "workflow.started" if seq == 1 else kind,
        seq,
        execution=execution_id,
        workflow=workflow_id,
        data={"message": "x" * pad} if seq > 1 else {"totalNodes": 0, "nodes": [], "userId": None},
    )


def publish(stack: Stack, events: list[LiveEvent]) -> None:
    assert stack.bridge is not None
    stack.bridge.hub.publish(events)


async def test_auth_denies_and_leaks_nothing(stack_factory: StackFactory) -> None:
    async with stack_factory(auth_tokens=TOKENS, jwt_secret=SECRET) as stack:
        with pytest.raises(ConnectionClosed) as closed:
            async with ws_client(ws_url(stack)) as ws:
                await recv_json(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401

        headers = {"Authorization": "Bearer tok-alice"}
        async with ws_client(ws_url(stack), additional_headers=headers) as alice:
            await alice.send(json.dumps({"op": "subscribe", "id": "x", "rooms": ["all"]}))
            assert (await recv_json(alice))["code"] == "forbidden"
            await alice.send(json.dumps({"op": "subscribe", "id": "y", "rooms": ["workflow:wb"]}))
            assert (await recv_json(alice))["code"] == "forbidden"
            # Joining another workflow's execution room is allowed, but nothing of it is delivered.
            await alice.send(json.dumps({"op": "subscribe", "id": "spy", "rooms": ["execution:eb"], "fromSeq": 1}))
            await recv_until(alice, lambda m: m.get("type") == "replay.done")
            await alice.send(json.dumps({"op": "subscribe", "id": "mine", "rooms": ["workflow:wa"]}))
            await recv_until(alice, lambda m: m.get("type") == "replay.done")
            publish(stack, [synthetic("eb", "wb", s) for s in range(1, 6)] + [synthetic("ea", "wa", s) for s in (1, 2)])
            assert stack.bridge is not None
            await stack.bridge.hub.settled()  # new executions wait for their stored owner
            await alice.send('{"op": "ping"}')
            received = await recv_until(alice, lambda m: m.get("type") == "pong")
        events = [m for m in received if "executionId" in m]
        assert [(e["executionId"], e["seq"], e["sub"]) for e in events] == [("ea", 1, "mine"), ("ea", 2, "mine")]

        token = jwt.encode({"sub": "bob", "rooms": ["workflow:wb"], "exp": int(time.time()) + 60}, SECRET, "HS256")
        async with ws_client(ws_url(stack, f"/ws/executions/eb?fromSeq=1&token={token}")) as bob:
            replay = await recv_until(bob, lambda m: m.get("type") == "replay.done")
        assert [m["seq"] for m in replay if "seq" in m] == [1, 2, 3, 4, 5]

        expired = jwt.encode({"sub": "bob", "rooms": ["*"], "exp": int(time.time()) - 10}, SECRET, "HS256")
        forged = jwt.encode(
            {"sub": "eve", "rooms": ["*"], "exp": int(time.time()) + 60},
            "wrong-secret-also-thirty-two-bytes-long",
            "HS256",
        )
        assert stack.endpoints is not None
        async with httpx.AsyncClient(base_url=stack.endpoints.web) as http:
            for bad in (expired, forged, "nonsense"):
                response = await http.get("/api/v1/executions", headers={"Authorization": f"Bearer {bad}"})
                assert response.status_code == 401
            assert (await http.get("/api/v1/executions")).status_code == 401
            ok = await http.get("/api/v1/executions", headers={"Authorization": "Bearer tok-admin"})
            assert ok.status_code == 200
            sql = await http.post("/api/v1/sql", json={"sql": "SELECT 1"}, headers=headers)
            assert sql.status_code == 403


def test_public_bind_without_auth_is_refused() -> None:
    with pytest.raises(ValueError, match=r"refusing to serve live events on 0\.0\.0\.0 without authentication"):
        require_auth_on_public_bind("0.0.0.0", AuthConfig())
    require_auth_on_public_bind("0.0.0.0", AuthConfig(disabled=True))
    require_auth_on_public_bind("127.0.0.1", AuthConfig())


async def open_stalled_socket(port: int, path: str) -> socket.socket:
    """A WebSocket client that subscribes and then never reads, with a tiny receive window."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await loop.sock_sendall(sock, request.encode())
    response = b""
    while b"\r\n\r\n" not in response:
        response += await loop.sock_recv(sock, 1)
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


async def read_until_lagged(sock: socket.socket) -> bytes:
    """Everything the server sends up to the end of its `lagged` notice (or the connection's end);
    bounded by a generous timeout, since a loaded machine drains the backlog slowly."""
    loop = asyncio.get_running_loop()
    data = b""
    async with asyncio.timeout(60):
        while True:
            start = data.find(b'{"type":"lagged"')
            if start >= 0 and b"}]" in data[start:]:
                return data
            chunk = await loop.sock_recv(sock, 65536)
            if not chunk:
                return data
            data += chunk


async def test_stalled_client_gets_lagged_while_200_others_receive_everything(stack_factory: StackFactory) -> None:
    count = 300
    async with stack_factory(ws_queue_size=20) as stack:
        assert stack.endpoints is not None
        stalled = await open_stalled_socket(stack.endpoints.http_port, "/ws/executions/heavy?fromSeq=1")
        clients = []
        for _ in range(200):
            clients.append(await connect(ws_url(stack, "/ws/executions/load?fromSeq=1"), open_timeout=10))
        for ws in clients:
            await recv_until(ws, lambda m: m.get("type") == "replay.done")

        events = [synthetic("load", "wl", seq, pad=200) for seq in range(1, count + 1)]
        # 16 MB for the stalled subscriber: far beyond any socket buffer, so its queue must overflow.
        heavy = [synthetic("heavy", "wh", seq, pad=64_000) for seq in range(1, 251)]

        async def read(ws: Any, n: int) -> list[int]:
            seqs: list[int] = []
            while len(seqs) < n:
                message = await recv_json(ws)
                if "seq" in message:
                    seqs.append(message["seq"])
            return seqs

        # Lockstep: the healthy clients read each batch; the stalled one never reads anything.
        received: list[list[int]] = [[] for _ in clients]
        batch = 5
        for i in range(0, count, batch):
            publish(stack, events[i : i + batch])
            publish(stack, heavy[i // batch * 5 : i // batch * 5 + 5])
            chunks = await asyncio.gather(*(read(ws, batch) for ws in clients))
            for seqs, chunk in zip(received, chunks, strict=True):
                seqs.extend(chunk)
        for ws in clients:
            await ws.close()
        assert all(seqs == list(range(1, count + 1)) for seqs in received)
        # Now read what the stalled client was sent: it was told exactly what it missed.
        stalled_bytes = await read_until_lagged(stalled)
        stalled.close()
    assert b'"type":"lagged"' in stalled_bytes
    lagged = stalled_bytes[stalled_bytes.index(b'{"type":"lagged"') :]
    notice = json.loads(lagged[: lagged.index(b"}]") + 2] + b"}")
    missed = notice["executions"][0]
    assert missed["executionId"] == "heavy" and 1 < missed["fromSeq"] <= missed["toSeq"] == len(heavy)
