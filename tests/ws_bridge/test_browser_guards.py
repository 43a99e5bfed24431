"""What a web page, or any client, can make the bridge do: JSON bodies only, WebSocket
handshakes from allowed origins, Host names the server serves, and bad input answered with
a 400 or an error frame — never a 500 or a dropped connection."""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus

from flowscope.config import Settings
from flowscope.stack import Stack
from flowscope.ws_bridge.app import trusted_hosts
from tests.ws_bridge.conftest import StackFactory, recv_until, ws_client, ws_url


def web(stack: Stack) -> str:
    assert stack.endpoints is not None
    return stack.endpoints.web


async def test_json_endpoints_refuse_other_content_types(stack: Stack) -> None:
    body = json.dumps({"sql": "SELECT 1 AS one"})
    async with httpx.AsyncClient(base_url=web(stack)) as http:
        # What a page can send without a CORS preflight: text/plain, a form type, or no type at all.
        for headers in ({"content-type": "text/plain;charset=UTF-8"}, {"content-type": "multipart/form-data"}, {}):
            response = await http.post("/api/v1/sql", content=body, headers=headers)
            assert response.status_code == 415, headers
            assert "Content-Type: application/json" in response.json()["error"]
        ok = await http.post("/api/v1/sql", content=body, headers={"content-type": "application/json; charset=utf-8"})
    assert ok.json()["rows"] == [[1]]


async def test_websocket_handshakes_check_the_origin(stack_factory: StackFactory) -> None:
    async with stack_factory(cors_origins=("https://ops.example",)) as stack:
        same_origin = web(stack)
        for origin in (same_origin, "https://ops.example", None):
            async with ws_client(ws_url(stack), origin=origin) as ws:
                await ws.send(json.dumps({"op": "ping"}))
                assert (await recv_until(ws, lambda m: m["type"] == "pong"))[-1]["type"] == "pong"
        # Behind a TLS proxy the page is https://host while the bridge sees ws://host: same host, same origin.
        async with ws_client(ws_url(stack), origin=same_origin.replace("http://", "https://")):
            pass
        for origin in ("https://evil.example", "http://ops.example", same_origin + ".evil.example", "null"):
            with pytest.raises(InvalidStatus) as refused:
                async with ws_client(ws_url(stack, "/ws/executions/x"), origin=origin):
                    pass
            assert refused.value.response.status_code == 403, origin


def upgrade_headers(host: str) -> dict[str, str]:
    key = base64.b64encode(os.urandom(16)).decode()
    return {"host": host, "connection": "Upgrade", "upgrade": "websocket", "sec-websocket-version": "13",
            "sec-websocket-key": key}  # fmt: skip


async def test_the_server_answers_only_its_host_names(stack_factory: StackFactory) -> None:
    async with stack_factory(allowed_hosts=("flowscope.internal",)) as stack:
        port = web(stack).rsplit(":", 1)[1]
        async with httpx.AsyncClient(base_url=web(stack)) as http:
            for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "flowscope.internal", "LOCALHOST"):
                assert (await http.get("/healthz", headers={"host": host})).status_code == 200, host
            # A rebinding page's own name, resolving to 127.0.0.1, reaches the server with that name as Host.
            for host in (f"evil.example:{port}", "127.0.0.1.evil.example", "flowscope.internal.evil.example"):
                assert (await http.get("/api/v1/executions", headers={"host": host})).status_code == 400, host
            refused = await http.get("/ws", headers=upgrade_headers("evil.example"))
            assert refused.status_code == 400


def test_trusted_host_defaults() -> None:
    assert trusted_hosts("127.0.0.1", ()) == ["127.0.0.1", "localhost", "[::1]"]
    assert trusted_hosts("::1", ("ops.example",)) == ["127.0.0.1", "localhost", "[::1]", "ops.example"]
    assert trusted_hosts("127.0.0.2", ()) == ["127.0.0.1", "localhost", "[::1]", "127.0.0.2"]
    # A public bind needs auth anyway: the configured names, or any when none are.
    assert trusted_hosts("0.0.0.0", ()) == ["*"]
    assert trusted_hosts("0.0.0.0", ("flowscope.example.com", " *.ops.example ")) == [
        "flowscope.example.com",
        "*.ops.example",
    ]
    settings = Settings.from_env({"FLOWSCOPE_ALLOWED_HOSTS": "a.example, b.example,"})
    assert settings.allowed_hosts == ("a.example", "b.example")


def cursor(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


async def test_out_of_range_parameters_answer_400(stack: Stack) -> None:
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("/api/v1/executions", {"cursor": cursor(b'[Infinity,"x"]')}, "invalid cursor"),
        ("/api/v1/executions", {"cursor": cursor(b'[1e300,"x"]')}, "invalid cursor"),
        ("/api/v1/executions", {"cursor": cursor(b'[99999999999999999999,"x"]')}, "invalid cursor"),
        ("/api/v1/executions", {"cursor": cursor(b'[true,"x"]')}, "invalid cursor"),
        ("/api/v1/executions", {"cursor": cursor(b"[" * 20_000)}, "invalid cursor"),
        ("/api/v1/executions", {"since": "0001-01-01T00:00:00Z"}, "'since' must be between 1900-01-01"),
        ("/api/v1/executions", {"until": "9999-12-31T23:59:59-05:00"}, "'until' must be between"),
        ("/api/v1/stats", {"since": "0001-01-01T00:00:00Z"}, "'since' must be between"),
        ("/api/v1/stats", {"until": "9999-12-31T00:00:00Z"}, "'until' must be between"),
        ("/api/v1/stats", {"since": "1899-12-31T23:59:59+00:00", "until": "2000-01-01T00:00:00Z"}, "between"),
    ]
    async with httpx.AsyncClient(base_url=web(stack)) as http:
        for path, params, message in cases:
            response = await http.get(path, params=params)
            assert response.status_code == 400, (params, response.text)
            assert message in response.json()["error"], (params, response.text)
        widest = {"since": "1900-01-01T00:00:00Z", "until": "2262-04-10T00:00:00Z"}
        edges = await http.get("/api/v1/stats", params=widest)
        deep = await http.post("/api/v1/sql", content=b"[" * 100_000, headers={"content-type": "application/json"})
    assert edges.status_code == 200, edges.text
    assert deep.status_code == 400 and "body must be JSON" in deep.json()["error"]


async def test_bad_frames_get_an_error_and_the_connection_stays_usable(stack: Stack) -> None:
    subscribe = {"op": "subscribe", "id": "s", "rooms": ["execution:x"]}
    frames = [
        ("[" * 100_000, "frame_too_large"),
        ("[" * 60_000, "bad_json"),  # within the frame limit, past Python's recursion limit
        (json.dumps(subscribe)[:-1] + ', "fromSeq": ' + "1" * 5000 + "}", "bad_json"),
        (json.dumps({**subscribe, "fromSeq": 2**64}), "bad_request"),
        (json.dumps({**subscribe, "rooms": ["all"], "since": "0001-01-01T00:00:00Z"}), "bad_request"),
        (json.dumps({**subscribe, "rooms": ["all"], "since": "9999-12-31T23:59:59Z"}), "bad_request"),
    ]
    async with ws_client(ws_url(stack), max_size=None) as ws:
        for frame, code in frames:
            await ws.send(frame)
            await ws.send(json.dumps({"op": "ping"}))
            seen = await recv_until(ws, lambda m: m["type"] == "pong")
            errors = [m for m in seen if m["type"] == "error"]
            assert [e["code"] for e in errors] == [code], (frame[:80], seen)
    for query in ("fromSeq=%C2%B2", "fromSeq=99999999999999999999", "fromSeq=-1", "fromSeq=1&x=%ff"):
        async with ws_client(ws_url(stack, f"/ws/executions/x?{query}")) as ws:
            await ws.send(json.dumps({"op": "ping"}))
            seen = await recv_until(ws, lambda m: m["type"] == "pong")
            codes = [m.get("code") for m in seen if m["type"] == "error"]
            assert codes == ([] if query.startswith("fromSeq=1") else ["bad_request"]), (query, seen)
    async with ws_client(ws_url(stack, "/ws/executions/%ff")) as ws:
        await ws.send(json.dumps({"op": "ping"}))
        seen = await recv_until(ws, lambda m: m["type"] == "pong")
        assert [m.get("code") for m in seen if m["type"] == "error"] == ["unknown_room"]
