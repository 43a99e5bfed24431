"""The scheduler: drives a workflow's DAG — which nodes are ready, what their results unblock —
and takes control from outside (pause, resume, cancel, signals).

One node's attempts (retries, timeout) run in engine/attempts.py; everything a run reports
(spans, metrics, events) goes through its reporter, engine/reporting.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import httpx
from opentelemetry.context import Context

from flowscope.contract.attributes import CHILD_EXECUTION_ID
from flowscope.engine.attempts import Attempt, AttemptRunner, NodeTimeout, describe
from flowscope.engine.catalog import (
    DEFAULT_FINISHED_RUNS,
    CheckpointedRuns,
    FinishedRuns,
    RetrySource,
    rerun_nodes,
    retry_plan,
    trace_parent_of,
)
from flowscope.engine.checkpoints import CheckpointError, CheckpointStore, open_checkpoint_store
from flowscope.engine.context import NodeContext
from flowscope.engine.dag import Node, Workflow
from flowscope.engine.events import EventBus
from flowscope.engine.nodes import NodeRegistry, NodeType
from flowscope.engine.propagation import extract_context
from flowscope.engine.reporting import RunReporter
from flowscope.engine.results import ExecutionFailed, ExecutionResult, NodeState, NodeStates, Result, RunOptions
from flowscope.engine.telemetry import Telemetry

if TYPE_CHECKING:
    from flowscope.engine.control_link import ControlLink

__all__ = [
    "ChildWorkflowFailed",
    "Engine",
    "Execution",
    "ExecutionFailed",
    "ExecutionHandle",
    "ExecutionResult",
    "NodeState",
    "NodeTimeout",
    "Result",
]

_MAX_PENDING_SIGNALS = 1_000
_DEFAULT_CONCURRENCY = 64
_DEFAULT_PROGRESS_INTERVAL_S = 0.1

logger = logging.getLogger(__name__)

# Told of every run's end: its id, workflow, and result (None when the run's task itself failed).
FinishListener = Callable[[str, Workflow, "ExecutionResult | None"], None]


class Execution:
    """One run of a workflow. Created by `Engine.start`; driven by `run()`."""

    def __init__(self, engine: Engine, workflow: Workflow, workflow_input: Any, execution_id: str, options: RunOptions):
        self.engine = engine
        self.workflow = workflow
        self.workflow_input = workflow_input
        self.execution_id = execution_id
        self.options = options
        self.registry: NodeRegistry = engine.registry
        self._node_states = NodeStates(workflow.node_ids)
        self.states: dict[str, NodeState] = self._node_states.states
        self.set_state = self._node_states.set
        self.outputs: dict[str, Any] = {}
        self.attempts: dict[str, int] = dict.fromkeys(workflow.node_ids, 0)
        self.slots = asyncio.Semaphore(engine.concurrency)
        self.started = asyncio.Event()
        self.started_ns: int | None = None
        self._reporter = RunReporter(
            engine.telemetry,
            engine.events,
            execution_id,
            workflow,
            workflow_input,
            options,
            self._node_states,
            engine.progress_interval_s,
        )
        self._runner = AttemptRunner(self, self._reporter)
        self._checkpoints = engine.checkpoints
        self._untaken: dict[str, str] = {}
        # Set while the run is not paused; attempts wait on it before they start.
        self.unpaused = asyncio.Event()
        self.unpaused.set()
        self._cancel_requested = asyncio.Event()
        self._cancel_reason = "cancelled by request"
        self._signals: dict[str, asyncio.Future[Any]] = {}
        self._finished = False
        # Set up by `_drive`: dependencies each node still waits for, running attempt tasks, the run's end.
        self._remaining: dict[str, int] = {}
        self._tasks: dict[asyncio.Task[Attempt], str] = {}
        self._settled: asyncio.Future[tuple[Result, str | None]] | None = None

    @property
    def http_client(self) -> httpx.AsyncClient:
        # Created on first use: its TLS context takes ~100 ms to load, and many workflows make no HTTP call.
        return self.engine.http_client

    @property
    def durations_ms(self) -> dict[str, float]:
        return self._reporter.durations_ms

    # -- control from outside --------------------------------------------------------------

    def cancel(self, reason: str = "cancelled by request") -> None:
        self._cancel_reason = reason
        self._cancel_requested.set()

    def pause(self, reason: str = "paused by request") -> None:
        if self.unpaused.is_set() and not self._finished:
            self.unpaused.clear()
            self._reporter.paused(reason)

    def resume(self, reason: str = "resumed by request") -> None:
        if not self.unpaused.is_set() and not self._finished:
            self.unpaused.set()
            self._reporter.resumed(reason)

    @property
    def paused(self) -> bool:
        return not self.unpaused.is_set()

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def cancelling(self) -> bool:
        return self._cancel_requested.is_set()

    @property
    def seq(self) -> int:
        """The seq of the last event this run emitted."""
        return self._reporter.seq

    def recovered(self, lost_seq: int) -> bool:
        """The stack declared this run lost at `lost_seq` while it still runs: say it is alive,
        numbering on after the stack's event. False when the run has already ended."""
        if self._finished:
            return False
        if self.started_ns is None:
            # Not started yet: its workflow.started, numbered after the stack's event, says it all.
            self._reporter.seq = max(self._reporter.seq, lost_seq)
            return True
        self._reporter.recovered(lost_seq, self.started_ns)
        return True

    def signal(self, name: str, payload: Any = None) -> None:
        future = self._signal_future(name)
        if not future.done():
            future.set_result(payload)

    # -- hooks for node executors and the attempt runner -----------------------------------

    def node_log(self, ctx: NodeContext, message: str, level: str, attributes: Mapping[str, Any]) -> None:
        self._reporter.node_log(ctx, message, level, attributes)

    def node_waiting(self, ctx: NodeContext, waiting_for: str) -> None:
        self.set_state(ctx.node.id, NodeState.WAITING)
        self._reporter.node_waiting(ctx, waiting_for)

    async def wait_for_signal(self, ctx: NodeContext, name: str) -> Any:
        future = self._signal_future(name)
        if not future.done():
            self.node_waiting(ctx, f"signal {name}")
        payload = await future
        self.set_state(ctx.node.id, NodeState.RUNNING)
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
        ctx.set_attribute(CHILD_EXECUTION_ID, handle.execution_id)
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

    def node_succeeded(self, node: Node, node_type: NodeType, output: Any) -> None:
        """A node's output is in: record it, and which dependents its node type leaves untaken."""
        self.outputs[node.id] = output
        self.set_state(node.id, NodeState.SUCCESS)
        if node_type.untaken is not None:
            self._untaken.update(node_type.untaken(node, output))

    def _signal_future(self, name: str) -> asyncio.Future[Any]:
        future = self._signals.get(name)
        if future is None:
            if len(self._signals) >= _MAX_PENDING_SIGNALS:
                raise RuntimeError(f"too many distinct signals (max {_MAX_PENDING_SIGNALS})")
            future = asyncio.get_running_loop().create_future()
            self._signals[name] = future
        return future

    # -- the run ---------------------------------------------------------------------------

    async def run(self) -> ExecutionResult:
        reporter = self._reporter
        if reporter.events_backlogged():
            # Room for this run's events before it starts; its duration starts after.
            await reporter.event_room()
        started_ns = self.started_ns = time.time_ns()
        started = time.perf_counter()
        reporter.run_started(started_ns)
        self.started.set()

        outcome: Result = Result.ERROR
        error: str | None = "internal error"
        try:
            error = None if self._checkpoints is None else await self._checkpoint_run()
            if error is None:
                outcome, error = await self._drive(started)
        finally:
            self._finished = True
            duration = time.perf_counter() - started
            reporter.run_finished(outcome, error, duration)
        return ExecutionResult(
            execution_id=self.execution_id,
            workflow=self.workflow,
            result=outcome,
            outputs=dict(self.outputs),
            node_states=dict(self.states),
            attempts=dict(self.attempts),
            error=error,
            duration_s=duration,
            span_context=reporter.span.get_span_context(),
            events_emitted=reporter.seq,
            workflow_input=self.workflow_input,
        )

    async def _checkpoint_run(self) -> str | None:
        """Store the run (workflow, input, trace) and the outputs it reuses under its own id, so
        that it can be continued in turn; the reason when the store refuses."""
        store, wf, execution_id = self._checkpoints, self.workflow, self.execution_id
        assert store is not None
        resumed = self.options.resumed_from
        writes = [
            store.put_run(
                execution_id,
                wf.id,
                wf.version,
                self.workflow_input,
                resumed.execution_id if resumed is not None else None,
                trace_parent_of(self._reporter.span.get_span_context()),
            ),
            *(
                store.put(execution_id, node_id, output, workflow_id=wf.id, workflow_version=wf.version, attempt=0)
                for node_id, output in self.options.reused.items()
            ),
        ]
        try:
            await asyncio.gather(*writes)
        except CheckpointError as exc:
            return f"the checkpoint store refused the run: {exc}"
        return None

    async def _run_checkpointed(self, node: Node) -> Attempt:
        """A node's attempts, then its output stored: dependents start only once it is durable."""
        attempt = await self._runner.run(node)
        store = self._checkpoints
        if attempt.result is Result.SUCCESS and store is not None:
            wf = self.workflow
            try:
                await store.put(
                    self.execution_id,
                    node.id,
                    attempt.output,
                    workflow_id=wf.id,
                    workflow_version=wf.version,
                    attempt=self.attempts[node.id],
                )
            except CheckpointError as exc:
                self.set_state(node.id, NodeState.FAILED)
                return Attempt(Result.ERROR, error=exc)
        return attempt

    async def _drive(self, started: float) -> tuple[Result, str | None]:
        """Run the DAG to its end, a failure, the workflow timeout or a cancellation.

        Dependents are launched from each attempt task's done callback, not by a loop
        that wakes per completion: one event-loop turn and no `asyncio.wait` per step,
        which was a third of the scheduler's own cost on a chain.
        """
        wf = self.workflow
        self._remaining = {n.id: len(n.depends_on) for n in wf.nodes}
        self._tasks = {}
        settled = self._settled = asyncio.get_running_loop().create_future()
        deadline = started + wf.timeout_s if wf.timeout_s else None
        cancel_waiter = asyncio.ensure_future(self._cancel_requested.wait())
        try:
            self._launch([n.id for n in wf.nodes if not n.depends_on])
            if not self._tasks:
                self._settle(Result.SUCCESS, None)
            timeout = None if deadline is None else max(0.0, deadline - time.perf_counter())
            waiters: list[asyncio.Future[Any]] = [settled, cancel_waiter]
            done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if settled in done:
                outcome, error = settled.result()
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
            if not settled.done():
                settled.cancel()
        if outcome is not Result.SUCCESS:
            await self._cancel_all()
        return outcome, error

    def _settle(self, outcome: Result, error: str | None) -> None:
        settled = self._settled
        if settled is not None and not settled.done():
            settled.set_result((outcome, error))

    def _attempt_done(self, task: asyncio.Task[Attempt]) -> None:
        node_id = self._tasks.pop(task)
        settled = self._settled
        if settled is None or settled.done():
            return
        if task.cancelled():
            # Not by us (we cancel only after settling): the node's own code was cancelled.
            self._settle(Result.CANCELLATION, f"node {node_id!r} was cancelled")
            return
        error = task.exception()
        if error is not None:
            settled.set_exception(error)
            return
        attempt = task.result()
        if attempt.result is not Result.SUCCESS:
            self._settle(Result.FAILURE, f"node {node_id!r} failed: {describe(attempt.error)}")
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
                self.set_state(node_id, NodeState.SKIPPED)
                self._reporter.node_skipped(node, reason)
                queue.extend(self._completed(node_id))
                continue
            # Without a store the attempt task is the runner's own: no extra coroutine per step.
            runner = self._runner.run if self._checkpoints is None else self._run_checkpointed
            task = asyncio.ensure_future(runner(node))
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
        self.node_succeeded(node, self.registry.node_type(node.type), self.options.reused[node.id])
        self._reporter.node_reused(node)

    async def _cancel_all(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


class ChildWorkflowFailed(RuntimeError):
    def __init__(self, result: ExecutionResult) -> None:
        self.result = result
        outcome = f"{result.result.value}: {result.error}"
        super().__init__(f"subworkflow {result.workflow.id!r} ({result.execution_id}) {outcome}")


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
    """Runs workflows. One per process is typical; it owns the HTTP client nodes share.

    With `control` (the stack's web address) the engine dials out to the stack's control
    plane while it is open (`async with engine:` or `connect_control()`): it announces the
    workflows it `serve`s and takes start, pause, resume, stop and retry commands from
    there (docs/control.md, engine/control.py).
    """

    def __init__(
        self,
        telemetry: Telemetry | None = None,
        registry: NodeRegistry | None = None,
        *,
        concurrency: int | None = None,
        http_client: httpx.AsyncClient | None = None,
        rng: random.Random | None = None,
        progress_interval_s: float | None = None,
        control: str | None = None,
        control_token: str | None = None,
        retry_source: RetrySource | None = None,
        checkpoints: str | CheckpointStore | None = None,
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
        # Ended runs, for retries by id over the control link (kept only with one: a busy
        # engine's outputs would otherwise stay in memory); a durable store may stand in.
        self.finished = FinishedRuns(DEFAULT_FINISHED_RUNS if control is not None else 0)
        # Each node's output is stored before its dependents start (docs/durability.md): any engine
        # sharing the store can then continue a run this one could not finish.
        self._owns_checkpoints = isinstance(checkpoints, str)
        self.checkpoints: CheckpointStore | None = (
            open_checkpoint_store(checkpoints) if isinstance(checkpoints, str) else checkpoints
        )
        if retry_source is None and self.checkpoints is not None:
            retry_source = CheckpointedRuns(self.checkpoints, self.served_workflow, self.finished)
        # Not `or`: an empty FinishedRuns (or any empty source) is falsy and must still be used.
        self.retry_source: RetrySource = retry_source if retry_source is not None else self.finished
        self._served: dict[str, dict[str, Workflow]] = {}
        self._finish_listeners: list[FinishListener] = []
        self.control = control
        self.control_token = control_token
        self.control_link: ControlLink | None = None

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

    # -- what this engine serves -----------------------------------------------------------

    def serve(self, *workflows: Workflow) -> None:
        """Workflows the stack may start here (each validated now); the latest of a version wins."""
        for workflow in workflows:
            self.validate(workflow)
        for workflow in workflows:
            versions = self._served.setdefault(workflow.id, {})
            versions.pop(workflow.version, None)
            versions[workflow.version] = workflow

    @property
    def served(self) -> list[Workflow]:
        return [wf for versions in self._served.values() for wf in versions.values()]

    def served_workflow(self, workflow_id: str, version: str | None = None) -> Workflow | None:
        """The served workflow of that id and version; without a version, the last one served."""
        versions = self._served.get(workflow_id)
        if not versions:
            return None
        if version is None:
            return next(reversed(versions.values()))
        return versions.get(version)

    @property
    def executions(self) -> list[Execution]:
        """The runs in progress."""
        return list(self._executions.values())

    def add_finish_listener(self, listener: FinishListener) -> None:
        self._finish_listeners.append(listener)

    def remove_finish_listener(self, listener: FinishListener) -> None:
        if listener in self._finish_listeners:
            self._finish_listeners.remove(listener)

    # -- runs ------------------------------------------------------------------------------

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
        _rerun: frozenset[str] = frozenset(),
    ) -> ExecutionHandle:
        """Validate and start `workflow`; returns at once with a handle.

        `headers` carrying W3C `traceparent` make the run a SERVER span in the
        caller's trace; `parent_context` does the same in-process.
        """
        self.validate(workflow)
        if execution_id is not None and execution_id in self._executions:
            raise ValueError(f"execution {execution_id} is already running")
        remote = headers is not None and "traceparent" in {k.lower() for k in headers}
        parent = extract_context(headers) if remote and headers is not None else parent_context
        options = RunOptions(
            trigger=trigger,
            user_id=user_id,
            parent=parent,
            remote=remote,
            reused=_reused or {},
            resumed_from=_resumed_from,
            parent_execution_id=_parent_execution_id,
            rerun=_rerun,
            engine_id=self.control_link.engine_id if self.control_link is not None else None,
        )
        execution = Execution(self, workflow, workflow_input, execution_id or _new_execution_id(), options)
        task = asyncio.ensure_future(execution.run())
        self._tasks.add(task)
        self._executions[execution.execution_id] = execution
        task.add_done_callback(lambda done: self._forget(done, execution))
        return ExecutionHandle(execution, task)

    def _forget(self, task: asyncio.Task[ExecutionResult], execution: Execution) -> None:
        self._tasks.discard(task)
        self._executions.pop(execution.execution_id, None)
        result = None
        if not task.cancelled() and task.exception() is None:
            result = task.result()
            self.finished.add(result)
        for listener in list(self._finish_listeners):
            try:
                listener(execution.execution_id, execution.workflow, result)
            except Exception:
                logger.exception("a run-end listener failed")

    def get(self, execution_id: str) -> Execution | None:
        return self._executions.get(execution_id)

    async def run(self, workflow: Workflow, workflow_input: Any = None, **kwargs: Any) -> ExecutionResult:
        return await self.start(workflow, workflow_input, **kwargs).result()

    def resume(self, previous: ExecutionResult, **kwargs: Any) -> ExecutionHandle:
        """A new execution that reuses the outputs of nodes that succeeded and reruns the rest;
        a node that had started in `previous` carries `workflow.node.rerun` on its span."""
        if previous.result is Result.SUCCESS:
            raise ValueError(f"execution {previous.execution_id} succeeded; there is nothing to resume")
        reused = {
            node_id: previous.outputs[node_id]
            for node_id, state in previous.node_states.items()
            if state is NodeState.SUCCESS and node_id in previous.outputs
        }
        kwargs.setdefault("trigger", "resume")
        workflow_input = kwargs.pop("workflow_input", previous.workflow_input)
        rerun = rerun_nodes(previous, reused)
        return self.start(
            previous.workflow, workflow_input, _resumed_from=previous, _reused=reused, _rerun=rerun, **kwargs
        )

    def retry(
        self, previous: ExecutionResult, from_node: str | None = None, execution_id: str | None = None, **kwargs: Any
    ) -> ExecutionHandle:
        """A new execution linked to `previous` in which `from_node` (default: the first failed
        node) and everything downstream of it run again; every other node that succeeded
        reuses its output. An unknown node raises `catalog.UnknownNode` (a ValueError)."""
        _, reused = retry_plan(previous, from_node)
        kwargs.setdefault("trigger", "retry")
        return self.start(
            previous.workflow,
            previous.workflow_input,
            execution_id=execution_id,
            _resumed_from=previous,
            _reused=reused,
            _rerun=rerun_nodes(previous, reused),
            **kwargs,
        )

    # -- the control link and the engine's end ---------------------------------------------

    async def connect_control(self) -> None:
        """Dial the stack's control plane (`control`) and keep the link up until `aclose()`."""
        if self.control is None:
            raise ValueError("this engine has no control address (Engine(control=...))")
        if self.control_link is None:
            from flowscope.engine.control_link import ControlLink

            self.control_link = ControlLink(self, self.control, self.control_token)
        self.control_link.start()

    async def aclose(self) -> None:
        """Cancel what still runs, wait for it to record its end, close the control link and
        the HTTP client."""
        for execution in list(self._executions.values()):
            execution.cancel("engine shutting down")
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        from flowscope.engine.rollback import settle_rollbacks  # rollback imports this module

        await settle_rollbacks(self)
        if self.control_link is not None:
            await self.control_link.aclose()
        if self._owns_checkpoints and self.checkpoints is not None:
            self.checkpoints.close()
        if self._owns_client and self._http_client is not None:
            await self._http_client.aclose()

    async def __aenter__(self) -> Engine:
        if self.control is not None:
            await self.connect_control()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _new_execution_id() -> str:
    return uuid.uuid4().hex
