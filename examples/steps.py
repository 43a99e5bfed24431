"""Callables referenced by the example workflow files (`module:function`)."""

from __future__ import annotations

from typing import Any

from flowscope.engine import NodeContext


async def extract(ctx: NodeContext) -> list[dict[str, Any]]:
    ctx.log("extracted rows", rows=3)
    return [{"id": i, "amount": i * 10} for i in range(1, 4)]


async def total(ctx: NodeContext) -> int:
    rows = ctx.inputs["extract"]
    return sum(int(r["amount"]) for r in rows)


def is_large(ctx: NodeContext) -> str:
    return "large" if ctx.inputs["total"] > 50 else "small"
