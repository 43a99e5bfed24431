"""The distributed path: collector → OTLP forward → a separate bridge's OTLP/gRPC feed → subscribers."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from flowscope.collector.schema import SchemaOptions
from flowscope.collector.service import Collector, CollectorConfig
from flowscope.collector.serving import serve_asgi
from flowscope.engine import Engine, NodeContext, WorkflowBuilder
from flowscope.ws_bridge.app import Bridge, BridgeConfig
from flowscope.ws_bridge.auth import AuthConfig
from tests.collector.otlp import otlp_providers
from tests.ws_bridge.conftest import recv_until, ws_client


async def one(ctx: NodeContext) -> int:
    return 1


async def _run_through_remote_feed(
    chdb_dsn: str, database: str, bridge: Bridge, token: str | None, query: str
) -> tuple[list[dict[str, Any]], int, str]:
    """One two-node run through collector → forward → the bridge's feed → a subscriber:
    (the events received, the events the engine emitted, the collector's metrics)."""
    async with bridge.running():
        assert bridge.otlp_port > 0
        config = CollectorConfig(
            dsn=chdb_dsn, schema=SchemaOptions(database=database), grpc_port=0, http_port=0, flush_interval_s=0.05,
            forward_endpoints=(f"127.0.0.1:{bridge.otlp_port}",), forward_token=token,
        )  # fmt: skip
        async with Collector(config).running() as collector, serve_asgi(bridge.app()) as port:
            providers = otlp_providers(collector, "grpc")
            engine = Engine(providers.telemetry())
            async with ws_client(f"ws://127.0.0.1:{port}/ws{query}") as ws:
                await ws.send(json.dumps({"op": "subscribe", "id": "r", "rooms": ["workflow:remote"]}))
                await recv_until(ws, lambda m: m.get("type") == "replay.done")
                result = await engine.run(
                    WorkflowBuilder("remote").code("a", one).code("b", one, depends_on=["a"]).build()
                )
                await asyncio.to_thread(providers.flush)
                received = await recv_until(ws, lambda m: m.get("type") == "workflow.completed")
            await asyncio.to_thread(providers.shutdown)
            await engine.aclose()
            return received, result.events_emitted, collector.metrics.render().decode()


async def test_events_reach_a_remote_bridge_through_its_otlp_feed(chdb_dsn: str, database: str) -> None:
    bridge = Bridge(BridgeConfig(otlp_port=0), None)
    received, emitted, metrics = await _run_through_remote_feed(chdb_dsn, database, bridge, None, "")
    assert [m["seq"] for m in received] == list(range(1, emitted + 1))
    assert "flowscope_collector_forwarded_requests_total" in metrics


async def test_a_bridge_with_auth_takes_the_feed_of_a_collector_holding_an_ingest_token(
    chdb_dsn: str, database: str
) -> None:
    tokens = {"feed": ("collector", frozenset({"ingest"})), "reader": ("reader", frozenset({"*"}))}
    bridge = Bridge(BridgeConfig(otlp_port=0, auth=AuthConfig(tokens=tokens)), None)
    received, emitted, metrics = await _run_through_remote_feed(chdb_dsn, database, bridge, "feed", "?token=reader")
    assert [m["seq"] for m in received] == list(range(1, emitted + 1))
    assert "flowscope_collector_forward_dropped_requests_total{" not in metrics
