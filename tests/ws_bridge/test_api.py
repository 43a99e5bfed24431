"""The history REST API against real data in chdb, and the events the bridge derives."""

from __future__ import annotations

import asyncio
import json

import httpx

from flowscope.contract.page import page_constants
from flowscope.engine import Engine, NodeContext, WorkflowBuilder
from flowscope.stack import Stack
from flowscope.ws_bridge.derive import Thresholds
from flowscope.ws_bridge.history import History
from tests.collector.otlp import otlp_providers
from tests.ws_bridge.conftest import StackFactory, recv_until, ws_client, ws_url


async def fine(ctx: NodeContext) -> int:
    return 1


async def broken(ctx: NodeContext) -> None:
    raise RuntimeError("quota exceeded")


async def run_some(stack: Stack, token: str | None = None) -> tuple[list[str], str]:
    providers = otlp_providers(stack.collector, "http", token=token)
    engine = Engine(providers.telemetry())
    good = WorkflowBuilder("api-ok", "API ok").code("a", fine).code("b", fine, depends_on=["a"]).build()
    bad = WorkflowBuilder("api-bad", "API bad").code("a", fine).code("b", broken, depends_on=["a"]).build()
    ok_ids = [(await engine.run(good, user_id="ana")).execution_id for _ in range(3)]
    failed = (await engine.run(bad)).execution_id
    await asyncio.to_thread(providers.flush)
    await asyncio.to_thread(providers.shutdown)
    await engine.aclose()
    assert stack.collector.pipeline is not None
    assert await asyncio.to_thread(stack.collector.pipeline.flush, 30.0)
    return ok_ids, failed


async def test_rest_api_filters_pagination_errors(stack: Stack) -> None:
    ok_ids, failed = await run_some(stack)
    assert stack.endpoints is not None
    async with httpx.AsyncClient(base_url=stack.endpoints.web) as http:
        page = (await http.get("/api/v1/executions", params={"limit": 2})).json()
        assert len(page["items"]) == 2 and page["nextCursor"]
        rest = (await http.get("/api/v1/executions", params={"limit": 2, "cursor": page["nextCursor"]})).json()
        listed = [e["executionId"] for e in page["items"] + rest["items"]]
        assert sorted(listed) == sorted([*ok_ids, failed]) and rest["nextCursor"] is None

        failures = (await http.get("/api/v1/executions", params={"status": "failure"})).json()["items"]
        assert [e["executionId"] for e in failures] == [failed]
        assert failures[0]["links"]["jaeger"].endswith(f"/trace/{failures[0]['traceId']}")
        mine = (await http.get("/api/v1/executions", params={"user": "ana", "workflow": "api-ok"})).json()["items"]
        assert len(mine) == 3

        detail = (await http.get(f"/api/v1/executions/{failed}")).json()
        assert detail["status"] == "failure"
        assert [(n["nodeId"], n["state"]) for n in detail["nodes"]] == [("a", "success"), ("b", "failed")]
        assert detail["nodes"][1]["error"] == "RuntimeError: quota exceeded"
        assert "grafana" in detail["links"]

        events = (await http.get(f"/api/v1/executions/{ok_ids[0]}/events", params={"fromSeq": 2})).json()["items"]
        assert events[0]["seq"] == 2 and events[-1]["type"] == "workflow.completed"

        workflows = {w["workflowId"]: w for w in (await http.get("/api/v1/workflows")).json()["items"]}
        assert workflows["api-ok"]["runs"] == 3 and workflows["api-bad"]["failed"] == 1
        stats = (await http.get("/api/v1/stats", params={"bucket": 60})).json()
        assert stats["byStatus"] == {"success": 3, "failure": 1}

        sql = await http.post("/api/v1/sql", json={"sql": "SELECT count() AS runs FROM " + stack.collector.database
                                                   + ".workflow_executions FINAL"})  # fmt: skip
        assert sql.json() == {"columns": ["runs"], "types": ["UInt64"], "rows": [[4]]}

        for path, params, status, message in [
            ("/api/v1/executions", {"limit": "abc"}, 400, "'limit' must be an integer"),
            ("/api/v1/executions", {"limit": "0"}, 400, "'limit' must be between 1 and 500"),
            ("/api/v1/executions", {"status": "exploded"}, 400, "unknown status 'exploded'"),
            ("/api/v1/executions", {"since": "yesterday"}, 400, "'since' must be an ISO-8601 timestamp"),
            ("/api/v1/executions", {"sort": "name"}, 400, "unknown sort 'name'"),
            ("/api/v1/executions", {"cursor": "garbage"}, 400, "invalid cursor"),
            ("/api/v1/executions/nope", {}, 404, "no execution 'nope'"),
            ("/api/v1/executions/nope/events", {}, 404, "no execution 'nope'"),
            ("/api/v1/stats", {"since": "2030-01-01T00:00:00Z", "until": "2029-01-01T00:00:00Z"}, 400, "before"),
        ]:
            response = await http.get(path, params=params)
            assert response.status_code == status, (path, params, response.text)
            assert message in response.json()["error"]
        bad_sql = await http.post("/api/v1/sql", json={"sql": f"DROP TABLE {stack.collector.database}.otel_traces"})
        assert bad_sql.status_code == 400 and "readonly" in bad_sql.json()["error"]
        malformed = await http.post("/api/v1/sql", content=b"not json", headers={"content-type": "application/json"})
        assert malformed.status_code == 400

        spec = (await http.get("/openapi.json")).json()
        assert {"/api/v1/executions", "/api/v1/executions/{execution_id}", "/api/v1/sql"} <= set(spec["paths"])
        health = (await http.get("/healthz")).json()
        assert health["status"] == "ok"
        ready = await http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["storage"] == "ok"
        metrics = (await http.get("/metrics")).text
        assert 'flowscope_collector_written_rows_total{table="otel_traces"}' in metrics


async def test_performance_warning_while_running_and_eta(stack_factory: StackFactory) -> None:
    gate = asyncio.Event()

    async def slow(ctx: NodeContext) -> int:
        await gate.wait()
        return 2

    async with stack_factory() as stack:
        assert stack.bridge is not None
        stack.bridge.hub.thresholds = Thresholds(warning_ms=50, critical_ms=100_000)
        providers = otlp_providers(stack.collector, "grpc")
        engine = Engine(providers.telemetry(), progress_interval_s=0)
        wf = WorkflowBuilder("perf", "Perf").code("a", fine).code("slow", slow, depends_on=["a"]).build()
        # History for the ETA: one finished run of the same workflow.
        gate.set()
        await engine.run(wf)
        await asyncio.to_thread(providers.flush)
        assert stack.collector.pipeline is not None
        await asyncio.to_thread(stack.collector.pipeline.flush, 30.0)
        history = History(stack.collector.client, stack.collector.database)
        assert set(await asyncio.to_thread(history.node_duration_medians, "perf")) == {"a", "slow"}
        assert set(await stack.bridge.medians.ensure("perf")) == {"a", "slow"}
        gate.clear()
        async with ws_client(ws_url(stack)) as ws:
            await ws.send(json.dumps({"op": "subscribe", "id": "p", "rooms": ["workflow:perf"]}))
            await recv_until(ws, lambda m: m.get("type") == "replay.done")
            handle = engine.start(wf)
            await asyncio.to_thread(providers.flush)
            warning = await recv_until(ws, lambda m: m.get("type") == "performance.warning")
            gate.set()
            tail = await recv_until(ws, lambda m: m.get("type") == "workflow.completed")
        await handle.result()
        event = warning[-1]
        assert event["nodeId"] == "slow" and event["derived"] is True
        assert event["data"]["running"] is True and event["data"]["thresholdMs"] == 50
        assert event["data"]["actualMs"] >= 50
        progress = [m for m in warning + tail if m.get("type") == "execution.progress"]
        assert any(isinstance(p["data"]["etaMs"], float) for p in progress)
        await asyncio.to_thread(providers.shutdown)
        await engine.aclose()


async def test_a_restricted_token_lists_everything_its_grants_cover(stack_factory: StackFactory) -> None:
    tokens = {
        "tok-ana": ("ana", frozenset({"user:ana", "workflow:api-bad", "not-a-room"})),
        "tok-admin": ("admin", frozenset({"*"})),
        "tok-engine": ("engine", frozenset({"ingest"})),
    }
    async with stack_factory(auth_tokens=tokens) as stack:
        assert stack.endpoints is not None
        ok_ids, failed = await run_some(stack, "tok-engine")
        async with httpx.AsyncClient(base_url=stack.endpoints.web) as http:
            ana = {"Authorization": "Bearer tok-ana"}
            me = (await http.get("/api/v1/me", headers=ana)).json()
            rooms = ["user:ana", "workflow:api-bad"]
            assert me == {"subject": "ana", "unrestricted": False, "rooms": rooms, "control": []}
            admin = (await http.get("/api/v1/me", params={"token": "tok-admin"})).json()
            assert admin["rooms"] == ["all"] and admin["unrestricted"] is True
            assert (await http.get("/api/v1/me")).status_code == 401

            # Two grants, one list: ana's runs of api-ok and every run of api-bad.
            listed = (await http.get("/api/v1/executions", headers=ana)).json()["items"]
            assert sorted(e["executionId"] for e in listed) == sorted([*ok_ids, failed])
            narrowed = (await http.get("/api/v1/executions", params={"workflow": "api-bad"}, headers=ana)).json()
            assert [e["executionId"] for e in narrowed["items"]] == [failed]
            # A filter outside the grants finds nothing rather than widening them.
            other = (await http.get("/api/v1/executions", params={"user": "bo"}, headers=ana)).json()
            assert other["items"] == []

        providers = otlp_providers(stack.collector, "http", token="tok-engine")
        engine = Engine(providers.telemetry())
        hidden = await engine.run(WorkflowBuilder("api-ok", "API ok").code("a", fine).build(), user_id="bo")
        await asyncio.to_thread(providers.flush)
        await asyncio.to_thread(providers.shutdown)
        await engine.aclose()
        assert stack.collector.pipeline is not None
        assert await asyncio.to_thread(stack.collector.pipeline.flush, 30.0)
        async with httpx.AsyncClient(base_url=stack.endpoints.web) as http:
            listed = (await http.get("/api/v1/executions", headers=ana)).json()["items"]
            everything = (await http.get("/api/v1/executions", headers={"Authorization": "Bearer tok-admin"})).json()
        assert hidden.execution_id not in {e["executionId"] for e in listed}
        assert hidden.execution_id in {e["executionId"] for e in everything["items"]}


async def test_the_page_takes_its_names_from_the_contract(stack: Stack) -> None:
    """/static/contract.js is the contract package's data, loaded before the page's script."""
    assert stack.endpoints is not None
    async with httpx.AsyncClient(base_url=stack.endpoints.web) as http:
        script = await http.get("/static/contract.js")
        index = (await http.get("/")).text
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    body = script.text.split("const CONTRACT = Object.freeze(", 1)[1].rsplit(");", 1)[0]
    assert json.loads(body) == page_constants()
    assert json.loads(body)["nodeStateByResult"] == {"node.failed": {"cancellation": "cancelled"}}
    assert index.index("/static/contract.js") < index.index("/static/app.js")


async def test_the_contract_script_is_public_like_the_page_and_holds_to_the_host_check(
    stack_factory: StackFactory,
) -> None:
    """It carries constants only (no data, no parameters, no store), so like /static/app.js it
    needs no grant; it is still served only under the addresses the bridge answers to."""
    tokens = {"reader": ("reader", frozenset({"*"}))}
    async with stack_factory(auth_tokens=tokens) as stack:
        assert stack.endpoints is not None
        async with httpx.AsyncClient(base_url=stack.endpoints.web) as http:
            anonymous = await http.get("/static/contract.js")
            rebound = await http.get("/static/contract.js", headers={"host": "attacker.example"})
            posted = await http.post("/static/contract.js", content=b"x")
            api = await http.get("/api/v1/executions")
    assert anonymous.status_code == 200 and "const CONTRACT" in anonymous.text
    assert rebound.status_code == 400
    assert posted.status_code == 405
    assert api.status_code == 401
