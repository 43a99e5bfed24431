"""The CLI through its real entry point (subprocesses) against real stacks."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from flowscope.collector.schema import SchemaOptions, ddl
from flowscope.engine import Engine, WorkflowBuilder
from flowscope.stack import Stack
from tests.collector.otlp import otlp_providers
from tests.helpers import Gate

ROOT = Path(__file__).parents[2]
FLOWSCOPE = [sys.executable, "-m", "flowscope.cli"]


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWSCOPE_", "OTEL_"))}
    env.update({"PYTHONPATH": str(ROOT), "NO_COLOR": "1", "COLUMNS": "200", **extra})
    return env


_CLI_TIMEOUT_S = 90


async def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    process = await asyncio.create_subprocess_exec(
        *FLOWSCOPE, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env or cli_env(), cwd=ROOT
    )
    out, err = await asyncio.wait_for(process.communicate(), _CLI_TIMEOUT_S)
    assert process.returncode is not None
    return subprocess.CompletedProcess(list(args), process.returncode, out.decode(), err.decode())


WORKFLOW = """
id: cli-flow
name: CLI flow
nodes:
  - id: extract
    type: code
    config: {fn: "examples.steps:extract"}
  - id: total
    type: code
    depends_on: [extract]
    config: {fn: "examples.steps:total"}
"""


async def test_run_watch_executions_sql_against_a_stack(stack: Stack, tmp_path: Path) -> None:
    assert stack.endpoints is not None
    server = stack.endpoints.web
    flow = tmp_path / "flow.yaml"
    flow.write_text(WORKFLOW)
    ran = await cli("run", str(flow), "--otlp-endpoint", stack.endpoints.otlp_grpc, "--user", "cli-user")
    assert ran.returncode == 0, ran.stderr
    execution_id = re.search(r"execution ([0-9a-f]{32})", ran.stdout)
    assert execution_id is not None, ran.stdout
    assert "node.completed" in ran.stderr and "total" in ran.stderr
    assert stack.collector.pipeline is not None
    await asyncio.to_thread(stack.collector.pipeline.flush, 30.0)

    watched = await cli("watch", execution_id.group(1), "--server", server)
    assert watched.returncode == 0, watched.stderr
    assert "summary: success, 2/2 nodes succeeded" in watched.stdout

    listed = await cli("executions", "list", "--server", server, "--json")
    assert listed.returncode == 0
    assert json.loads(listed.stdout)["items"][0]["executionId"] == execution_id.group(1)
    shown = await cli("executions", "show", execution_id.group(1), "--server", server)
    assert shown.returncode == 0 and "extract" in shown.stdout and "success" in shown.stdout

    query = f"SELECT WorkflowId, Status, UserId FROM {stack.collector.database}.workflow_executions FINAL"
    as_csv = await cli("sql", query, "--server", server, "--format", "csv")
    assert as_csv.stdout.splitlines() == ["WorkflowId,Status,UserId", "cli-flow,success,cli-user"]
    as_json = await cli("sql", query, "--server", server, "--format", "json")
    assert json.loads(as_json.stdout) == [{"WorkflowId": "cli-flow", "Status": "success", "UserId": "cli-user"}]

    bad_sql = await cli("sql", "SELEC nonsense", "--server", server)
    assert bad_sql.returncode == 1 and "Syntax error" in bad_sql.stderr and "Traceback" not in bad_sql.stderr
    missing = await cli("executions", "show", "nope", "--server", server)
    assert missing.returncode == 1 and "404: no execution 'nope'" in missing.stderr


async def test_watch_shows_a_cancelled_node_as_cancelled(stack: Stack) -> None:
    """A node failed by cancellation is `cancelled` in `flowscope watch`, as on the page and in
    the history API — not `failed`."""
    assert stack.endpoints is not None
    providers = otlp_providers(stack.collector, "grpc")
    engine = Engine(providers.telemetry())
    gate = Gate()
    handle = engine.start(WorkflowBuilder("watch-cancel").code("hold", gate).build())
    await gate.entered.wait()
    handle.cancel()
    result = await handle.result()
    assert result.result.value == "cancellation"
    await asyncio.to_thread(providers.flush)
    assert stack.collector.pipeline is not None
    await asyncio.to_thread(stack.collector.pipeline.flush, 30.0)

    watched = await cli("watch", handle.execution_id, "--server", stack.endpoints.web)
    assert watched.returncode == 1, watched.stderr
    row = next(line for line in watched.stdout.splitlines() if " hold " in line)
    assert "cancelled" in row and "failed" not in row, watched.stdout
    assert "summary: cancellation, 0/1 nodes succeeded" in watched.stdout
    await asyncio.to_thread(providers.shutdown)
    await engine.aclose()


async def test_error_paths_are_clear(tmp_path: Path) -> None:
    down = "http://127.0.0.1:9"
    no_server = await cli("executions", "list", "--server", down)
    assert no_server.returncode == 3 and "is `flowscope up` running?" in no_server.stderr
    assert "Traceback" not in no_server.stderr
    watch = await cli("watch", "--server", down)
    assert watch.returncode == 2 and "give an EXECUTION_ID or --workflow ID" in watch.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("id: x\nnodes:\n  - {id: a, type: teleport}\n")
    invalid = await cli("run", str(bad), "--standalone")
    assert invalid.returncode == 2 and "unknown node type 'teleport'" in invalid.stderr
    bad_dsn = await cli("schema", "apply", "--dsn", "mysql://nope")
    assert bad_dsn.returncode == 2 and "unsupported DSN scheme 'mysql'" in bad_dsn.stderr
    for command in (["--help"], ["up", "--help"], ["demo", "--help"], ["sql", "--help"], ["watch", "--help"]):
        helped = await cli(*command)
        assert helped.returncode == 0 and "Usage:" in helped.stdout


async def test_schema_print_matches_the_collector_schema() -> None:
    printed = await cli("schema", "print", "--database", "otel", "--traces-ttl-days", "30")
    assert printed.returncode == 0
    assert printed.stdout == ddl(SchemaOptions(database="otel", traces_ttl_days=30))
    assert "TTL toDateTime(Timestamp) + toIntervalDay(30)" in printed.stdout


async def test_installed_script_resolves_references_from_the_working_directory() -> None:
    script = Path(sys.executable).parent / "flowscope"
    process = await asyncio.create_subprocess_exec(
        str(script), "run", "examples/etl.yaml", "--standalone",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(PYTHONPATH=""), cwd=ROOT,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 90)
    assert process.returncode == 0, err.decode()
    assert "success" in out.decode()


async def test_run_standalone_prints_console_telemetry(tmp_path: Path) -> None:
    flow = tmp_path / "flow.yaml"
    flow.write_text(WORKFLOW)
    ran = await cli("run", str(flow), "--standalone")
    assert ran.returncode == 0, ran.stderr
    assert '"name": "invoke_workflow CLI flow"' in ran.stdout


@pytest.mark.slow
async def test_up_twice_refuses_and_ctrl_c_drains_everything(tmp_path: Path) -> None:
    data = tmp_path / "data"
    ports = ["--http-port", "0", "--otlp-grpc-port", "0", "--otlp-http-port", "0"]
    env = cli_env(FLOWSCOPE_FLUSH_INTERVAL_S="3600")
    first = await asyncio.create_subprocess_exec(
        *FLOWSCOPE,
        "up",
        "--data-dir",
        str(data),
        *ports,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    assert first.stdout is not None
    banner = ""
    async with asyncio.timeout(60):
        while "Press Ctrl-C" not in banner:
            line = await first.stdout.readline()
            assert line, "flowscope up exited early"
            banner += line.decode()
    grpc = re.search(r"gRPC (http://127\.0\.0\.1:\d+)", banner)
    assert grpc is not None, banner

    second = await cli("up", "--data-dir", str(data), *ports, env=env)
    assert second.returncode == 3
    assert "is in use by another flowscope process" in second.stderr and "Traceback" not in second.stderr

    # Spans accepted by the first process, with a flush interval so long that only the drain writes them.
    flow = tmp_path / "flow.yaml"
    flow.write_text(WORKFLOW)
    for _ in range(3):
        ran = await cli("run", str(flow), "--otlp-endpoint", grpc.group(1))
        assert ran.returncode == 0, ran.stderr
    first.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(first.communicate(), 60)
    assert first.returncode == 0, err.decode()

    counted = await cli(
        "sql", "SELECT count() FROM otel.otel_traces", "--server", "http://127.0.0.1:9", "--data-dir", str(data),
        "--format", "json",
    )  # fmt: skip
    assert counted.returncode == 0, counted.stderr
    assert json.loads(counted.stdout) == [{"count()": 9}], "3 runs x (1 run span + 2 node spans)"
