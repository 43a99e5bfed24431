from __future__ import annotations

import httpx

from tests.ws_bridge.conftest import StackFactory, recv_json, ws_client, ws_url


async def test_heartbeats_arrive_at_the_configured_interval(stack_factory: StackFactory) -> None:
    async with stack_factory(heartbeat_interval_s=0.05) as stack, ws_client(ws_url(stack)) as ws:
        first = await recv_json(ws)
        second = await recv_json(ws)
        assert first["type"] == second["type"] == "heartbeat"
        assert first["ts"] < second["ts"]


async def test_cors_origins_are_configurable(stack_factory: StackFactory) -> None:
    async with stack_factory(cors_origins=("https://ops.example",)) as stack:
        assert stack.endpoints is not None
        async with httpx.AsyncClient(base_url=stack.endpoints.web) as http:
            allowed = await http.get("/healthz", headers={"Origin": "https://ops.example"})
            other = await http.get("/healthz", headers={"Origin": "https://evil.example"})
    assert allowed.headers["access-control-allow-origin"] == "https://ops.example"
    assert "access-control-allow-origin" not in other.headers
