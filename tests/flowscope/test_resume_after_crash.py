"""Resume after a crash, end to end: two `flowscope worker` processes share one SQLite checkpoint
file (the embedded default on one host); the first is killed with SIGKILL while a node runs, the
stack declares the run lost, and a resume over REST continues it on the second.

A ClickHouse server shared by workers on several hosts cannot be run here (chdb is one process per
data directory, and there is no server binary): that store is tested in-process,
tests/engine/test_checkpointed_runs.py::test_another_engine_resumes_a_run_from_the_store[chdb]."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest

from flowscope.engine.checkpoints import open_checkpoint_store
from flowscope.stack import Stack
from tests.conftest import StackFactory
from tests.flowscope.test_cli import FLOWSCOPE, ROOT, cli, cli_env
from tests.flowscope.test_control_e2e import ENGINE, OPERATOR, Control
from tests.flowscope.test_control_e2e import worker as e2e_worker
from tests.flowscope.test_demo_control import VIEWER, _lines_until
from tests.helpers import eventually
from tests.ws_bridge.control_peer import WF_A, control_bridge, http, run, scripted_engine, until

pytestmark = pytest.mark.slow

STEERER = "steerer-token"  # may steer ctl-durable, may not read it
TOKENS = {
    ENGINE: ("worker", frozenset({"engine", "ingest"})),
    OPERATOR: ("operator", frozenset({"*", "control:*"})),
    STEERER: ("steerer", frozenset({"control:workflow:ctl-durable"})),
}


def worker(stack: Stack, gates: Path, checkpoints: str) -> AbstractAsyncContextManager[asyncio.subprocess.Process]:
    assert stack.endpoints is not None
    web, otlp = stack.endpoints.web, stack.endpoints.otlp_grpc
    return e2e_worker(web, otlp, gates, catalog="durable_catalog", checkpoints=checkpoints)


async def engines(control: Control, count: int) -> list[dict[str, Any]]:
    async def probe() -> list[dict[str, Any]] | None:
        answer = await control.http.get("/api/v1/engines")
        items = [e for e in answer.json()["items"] if e["workflows"]] if answer.status_code == 200 else []
        return items if len(items) == count else None

    found: list[dict[str, Any]] = await eventually(probe, f"{count} connected engine(s)")
    return found


async def node_span_attributes(stack: Stack, execution_id: str) -> dict[str, dict[str, str]]:
    """Each node's attempt span attributes, from the stored traces."""
    assert stack.collector.pipeline is not None
    await asyncio.to_thread(stack.collector.pipeline.flush, 30.0)
    rows = await asyncio.to_thread(
        stack.collector.client().query,
        f"SELECT SpanAttributes FROM {stack.collector.database}.otel_traces "
        "WHERE SpanAttributes['workflow.execution.id'] = {e:String} AND SpanAttributes['workflow.node.id'] != ''",
        parameters={"e": execution_id},
    )
    return {row[0]["workflow.node.id"]: dict(row[0]) for row in rows.result_rows}


async def run_links(stack: Stack, execution_id: str) -> list[tuple[str, str]]:
    """(trace id, span id) of the links of the execution's run span."""
    rows = await asyncio.to_thread(
        stack.collector.client().query,
        f"SELECT `Links.TraceId`, `Links.SpanId` FROM {stack.collector.database}.otel_traces "
        "WHERE SpanAttributes['workflow.execution.id'] = {e:String} AND SpanAttributes['workflow.node.id'] = ''"
        " AND SpanAttributes['gen_ai.operation.name'] = 'invoke_workflow'",
        parameters={"e": execution_id},
    )
    return [link for row in rows.result_rows for link in zip(row[0], row[1], strict=True)]


async def test_a_run_killed_with_its_worker_resumes_on_another_worker(
    stack_factory: StackFactory, tmp_path: Path
) -> None:
    db = tmp_path / "checkpoints.db"
    checkpoints = f"sqlite:///{db}"
    async with stack_factory(auth_tokens=TOKENS, checkpoints=checkpoints, control_timeout_s=1.0) as stack:
        assert stack.endpoints is not None
        control = Control(stack.endpoints.web, tmp_path)
        try:
            async with worker(stack, tmp_path, checkpoints) as first:
                await engines(control, 1)
                answer = await control.post("/api/v1/executions", {"workflowId": "ctl-durable", "input": {"day": 30}})
                assert answer.status_code == 201, answer.text
                old = answer.json()["executionId"]
                await control.entered(old, "hold")  # mint and use are done, hold runs
                async with worker(stack, tmp_path, checkpoints):
                    await engines(control, 2)
                    first.send_signal(signal.SIGKILL)
                    await first.wait()
                    await control.status(old, "lost")

                    web = stack.endpoints.web

                    async def resumed() -> Any:
                        # Until the stack stops holding commands for the killed engine (control_timeout_s).
                        done = await cli("executions", "resume", old, "--server", web, "--token", OPERATOR)
                        return done if done.returncode == 0 or "503" not in done.stderr else None

                    done = await eventually(resumed, "the resume to be routed")
                    assert done.returncode == 0, done.stderr
                    printed = done.stdout.split()
                    assert printed[:3] == ["resumed", old, "as"]
                    new = printed[3]
                    await control.entered(new, "hold")
                    control.open("hold")
                    finished = await control.status(new, "success")

                    # Completed nodes did not run again; the interrupted one did, then the rest.
                    assert control.ran(old) == ["mint", "use", "hold"]
                    assert control.ran(new) == ["hold", "end"]
                    # What the interrupted node was given again is what the killed worker produced.
                    given = [(tmp_path / f"{e}.hold.inputs.json").read_bytes() for e in (old, new)]
                    assert given[0] == given[1]
                    assert json.loads(given[1])["use"]["seen"]["pid"] == first.pid
                    store = open_checkpoint_store(checkpoints)
                    try:
                        before, after = await store.load(old), await store.load(new)
                    finally:
                        store.close()
                    for node in ("mint", "use"):
                        assert after.encoded[node] == before.encoded[node], node
                    assert set(before.nodes) == {"mint", "use"}

                    assert finished["resumedFrom"] == old
                    spans = await node_span_attributes(stack, new)
                    assert set(spans) == {"hold", "end"}
                    assert spans["hold"].get("workflow.node.rerun") == "true"
                    assert "workflow.node.rerun" not in spans["end"]
                    old_run = (await control.http.get(f"/api/v1/executions/{old}")).json()
                    assert [trace for trace, _ in await run_links(stack, new)] == [old_run["traceId"]]

                    # A run that succeeded has nothing to resume.
                    again = await control.post(f"/api/v1/executions/{new}/resume")
                    assert again.status_code == 409 and "succeeded" in again.json()["error"], again.text
                    refused = await cli("executions", "resume", new, "--server", web, "--token", OPERATOR)
                    assert refused.returncode != 0 and "409" in refused.stderr and "succeeded" in refused.stderr

                    # What a resume of the lost run reuses: its outputs to readers only.
                    snapshot = (await control.http.get(f"/api/v1/executions/{old}/checkpoint")).json()
                    assert snapshot["reusableNodes"] == ["mint", "use"]
                    assert [n["output"] for n in snapshot["nodes"]] == [before.outputs["mint"], before.outputs["use"]]
                    assert snapshot["input"] == {"stored": "output", "sizeBytes": 10, "value": {"day": 30}}
                    steerer = await control.http.get(
                        f"/api/v1/executions/{old}/checkpoint", headers={"authorization": f"Bearer {STEERER}"}
                    )
                    assert steerer.status_code == 200, steerer.text
                    assert [n["nodeId"] for n in steerer.json()["nodes"]] == ["mint", "use"]
                    assert all("output" not in n for n in steerer.json()["nodes"])
                    assert "value" not in steerer.json()["input"]
                    missing = await control.http.get("/api/v1/executions/nope/checkpoint")
                    assert missing.status_code == 404
        finally:
            await control.http.aclose()


async def test_the_demo_checkpoints_next_to_its_data_directory(tmp_path: Path) -> None:
    env = cli_env(FLOWSCOPE_AUTH_TOKENS=f"{VIEWER}=viewer:*")
    process = await asyncio.create_subprocess_exec(
        *FLOWSCOPE, "demo", "--runs", "1", "--http-port", "0", "--otlp-grpc-port", "0",
        "--otlp-http-port", "0", "--data-dir", str(tmp_path / "data"), "--no-spool",
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        text = "".join(await _lines_until(process.stdout, "round(s) done"))
        web = re.search(r"live view\s+(http://\S+)/", text)
        billing = re.findall(r"✗ Billing sync\s+failure.*/executions/([0-9a-f]{32})", text)
        assert web is not None and billing, text
        assert (tmp_path / "checkpoints.db").is_file()
        async with httpx.AsyncClient(base_url=web.group(1), headers={"authorization": f"Bearer {VIEWER}"}) as http:
            snapshot = (await http.get(f"/api/v1/executions/{billing[0]}/checkpoint")).json()
        # The failed run's completed nodes are what a resume would reuse.
        assert snapshot["workflowId"] == "billing-sync" and snapshot["reusableNodes"], snapshot
        assert all("output" in n for n in snapshot["nodes"] if n["reusable"])
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
        rest, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, rest.decode()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://somewhere/x", "--checkpoints: unsupported checkpoint store URL scheme 'ftp'"),
        ("sqlite://", "--checkpoints: sqlite checkpoint URL needs a file path"),
    ],
)
async def test_a_checkpoint_url_the_worker_cannot_use_is_a_clear_error(url: str, message: str) -> None:
    done = await cli("worker", "tests.flowscope.control_flows:catalog", "--checkpoints", url)
    assert done.returncode == 2, done
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr


async def test_the_stack_routes_a_resume_to_any_engine_serving_the_version(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'checkpoints.db'}"
    store = open_checkpoint_store(url)
    try:
        # A run the stack never saw, known only from its checkpoints: version 7 nobody serves.
        await store.put_run("x9", "wf-a", "7", {"n": 1})
        await store.put("x9", "fetch", {"rows": 3}, workflow_id="wf-a", workflow_version="7", attempt=1)
    finally:
        store.close()
    async with control_bridge(checkpoints_url=url, control_timeout_s=0.2) as (bridge, port, _), http(port) as op:
        op.headers["authorization"] = "Bearer operator"
        async with scripted_engine(port, "engine-token-2") as other:
            await other.hello("eng-2", [WF_A])
            async with scripted_engine(port) as ran_it:
                await ran_it.hello("eng-1", [WF_A], [run("x1")])
            # eng-1 is gone; past the command timeout its run is resumed by eng-2.
            await until(lambda: "eng-1" not in bridge.control.engines)
            await until(lambda: not bridge.control._may_return(bridge.control._gone["eng-1"]))
            resuming = asyncio.create_task(op.post("/api/v1/executions/x1/resume", json={}))
            command = await other.expect("command")
            assert command["op"] == "resume" and command["executionId"] == "x1"
            assert (command["workflowId"], command["version"]) == ("wf-a", "1")
            await other.answer(command, executionId=command["newExecutionId"], resumedFrom="x1")
            answer = await resuming
            assert answer.status_code == 201, answer.text
            assert answer.json() == {"executionId": command["newExecutionId"], "resumedFrom": "x1"}

            refused = await op.post("/api/v1/executions/x9/resume", json={})
            assert refused.status_code == 409, refused.text
            assert "no connected engine serves workflow 'wf-a' version '7'" in refused.json()["error"]
            unknown = await op.post("/api/v1/executions/nothing/resume", json={})
            assert unknown.status_code == 404, unknown.text

            snapshot = await op.get("/api/v1/executions/x9/checkpoint")  # control, no read grant
            assert snapshot.status_code == 200, snapshot.text
            assert snapshot.json()["reusableNodes"] == ["fetch"] and "output" not in snapshot.json()["nodes"][0]
            async with http(port, "reader") as reader:
                read = (await reader.get("/api/v1/executions/x9/checkpoint")).json()
                assert read["nodes"][0]["output"] == {"rows": 3} and read["input"]["value"] == {"n": 1}
            async with http(port, "engine-token") as neither:
                refused = await neither.get("/api/v1/executions/x9/checkpoint")
                # A token that may neither read nor steer the run learns nothing of it, not even its workflow.
                assert refused.status_code == 404 and "wf-a" not in refused.text, refused.text
    async with control_bridge() as (_, port, _), http(port, "reader") as reader:
        answer = await reader.get("/api/v1/executions/x9/checkpoint")
        assert answer.status_code == 503 and "no checkpoint store is configured" in answer.json()["error"]
