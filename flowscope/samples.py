"""Sample workflows for `flowscope demo`: what the product is for, in four runs.

Each is deterministic and local (no network, no model): an LLM agent with
parallel tool calls, an ETL with a flaky extract that retries, a billing sync
that fails and is then resumed, and a report with a slow node that trips the
performance warning.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

from flowscope.contract import TERMINAL_EVENTS
from flowscope.engine import (
    Catalog,
    Engine,
    ExecutionResult,
    LocalProvider,
    NodeContext,
    NodeRegistry,
    Result,
    RetryPolicy,
    ToolRegistry,
    Workflow,
    WorkflowBuilder,
)
from flowscope.ws_bridge.client import LiveClient, LiveClientError

T = TypeVar("T")

tools = ToolRegistry()


@tools.register
async def search_web(query: str) -> list[dict[str, str]]:
    """Search an (offline) index of pages."""
    await asyncio.sleep(0.35)
    return [{"title": f"{query} — overview", "url": "https://example.org/a"}]


@tools.register
async def lookup_weather(city: str) -> dict[str, Any]:
    """Current weather for a city (offline)."""
    await asyncio.sleep(0.25)
    return {"city": city, "tempC": 17 + len(city) % 9, "sky": "clear"}


@tools.register
async def query_orders(region: str, limit: int = 5) -> list[dict[str, Any]]:
    """Recent orders for a region (offline)."""
    await asyncio.sleep(0.3)
    return [{"id": i, "region": region, "amount": 10 * i} for i in range(1, limit + 1)]


def agent() -> Workflow:
    return (
        WorkflowBuilder("research-agent", "Research agent", version="4")
        .llm("plan", "local-planner", "Plan research about {{ input.topic }} in {{ input.city }}", label="Plan")
        .tool(
            "search",
            "search_web",
            args={"query": "{{ input.topic }}"},
            depends_on=["plan"],
            label="Web search",
        )
        .tool(
            "weather",
            "lookup_weather",
            args={"city": "{{ input.city }}"},
            depends_on=["plan"],
            label="Weather",
        )
        .tool("orders", "query_orders", args={"region": "{{ input.city }}", "limit": 3}, depends_on=["plan"])
        .llm(
            "answer",
            "local-writer",
            "Answer using {{ nodes.search }} {{ nodes.weather }} {{ nodes.orders }}",
            depends_on=["search", "weather", "orders"],
            label="Write answer",
        )
        .build()
    )


_extract_calls = itertools.count(1)


async def extract_orders(ctx: NodeContext) -> list[dict[str, Any]]:
    await asyncio.sleep(0.15)
    # Every other call fails as a flaky upstream would; the retry policy absorbs it.
    if next(_extract_calls) % 2 == 1:
        raise ConnectionError("orders API reset the connection")
    ctx.log("fetched page 1 of orders", rows=4)
    return [{"id": i, "amount": 25 * i} for i in range(1, 5)]


async def transform_orders(ctx: NodeContext) -> dict[str, Any]:
    await asyncio.sleep(0.1)
    rows = ctx.inputs["extract"]
    return {"rows": len(rows), "total": sum(r["amount"] for r in rows)}


async def load_warehouse(ctx: NodeContext) -> str:
    await asyncio.sleep(0.2)
    return f"loaded {ctx.inputs['transform']['rows']} rows"


def etl() -> Workflow:
    return (
        WorkflowBuilder("etl-orders", "ETL orders", version="2")
        .code(
            "extract",
            extract_orders,
            label="Extract",
            retry=RetryPolicy(max_attempts=4, initial_delay_s=0.2, retry_on=frozenset({"ConnectionError"})),
        )
        .code("transform", transform_orders, depends_on=["extract"], label="Transform")
        .code("load", load_warehouse, depends_on=["transform"], label="Load")
        .build()
    )


@dataclass
class Switch:
    """A dependency that is down until it is repaired (for the resume demo)."""

    down: bool = True
    calls: list[str] = field(default_factory=list)


ledger = Switch()


async def fetch_invoices(ctx: NodeContext) -> list[int]:
    await asyncio.sleep(0.2)
    return [120, 80, 45]


async def post_ledger(ctx: NodeContext) -> dict[str, Any]:
    await asyncio.sleep(0.15)
    ledger.calls.append(ctx.execution_id)
    if ledger.down:
        raise RuntimeError("ledger service returned 503 Service Unavailable")
    return {"posted": sum(ctx.inputs["fetch"])}


def billing() -> Workflow:
    return (
        WorkflowBuilder("billing-sync", "Billing sync")
        .code("fetch", fetch_invoices, label="Fetch invoices")
        .code("post", post_ledger, depends_on=["fetch"], label="Post to ledger")
        .node("notify", "wait", delay_s=0.05, depends_on=["post"], label="Notify")
        .build()
    )


async def render_pdf(ctx: NodeContext) -> str:
    # Longer than the 5 s warning threshold for code nodes, so the live view flags it.
    for page in range(1, 7):
        await asyncio.sleep(1.0)
        ctx.log(f"rendered page {page}")
    return "report.pdf"


def report() -> Workflow:
    return (
        WorkflowBuilder("weekly-report", "Weekly report")
        .code("gather", fetch_invoices, label="Gather data")
        .code("render", render_pdf, depends_on=["gather"], label="Render PDF")
        .llm("summary", "local-writer", "Summarise {{ nodes.gather }}", depends_on=["gather"])
        .build()
    )


def registry() -> NodeRegistry:
    return NodeRegistry(tools=tools, providers={"local": LocalProvider(token_delay_s=0.02, first_token_delay_s=0.1)})


def catalog() -> Catalog:
    """Every sample with the registry they run with: `flowscope worker flowscope.samples:catalog`."""
    return Catalog([agent(), etl(), billing(), report()], registry())


async def run_rounds(
    engine: Engine, runs: int | None, interval_s: float, report: Callable[[int, list[ExecutionResult]], None]
) -> int:
    """Rounds of every sample, `interval_s` apart, until `runs` (or forever); returns rounds done."""
    return await repeat_rounds(lambda round_no: run_round(engine, round_no), runs, interval_s, report)


async def repeat_rounds(
    one_round: Callable[[int], Awaitable[list[T]]],
    runs: int | None,
    interval_s: float,
    report: Callable[[int, list[T]], None],
) -> int:
    done = 0
    while runs is None or done < runs:
        report(done, await one_round(done))
        done += 1
        if runs is None or done < runs:
            await asyncio.sleep(interval_s)
    return done


def _user(round_no: int) -> str:
    users = ["ana", "bo", "chen"]
    return users[round_no % len(users)]


async def run_round(engine: Engine, round_no: int) -> list[ExecutionResult]:
    """One round of every sample; the billing run fails, then is resumed after a repair."""
    ledger.down = True
    user = _user(round_no)
    first = await asyncio.gather(
        engine.run(agent(), {"topic": "solar panels", "city": "Lisbon"}, user_id=user, trigger="api"),
        engine.run(etl(), None, trigger="schedule"),
        engine.run(billing(), None, trigger="schedule"),
    )
    failed = first[2]
    results = list(first)
    if failed.result is not Result.SUCCESS:
        ledger.down = False
        results.append(await engine.resume(failed).result())
    results.append(await engine.run(report(), None, user_id=user, trigger="manual"))
    return results


class StackRunError(RuntimeError):
    """The stack refused to start a sample, or its live stream ended before the run did."""


@dataclass(frozen=True)
class RunEnd:
    """A run started through a stack, as its last live event told it."""

    execution_id: str
    workflow_name: str
    result: str
    duration_ms: float


class StackRuns:
    """Starts samples through a stack's control API and follows each to its end over the live
    WebSocket: what `flowscope demo` does, as any client of the stack would."""

    def __init__(self, web: str, token: str | None) -> None:
        self.web = web
        self.token = token
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self.api = httpx.AsyncClient(base_url=web, headers=headers, timeout=30.0)

    async def aclose(self) -> None:
        await self.api.aclose()

    async def start(self, workflow_id: str, workflow_input: Any, **fields: Any) -> RunEnd:
        body = {"workflowId": workflow_id, "input": workflow_input, **fields}
        return await self._follow(await self._post("/api/v1/executions", body))

    async def retry(self, execution_id: str) -> RunEnd:
        return await self._follow(await self._post(f"/api/v1/executions/{execution_id}/retry", {}))

    async def _post(self, path: str, body: dict[str, Any]) -> str:
        try:
            answer = await self.api.post(path, json=body)
        except httpx.HTTPError as exc:
            raise StackRunError(f"POST {path}: {exc}") from exc
        if answer.status_code != 201:
            raise StackRunError(f"POST {path}: {answer.status_code} {answer.text[:300]}")
        execution_id: str = answer.json()["executionId"]
        return execution_id

    async def _follow(self, execution_id: str) -> RunEnd:
        try:
            async for event in LiveClient(self.web, execution_id=execution_id, token=self.token):
                if event["type"] in TERMINAL_EVENTS:
                    data = event["data"]
                    return RunEnd(execution_id, event["workflowName"], str(data["result"]), float(data["durationMs"]))
        except LiveClientError as exc:
            raise StackRunError(f"watching {execution_id}: {exc}") from exc
        raise StackRunError(f"the live stream of {execution_id} ended before the run did")


async def run_stack_round(runs: StackRuns, round_no: int) -> list[RunEnd]:
    """One round of every sample started through the stack; the failed billing run is retried
    from its failed node after the repair."""
    ledger.down = True
    user = _user(round_no)
    first = await asyncio.gather(
        runs.start("research-agent", {"topic": "solar panels", "city": "Lisbon"}, userId=user, trigger="api"),
        runs.start("etl-orders", None, trigger="schedule"),
        runs.start("billing-sync", None, trigger="schedule"),
    )
    failed = first[2]
    results = list(first)
    if failed.result != Result.SUCCESS:
        ledger.down = False
        results.append(await runs.retry(failed.execution_id))
    results.append(await runs.start("weekly-report", None, userId=user, trigger="manual"))
    return results
