"""A stack restarted while an engine died (issue 18.6): the runs of engines that never come back
are declared lost; a run of an engine without a control link is never."""

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


async def _until(probe: Any, what: str) -> Any:
    deadline = time.monotonic() + _DEADLINE_S
    while time.monotonic() < deadline:
        found = await probe()
        if found:
            return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def _status(http: httpx.AsyncClient, execution_id: str) -> str | None:
    answer = await http.get(f"/api/v1/executions/{execution_id}")
    return answer.json().get("status") if answer.status_code == 200 else None


async def test_runs_of_an_engine_that_died_while_the_stack_was_down_are_lost(stack_factory: StackFactory) -> None:
    headers = {"authorization": f"Bearer {OPERATOR}"}
    gate, local_gate = Gate(), Gate()
    engines: list[Engine] = []
    try:
        # Above the heartbeat interval: the first stack declares nothing lost while the engine lives.
        async with stack_factory(auth_tokens=TOKENS, lost_after_s=5.0) as first:
            assert first.endpoints is not None and first.collector is not None
            providers = otlp_providers(first.collector, "grpc", token=ENGINE)
            linked = Engine(providers.telemetry(), control=first.endpoints.web, control_token=ENGINE)
            linked.serve(WorkflowBuilder("held", "Held").code("wait", gate).build())
            local = Engine(otlp_providers(first.collector, "grpc", token=ENGINE).telemetry())
            engines += [linked, local]
            await linked.connect_control()
            assert linked.control_link is not None
            await asyncio.wait_for(linked.control_link.connected.wait(), _DEADLINE_S)
            async with httpx.AsyncClient(base_url=first.endpoints.web, headers=headers) as http:
                answer = await http.post("/api/v1/executions", json={"workflowId": "held"})
                assert answer.status_code == 201, answer.text
                remote_run = answer.json()["executionId"]
                local_run = local.start(WorkflowBuilder("local", "Local").code("wait", local_gate).build()).execution_id
                await gate.entered.wait()
                await local_gate.entered.wait()
                for execution_id in (remote_run, local_run):
                    await _until(lambda e=execution_id: _is(http, e, "running"), f"{execution_id} stored running")
                started = (await http.get(f"/api/v1/executions/{remote_run}/events")).json()["items"][0]
                assert started["data"]["engineId"] == linked.control_link.engine_id
        # The stack stops (its runs are not lost for that), and the engine dies while it is down.
        assert linked.control_link is not None
        await linked.control_link.aclose()
        async with stack_factory(auth_tokens=TOKENS, lost_after_s=0.3) as second:
            assert second.endpoints is not None
            async with httpx.AsyncClient(base_url=second.endpoints.web, headers=headers) as http:
                await _until(lambda: _is(http, remote_run, "lost"), "the dead engine's run lost")
                events = (await http.get(f"/api/v1/executions/{remote_run}/events")).json()["items"]
                assert events[-1]["type"] == "workflow.lost"
                assert events[-1]["data"]["reason"] == "its engine did not come back after the stack restarted"
                assert await _status(http, local_run) == "running"
    finally:
        gate.release.set()
        local_gate.release.set()
        for engine in engines:
            await engine.aclose()


async def _is(http: httpx.AsyncClient, execution_id: str, status: str) -> bool:
    return await _status(http, execution_id) == status
