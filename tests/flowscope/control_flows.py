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


# --- durable runs (tests/flowscope/test_resume_after_crash.py) ---------------------------------


async def mint(ctx: NodeContext) -> dict[str, Any]:
    """An output no rerun could repeat: reusing it is the only way a later run sees it again."""
    import uuid

    _record(ctx)
    return {"nonce": uuid.uuid4().hex, "pid": os.getpid(), "pi": 3.141592653589793, "text": "héllo"}


async def use(ctx: NodeContext) -> dict[str, Any]:
    _record(ctx)
    return {"seen": ctx.inputs["mint"], "pid": os.getpid()}


async def held(ctx: NodeContext) -> str:
    """Writes the inputs it was given, then holds at its gate like `gate`."""
    import json

    (_gates() / f"{ctx.execution_id}.{ctx.node.id}.inputs.json").write_text(json.dumps(ctx.inputs, sort_keys=True))
    return await gate(ctx)


def durable() -> Workflow:
    return (
        WorkflowBuilder("ctl-durable", "Control: durable", version="2")
        .code("mint", mint)
        .code("use", use, depends_on=["mint"])
        .code("hold", held, depends_on=["use"])
        .code("end", step, depends_on=["hold"])
        .build()
    )


def durable_catalog() -> list[Workflow]:
    return [*catalog(), durable()]


# --- rollback with compensation (tests/flowscope/test_rollback_e2e.py) -------------------------


async def undo(ctx: Any) -> None:
    """A compensation (a rollback.CompensationContext): writes what it undid, in order; holds
    (announcing `<execution>.<node>.undoing`) while `undo.hold` exists."""
    import json

    while (_gates() / "undo.hold").exists():  # another process lets it go: a file both see
        (_gates() / f"{ctx.execution_id}.{ctx.node.id}.undoing").touch()
        await asyncio.sleep(0.01)

    with (_gates() / "undone.log").open("a") as log:
        log.write(f"{ctx.execution_id} {ctx.node.id} {json.dumps(ctx.output, sort_keys=True)}\n")


async def ship(ctx: NodeContext) -> str:
    """Fails while `ship.broken` exists."""
    _record(ctx)
    if (_gates() / "ship.broken").exists():
        raise RuntimeError("the carrier is down")
    return "shipped"


def saga() -> Workflow:
    """An order: stock reserved (reversible), a card charged (external, refunded by its
    compensation), a confirmation e-mailed (external, nothing can unsend it), then shipped."""
    return (
        WorkflowBuilder("ctl-saga", "Control: saga", version="4")
        .code("order", step)
        .code("reserve", step, depends_on=["order"], side_effect="reversible", compensate=undo)
        .code("charge", step, depends_on=["reserve"], side_effect="external",
              compensate="tests.flowscope.control_flows:undo")
        .code("email", step, depends_on=["charge"], side_effect="external")
        .code("ship", ship, depends_on=["email"])
        .build()
    )  # fmt: skip


def rollback_catalog() -> list[Workflow]:
    return [*catalog(), saga()]
