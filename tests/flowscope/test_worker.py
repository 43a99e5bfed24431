"""`flowscope worker`: the real command in a subprocess, dialing a scripted stack (a real
WebSocket peer) and exporting to a real OTLP/gRPC receiver."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.engine.control_peer import scripted_stack
from tests.engine.test_sdk_fallback import OtlpReceiver
from tests.flowscope.test_cli import cli_env

WORKER = [sys.executable, "-m", "flowscope", "worker"]
# A YAML file, a JSON file, a function returning workflows, and a Catalog with its registry.
TARGETS = ["flow.yaml", "hang.json", "worker_flows:flows", "flowscope.samples:catalog"]

FLOW_YAML = """\
id: file-flow
name: File flow
version: "7"
nodes:
  - id: pause
    type: wait
    config: {delay_s: 0.01}
  - id: done
    type: wait
    depends_on: [pause]
    config: {delay_s: 0.01}
"""

HANG_JSON = '{"id": "hang", "nodes": [{"id": "forever", "type": "wait", "config": {"signal": "never"}}]}'

CATALOG_MODULE = """\
from flowscope.engine import NodeContext, Workflow, WorkflowBuilder


async def double(ctx: NodeContext) -> int:
    return 2 * ctx.workflow_input["n"]


def flows() -> list[Workflow]:
    return [WorkflowBuilder("mod-flow", "Module flow").code("double", double).build()]
"""


@pytest.mark.slow
async def test_the_worker_serves_files_and_catalogs_and_runs_what_the_stack_starts(tmp_path: Path) -> None:
    (tmp_path / "flow.yaml").write_text(FLOW_YAML)
    (tmp_path / "hang.json").write_text(HANG_JSON)
    (tmp_path / "worker_flows.py").write_text(CATALOG_MODULE)
    receiver = OtlpReceiver()
    try:
        async with scripted_stack() as stack:
            env = cli_env(
                FLOWSCOPE_TOKEN="engine-token", OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{receiver.port}"
            )
            process = await asyncio.create_subprocess_exec(
                *WORKER, *TARGETS, "--stack", stack.url,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
            )  # fmt: skip
            try:
                hello = await stack.hello()
                served = {(w["workflowId"], w["version"]) for w in hello["workflows"]}
                assert {("file-flow", "7"), ("mod-flow", "1"), ("billing-sync", "1"), ("etl-orders", "2")} <= served
                assert stack.authorizations == ["Bearer engine-token"]
                started = await stack.command("start", executionId="w-1", workflowId="mod-flow", input={"n": 21})
                assert started["ok"] is True
                assert (await stack.ended("w-1"))["result"] == "success"
                from_file = await stack.command("start", executionId="w-2", workflowId="file-flow", input=None)
                assert from_file["ok"] is True
                assert (await stack.ended("w-2"))["result"] == "success"
                await stack.command("start", executionId="w-3", workflowId="hang", input=None)
                await stack.wait_for(
                    lambda: any(e["executionId"] == "w-3" for h in stack.of_type("heartbeat") for e in h["executions"]),
                    "a heartbeat with w-3",
                )
                # Stopping the worker cancels what still runs and says so before it goes.
                process.send_signal(signal.SIGTERM)
                assert (await stack.ended("w-3"))["result"] == "cancellation"
            finally:
                if process.returncode is None:
                    process.send_signal(signal.SIGTERM)
                output, _ = await asyncio.wait_for(process.communicate(), 60)
                print(output.decode())  # shown when the test fails
        text = output.decode()
        assert process.returncode == 0, text
        assert "serving" in text and "file-flow" in text and "mod-flow" in text and stack.url in text
        assert "stopped cleanly." in text
        spans = [
            span
            for request in receiver.take()["traces"]
            for rs in request.resource_spans
            for ss in rs.scope_spans
            for span in ss.spans
        ]
        assert {"invoke_workflow Module flow", "invoke_workflow File flow", "invoke_workflow hang"} <= {
            s.name for s in spans
        }
    finally:
        receiver.server.stop(None)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("broken.yaml", "is not valid yaml"),
        ("missing.yaml", "cannot read missing.yaml"),
        ("no_such_module:catalog", "cannot import no_such_module"),
        ("worker_bad:nothing", "worker_bad has no nothing"),
        ("worker_bad:number", "is a int: expected a Workflow"),
        ("plain-word", "neither a workflow file"),
    ],
)
def test_a_bad_target_is_a_clear_error(tmp_path: Path, target: str, message: str) -> None:
    (tmp_path / "broken.yaml").write_text("id: [unclosed\n")
    (tmp_path / "worker_bad.py").write_text(textwrap.dedent("number = 3\n"))
    done = subprocess.run(
        [*WORKER, target, "--stack", "http://127.0.0.1:9"],
        cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "error:" in done.stderr and message in done.stderr.replace("\n", " ")
    assert "Traceback" not in done.stderr
