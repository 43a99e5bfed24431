"""Which workflow an execution belongs to, for steering: its first stored record's, over its engine's word."""

from __future__ import annotations

import asyncio

import pytest

from tests.ws_bridge.conftest import StackFactory
from tests.ws_bridge.control_peer import WF_A, answering, http, scripted_engine
from tests.ws_bridge.test_api import run_some

TOKENS = {
    "engine-token": ("engine-1", frozenset({"engine", "ingest"})),
    "steer-ok": ("olga", frozenset({"control:workflow:api-ok"})),
    "steer-claimed": ("carl", frozenset({"control:workflow:wf-claimed"})),
}


@pytest.mark.slow
async def test_the_stored_owner_decides_who_may_steer_an_execution(stack_factory: StackFactory) -> None:
    async with stack_factory(auth_tokens=TOKENS) as stack:
        assert stack.endpoints is not None
        port = stack.endpoints.http_port
        ok_ids, _failed = await run_some(stack, "engine-token")
        running, stored_only = ok_ids[0], ok_ids[1]
        assert stack.bridge is not None
        control, lookups = stack.bridge.control, []
        stored_owner = control.stored_owner
        assert stored_owner is not None

        def counted(execution_id: str) -> tuple[str, str] | None:
            lookups.append(execution_id)
            return stored_owner(execution_id)

        control.stored_owner = counted
        async with scripted_engine(port) as engine:
            # The engine claims the stored api-ok run for another workflow.
            claim = {"executionId": running, "workflowId": "wf-claimed", "version": "1", "status": "running", "seq": 9}
            await engine.hello("eng", [WF_A], [claim])
            async with http(port, "steer-claimed") as client:
                for execution_id in (running, stored_only):
                    response = await client.post(f"/api/v1/executions/{execution_id}/pause", json={})
                    # It may neither read nor steer api-ok's runs: they do not exist for it.
                    assert response.status_code == 404 and "'api-ok'" not in response.json()["error"]
            async with http(port, "steer-ok") as client:
                pausing = asyncio.create_task(client.post(f"/api/v1/executions/{running}/pause", json={}))
                [command] = await answering(engine, 1, executionId=running, status="paused")
                assert command["executionId"] == running and (await pausing).status_code == 200
                # The stored owner is read once: it never changes.
                resuming = asyncio.create_task(client.post(f"/api/v1/executions/{running}/resume", json={}))
                await answering(engine, 1, executionId=running, status="running")
                assert (await resuming).status_code == 200 and lookups.count(running) == 1
                # Stored but run by no connected engine: a conflict, not an unknown execution.
                response = await client.post(f"/api/v1/executions/{stored_only}/pause", json={})
                assert response.status_code == 409 and "not running on any connected engine" in response.text
                response = await client.post("/api/v1/executions/never-stored/pause", json={})
                assert response.status_code == 404
