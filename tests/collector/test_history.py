from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from flowscope.collector.service import Collector
from flowscope.collector.store import background_settings
from flowscope.engine import Engine, NodeContext, WorkflowBuilder
from flowscope.ws_bridge.history import ExecutionQuery, History, HistoryError, SqlError, SqlLimits
from tests.collector.otlp import otlp_providers


async def fine(ctx: NodeContext) -> int:
    return 1


async def broken(ctx: NodeContext) -> None:
    raise RuntimeError("disk full")


async def populate(collector: Collector) -> dict[str, list[str]]:
    providers = otlp_providers(collector, "grpc")
    engine = Engine(providers.telemetry())
    ok_wf = WorkflowBuilder("daily", "Daily").code("a", fine).code("b", fine, depends_on=["a"]).build()
    bad_wf = WorkflowBuilder("fragile", "Fragile").code("a", fine).code("b", broken, depends_on=["a"]).build()
    ids: dict[str, list[str]] = {"daily": [], "fragile": []}
    for i in range(5):
        ids["daily"].append((await engine.run(ok_wf, user_id="ana" if i % 2 else "bo")).execution_id)
    for _ in range(2):
        ids["fragile"].append((await engine.run(bad_wf, trigger="webhook")).execution_id)
    await asyncio.to_thread(providers.flush)
    await asyncio.to_thread(providers.shutdown)
    await engine.aclose()
    assert collector.pipeline is not None
    assert await asyncio.to_thread(collector.pipeline.flush, 30.0)
    return ids


async def test_history_queries(collector: Collector) -> None:
    ids = await populate(collector)
    history = History(collector.client, collector.database)

    page, cursor = history.list_executions(ExecutionQuery(limit=3))
    assert len(page) == 3 and cursor is not None
    seen = [e["executionId"] for e in page]
    while cursor:
        more, cursor = history.list_executions(ExecutionQuery(limit=3, cursor=cursor))
        seen += [e["executionId"] for e in more]
    assert sorted(seen) == sorted(ids["daily"] + ids["fragile"])
    assert seen[0] == ids["fragile"][-1], "newest first"

    failed, _ = history.list_executions(ExecutionQuery(status="failure"))
    assert {e["executionId"] for e in failed} == set(ids["fragile"])
    assert all(e["trigger"] == "webhook" and e["error"] == "node 'b' failed: RuntimeError: disk full" for e in failed)
    ana, _ = history.list_executions(ExecutionQuery(workflow_id="daily", user_id="ana", sort="startTime"))
    assert [e["executionId"] for e in ana] == [ids["daily"][1], ids["daily"][3]]
    future = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    assert history.list_executions(ExecutionQuery(since=future)) == ([], None)

    detail = history.get_execution(ids["fragile"][0])
    assert detail is not None
    assert detail["status"] == "failure"
    assert [(n["nodeId"], n["state"], n["dependsOn"]) for n in detail["nodes"]] == [
        ("a", "success", []),
        ("b", "failed", ["a"]),
    ]
    assert detail["nodes"][1]["error"] == "RuntimeError: disk full"
    assert detail["nodes"][1]["attemptHistory"][0]["errorType"] == "RuntimeError"
    assert history.get_execution("no-such-id") is None

    events = history.events(ids["daily"][0], from_seq=3)
    assert events[0]["seq"] == 3
    assert [e["seq"] for e in events] == list(range(3, 3 + len(events)))
    assert events[-1]["type"] == "workflow.completed"
    assert history.events(ids["daily"][0], from_seq=2, to_seq=3)[-1]["seq"] == 3

    # Replay since a time: one workflow's, one user's, or every execution's; narrowed by event name.
    hour_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    everything = history.events_since(hour_ago)
    assert {e["executionId"] for e in everything} == set(ids["daily"] + ids["fragile"])
    assert [(e["ts"], e["executionId"], e["seq"]) for e in everything] == sorted(
        (e["ts"], e["executionId"], e["seq"]) for e in everything
    )
    ends = history.events_since(hour_ago, types=frozenset({"workflow.completed", "workflow.failed"}))
    assert sorted((e["executionId"], e["type"]) for e in ends) == sorted(
        [(x, "workflow.completed") for x in ids["daily"]] + [(x, "workflow.failed") for x in ids["fragile"]]
    )
    ana_ends = history.events_since(hour_ago, user_id="ana", types=frozenset({"workflow.completed"}))
    assert [e["executionId"] for e in ana_ends] == [ids["daily"][1], ids["daily"][3]]
    assert {e["workflowId"] for e in history.events_since(hour_ago, workflow_id="fragile")} == {"fragile"}
    assert history.events_since(future) == []

    workflows = {w["workflowId"]: w for w in history.workflows()}
    assert workflows["daily"]["runs"] == 5 and workflows["daily"]["succeeded"] == 5
    assert workflows["fragile"]["failed"] == 2
    now = dt.datetime.now(dt.UTC)
    stats = history.stats(now - dt.timedelta(hours=1), now + dt.timedelta(minutes=1), 60)
    assert stats["byStatus"] == {"success": 5, "failure": 2}
    assert sum(b["runs"] for b in stats["byTime"]) == 7
    medians = history.node_duration_medians("daily")
    assert set(medians) == {"a", "b"}
    # Several workflows in one query give what one query each gives; no runs, no entry.
    assert history.node_duration_medians_of(["daily", "fragile", "never-ran"]) == {"daily": medians}
    # The bridge's lookups run as background work in the embedded engine: same answer.
    background = History(collector.client, collector.database, background=background_settings(collector.dsn))
    assert background.node_duration_medians_of(["daily", "never-ran"]) == {"daily": medians}

    with pytest.raises(HistoryError, match="unknown sort"):
        history.list_executions(ExecutionQuery(sort="name"))
    with pytest.raises(HistoryError, match="invalid cursor"):
        history.list_executions(ExecutionQuery(cursor="!!!"))


async def test_user_sql_is_read_only_and_limited(collector: Collector) -> None:
    history = History(collector.client, collector.database)
    result = history.sql(f"SELECT count() AS n FROM {collector.database}.otel_traces")
    assert result == {"columns": ["n"], "types": ["UInt64"], "rows": [[0]]}
    with pytest.raises(SqlError, match="readonly mode"):
        history.sql(f"DROP TABLE {collector.database}.otel_traces")
    with pytest.raises(SqlError, match="readonly mode"):
        history.sql(f"INSERT INTO {collector.database}.workflow_events (ExecutionId) VALUES ('x')")
    with pytest.raises(SqlError, match="Cannot modify 'max_result_rows'"):
        history.sql("SELECT 1 SETTINGS max_result_rows = 1000000000")
    with pytest.raises(SqlError, match="Limit for result exceeded"):
        History(collector.client, collector.database, SqlLimits(max_rows=10)).sql(
            "SELECT number FROM system.numbers LIMIT 100"
        )
    with pytest.raises(SqlError, match="Syntax error"):
        history.sql("SELEC 1")
    assert history.sql(f"SHOW TABLES FROM {collector.database} LIKE 'otel_logs'")["rows"] == [["otel_logs"]]
