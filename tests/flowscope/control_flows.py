"""Workflows a `flowscope worker` subprocess serves in the control tests.

Nodes hold at gates the test opens and record every run, through files in
$FLOWSCOPE_TEST_GATES: the worker is another process, and files are what both can see.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from flowscope.engine import NodeContext, Workflow, WorkflowBuilder


def _gates() -> Path:
    return Path(os.environ.get("FLOWSCOPE_TEST_GATES", "."))


def _record(ctx: NodeContext) -> None:
    with (_gates() / "ran.log").open("a") as log:
        log.write(f"{ctx.execution_id} {ctx.node.id}\n")


async def gate(ctx: NodeContext) -> str:
    """Announces it runs, then holds until the test creates `<node>.open`."""
    _record(ctx)
    (_gates() / f"{ctx.execution_id}.{ctx.node.id}.entered").touch()
    # Another process opens the gate: a file is all both see, so it is polled.
    while not (_gates() / f"{ctx.node.id}.open").exists():  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    return f"{ctx.node.id}-out"


async def step(ctx: NodeContext) -> dict[str, Any]:
    _record(ctx)
    return {"node": ctx.node.id, "inputs": sorted(ctx.inputs)}


async def flaky(ctx: NodeContext) -> str:
    """Fails while `flaky.broken` exists."""
    _record(ctx)
    if (_gates() / "flaky.broken").exists():
        raise RuntimeError("flaky is broken")
    return "repaired"


def hold() -> Workflow:
    return WorkflowBuilder("ctl-hold", "Control: hold").code("a", gate).code("b", step, depends_on=["a"]).build()


def wide() -> Workflow:
    return (
        WorkflowBuilder("ctl-wide", "Control: wide")
        .code("g1", gate)
        .code("g2", gate)
        .code("join", step, depends_on=["g1", "g2"])
        .build()
    )


def chain() -> Workflow:
    return (
        WorkflowBuilder("ctl-chain", "Control: chain")
        .code("first", step)
        .code("flaky", flaky, depends_on=["first"])
        .code("last", step, depends_on=["flaky"])
        .build()
    )


def catalog() -> list[Workflow]:
    return [hold(), wide(), chain()]
