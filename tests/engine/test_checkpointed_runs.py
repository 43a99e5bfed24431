"""Runs with a checkpoint store: each node's output stored before its dependents start, and a run
continued from the store by another engine (docs/durability.md, "Checkpoints").

The store is real (SQLite files, embedded ClickHouse through chdb). Several processes sharing a
ClickHouse server cannot be tested here — chdb is one process per data directory and there is no
server binary — so the ClickHouse path runs with two engines in one process on one store."""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan

from flowscope.engine import Engine, NodeContext, NodeRegistry, Result, WorkflowBuilder
from flowscope.engine.catalog import CheckpointedRuns, NotResumable
from flowscope.engine.checkpoint_commit import GroupCommitStore
from flowscope.engine.checkpoints import open_checkpoint_store
from flowscope.engine.redact import Secret
from tests.engine.conftest import Captured

RERUN = "workflow.node.rerun"


def stored_nodes(db: Path, execution_id: str) -> set[str]:
    """The nodes of a run stored in the SQLite file, read on a connection of its own."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return {r[0] for r in conn.execute("SELECT node_id FROM checkpoints WHERE execution_id = ?", (execution_id,))}


def stored_run(db: Path, execution_id: str) -> bool:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return (
            conn.execute("SELECT 1 FROM checkpoint_runs WHERE execution_id = ?", (execution_id,)).fetchone() is not None
        )


async def test_a_dependent_starts_only_once_its_inputs_checkpoints_are_stored(
    tmp_path: Path, captured: Captured
) -> None:
    db = tmp_path / "checkpoints.db"
    seen: dict[str, tuple[set[str], bool]] = {}

    async def step(ctx: NodeContext) -> dict[str, Any]:
        # What another process would find in the file at the moment this node starts.
        seen[ctx.node.id] = (stored_nodes(db, ctx.execution.execution_id), stored_run(db, ctx.execution.execution_id))
        return {"node": ctx.node.id, "inputs": sorted(ctx.inputs)}

    wf = (
        WorkflowBuilder("diamond")
        .code("a", step)
        .code("b", step, depends_on=["a"])
        .code("c", step, depends_on=["a"])
        .code("d", step, depends_on=["b", "c"])
        .build()
    )
    async with Engine(captured.telemetry, NodeRegistry(), checkpoints=f"sqlite:///{db}") as engine:
        result = await engine.run(wf, {"x": 1})
    assert result.result is Result.SUCCESS
    for node in wf.nodes:
        stored, run_stored = seen[node.id]
        assert run_stored, f"{node.id} started before its run was stored"
        assert set(node.depends_on) <= stored, f"{node.id} started before {set(node.depends_on) - stored} was stored"
    assert stored_nodes(db, result.execution_id) == {"a", "b", "c", "d"}


@pytest.fixture(params=["sqlite", "chdb"])
async def two_stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[GroupCommitStore, ...]]:
    """The store as two engines see it: two handles on one SQLite file, or one chdb store (one per process)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'checkpoints.db'}"
        first, second = open_checkpoint_store(url), open_checkpoint_store(url)
        yield first, second
        first.close()
        second.close()
    else:
        store = open_checkpoint_store(f"chdb:///{tmp_path / 'chdb'}", database="ckpt")
        yield store, store
        store.close()


async def test_another_engine_resumes_a_run_from_the_store(
    two_stores: tuple[GroupCommitStore, GroupCommitStore], captured: Captured
) -> None:
    ran: list[tuple[str, str]] = []
    seen_by_load: list[Any] = []
    broken = True

    def workflow(engine_name: str) -> Any:
        async def extract(ctx: NodeContext) -> dict[str, Any]:
            ran.append((engine_name, "extract"))
            return {"rows": [1, 2, 3], "pi": 3.141592653589793, "name": "ünïcode", "engine": engine_name}

        async def load(ctx: NodeContext) -> int:
            ran.append((engine_name, "load"))
            seen_by_load.append(ctx.inputs["extract"])
            if broken:
                raise RuntimeError("warehouse down")
            return len(ctx.inputs["extract"]["rows"])

        async def report(ctx: NodeContext) -> str:
            ran.append((engine_name, "report"))
            return f"loaded {ctx.inputs['load']}"

        return (
            WorkflowBuilder("etl", version="3")
            .code("extract", extract)
            .code("load", load, depends_on=["extract"])
            .code("report", report, depends_on=["load"])
            .build()
        )

    first_store, second_store = two_stores
    one = Engine(captured.telemetry, NodeRegistry(), checkpoints=first_store)
    first = await one.run(workflow("one"), {"day": "2026-11-30"})
    await one.aclose()
    assert first.result is Result.FAILURE
    broken = False

    two = Engine(captured.telemetry, NodeRegistry(), checkpoints=second_store)
    two.serve(workflow("two"))
    assert isinstance(two.retry_source, CheckpointedRuns)
    previous = await two.retry_source.previous(first.execution_id)
    assert previous is not None
    second = await two.resume(previous).result()
    await two.aclose()

    assert second.result is Result.SUCCESS, second.error
    assert ran == [("one", "extract"), ("one", "load"), ("two", "load"), ("two", "report")]
    assert seen_by_load[1] == seen_by_load[0] and seen_by_load[1]["engine"] == "one"
    assert second.workflow_input == {"day": "2026-11-30"}
    old, new = await second_store.load(first.execution_id), await second_store.load(second.execution_id)
    # The reused output is stored under the new run too, byte for byte: it can be resumed in turn.
    assert new.encoded["extract"] == old.encoded["extract"]
    assert new.run is not None and new.run.resumed_from == first.execution_id
    assert set(new.outputs) == {"extract", "load", "report"}

    spans: dict[Any, list[ReadableSpan]] = {}
    for s in captured.spans():
        spans.setdefault((s.attributes or {}).get("workflow.execution.id"), []).append(s)
    attempts = {
        (s.attributes or {})["workflow.node.id"]: s for s in spans[second.execution_id] if s.name.startswith("code")
    }
    assert set(attempts) == {"load", "report"}
    assert (attempts["load"].attributes or {}).get(RERUN) is True  # it had started in the first run
    assert RERUN not in (attempts["report"].attributes or {})  # it had not
    run_span = next(s for s in spans[second.execution_id] if s.name == "invoke_workflow etl")
    assert (run_span.attributes or {})["workflow.resumed_from.execution.id"] == first.execution_id
    assert run_span.links[0].context.trace_id == first.span_context.trace_id
    assert run_span.links[0].context.span_id == first.span_context.span_id


_CHAIN_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from flowscope.engine import Engine, NodeRegistry, WorkflowBuilder

    async def step(ctx):
        # This node started: the checkpoint of the one before it was acknowledged to the scheduler.
        print(ctx.execution.execution_id, ctx.node.id, flush=True)
        return {"node": ctx.node.id, "payload": "x" * 2000}

    async def main():
        builder = WorkflowBuilder("chain")
        for i in range(100_000):
            builder.code(f"n{i}", step, depends_on=[f"n{i - 1}"] if i else [])
        async with Engine(checkpoints=sys.argv[1]) as engine:
            await engine.run(builder.build())

    asyncio.run(main())
    """
)


@pytest.mark.slow
def test_a_checkpoint_acknowledged_to_the_scheduler_survives_kill_9(tmp_path: Path) -> None:
    db = tmp_path / "checkpoints.db"
    started: list[tuple[str, str]] = []
    with subprocess.Popen(
        [sys.executable, "-c", _CHAIN_SCRIPT, f"sqlite:///{db}"], stdout=subprocess.PIPE, text=True, bufsize=1
    ) as proc:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while len(started) < 300 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            execution_id, node_id = line.split()
            started.append((execution_id, node_id))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        # Lines written before the kill, still in the pipe, count too.
        for line in proc.stdout.read().splitlines():
            execution_id, node_id = line.split()
            started.append((execution_id, node_id))
    assert len(started) >= 300, "the chain did not get going"
    execution_id = started[0][0]
    stored = stored_nodes(db, execution_id)
    # Every node that started had its predecessor's checkpoint acknowledged: each must be there.
    acknowledged = {f"n{int(node_id[1:]) - 1}" for _, node_id in started if node_id != "n0"}
    assert acknowledged <= stored, sorted(acknowledged - stored)[:5]


async def test_a_checkpoint_the_store_refuses_fails_the_run_before_dependents_start(
    tmp_path: Path, captured: Captured
) -> None:
    store = open_checkpoint_store(f"sqlite:///{tmp_path / 'checkpoints.db'}")
    ran: list[str] = []

    async def first(ctx: NodeContext) -> str:
        ran.append("first")
        store.close()  # the store goes away while the node runs: its put is refused
        return "out"

    async def second(ctx: NodeContext) -> str:
        ran.append("second")
        return "never"

    wf = WorkflowBuilder("refused").code("first", first).code("second", second, depends_on=["first"]).build()
    async with Engine(captured.telemetry, NodeRegistry(), checkpoints=store) as engine:
        result = await engine.run(wf)
    assert result.result is Result.FAILURE
    assert result.error is not None and "node 'first' failed: CheckpointError" in result.error
    assert ran == ["first"]


async def test_a_run_another_engine_cannot_continue_says_why(tmp_path: Path, captured: Captured) -> None:
    async def boom(ctx: NodeContext) -> None:
        raise RuntimeError("down")

    url = f"sqlite:///{tmp_path / 'checkpoints.db'}"
    v1 = WorkflowBuilder("wf", version="1").code("a", boom).build()
    async with Engine(captured.telemetry, NodeRegistry(), checkpoints=url) as one:
        plain = await one.run(v1, {"n": 1})
        secret = await one.run(v1, {"password": Secret("hunter2")})
    async with Engine(captured.telemetry, NodeRegistry(), checkpoints=url) as two:
        assert isinstance(two.retry_source, CheckpointedRuns)
        with pytest.raises(NotResumable, match="version '1', which this engine does not serve"):
            await two.retry_source.previous(plain.execution_id)
        two.serve(v1)
        with pytest.raises(NotResumable, match=r"input of execution .* was not stored \(secret\)"):
            await two.retry_source.previous(secret.execution_id)
        assert await two.retry_source.previous("never-ran") is None
