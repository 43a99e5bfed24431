"""A run the stack declares lost while its engine still runs it comes back: the engine's
`workflow.recovered` follows the stack's `workflow.lost` through the whole pipeline."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from flowscope.engine import Engine, WorkflowBuilder
from tests.collector.otlp import otlp_providers
from tests.conftest import StackFactory
from tests.helpers import Gate

pytestmark = pytest.mark.slow

ENGINE = "engine-token"
OPERATOR = "operator-token"
TOKENS = {ENGINE: ("worker", frozenset({"engine", "ingest"})), OPERATOR: ("operator", frozenset({"*", "control:*"}))}
_DEADLINE_S = 60.0


async def _events_until(http: httpx.AsyncClient, execution_id: str, kinds: set[str]) -> list[dict[str, Any]]:
    deadline = time.monotonic() + _DEADLINE_S
    items: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        answer = await http.get(f"/api/v1/executions/{execution_id}/events")
        items = answer.json()["items"] if answer.status_code == 200 else []
        if kinds <= {e["type"] for e in items}:
            return items
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {kinds} for {execution_id}: {[e['type'] for e in items]}")


async def test_a_lost_run_that_still_runs_is_recovered_through_the_stack(stack_factory: StackFactory) -> None:
    # Silence longer than lost_after_s between heartbeats: the stack declares the run lost while
    # the engine is still connected, then tells it so at its next heartbeat.
    async with stack_factory(auth_tokens=TOKENS, lost_after_s=0.3) as stack:
        assert stack.endpoints is not None and stack.collector is not None
        providers = otlp_providers(stack.collector, "grpc", token=ENGINE)
        gate = Gate()
        flow = WorkflowBuilder("held", "Held").code("wait", gate).build()
        engine = Engine(providers.telemetry(), control=stack.endpoints.web, control_token=ENGINE)
        engine.serve(flow)
        headers = {"authorization": f"Bearer {OPERATOR}"}
        try:
            async with engine, httpx.AsyncClient(base_url=stack.endpoints.web, headers=headers) as http:
                assert engine.control_link is not None
                await asyncio.wait_for(engine.control_link.connected.wait(), _DEADLINE_S)
                answer = await http.post("/api/v1/executions", json={"workflowId": "held", "userId": "ana"})
                assert answer.status_code == 201, answer.text
                execution_id = answer.json()["executionId"]
                await gate.entered.wait()
                events = await _events_until(http, execution_id, {"workflow.lost", "workflow.recovered"})
                lost = next(e for e in events if e["type"] == "workflow.lost")
                recovered = next(e for e in events if e["type"] == "workflow.recovered" and e["seq"] > lost["seq"])
                assert recovered["data"]["lostSeq"] == lost["seq"]
                assert recovered["data"]["userId"] == "ana" and recovered["data"]["trigger"] == "api"
                gate.release.set()
                events = await _events_until(http, execution_id, {"workflow.completed"})
        finally:
            providers.shutdown()
        seqs = sorted(e["seq"] for e in events)
        assert len(seqs) == len(set(seqs)), "no two events of the run share a seq"
