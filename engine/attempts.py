"""The attempt runner: runs one node's attempts — the wait for a slot, the timeout, the retries.

The scheduler (engine/scheduler.py) starts one `AttemptRunner.run` task per ready node and
learns the node's last attempt from it; what each attempt looks like from outside (spans,
events, metrics) the runner tells the run reporter (engine/reporting.py).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry.trace import Span

from flowscope.engine.dag import Node
from flowscope.engine.nodes import NodeType
from flowscope.engine.results import NodeState, Result
from flowscope.engine.retry import NonRetryableError
from flowscope.engine.template import TemplateError
from flowscope.engine.tools import ToolInputError

if TYPE_CHECKING:
    from flowscope.engine.reporting import RunReporter
    from flowscope.engine.scheduler import Execution

# Errors that mean the workflow definition or wiring is wrong, not that the work failed.
ERROR_TYPES: tuple[type[BaseException], ...] = (TemplateError, ToolInputError, NonRetryableError)


class NodeTimeout(TimeoutError):
    pass


@dataclass
class Attempt:
    result: Result
    output: Any = None
    error: BaseException | None = None


def describe(error: BaseException | None) -> str:
    if error is None:
        return "unknown error"
    if isinstance(error, asyncio.CancelledError):
        return "cancelled"
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def error_type(result: Result, error: BaseException | None) -> str:
    if result in (Result.TIMEOUT, Result.CANCELLATION):
        return result.value  # docs/telemetry.md: error.type is `timeout` / `cancellation`
    return type(error).__qualname__ if error is not None else "unknown"


class AttemptRunner:
    """Runs the attempts of one execution's nodes, one `run` call per node."""

    def __init__(self, execution: Execution, reporter: RunReporter) -> None:
        self._execution = execution
        self._reporter = reporter

    async def run(self, node: Node) -> Attempt:
        """Attempts until one succeeds, the retry policy gives up, or the error is not retryable."""
        execution, reporter = self._execution, self._reporter
        node_type = execution.registry.node_type(node.type)
        ready_at = time.perf_counter()
        attempt_no = 0
        while True:
            attempt_no += 1
            await execution.unpaused.wait()
            if reporter.events_backlogged():
                await reporter.event_room()
            async with execution.slots:
                reporter.queue_waited(node, time.perf_counter() - ready_at)
                attempt, span = await self._attempt(node, attempt_no, node_type)
            if attempt.result is Result.SUCCESS or attempt.error is None:
                return attempt
            if attempt.result is Result.CANCELLATION or not node.retry.should_retry(attempt.error, attempt_no):
                return attempt
            if isinstance(attempt.error, ERROR_TYPES):
                return attempt
            delay = node.retry.delay_s(attempt_no, execution.engine.rng)
            execution.set_state(node.id, NodeState.RETRYING)
            reporter.node_retrying(node, span, attempt_no, delay, attempt.error)
            await asyncio.sleep(delay)
            ready_at = time.perf_counter()

    async def _attempt(self, node: Node, attempt_no: int, node_type: NodeType) -> tuple[Attempt, Span]:
        execution, reporter = self._execution, self._reporter
        inputs = {d: execution.outputs[d] for d in node.depends_on if d in execution.outputs}
        execution.attempts[node.id] = attempt_no
        execution.set_state(node.id, NodeState.RUNNING)
        ctx, secret_keys = reporter.attempt_started(execution, node, attempt_no, node_type, inputs)
        span, span_ctx, executor = ctx.span, ctx.otel_context, node_type.executor

        started = time.perf_counter()
        token = otel_context.attach(span_ctx)
        # Without a node timeout the step runs bare: a Timeout context per attempt is a measurable share of a step.
        timeout = asyncio.timeout(node.timeout_s) if node.timeout_s is not None else None
        try:
            if timeout is None:
                output = await executor.execute(ctx)
            else:
                async with timeout:
                    output = await executor.execute(ctx)
            attempt = Attempt(Result.SUCCESS, output)
        except BaseException as exc:
            attempt = _failed(node, timeout, exc)
        finally:
            otel_context.detach(token)
        duration_s = time.perf_counter() - started
        if attempt.result is Result.SUCCESS:
            execution.node_succeeded(node, node_type, attempt.output)
        else:
            failed = NodeState.CANCELLED if attempt.result is Result.CANCELLATION else NodeState.FAILED
            execution.set_state(node.id, failed)
        reporter.attempt_ended(ctx, attempt, duration_s, secret_keys)
        if attempt.result is Result.CANCELLATION:
            # Re-raise so the task ends cancelled, as its canceller expects.
            raise asyncio.CancelledError
        return attempt, span


def _failed(node: Node, timeout: asyncio.Timeout | None, error: BaseException) -> Attempt:
    """What an attempt that raised `error` comes to; only the node's timeout counts as its timeout."""
    if isinstance(error, asyncio.CancelledError):
        return Attempt(Result.CANCELLATION, error=error)
    if isinstance(error, TimeoutError):
        if timeout is not None and timeout.expired():
            return Attempt(Result.TIMEOUT, error=NodeTimeout(f"node {node.id!r} timed out after {node.timeout_s:g}s"))
        return Attempt(Result.FAILURE, error=error)
    if isinstance(error, ERROR_TYPES):
        return Attempt(Result.ERROR, error=error)
    if isinstance(error, Exception):
        return Attempt(Result.FAILURE, error=error)
    raise error  # KeyboardInterrupt, SystemExit: not an outcome of the node
