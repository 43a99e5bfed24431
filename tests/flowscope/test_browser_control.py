"""Steering runs from the live page (docs/control.md), in a real browser: Debian's chromium
driven by Playwright, against the embedded stack and a real `flowscope worker` process."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, Request, Route

from tests.conftest import StackFactory
from tests.flowscope.conftest import shot
from tests.flowscope.test_control_e2e import (
    OPERATOR,
    TOKENS,
    VIEWER,
    Control,
    connected_engine,
    start,
    steered,
    worker,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# Events reach the page through the worker's OTLP export and the collector: bounded, not timed.
WAIT_MS = 60_000


async def opened(browser: Browser, url: str) -> Page:
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(WAIT_MS)
    await page.goto(url)
    return page


async def status(page: Page, wanted: str) -> None:
    await page.wait_for_selector(f'#status[data-status="{wanted}"]')


async def new_execution(page: Page, previous: str | None = None) -> str:
    """The execution whose page the browser was sent to, once it is not `previous`'s."""
    await page.wait_for_url(lambda url: "/executions/" in url and (previous is None or previous not in url))
    return page.url.split("/executions/", 1)[1].split("?", 1)[0]


async def settled(page: Page) -> None:
    """The page knows what the token may steer, and has drawn what follows from it."""
    await page.evaluate("steering")
    await page.evaluate("new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)))")


async def no_controls(page: Page) -> None:
    await settled(page)
    assert await page.get_by_role("button").count() == 0
    for selector in ("#controls", "#start", "form", "textarea", "#retry-node"):
        assert await page.locator(selector).count() == 0, selector


class Held:
    """Holds the page's next POST to `path` in the browser until released, so what the page shows
    while a command is in flight can be looked at; then sends it on, unchanged, to the stack."""

    def __init__(self) -> None:
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, route: Route) -> None:
        self.arrived.set()
        await self.release.wait()
        await route.continue_()


async def test_an_operator_starts_a_run_with_json_input_then_pauses_and_resumes_it(
    stack_factory: StackFactory, tmp_path: Path, browser: Browser
) -> None:
    async with steered(stack_factory, tmp_path) as (stack, control, _):
        assert stack.endpoints is not None
        page = await opened(browser, f"{stack.endpoints.web}/?token={OPERATOR}")
        posted: list[Request] = []
        page.on("request", lambda r: posted.append(r) if r.method == "POST" else None)
        form = page.locator('form[data-workflow="ctl-hold"]')
        await form.wait_for()
        assert await page.locator("form[data-workflow]").count() == 3, "one Start per served workflow"

        # Bad JSON: said so where it was typed, and nothing is sent.
        box = form.get_by_role("textbox")
        await box.fill('{"n": ')
        await form.get_by_role("button", name="Start").click()
        await form.locator('[role="alert"]', has_text="not valid JSON").wait_for()
        assert await box.get_attribute("aria-invalid") == "true"
        assert posted == [] and page.url.endswith(f"/?token={OPERATOR}")
        await shot(page, "control-start-bad-json")

        await box.fill('{"n": 7, "who": "page"}')
        await form.get_by_role("button", name="Start").click()
        execution_id = await new_execution(page)
        assert [r.post_data_json for r in posted] == [{"workflowId": "ctl-hold", "input": {"n": 7, "who": "page"}}]
        assert posted[0].headers["content-type"] == "application/json"
        await control.entered(execution_id, "a")
        assert (await control.event(execution_id, "workflow.started"))["data"]["trigger"] == "api"

        await status(page, "running")
        assert await page.get_by_role("button", name="Resume").count() == 0
        held = Held()
        await page.route("**/pause", held)
        await page.get_by_role("button", name="Pause").click()
        await held.arrived.wait()
        # In flight: every command button waits for the answer.
        for name in ("Pause", "Stop"):
            assert await page.get_by_role("button", name=name).is_disabled()
        held.release.set()
        await status(page, "paused")
        await control.event(execution_id, "workflow.paused")
        await page.get_by_role("button", name="Resume").wait_for()
        assert await page.get_by_role("button", name="Pause").count() == 0
        await page.wait_for_function("document.activeElement.textContent === 'Resume'")
        await page.wait_for_selector('#log [data-type="workflow.paused"]')
        await shot(page, "control-paused")

        await page.get_by_role("button", name="Resume").click()
        await control.event(execution_id, "workflow.resumed")
        await page.wait_for_selector('#log [data-type="workflow.resumed"]')
        await page.get_by_role("button", name="Pause").wait_for()
        control.open("a")
        await control.status(execution_id, "success")
        await status(page, "success")
        assert await page.get_by_role("button").count() == 0, "a run that succeeded offers nothing to do"
        assert [r.url.rsplit("/", 1)[1] for r in posted[1:]] == ["pause", "resume"]
        await shot(page, "control-resumed")


async def test_retry_a_failed_run_whole_and_from_an_earlier_node(
    stack_factory: StackFactory, tmp_path: Path, browser: Browser
) -> None:
    async with steered(stack_factory, tmp_path) as (stack, control, _):
        assert stack.endpoints is not None
        (tmp_path / "flaky.broken").touch()
        failed = await start(control, "ctl-chain")
        await control.status(failed, "failure")
        (tmp_path / "flaky.broken").unlink()

        page = await opened(browser, f"{stack.endpoints.web}/executions/{failed}?token={OPERATOR}")
        await status(page, "failure")
        retry = page.get_by_role("button", name="Retry", exact=True)
        await retry.wait_for()
        assert await page.get_by_role("button", name="Pause").count() == 0
        assert await page.get_by_role("button", name="Stop").count() == 0
        node = page.get_by_label("From node")
        assert await node.locator("option").evaluate_all("os => os.map((o) => o.value)") == ["first", "flaky", "last"]
        assert await node.input_value() == "flaky", "the first failed node is offered first"
        await shot(page, "control-failed")

        await retry.click()
        whole = await new_execution(page, failed)
        done = await control.status(whole, "success")
        assert done["resumedFrom"] == failed
        assert sorted(control.ran(whole)) == ["flaky", "last"]
        await status(page, "success")
        await shot(page, "control-retried")

        await page.goto(f"{stack.endpoints.web}/executions/{failed}?token={OPERATOR}")
        await status(page, "failure")
        await page.get_by_label("From node").select_option("first")
        await page.get_by_role("button", name="Retry from this node").click()
        earlier = await new_execution(page, failed)
        assert earlier != whole
        done = await control.status(earlier, "success")
        assert done["resumedFrom"] == failed
        assert sorted(control.ran(earlier)) == ["first", "flaky", "last"]
        await status(page, "success")


async def test_a_read_only_token_sees_runs_and_no_control_at_all(
    stack_factory: StackFactory, tmp_path: Path, browser: Browser
) -> None:
    async with steered(stack_factory, tmp_path) as (stack, control, _):
        assert stack.endpoints is not None
        web = stack.endpoints.web
        (tmp_path / "flaky.broken").touch()
        failed = await start(control, "ctl-chain")
        await control.status(failed, "failure")
        running = await start(control, "ctl-hold")
        await control.entered(running, "a")

        page = await opened(browser, f"{web}/?token={VIEWER}")
        await page.wait_for_selector(f'tr[data-execution="{running}"][data-status="running"]')
        await page.wait_for_selector(f'tr[data-execution="{failed}"][data-status="failure"]')
        await no_controls(page)
        await shot(page, "control-readonly-list")

        await page.goto(f"{web}/executions/{running}?token={VIEWER}")
        await status(page, "running")
        await page.wait_for_selector('[data-node="a"][data-state="running"]')
        await no_controls(page)
        await page.goto(f"{web}/executions/{failed}?token={VIEWER}")
        await status(page, "failure")
        await no_controls(page)
        await shot(page, "control-readonly-failed")

        # The same pages for the operator do have them: what is absent above is for lack of grant.
        await page.goto(f"{web}/executions/{failed}?token={OPERATOR}")
        await page.get_by_role("button", name="Retry", exact=True).wait_for()
        control.open("a")
        await control.status(running, "success")


async def test_a_refused_command_shows_the_servers_message(
    stack_factory: StackFactory, tmp_path: Path, browser: Browser
) -> None:
    async with steered(stack_factory, tmp_path) as (stack, control, process):
        assert stack.endpoints is not None
        execution_id = await start(control, "ctl-hold")
        await control.entered(execution_id, "a")
        page = await opened(browser, f"{stack.endpoints.web}/executions/{execution_id}?token={OPERATOR}")
        await status(page, "running")
        await page.get_by_role("button", name="Pause").wait_for()

        os.kill(process.pid, signal.SIGKILL)
        await process.wait()
        await control.status(execution_id, "lost")
        await status(page, "lost")
        retry = page.get_by_role("button", name="Retry", exact=True)
        async with page.expect_response(lambda r: r.url.endswith("/retry")) as answered:
            await retry.click()
        answer = await answered.value
        body: dict[str, Any] = await answer.json()
        assert answer.status in (409, 503), body
        assert "engine" in body["error"]
        alert = page.locator("#control-error")
        await alert.filter(has_text=body["error"]).wait_for()
        assert await alert.get_attribute("aria-live") == "assertive"
        assert f"HTTP {answer.status}" in (await alert.text_content() or "")
        assert execution_id in page.url, "a refused retry goes nowhere"
        assert not await retry.is_disabled(), "the answer came: the buttons are back"
        assert await page.evaluate("document.activeElement.textContent") == "Retry"
        await shot(page, "control-refused")


async def test_buttons_follow_the_live_status_and_stop_ends_the_run(
    stack_factory: StackFactory, tmp_path: Path, browser: Browser
) -> None:
    async with steered(stack_factory, tmp_path) as (stack, control, _):
        assert stack.endpoints is not None
        execution_id = await start(control, "ctl-wide")
        await control.entered(execution_id, "g1")
        await control.entered(execution_id, "g2")
        page = await opened(browser, f"{stack.endpoints.web}/executions/{execution_id}?token={OPERATOR}")
        await page.get_by_role("button", name="Pause").wait_for()

        # Paused by another client: the page learns it from the run's events alone.
        paused = await control.post(f"/api/v1/executions/{execution_id}/pause")
        assert paused.status_code == 200, paused.text
        await status(page, "paused")
        await page.get_by_role("button", name="Resume").wait_for()
        assert await page.get_by_role("button", name="Pause").count() == 0

        await page.get_by_role("button", name="Stop").click()
        await control.event(execution_id, "workflow.cancelled")
        await status(page, "cancellation")
        await page.get_by_role("button", name="Retry", exact=True).wait_for()
        for gone in ("Pause", "Resume", "Stop"):
            assert await page.get_by_role("button", name=gone).count() == 0, gone
        ended = await control.status(execution_id, "cancellation")
        assert {n["nodeId"]: n["state"] for n in ended["nodes"]}["g1"] == "cancelled"
        await shot(page, "control-stopped")

        # A cancelled run is retried like a failed one.
        control.open("g1")
        control.open("g2")
        await page.get_by_role("button", name="Retry", exact=True).click()
        again = await new_execution(page, execution_id)
        assert (await control.status(again, "success"))["resumedFrom"] == execution_id
        await status(page, "success")


async def test_a_workflow_scoped_grant_steers_that_workflow_only(
    stack_factory: StackFactory, tmp_path: Path, browser: Browser
) -> None:
    scoped = "scoped-token"
    tokens = {**TOKENS, scoped: ("scoped", frozenset({"*", "control:workflow:ctl-hold"}))}
    async with stack_factory(auth_tokens=tokens) as stack:
        assert stack.endpoints is not None
        web = stack.endpoints.web
        control = Control(web, tmp_path)
        async with worker(web, stack.endpoints.otlp_grpc, tmp_path):
            await connected_engine(control)
            (tmp_path / "flaky.broken").touch()
            failed = await start(control, "ctl-chain")
            await control.status(failed, "failure")
            held = await start(control, "ctl-hold")
            await control.entered(held, "a")

            page = await opened(browser, f"{web}/?token={scoped}")
            await page.locator('form[data-workflow="ctl-hold"]').wait_for()
            await page.wait_for_selector(f'tr[data-execution="{failed}"][data-status="failure"]')
            shown = await page.locator("form[data-workflow]").evaluate_all("fs => fs.map((f) => f.dataset.workflow)")
            assert shown == ["ctl-hold"]

            await page.goto(f"{web}/executions/{failed}?token={scoped}")
            await status(page, "failure")
            await no_controls(page)
            await page.goto(f"{web}/executions/{held}?token={scoped}")
            await page.get_by_role("button", name="Pause").wait_for()
            await page.get_by_role("button", name="Stop").wait_for()
            await shot(page, "control-scoped")
            control.open("a")
            await control.status(held, "success")
            await control.http.aclose()
