"""The asyncio scheduler: runs a workflow's DAG and reports every step as it happens."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import httpx
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Status, StatusCode

from engine import telemetry as t
from engine.context import NodeContext
from engine.dag import Node, Workflow
from engine.events import EventBus, EventType, WorkflowEvent
from engine.nodes import NodeRegistry
from engine.propagation import extract_context
from engine.redact import preview
from engine.retry import NonRetryableError
from engine.telemetry import Telemetry
from engine.template import TemplateError
from engine.tools import ToolInputError


class Result(StrEnum):
    """Outcome of a run or an attempt, as the CI/CD semantic conventions name them."""

    SUCCESS = "success"
    FAILURE = "failure"
    ERROR = "error"
    TIMEOUT = "timeout"
    CANCELLATION = "cancellation"
    SKIP = "skip"


class NodeState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    WAITING = "waiting"
    RETRYING = "retrying"
    SUCCESS = "success"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"


_DONE_STATES = frozenset({NodeState.SUCCESS, NodeState.FAILED, NodeState.SKIPPED, NodeState.CANCELLED})
# Errors that mean the workflow definition or wiring is wrong, not that the work failed.
_ERROR_TYPES: tuple[type[BaseException], ...] = (TemplateError, ToolInputError, NonRetryableError)
_MAX_PENDING_SIGNALS = 1_000
_DEFAULT_CONCURRENCY = 64
_DEFAULT_PROGRESS_INTERVAL_S = 0.1


class ExecutionFailed(RuntimeError):
    def __init__(self, result: ExecutionResult) -> None:
        self.result = result
        super().__init__(f"execution {result.execution_id} ended with {result.result.value}: {result.error}")


@dataclass
class ExecutionResult:
    execution_id: str
    workflow: Workflow
    result: Result
    outputs: dict[str, Any]
    node_states: dict[str, NodeState]
    attempts: dict[str, int]
    error: str | None
    duration_s: float
    span_context: SpanContext
    events_emitted: int
    workflow_input: Any = None

    @property
    def trace_id(self) -> str:
        return format(self.span_context.trace_id, "032x")

    @property
    def output(self) -> Any:
        """Outputs of the workflow's sink nodes (the only one's output when there is one)."""
        sinks = [n.id for n in self.workflow.nodes if not self.workflow.dependents(n.id) and n.id in self.outputs]
        if len(sinks) == 1:
            return self.outputs[sinks[0]]
        return {s: self.outputs[s] for s in sinks}

    def raise_for_result(self) -> ExecutionResult:
        if self.result is not Result.SUCCESS:
            raise ExecutionFailed(self)
        return self


@dataclass
class _Attempt:
    result: Result
    output: Any = None
    error: BaseException | None = None


@dataclass
class _Options:
    trigger: str = "api"
    user_id: str | None = None
    parent: Context | None = None
    remote: bool = False
    reused: dict[str, Any] = field(default_factory=dict)
    resumed_from: ExecutionResult | None = None
    parent_execution_id: str | None = None


class Execution:
    """One run of a workflow. Created by `Engine.start`; driven by `run()`."""

    def __init__(self, engine: Engine, workflow: Workflow, workflow_input: Any, execution_id: str, options: _Options):
        self.engine = engine
        self.workflow = workflow
        self.workflow_input = workflow_input
        self.execution_id = execution_id
        self.options = options
        self.registry: NodeRegistry = engine.registry
        self._tel = engine.telemetry
        self._seq = 0
        self.states: dict[str, NodeState] = dict.fromkeys(workflow.node_ids, NodeState.PENDING)
        # Kept incrementally: recounting every state per event is O(n²) on wide workflows.
        self._counts: dict[NodeState, int] = dict.fromkeys(NodeState, 0)
        self._counts[NodeState.PENDING] = len(self.states)
        self.outputs: dict[str, Any] = {}
        self.attempts: dict[str, int] = dict.fromkeys(workflow.node_ids, 0)
        self.durations_ms: dict[str, float] = {}
        self._untaken: dict[str, str] = {}
        self._semaphore = asyncio.Semaphore(engine.concurrency)
        self._unpaused = asyncio.Event()
        self._unpaused.set()
        self._cancel_requested = asyncio.Event()
        self._signals: dict[str, asyncio.Future[Any]] = {}
        self.started = asyncio.Event()
        self._span: Span = trace.INVALID_SPAN
        self._run_context: Context = Context()
        self._ids = ("0" * 32, "0" * 16)

    @property
    def http_client(self) -> httpx.AsyncClient:
        # Created on first use: its TLS context takes ~100 ms to load, and many workflows make no HTTP call.
        return self.engine.http_client

    # -- control from outside --------------------------------------------------------------

    def cancel(self, reason: str = "cancelled by request") -> None:
        self._cancel_reason = reason
        self._cancel_requested.set()

    def pause(self, reason: str = "paused by request") -> None:
        if self._unpaused.is_set() and not self._finished:
            self._unpaused.clear()
            self._emit(EventType.WORKFLOW_PAUSED, data={"reason": reason})

    def resume(self, reason: str = "resumed by request") -> None:
        if not self._unpaused.is_set() and not self._finished:
            self._unpaused.set()
            self._emit(EventType.WORKFLOW_RESUMED, data={"reason": reason})

    @property
    def paused(self) -> bool:
        return not self._unpaused.is_set()

    def signal(self, name: str, payload: Any = None) -> None:
        future = self._signal_future(name)
        if not future.done():
            future.set_result(payload)

    _finished = False
    _remaining: dict[str, int]
    _tasks: dict[asyncio.Task[_Attempt], str]
    _settled: asyncio.Future[tuple[Result, str | None]]
    _observed = True
    _exporting = True
    _event_attributes: dict[str, Any] = {}  # noqa: RUF012 - replaced per instance before use
    _last_progress = 0.0
    _progress_timer: asyncio.TimerHandle | None = None
    _cancel_reason = "cancelled by request"

    # -- hooks for node executors ----------------------------------------------------------

    def node_log(self, ctx: NodeContext, message: str, level: str, attributes: Mapping[str, Any]) -> None:
        self._emit(
            EventType.EXECUTION_LOG,
            node=ctx.node,
            span=ctx.span,
            data={"level": level, "message": message, "attributes": dict(attributes), "attempt": ctx.attempt},
        )

    def node_waiting(self, ctx: NodeContext, waiting_for: str) -> None:
        self._set_state(ctx.node.id, NodeState.WAITING)
        self._emit(EventType.NODE_WAITING, node=ctx.node, span=ctx.span, data={"waitingFor": waiting_for})
        self._progress()

    async def wait_for_signal(self, ctx: NodeContext, name: str) -> Any:
        future = self._signal_future(name)
        if not future.done():
            self.node_waiting(ctx, f"signal {name}")
        payload = await future
        self._set_state(ctx.node.id, NodeState.RUNNING)
        return payload

    async def run_child(self, ctx: NodeContext, workflow: Workflow, child_input: Any) -> Any:
        handle = self.engine.start(
            workflow,
            child_input,
            trigger="subworkflow",
            user_id=self.options.user_id,
            parent_context=ctx.otel_context,
            _parent_execution_id=self.execution_id,
        )
        ctx.set_attribute("workflow.child.execution.id", handle.execution_id)
        try:
            result = await handle.result()
        except asyncio.CancelledError:
            handle.cancel("parent execution cancelled")
            with contextlib.suppress(asyncio.CancelledError):
                await handle.result()
            raise
        if result.result is not Result.SUCCESS:
            raise ChildWorkflowFailed(result)
        return result.output

    def _signal_future(self, name: str) -> asyncio.Future[Any]:
        future = self._signals.get(name)
        if future is None:
            if len(self._signals) >= _MAX_PENDING_SIGNALS:
                raise RuntimeError(f"too many distinct signals (max {_MAX_PENDING_SIGNALS})")
            future = asyncio.get_running_loop().create_future()
            self._signals[name] = future
        return future

    # -- events ----------------------------------------------------------------------------

    def _emit(
        self,
        kind: EventType,
        *,
        node: Node | None = None,
        span: Span | None = None,
        context: Context | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        self._seq += 1
        if not self._observed:
            return
        ts_ns = time.time_ns()
        payload = data or {}
        target = span or self._span
        # An ended span no longer records, yet its id still anchors the event.
        if self._exporting:
            otel_ctx = context or (self._run_context if span is None else trace.set_span_in_context(span))
            self._tel.emit(kind.value, self._seq, ts_ns, self._event_attributes, node, payload, otel_ctx)
        if self.engine.events.active:
            ids = self._ids if span is None else _hex_ids(target.get_span_context())
            self.engine.events.publish(
                WorkflowEvent(
                    type=kind,
                    seq=self._seq,
                    ts_ns=ts_ns,
                    execution_id=self.execution_id,
                    workflow_id=self.workflow.id,
                    workflow_name=self.workflow.name,
                    trace_id=ids[0],
                    span_id=ids[1],
                    node_id=node.id if node else "",
                    node_type=node.type if node else "",
                    data=payload,
                )
            )

    def _set_state(self, node_id: str, state: NodeState) -> None:
        self._counts[self.states[node_id]] -= 1
        self._counts[state] += 1
        self.states[node_id] = state

    def _progress(self) -> None:
        """Coalesced: at most one progress event per interval, the latest state always sent.

        Progress follows every state change, but one event per change doubled
        the telemetry cost per step; a deferred flush keeps it current.
        """
        if not self._observed:
            return
        now = time.perf_counter()
        wait = self._last_progress + self.engine.progress_interval_s - now
        if wait <= 0:
            self._flush_progress()
        elif self._progress_timer is None:
            self._progress_timer = asyncio.get_running_loop().call_later(wait, self._flush_progress)

    def _flush_progress(self) -> None:
        if self._progress_timer is not None:
            self._progress_timer.cancel()
            self._progress_timer = None
        self._last_progress = time.perf_counter()
        counts = self._counts
        total = len(self.states)
        done = sum(counts[s] for s in _DONE_STATES)
        self._emit(
            EventType.EXECUTION_PROGRESS,
            data={
                "totalNodes": total,
                "completedNodes": counts[NodeState.SUCCESS],
                "failedNodes": counts[NodeState.FAILED],
                "skippedNodes": counts[NodeState.SKIPPED],
                "cancelledNodes": counts[NodeState.CANCELLED],
                "runningNodes": counts[NodeState.RUNNING] + counts[NodeState.WAITING],
                "retryingNodes": counts[NodeState.RETRYING],
                "pendingNodes": counts[NodeState.PENDING],
                "progress": round(done / total, 4) if total else 1.0,
            },
        )

    # -- the run ---------------------------------------------------------------------------

    async def run(self) -> ExecutionResult:
        wf = self.workflow
        if self._tel.events_backlogged():
            # Room for this run's events before it starts; its duration starts after.
            await self._tel.event_room()
        started_ns = time.time_ns()
        started = time.perf_counter()
        attributes: dict[str, Any] = {
            t.GEN_AI_OPERATION: "invoke_workflow",
            t.WORKFLOW_NAME: wf.name,
            t.WORKFLOW_ID: wf.id,
            t.WORKFLOW_VERSION: wf.version,
            t.EXECUTION_ID: self.execution_id,
            t.TRIGGER_TYPE: self.options.trigger,
            t.NODE_COUNT: len(wf.nodes),
        }
        if self.options.user_id:
            attributes[t.ENDUSER_ID] = self.options.user_id
        links = []
        if self.options.resumed_from is not None:
            attributes[t.RESUMED_FROM] = self.options.resumed_from.execution_id
            links.append(Link(self.options.resumed_from.span_context, {"workflow.link.type": "resumed_from"}))
        if self.options.parent_execution_id:
            attributes[t.PARENT_EXECUTION_ID] = self.options.parent_execution_id
        self._span = self._tel.start_span(
            f"invoke_workflow {wf.name}",
            parent=self.options.parent,
            kind=SpanKind.SERVER if self.options.remote else SpanKind.INTERNAL,
            attributes=attributes,
            links=links,
            start_time_ns=started_ns,
        )
        self._ids = _hex_ids(self._span.get_span_context())
        # With telemetry off and no in-process watcher, events are numbered but not built.
        self._exporting = self._ids[0] != "0" * 32
        self._observed = self._exporting or self.engine.events.active
        self._event_attributes = {
            t.EXECUTION_ID: self.execution_id,
            t.WORKFLOW_ID: wf.id,
            t.WORKFLOW_NAME: wf.name,
        }
        self._run_context = trace.set_span_in_context(self._span, self.options.parent)
        metric_attrs = {t.WORKFLOW_NAME: wf.name}
        self._tel.run_active.add(1, metric_attrs)
        start_data: dict[str, Any] = {
            "totalNodes": len(wf.nodes),
            "trigger": self.options.trigger,
            "userId": self.options.user_id,
            "workflowVersion": wf.version,
            "nodes": [
                {"id": n.id, "type": n.type, "label": n.display_label, "dependsOn": list(n.depends_on)}
                for n in wf.nodes
            ],
        }
        if self.options.resumed_from is not None:
            start_data["resumedFrom"] = self.options.resumed_from.execution_id
        if self.options.parent_execution_id:
            start_data["parentExecutionId"] = self.options.parent_execution_id
        self._emit(EventType.WORKFLOW_STARTED, data=start_data)
        self.started.set()

        outcome: Result = Result.ERROR
        error: str | None = "internal error"
        try:
            outcome, error = await self._drive(started)
        finally:
            self._finished = True
            duration = time.perf_counter() - started
            self._finish(outcome, error, duration, metric_attrs)
        return ExecutionResult(
            execution_id=self.execution_id,
            workflow=wf,
            result=outcome,
            outputs=dict(self.outputs),
            node_states=dict(self.states),
            attempts=dict(self.attempts),
            error=error,
            duration_s=duration,
            span_context=self._span.get_span_context(),
            events_emitted=self._seq,
            workflow_input=self.workflow_input,
        )

    async def _drive(self, started: float) -> tuple[Result, str | None]:
        """Run the DAG to its end, a failure, the workflow timeout or a cancellation.

        Dependents are launched from each attempt task's done callback, not by a loop
        that wakes per completion: one event-loop turn and no `asyncio.wait` per step,
        which was a third of the scheduler's own cost on a chain.
        """
        wf = self.workflow
        self._remaining = {n.id: len(n.depends_on) for n in wf.nodes}
        self._tasks = {}
        self._settled = asyncio.get_running_loop().create_future()
        deadline = started + wf.timeout_s if wf.timeout_s else None
        cancel_waiter = asyncio.ensure_future(self._cancel_requested.wait())
        try:
            self._launch([n.id for n in wf.nodes if not n.depends_on])
            if not self._tasks:
                self._settle(Result.SUCCESS, None)
            timeout = None if deadline is None else max(0.0, deadline - time.perf_counter())
            waiters: list[asyncio.Future[Any]] = [self._settled, cancel_waiter]
            done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if self._settled in done:
                outcome, error = self._settled.result()
            elif cancel_waiter in done:
                outcome, error = Result.CANCELLATION, self._cancel_reason
            else:
                outcome, error = Result.TIMEOUT, f"workflow timed out after {wf.timeout_s:g}s"
        except asyncio.CancelledError:
            # The host is tearing the engine down: record what happened, then let go.
            await self._cancel_all()
            raise
        finally:
            cancel_waiter.cancel()
            if not self._settled.done():
                self._settled.cancel()
        if outcome is not Result.SUCCESS:
            await self._cancel_all()
        return outcome, error

    def _settle(self, outcome: Result, error: str | None) -> None:
        if not self._settled.done():
            self._settled.set_result((outcome, error))

    def _attempt_done(self, task: asyncio.Task[_Attempt]) -> None:
        node_id = self._tasks.pop(task)
        if self._settled.done():
            return
        if task.cancelled():
            # Not by us (we cancel only after settling): the node's own code was cancelled.
            self._settle(Result.CANCELLATION, f"node {node_id!r} was cancelled")
            return
        error = task.exception()
        if error is not None:
            self._settled.set_exception(error)
            return
        attempt = task.result()
        if attempt.result is not Result.SUCCESS:
            self._settle(Result.FAILURE, f"node {node_id!r} failed: {_describe(attempt.error)}")
            return
        self._launch(self._completed(node_id))
        if not self._tasks:
            self._settle(Result.SUCCESS, None)

    def _launch(self, ready: list[str]) -> None:
        # Skips and reuses resolve synchronously and may make more nodes ready.
        queue = list(ready)
        while queue:
            node_id = queue.pop(0)
            node = self.workflow.node(node_id)
            if node_id in self.options.reused:
                self._reuse(node)
                queue.extend(self._completed(node_id))
                continue
            reason = self._skip_reason(node)
            if reason is not None:
                self._set_state(node_id, NodeState.SKIPPED)
                self._emit(EventType.NODE_SKIPPED, node=node, data={"reason": reason})
                self._progress()
                queue.extend(self._completed(node_id))
                continue
            task = asyncio.ensure_future(self._run_node(node))
            self._tasks[task] = node_id
            task.add_done_callback(self._attempt_done)

    def _completed(self, node_id: str) -> list[str]:
        ready = []
        remaining = self._remaining
        for child in self.workflow.dependents(node_id):
            remaining[child] -= 1
            if remaining[child] == 0:
                ready.append(child)
        return ready

    def _skip_reason(self, node: Node) -> str | None:
        if node.id in self._untaken:
            return self._untaken[node.id]
        if node.depends_on and all(self.states[d] is NodeState.SKIPPED for d in node.depends_on):
            return "every upstream node was skipped"
        return None

    def _reuse(self, node: Node) -> None:
        output = self.options.reused[node.id]
        self.outputs[node.id] = output
        self._set_state(node.id, NodeState.SUCCESS)
        self._apply_branch(node, output)
        source = self.options.resumed_from.execution_id if self.options.resumed_from else ""
        self._emit(
            EventType.NODE_COMPLETED,
            node=node,
            data={"reused": True, "reusedFrom": source, "durationMs": 0.0, "attempt": 0},
        )
        self._progress()

    def _apply_branch(self, node: Node, output: Any) -> None:
        if node.type != "condition" or not isinstance(output, dict):
            return
        chosen = output.get("branch")
        for name, targets in node.config.get("branches", {}).items():
            if name != chosen:
                for target in targets:
                    self._untaken[target] = f"branch {name!r} of {node.id!r} not taken (chose {chosen!r})"

    async def _cancel_all(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _run_node(self, node: Node) -> _Attempt:
        executor = self.registry.executor(node.type)
        ready_at = time.perf_counter()
        metric_attrs = {t.WORKFLOW_NAME: self.workflow.name, t.NODE_TYPE: node.type}
        attempt_no = 0
        while True:
            attempt_no += 1
            await self._unpaused.wait()
            if self._tel.events_backlogged():
                await self._tel.event_room()
            async with self._semaphore:
                self._tel.node_queue_wait.record(time.perf_counter() - ready_at, metric_attrs)
                attempt, span = await self._attempt(node, attempt_no, executor)
            if attempt.result is Result.SUCCESS or attempt.error is None:
                return attempt
            if attempt.result is Result.CANCELLATION or not node.retry.should_retry(attempt.error, attempt_no):
                return attempt
            if isinstance(attempt.error, _ERROR_TYPES):
                return attempt
            delay = node.retry.delay_s(attempt_no, self.engine.rng)
            self._set_state(node.id, NodeState.RETRYING)
            self._tel.node_retries.add(1, metric_attrs)
            self._emit(
                EventType.NODE_RETRYING,
                node=node,
                span=span,
                data={
                    "delayMs": round(delay * 1000, 3),
                    "attempt": attempt_no,
                    "nextAttempt": attempt_no + 1,
                    "maxAttempts": node.retry.max_attempts,
                    "error": _describe(attempt.error),
                },
            )
            self._progress()
            await asyncio.sleep(delay)
            ready_at = time.perf_counter()

    async def _attempt(self, node: Node, attempt_no: int, executor: Any) -> tuple[_Attempt, Span]:
        inputs = {d: self.outputs[d] for d in node.depends_on if d in self.outputs}
        attrs: dict[str, Any] = {
            t.EXECUTION_ID: self.execution_id,
            t.NODE_ID: node.id,
            t.NODE_TYPE: node.type,
            t.NODE_LABEL: node.display_label,
            t.NODE_ATTEMPT: attempt_no,
        }
        if node.type == "llm":
            attrs[t.GEN_AI_OPERATION] = "chat"
            attrs[t.GEN_AI_REQUEST_MODEL] = str(node.config.get("model", ""))
        elif node.type == "tool":
            attrs[t.GEN_AI_OPERATION] = "execute_tool"
        options = self._tel.options
        secret_keys = frozenset(node.config.get("secret_keys", ())) if options.capture_io else frozenset()
        input_preview = None
        if options.capture_io:
            input_preview = preview(inputs or self.workflow_input, options.max_io_chars, secret_keys=secret_keys)
            attrs[t.NODE_INPUT] = input_preview
        span = self._tel.start_child_span(
            executor.span_name(node), self._run_context, self._span.get_span_context(), executor.kind, attrs
        )
        span_ctx = trace.set_span_in_context(span, self._run_context)
        ctx = NodeContext(node, attempt_no, inputs, self.workflow_input, span, span_ctx, self)
        self.attempts[node.id] = attempt_no
        self._set_state(node.id, NodeState.RUNNING)
        started_data: dict[str, Any] = {"attempt": attempt_no, "nodeLabel": node.display_label}
        if input_preview is not None:
            started_data["input"] = input_preview
        self._emit(EventType.NODE_STARTED, node=node, span=span, context=span_ctx, data=started_data)
        self._progress()

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
            attempt = _Attempt(Result.SUCCESS, output)
        except asyncio.CancelledError as exc:
            attempt = _Attempt(Result.CANCELLATION, error=exc)
        except TimeoutError as exc:
            if timeout is not None and timeout.expired():
                expired = NodeTimeout(f"node {node.id!r} timed out after {node.timeout_s:g}s")
                attempt = _Attempt(Result.TIMEOUT, error=expired)
            else:
                attempt = _Attempt(Result.FAILURE, error=exc)
        except _ERROR_TYPES as exc:
            attempt = _Attempt(Result.ERROR, error=exc)
        except Exception as exc:
            attempt = _Attempt(Result.FAILURE, error=exc)
        finally:
            otel_context.detach(token)
        self._end_attempt(ctx, attempt, time.perf_counter() - started, secret_keys)
        if attempt.result is Result.CANCELLATION:
            # Re-raise so the task ends cancelled, as its canceller expects.
            raise asyncio.CancelledError
        return attempt, span

    def _end_attempt(self, ctx: NodeContext, attempt: _Attempt, duration_s: float, secret_keys: frozenset[str]) -> None:
        node, span = ctx.node, ctx.span
        duration_ms = round(duration_s * 1000, 3)
        self.durations_ms[node.id] = duration_ms
        data: dict[str, Any] = {
            "durationMs": duration_ms,
            "attempt": ctx.attempt,
            "result": attempt.result.value,
        }
        span.set_attribute(t.NODE_RESULT, attempt.result.value)
        usage = ctx.llm_usage
        if usage is not None:
            self._record_llm(span, usage, duration_s)
            data["usage"] = {"inputTokens": usage.input_tokens, "outputTokens": usage.output_tokens}
            data["model"] = usage.model
            if usage.time_to_first_token_s is not None:
                data["timeToFirstTokenMs"] = round(usage.time_to_first_token_s * 1000, 3)
        options = self._tel.options
        if attempt.result is Result.SUCCESS:
            self.outputs[node.id] = attempt.output
            self._set_state(node.id, NodeState.SUCCESS)
            self._apply_branch(node, attempt.output)
            if options.capture_io:
                data["output"] = preview(attempt.output, options.max_io_chars, secret_keys=secret_keys)
                span.set_attribute(t.NODE_OUTPUT, data["output"])
            event = EventType.NODE_COMPLETED
        else:
            error = attempt.error
            message = _describe(error)
            data["error"] = message[: options.max_io_chars]
            data["errorType"] = _error_type(attempt.result, error)
            span.set_attribute(t.ERROR_TYPE, data["errorType"])
            if error is not None and not isinstance(error, asyncio.CancelledError):
                span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, message[:512]))
            self._set_state(node.id, NodeState.CANCELLED if attempt.result is Result.CANCELLATION else NodeState.FAILED)
            event = EventType.NODE_FAILED
        span.end()
        self._tel.node_duration.record(
            duration_s,
            {
                t.WORKFLOW_NAME: self.workflow.name,
                t.NODE_TYPE: node.type,
                t.NODE_RESULT: attempt.result.value,
            },
        )
        self._emit(event, node=node, span=span, context=ctx.otel_context, data=data)
        self._progress()

    def _record_llm(self, span: Span, usage: Any, duration_s: float) -> None:
        span.set_attribute(t.GEN_AI_PROVIDER, usage.provider)
        span.set_attribute(t.GEN_AI_INPUT_TOKENS, usage.input_tokens)
        span.set_attribute(t.GEN_AI_OUTPUT_TOKENS, usage.output_tokens)
        if usage.time_to_first_token_s is not None:
            span.set_attribute(t.TIME_TO_FIRST_TOKEN, usage.time_to_first_token_s)
        base = {
            t.GEN_AI_OPERATION: "chat",
            t.GEN_AI_PROVIDER: usage.provider,
            t.GEN_AI_REQUEST_MODEL: usage.model,
        }
        self._tel.token_usage.record(usage.input_tokens, {**base, t.GEN_AI_TOKEN_TYPE: "input"})
        self._tel.token_usage.record(usage.output_tokens, {**base, t.GEN_AI_TOKEN_TYPE: "output"})
        self._tel.llm_duration.record(duration_s, base)

    def _finish(self, outcome: Result, error: str | None, duration_s: float, metric_attrs: dict[str, str]) -> None:
        span = self._span
        if self._progress_timer is not None:
            self._flush_progress()
        counts = self._counts
        span.set_attribute(t.WORKFLOW_RESULT, outcome.value)
        span.set_attribute(t.NODES_COMPLETED, counts[NodeState.SUCCESS])
        span.set_attribute(t.NODES_FAILED, counts[NodeState.FAILED])
        span.set_attribute(t.NODES_SKIPPED, counts[NodeState.SKIPPED])
        if outcome is not Result.SUCCESS:
            span.set_attribute(t.ERROR_TYPE, outcome.value)
            span.set_status(Status(StatusCode.ERROR, (error or outcome.value)[:512]))
        durations = self.durations_ms
        slowest = max(durations, key=durations.__getitem__) if durations else None
        data: dict[str, Any] = {
            "durationMs": round(duration_s * 1000, 3),
            "result": outcome.value,
            "performance": {
                "slowestNode": slowest,
                "slowestNodeMs": durations[slowest] if slowest else None,
                "averageNodeMs": round(sum(durations.values()) / len(durations), 3) if durations else None,
                "nodesRun": len(durations),
            },
            "completedNodes": counts[NodeState.SUCCESS],
            "failedNodes": counts[NodeState.FAILED],
            "skippedNodes": counts[NodeState.SKIPPED],
        }
        if error:
            data["error"] = error
        kind = {
            Result.SUCCESS: EventType.WORKFLOW_COMPLETED,
            Result.CANCELLATION: EventType.WORKFLOW_CANCELLED,
        }.get(outcome, EventType.WORKFLOW_FAILED)
        self._emit(kind, data=data)
        span.end()
        self._tel.run_active.add(-1, metric_attrs)
        self._tel.run_duration.record(duration_s, {**metric_attrs, t.WORKFLOW_RESULT: outcome.value})


class NodeTimeout(TimeoutError):
    pass


class ChildWorkflowFailed(RuntimeError):
    def __init__(self, result: ExecutionResult) -> None:
        self.result = result
        outcome = f"{result.result.value}: {result.error}"
        super().__init__(f"subworkflow {result.workflow.id!r} ({result.execution_id}) {outcome}")


def _hex_ids(span_context: SpanContext) -> tuple[str, str]:
    return format(span_context.trace_id, "032x"), format(span_context.span_id, "016x")


def _describe(error: BaseException | None) -> str:
    if error is None:
        return "unknown error"
    if isinstance(error, asyncio.CancelledError):
        return "cancelled"
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _error_type(result: Result, error: BaseException | None) -> str:
    if result is Result.TIMEOUT:
        return "timeout"
    if result is Result.CANCELLATION:
        return "cancellation"
    return type(error).__qualname__ if error is not None else "unknown"


class ExecutionHandle:
    """Control of one running execution: await its result, cancel, pause, resume, signal."""

    def __init__(self, execution: Execution, task: asyncio.Task[ExecutionResult]) -> None:
        self.execution = execution
        self._task = task

    @property
    def execution_id(self) -> str:
        return self.execution.execution_id

    async def result(self) -> ExecutionResult:
        return await asyncio.shield(self._task)

    async def wait_started(self) -> None:
        await self.execution.started.wait()

    def cancel(self, reason: str = "cancelled by request") -> None:
        self.execution.cancel(reason)

    def pause(self, reason: str = "paused by request") -> None:
        self.execution.pause(reason)

    def resume(self, reason: str = "resumed by request") -> None:
        self.execution.resume(reason)

    def signal(self, name: str, payload: Any = None) -> None:
        self.execution.signal(name, payload)

    @property
    def done(self) -> bool:
        return self._task.done()


class Engine:
    """Runs workflows. One per process is typical; it owns the HTTP client nodes share."""

    def __init__(
        self,
        telemetry: Telemetry | None = None,
        registry: NodeRegistry | None = None,
        *,
        concurrency: int | None = None,
        http_client: httpx.AsyncClient | None = None,
        rng: random.Random | None = None,
        progress_interval_s: float | None = None,
    ) -> None:
        self.telemetry = telemetry or Telemetry()
        self.registry = registry or NodeRegistry()
        self.concurrency = concurrency or _DEFAULT_CONCURRENCY
        self._owns_client = http_client is None
        self._http_client = http_client
        self.rng = rng or random.Random()
        self.progress_interval_s = _DEFAULT_PROGRESS_INTERVAL_S if progress_interval_s is None else progress_interval_s
        self.events = EventBus()
        self._tasks: set[asyncio.Task[ExecutionResult]] = set()
        self._executions: dict[str, Execution] = {}

    @property
    def http_client(self) -> httpx.AsyncClient:
        if self._http_client is None:
            self._http_client = httpx.AsyncClient(timeout=30.0)
        return self._http_client

    @property
    def tools(self) -> Any:
        return self.registry.tools

    def validate(self, workflow: Workflow) -> None:
        self.registry.validate(workflow)

    def start(
        self,
        workflow: Workflow,
        workflow_input: Any = None,
        *,
        execution_id: str | None = None,
        trigger: str = "api",
        user_id: str | None = None,
        parent_context: Context | None = None,
        headers: Mapping[str, str] | None = None,
        _resumed_from: ExecutionResult | None = None,
        _reused: dict[str, Any] | None = None,
        _parent_execution_id: str | None = None,
    ) -> ExecutionHandle:
        """Validate and start `workflow`; returns at once with a handle.

        `headers` carrying W3C `traceparent` make the run a SERVER span in the
        caller's trace; `parent_context` does the same in-process.
        """
        self.validate(workflow)
        remote = headers is not None and "traceparent" in {k.lower() for k in headers}
        parent = extract_context(headers) if remote and headers is not None else parent_context
        options = _Options(
            trigger=trigger,
            user_id=user_id,
            parent=parent,
            remote=remote,
            reused=_reused or {},
            resumed_from=_resumed_from,
            parent_execution_id=_parent_execution_id,
        )
        execution = Execution(self, workflow, workflow_input, execution_id or _new_execution_id(), options)
        task = asyncio.ensure_future(execution.run())
        self._tasks.add(task)
        self._executions[execution.execution_id] = execution
        task.add_done_callback(lambda done: self._forget(done, execution.execution_id))
        return ExecutionHandle(execution, task)

    def _forget(self, task: asyncio.Task[ExecutionResult], execution_id: str) -> None:
        self._tasks.discard(task)
        self._executions.pop(execution_id, None)

    def get(self, execution_id: str) -> Execution | None:
        return self._executions.get(execution_id)

    async def run(self, workflow: Workflow, workflow_input: Any = None, **kwargs: Any) -> ExecutionResult:
        return await self.start(workflow, workflow_input, **kwargs).result()

    def resume(self, previous: ExecutionResult, **kwargs: Any) -> ExecutionHandle:
        """A new execution that reuses the outputs of nodes that succeeded and reruns the rest."""
        if previous.result is Result.SUCCESS:
            raise ValueError(f"execution {previous.execution_id} succeeded; there is nothing to resume")
        reused = {
            node_id: previous.outputs[node_id]
            for node_id, state in previous.node_states.items()
            if state is NodeState.SUCCESS and node_id in previous.outputs
        }
        kwargs.setdefault("trigger", "resume")
        workflow_input = kwargs.pop("workflow_input", previous.workflow_input)
        return self.start(previous.workflow, workflow_input, _resumed_from=previous, _reused=reused, **kwargs)

    async def aclose(self) -> None:
        """Cancel what still runs, wait for it to record its end, close the HTTP client."""
        for execution in list(self._executions.values()):
            execution.cancel("engine shutting down")
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._owns_client and self._http_client is not None:
            await self._http_client.aclose()

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _new_execution_id() -> str:
    return uuid.uuid4().hex
