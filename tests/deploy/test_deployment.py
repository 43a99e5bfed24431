"""The distributed deployment, checked here without a Docker engine: statically, and by
running every dashboard query against the real schema filled by real runs."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import yaml

from flowscope import samples
from flowscope.collector.schema import OTEL_TABLES, WORKFLOW_TABLES, SchemaOptions, ddl
from flowscope.engine import Engine, NodeContext, Result, WorkflowBuilder
from flowscope.stack import Stack
from flowscope.ws_bridge.control_events import LostRun
from tests.collector.otlp import otlp_providers

ROOT = Path(__file__).parents[2]


def load_yaml(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / name).read_text())
    return loaded


def test_compose_is_consistent() -> None:
    compose = load_yaml("docker-compose.yml")
    services: dict[str, Any] = compose["services"]
    assert {"clickhouse", "otel-collector", "jaeger", "grafana", "bridge", "engine"} <= set(services)
    for name, service in services.items():
        if "image" in service:
            image = service["image"]
            assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image version"
        else:
            assert service.get("build") == ".", f"{name}: needs an image or the project's Dockerfile"
        for dependency, rule in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on unknown service {dependency}"
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], f"{dependency} needs a healthcheck for {name}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in compose["volumes"], f"{name} uses undeclared volume {source}"
    assert (ROOT / "Dockerfile").exists()
    assert "pip install --no-cache-dir -e ." in (ROOT / "Dockerfile").read_text()
    bridge_env = services["bridge"]["environment"]
    assert bridge_env["FLOWSCOPE_CLICKHOUSE_DSN"].endswith("/otel")
    assert "4319" in services["bridge"]["command"]


def test_collector_config_references_defined_components() -> None:
    config = load_yaml("otel-collector.yaml")
    service = config["service"]
    assert set(service["extensions"]) <= set(config["extensions"])
    for name, pipeline in service["pipelines"].items():
        signal = name.split("/")[0]
        assert signal in {"traces", "metrics", "logs"}
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline[kind]:
                assert component in config[kind], f"pipeline {name} uses undefined {kind[:-1]} {component}"
        assert pipeline["processors"][0] == "memory_limiter", "memory_limiter must come first"
    clickhouse = config["exporters"]["clickhouse"]
    assert clickhouse["database"] == SchemaOptions().database
    assert clickhouse["create_schema"] is False
    configured = {clickhouse["traces_table_name"], clickhouse["logs_table_name"]}
    configured |= {table["name"] for table in clickhouse["metrics_tables"].values()}
    assert configured == set(OTEL_TABLES) - {"otel_traces_trace_id_ts"}
    assert config["exporters"]["otlp/bridge"]["endpoint"] == "bridge:4319"
    assert config["exporters"]["otlp/jaeger"]["endpoint"].startswith("jaeger:")
    exported = {e for p in service["pipelines"].values() for e in p["exporters"]}
    assert {"clickhouse", "otlp/jaeger", "otlp/bridge"} <= exported


def test_committed_schema_equals_schema_print() -> None:
    assert (ROOT / "deploy/clickhouse/schema.sql").read_text() == ddl(SchemaOptions())


def test_grafana_provisioning_references_exist() -> None:
    datasources = load_yaml("grafana/provisioning/datasources/datasources.yaml")["datasources"]
    uids = {d["uid"] for d in datasources}
    clickhouse = next(d for d in datasources if d["type"] == "grafana-clickhouse-datasource")
    assert clickhouse["jsonData"]["traces"]["defaultTable"] == "otel_traces"
    assert clickhouse["jsonData"]["logs"]["defaultTable"] == "otel_logs"
    for path in sorted((ROOT / "grafana/dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            assert panel["datasource"]["uid"] in uids, f"{path.name}: {panel['title']}"


def dashboard_queries() -> list[tuple[str, str, str]]:
    found = []
    for path in sorted((ROOT / "grafana/dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text())
        for variable in dashboard["templating"]["list"]:
            if variable["type"] == "query":
                found.append((path.name, f"variable {variable['name']}", variable["query"]))
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                found.append((path.name, panel["title"], target["rawSql"]))
    return found


def expand(sql: str, database: str, values: dict[str, list[str]]) -> str:
    """Grafana's ClickHouse macros and variables, as the plugin would expand them for the last 6 hours."""
    sql = re.sub(r"\$__timeFilter\((\w+)\)", r"\1 >= now() - INTERVAL 6 HOUR AND \1 <= now() + INTERVAL 1 HOUR", sql)
    sql = re.sub(r"\$__timeInterval\((\w+)\)", r"toStartOfInterval(toDateTime(\1), INTERVAL 60 second)", sql)
    sql = sql.replace("$__interval_s", "60")
    for name, options in values.items():
        quoted = ", ".join(f"'{v}'" for v in options)
        sql = sql.replace(f"${{{name}:singlequote}}", quoted).replace(f"${{{name}}}", options[0])
    assert "$" not in sql, f"unexpanded macro or variable in: {sql}"
    return sql.replace("otel.", f"{database}.")


async def fill_with_sample_runs(stack: Stack) -> list[str]:
    providers = otlp_providers(stack.collector, "grpc")
    engine = Engine(providers.telemetry(), samples.registry())
    samples.ledger.down = True
    ids = [
        (await engine.run(samples.agent(), {"topic": "tides", "city": "Porto"}, user_id="ana")).execution_id,
        (await engine.run(samples.etl(), trigger="schedule")).execution_id,
    ]
    failed = await engine.run(samples.billing())
    assert failed.result is Result.FAILURE
    samples.ledger.down = False
    ids += [failed.execution_id, (await engine.resume(failed).result()).execution_id]
    ids.append(await lose_a_run(stack, engine, providers))
    await asyncio.to_thread(providers.shutdown)
    await engine.aclose()
    assert stack.collector.pipeline is not None
    assert await asyncio.to_thread(stack.collector.pipeline.flush, 30.0)
    return ids


async def lose_a_run(stack: Stack, engine: Engine, providers: Any) -> str:
    """A run whose engine "dies" mid-run: its start is stored, the stack declares it lost, and
    its end never leaves (the providers are shut down before the engine cancels it)."""
    held = asyncio.Event()

    async def wait(ctx: NodeContext) -> None:
        await held.wait()

    handle = engine.start(WorkflowBuilder("stuck-import", "Stuck import").code("wait", wait).build())
    await handle.wait_started()
    await asyncio.to_thread(providers.flush)
    assert stack.collector.pipeline is not None and stack.lost is not None
    assert await asyncio.to_thread(stack.collector.pipeline.flush, 30.0)
    lost = LostRun(handle.execution_id, "stuck-import", 1_000, "engine-1", "host:1", "engine channel closed")
    stack.lost(lost)
    client = stack.collector.client()
    try:
        table = f"{stack.collector.database}.workflow_executions"
        status = f"SELECT Status FROM {table} FINAL WHERE ExecutionId = {{e:String}}"
        for _ in range(600):
            await asyncio.to_thread(stack.collector.pipeline.flush, 30.0)
            if client.query(status, parameters={"e": handle.execution_id}).result_rows == [("lost",)]:
                return handle.execution_id
            await asyncio.sleep(0.05)
    finally:
        client.close()
    raise AssertionError("the run never became lost")


async def test_every_dashboard_query_and_doc_example_returns_rows(stack: Stack) -> None:
    ids = await fill_with_sample_runs(stack)
    client = stack.collector.client()
    database = stack.collector.database

    def rows(sql: str) -> list[Any]:
        return list(client.query(sql).result_rows)

    values = {
        "workflow": [r[0] for r in rows(f"SELECT DISTINCT WorkflowId FROM {database}.workflow_executions")],
        "node_type": [r[0] for r in rows(f"SELECT DISTINCT NodeType FROM {database}.node_executions")],
        "execution": [ids[2]],
    }
    assert set(values["workflow"]) == {"research-agent", "etl-orders", "billing-sync", "stuck-import"}
    queries = dashboard_queries()
    assert len(queries) >= 15
    for dashboard, title, sql in queries:
        result = rows(expand(sql, database, values))
        assert result, f"{dashboard} / {title} returned no rows"

    examples = re.findall(r"```sql\n(.*?)```", (ROOT / "docs/sql.md").read_text(), re.S)
    statements = [s.strip() for block in examples for s in block.split(";") if s.strip()]
    assert len(statements) >= 6
    for statement in statements:
        sql = statement.replace("'…'", f"'{ids[2]}'").replace("otel.", f"{database}.")
        assert rows(sql), f"docs/sql.md example returned nothing: {statement[:80]}"
    client.close()


def test_schema_tables_are_the_documented_ones() -> None:
    text = (ROOT / "docs/sql.md").read_text()
    for table in (*OTEL_TABLES, *WORKFLOW_TABLES):
        assert f"`{table}`" in text, f"docs/sql.md does not mention {table}"
