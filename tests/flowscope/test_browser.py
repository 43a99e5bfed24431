"""The live page in a real browser: Debian's chromium driven by Playwright."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from playwright.async_api import Browser, Page

from flowscope.contract import STORED_RUN_STATUSES, RunStatus
from flowscope.engine import Engine, NodeContext, WorkflowBuilder
from flowscope.stack import Stack
from tests.collector.otlp import otlp_providers
from tests.collector.test_outage import OutageWriter, outage_factory
from tests.conftest import StackFactory
from tests.flowscope.conftest import shot
from tests.helpers import Gate

pytestmark = pytest.mark.browser


async def quick(ctx: NodeContext) -> int:
    return 1


async def explode(ctx: NodeContext) -> None:
    raise ValueError("invoice 42 has no customer")


async def node_state(page: Page, node_id: str, state: str) -> None:
    await page.wait_for_selector(f'[data-node="{node_id}"][data-state="{state}"]', timeout=20_000)


async def test_nodes_go_running_then_success_and_failures_turn_red(stack: Stack, browser: Browser) -> None:
    assert stack.endpoints is not None
    providers = otlp_providers(stack.collector, "grpc")
    engine = Engine(providers.telemetry())
    gate = Gate()
    wf = (
        WorkflowBuilder("browser-run", "Browser run")
        .code("extract", quick, label="Extract")
        .code("transform", gate, depends_on=["extract"], label="Transform")
        .code("load", quick, depends_on=["transform"], label="Load")
        .build()
    )
    handle = engine.start(wf)
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    await page.goto(f"{stack.endpoints.web}/executions/{handle.execution_id}")
    await gate.entered.wait()
    await asyncio.to_thread(providers.flush)
    await node_state(page, "extract", "success")
    await node_state(page, "transform", "running")
    assert await page.get_attribute('[data-node="load"]', "data-state") == "pending"
    await shot(page, "running")
    gate.release.set()
    await handle.result()
    await asyncio.to_thread(providers.flush)
    await node_state(page, "load", "success")
    await page.wait_for_selector('#status[data-status="success"]')
    await shot(page, "succeeded")

    failing = (
        WorkflowBuilder("browser-fail", "Browser fail").code("fetch", quick).code("bill", explode, depends_on=["fetch"])
    )
    failed = await engine.run(failing.build())
    await asyncio.to_thread(providers.flush)
    await page.goto(f"{stack.endpoints.web}/executions/{failed.execution_id}")
    await node_state(page, "bill", "failed")
    fill = await page.eval_on_selector('[data-node="bill"] rect', "el => getComputedStyle(el).fill")
    assert fill == "rgb(185, 28, 28)", "failed nodes are drawn red"
    assert "invoice 42 has no customer" in (await page.text_content("#error") or "")
    assert "invoice 42 has no customer" in (await page.text_content('[data-node="bill"] title') or "")
    await page.wait_for_selector('#status[data-status="failure"]')
    await shot(page, "failed")

    # The list shows both runs, with their statuses.
    await page.goto(stack.endpoints.web + "/")
    await page.wait_for_selector(f'tr[data-execution="{failed.execution_id}"][data-status="failure"]')
    await page.wait_for_selector(f'tr[data-execution="{handle.execution_id}"][data-status="success"]')
    await shot(page, "list")
    await asyncio.to_thread(providers.shutdown)
    await engine.aclose()


async def test_reload_mid_run_resumes_without_gaps(stack: Stack, browser: Browser) -> None:
    assert stack.endpoints is not None
    providers = otlp_providers(stack.collector, "grpc")
    engine = Engine(providers.telemetry())
    gate = Gate()
    wf = (
        WorkflowBuilder("reload", "Reload")
        .code("a", quick)
        .code("b", quick, depends_on=["a"])
        .code("hold", gate, depends_on=["b"])
        .code("c", quick, depends_on=["hold"])
        .code("d", quick, depends_on=["c"])
        .build()
    )
    emitted: list[tuple[str, int, str]] = []
    engine.events.add_callback(lambda e: emitted.append((e.execution_id, e.seq, e.type.value)))
    handle = engine.start(wf)
    page = await browser.new_page()
    await page.goto(f"{stack.endpoints.web}/executions/{handle.execution_id}")
    await gate.entered.wait()
    await asyncio.to_thread(providers.flush)
    await node_state(page, "hold", "running")
    await page.reload()
    await node_state(page, "hold", "running")
    gate.release.set()
    result = await handle.result()
    await asyncio.to_thread(providers.flush)
    await node_state(page, "d", "success")
    await page.wait_for_selector('#status[data-status="success"]')
    logged = await page.eval_on_selector_all("#log [data-seq]", "els => els.map(e => Number(e.dataset.seq))")
    # The log shows every event except progress (drawn as the bar): once each, in order, none missing.
    expected = [seq for ex, seq, kind in emitted if ex == result.execution_id and kind != "execution.progress"]
    assert logged == expected
    await shot(page, "reloaded")
    await asyncio.to_thread(providers.shutdown)
    await engine.aclose()


async def test_list_shows_runs_clickhouse_has_not_stored_yet(stack_factory: StackFactory, browser: Browser) -> None:
    """The list page's history read lags the live stream by the store's write: a run that ended
    before the page loaded must still show, from the bridge's recent events. ClickHouse is held
    unreachable here, which makes that window as long as the test needs."""
    writers: list[OutageWriter] = []
    async with stack_factory(writer_factory=outage_factory(writers)) as stack:
        assert stack.endpoints is not None
        providers = otlp_providers(stack.collector, "grpc")
        engine = Engine(providers.telemetry())
        done = await engine.run(WorkflowBuilder("unstored-ok").code("a", quick).build())
        failing = WorkflowBuilder("unstored-fail").code("a", quick).code("b", explode, depends_on=["a"])
        failed = await engine.run(failing.build())
        await asyncio.to_thread(providers.flush)
        api = f"{stack.endpoints.web}/api/v1/executions"
        async with httpx.AsyncClient() as client:
            assert (await client.get(api)).json()["items"] == [], "nothing is stored while ClickHouse is down"
            page = await browser.new_page()
            await page.goto(stack.endpoints.web + "/")
            await page.wait_for_selector(f'tr[data-execution="{failed.execution_id}"][data-status="failure"]')
            await page.wait_for_selector(f'tr[data-execution="{done.execution_id}"][data-status="success"]')
            assert "1/1" in (await page.text_content(f'tr[data-execution="{done.execution_id}"]') or "")
            await shot(page, "list-unstored")

            for writer in writers:
                writer.down.clear()
            assert stack.collector.pipeline is not None
            assert await asyncio.to_thread(stack.collector.pipeline.flush, 30.0)
            stored = {e["executionId"]: e["status"] for e in (await client.get(api)).json()["items"]}
            assert stored == {done.execution_id: "success", failed.execution_id: "failure"}
        await page.reload()
        await page.wait_for_selector(f'tr[data-execution="{failed.execution_id}"][data-status="failure"]')
        assert await page.locator("#executions tbody tr").count() == 2, "a run shows once, stored or live"
        await asyncio.to_thread(providers.shutdown)
        await engine.aclose()


async def test_a_restricted_viewer_sees_its_runs_live_and_no_others(
    stack_factory: StackFactory, browser: Browser
) -> None:
    tokens = {
        "tok-ana": ("ana", frozenset({"workflow:granted", "user:ana"})),
        "tok-engine": ("engine", frozenset({"ingest"})),
    }
    async with stack_factory(auth_tokens=tokens) as stack:
        assert stack.endpoints is not None
        providers = otlp_providers(stack.collector, "grpc", token="tok-engine")
        engine = Engine(providers.telemetry())
        granted = WorkflowBuilder("granted").code("a", quick).build()
        other = WorkflowBuilder("other").code("a", quick).build()
        earlier = await engine.run(granted)
        hers = await engine.run(other, user_id="ana")
        await asyncio.to_thread(providers.flush)
        page = await browser.new_page()
        await page.goto(stack.endpoints.web + "/?token=tok-ana")
        await page.wait_for_selector(f'tr[data-execution="{earlier.execution_id}"][data-status="success"]')
        await page.wait_for_selector(f'tr[data-execution="{hers.execution_id}"][data-status="success"]')
        await page.wait_for_selector("#conn.live")

        # Runs after the page loaded arrive live: one of each grant, and one neither covers.
        gate = Gate()
        running = engine.start(WorkflowBuilder("granted").code("hold", gate).build())
        unseen = await engine.run(other, user_id="bo")
        await gate.entered.wait()
        await asyncio.to_thread(providers.flush)
        await page.wait_for_selector(f'tr[data-execution="{running.execution_id}"][data-status="running"]')
        gate.release.set()
        await running.result()
        await asyncio.to_thread(providers.flush)
        await page.wait_for_selector(f'tr[data-execution="{running.execution_id}"][data-status="success"]')
        await shot(page, "list-restricted")
        shown = await page.eval_on_selector_all("#executions tbody tr", "rows => rows.map(r => r.dataset.execution)")
        assert sorted(shown) == sorted([earlier.execution_id, hers.execution_id, running.execution_id])
        assert unseen.execution_id not in shown
        await asyncio.to_thread(providers.shutdown)
        await engine.aclose()


async def test_the_page_names_states_as_the_contract_does(stack: Stack, browser: Browser) -> None:
    """The page's names come from /static/contract.js: a node failed by cancellation is drawn
    cancelled, and the status filter offers every status the history API filters on."""
    assert stack.endpoints is not None
    providers = otlp_providers(stack.collector, "grpc")
    engine = Engine(providers.telemetry())
    gate = Gate()
    handle = engine.start(WorkflowBuilder("browser-cancel").code("hold", gate).build())
    await gate.entered.wait()
    handle.cancel()
    await handle.result()
    await asyncio.to_thread(providers.flush)
    page = await browser.new_page()
    await page.goto(f"{stack.endpoints.web}/executions/{handle.execution_id}")
    await node_state(page, "hold", "cancelled")
    await page.wait_for_selector('#status[data-status="cancellation"]')

    await page.goto(stack.endpoints.web + "/")
    options = await page.eval_on_selector_all("#f-status option", "els => els.map(e => e.value)")
    assert options == ["", *(s.value for s in RunStatus if s in STORED_RUN_STATUSES)]
    await asyncio.to_thread(providers.shutdown)
    await engine.aclose()


async def test_a_lost_run_shows_lost_until_it_recovers(stack: Stack, browser: Browser) -> None:
    """docs/control.md, Liveness: the list and the execution page badge a lost run in its own
    colour, the log names the lost engine, and workflow.recovered makes it running again."""
    from flowscope.ws_bridge.control_events import LostRun
    from tests.ws_bridge.test_lost_status import _started

    assert stack.endpoints is not None and stack.bridge is not None and stack.bridge.emit_lost is not None
    providers = otlp_providers(stack.collector, "grpc")
    gate = Gate()
    engine, handle, last = await _started(stack, providers, gate)
    run = await browser.new_page(viewport={"width": 1280, "height": 900})
    await run.goto(f"{stack.endpoints.web}/executions/{handle.execution_id}")
    await run.wait_for_selector('#status[data-status="running"]')
    listing = await browser.new_page(viewport={"width": 1280, "height": 900})
    await listing.goto(stack.endpoints.web + "/")
    row = f'tr[data-execution="{handle.execution_id}"]'
    await listing.wait_for_selector(f'{row}[data-status="running"]')

    stack.bridge.emit_lost(LostRun(handle.execution_id, "liveness", last + 1, "e-1", "worker-7", "disconnected"))
    await run.wait_for_selector('#status[data-status="lost"]')
    await listing.wait_for_selector(f'{row}[data-status="lost"]')
    lost_colour = "rgb(190, 24, 93)"
    assert await run.eval_on_selector("#status", "el => getComputedStyle(el).backgroundColor") == lost_colour
    assert await listing.eval_on_selector(f"{row} .badge", "el => getComputedStyle(el).backgroundColor") == lost_colour
    line = await run.text_content('[data-type="workflow.lost"]') or ""
    assert f"#{last + 1}" in line and "worker-7" in line and "disconnected" in line
    await shot(run, "lost")

    assert handle.execution.recovered(last + 1)
    await asyncio.to_thread(providers.flush)
    await run.wait_for_selector('#status[data-status="running"]')
    await listing.wait_for_selector(f'{row}[data-status="running"]')
    gate.release.set()
    await handle.result()
    await asyncio.to_thread(providers.flush)
    await run.wait_for_selector('#status[data-status="success"]')
    await listing.wait_for_selector(f'{row}[data-status="success"]')
    await asyncio.to_thread(providers.shutdown)
    await engine.aclose()
