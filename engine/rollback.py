"""Rollback with compensation (docs/durability.md, "Rollback").

Rolling an ended run back to one of its completed nodes runs the compensations of the completed
nodes downstream of it, latest first (the plan is contract/rollback.py's, shared with the stack).
It is no new execution: its events are the run's own, numbered on after the run's last seq —
`node.compensating`, then `node.compensated` or `node.compensation_failed` per node, and
`workflow.rolled_back` at the end — so the run's history, live stream and seq stay one gapless
sequence. Its spans are a trace of their own: a `rollback_workflow` span linked to the run's span,
with one `compensate <node>` child per compensation. What was undone loses its checkpoint, so a
resume runs it again; `resume=True` starts that resume at once. A node's checkpoint goes BEFORE
its compensation runs: an engine killed mid-rollback leaves no node that may have been undone
reusable (a compensation that fails puts it back: what it did stands). While a run is being
rolled back, nothing else continues it: retry, resume and a second rollback are refused.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode

from flowscope.contract import attributes as t
from flowscope.contract.rollback import MAX_AFTER_SEQ, Action, NodeSpec, NotARollbackPoint, RollbackPlan, plan_rollback
from flowscope.contract.states import Result
from flowscope.engine.attempts import describe
from flowscope.engine.dag import Node, Workflow, resolve_compensation
from flowscope.engine.events import EventType, WorkflowEvent
from flowscope.engine.results import ExecutionResult, NodeState

if TYPE_CHECKING:
    from flowscope.engine.scheduler import Engine, ExecutionHandle

__all__ = [
    "CompensationContext",
    "NotARollbackPoint",
    "RollbackOutcome",
    "RollbackRefused",
    "node_specs",
    "plan_for",
    "rollback",
]

TRIGGER_ROLLBACK = "rollback"

logger = logging.getLogger(__name__)


class RollbackRefused(Exception):
    """The rollback would pass `external` nodes that have no compensation (`nodes`), or the run
    is being rolled back already; nothing was undone."""

    def __init__(self, message: str, nodes: Iterable[str] = ()) -> None:
        self.nodes = list(nodes)
        super().__init__(message)


@dataclass
class CompensationContext:
    """What a compensation sees: its node, the output the node returned in the run (None when
    the checkpoint kept none: `output_known` says which), the run, and its own span."""

    node: Node
    output: Any
    output_known: bool
    execution_id: str
    rollback_id: str
    workflow_input: Any
    span: Span
    attributes: dict[str, Any] = field(default_factory=dict)

    def set_attribute(self, key: str, value: Any) -> None:
        self.span.set_attribute(key, value)


@dataclass(frozen=True)
class RollbackOutcome:
    rollback_id: str
    execution_id: str
    plan: RollbackPlan
    result: Result
    compensated: tuple[str, ...]
    undone: tuple[str, ...]  # compensated or skipped: what a resume runs again
    failed_node: str | None
    error: str | None
    last_seq: int
    forced: bool
    resumed_as: str | None = None

    def as_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "rollbackId": self.rollback_id,
            "executionId": self.execution_id,
            "toNode": self.plan.to_node,
            "result": self.result.value,
            "compensated": list(self.compensated),
            "undone": list(self.undone),
            "skipped": self.plan.skipped,
            "cannotUndo": self.plan.cannot_undo,
            "forced": self.forced,
            "lastSeq": self.last_seq,
        }
        if self.failed_node is not None:
            body["failedNode"] = self.failed_node
        if self.error is not None:
            body["error"] = self.error
        if self.resumed_as is not None:
            body["resumedAs"] = self.resumed_as
        return body


def node_specs(workflow: Workflow) -> list[NodeSpec]:
    return [NodeSpec(n.id, n.depends_on, n.side_effect, n.compensable) for n in workflow.nodes]


def completed_nodes(previous: ExecutionResult) -> set[str]:
    return {node_id for node_id, state in previous.node_states.items() if state is NodeState.SUCCESS}


def plan_for(previous: ExecutionResult, to_node: str) -> RollbackPlan:
    """The plan of rolling `previous` back to `to_node`; NotARollbackPoint for a node that is
    not the workflow's or did not complete."""
    return plan_rollback(node_specs(previous.workflow), completed_nodes(previous), to_node)


# Per engine: the last seq each rolled-back run reached (a second rollback numbers on after it),
# the runs being rolled back now (one at a time each), and the tasks of those the control plane
# started (kept so they are not collected while they run).
@dataclass
class _EngineRollbacks:
    last_seq: dict[str, int] = field(default_factory=dict)
    active: set[str] = field(default_factory=set)
    tasks: set[asyncio.Task[RollbackOutcome]] = field(default_factory=set)


_STATE: weakref.WeakKeyDictionary[Engine, _EngineRollbacks] = weakref.WeakKeyDictionary()


def _state(engine: Engine) -> _EngineRollbacks:
    found = _STATE.get(engine)
    if found is None:
        found = _STATE[engine] = _EngineRollbacks()
    return found


async def settle_rollbacks(engine: Engine) -> None:
    """Wait for the rollbacks this engine runs in the background: their compensations and
    checkpoint invalidations finish before the engine closes its store."""
    tasks = list(_state(engine).tasks)
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)


# What becomes of the checkpoints of undone nodes: the store's `invalidate` (None: no store).
Invalidate = Callable[[str, list[str]], Any]
# Puts a node's checkpoint back (execution id, node id, output) when its compensation failed.
Restore = Callable[[str, str, Any], Any]


def rolling_back(engine: Engine, execution_id: str) -> bool:
    """Whether `engine` is rolling `execution_id` back now: nothing else may continue it."""
    return execution_id in _state(engine).active


def check(engine: Engine, previous: ExecutionResult, to_node: str, force: bool) -> RollbackPlan:
    """The plan, or why the rollback cannot start: NotARollbackPoint for a bad `to_node`,
    RollbackRefused when it would pass external nodes without compensation and not `force`, or
    when the run is being rolled back already."""
    plan = plan_for(previous, to_node)
    if plan.cannot_undo and not force:
        names = ", ".join(plan.cannot_undo)
        raise RollbackRefused(
            f"rolling execution {previous.execution_id} back to {to_node!r} would pass external side effects "
            f"that have no compensation: {names} (force to roll back anyway)",
            plan.cannot_undo,
        )
    if previous.execution_id in _state(engine).active:
        raise RollbackRefused(f"execution {previous.execution_id} is being rolled back already")
    return plan


async def rollback(
    engine: Engine,
    previous: ExecutionResult,
    to_node: str,
    *,
    force: bool = False,
    after_seq: int = 0,
    rollback_id: str | None = None,
    invalidate: Invalidate | None = None,
    resume_as: str | None = None,
    restore: Restore | None = None,
) -> RollbackOutcome:
    """Roll `previous` (an ended run) back to `to_node`: see the module docstring and `check`
    for what refuses it. `after_seq`: the last seq of the run known elsewhere (the stack's);
    `invalidate(execution_id, node_ids)`: drops the checkpoints of what was undone;
    `resume_as`: the id of the run that continues from `to_node` once every compensation ran."""
    plan = check(engine, previous, to_node, force)
    _state(engine).active.add(previous.execution_id)
    return await _carry_out(engine, previous, plan, force, after_seq, rollback_id, (invalidate, restore), resume_as)


async def _carry_out(
    engine: Engine,
    previous: ExecutionResult,
    plan: RollbackPlan,
    force: bool,
    after_seq: int,
    rollback_id: str | None,
    store: tuple[Invalidate | None, Restore | None],
    resume_as: str | None,
) -> RollbackOutcome:
    """The rollback of a run `check`ed and marked active by the caller."""
    state, to_node = _state(engine), plan.to_node
    try:
        seq = max(previous.events_emitted, after_seq, state.last_seq.get(previous.execution_id, 0))
        run = _Rollback(engine, previous, plan, rollback_id or uuid.uuid4().hex, force, seq, *store)
        outcome = await run.run()
        state.last_seq[previous.execution_id] = outcome.last_seq
        for node_id in outcome.undone:
            # Undone: no longer a completed node of the run, for the next rollback, retry or resume.
            previous.node_states[node_id] = NodeState.PENDING
    finally:
        state.active.discard(previous.execution_id)
    if resume_as is not None and outcome.result is Result.SUCCESS:
        resume_after(engine, previous, to_node, resume_as)
        outcome = RollbackOutcome(**{**outcome.__dict__, "resumed_as": resume_as})
    return outcome


def rollback_command(engine: Engine, frame: dict[str, Any], previous: ExecutionResult) -> dict[str, Any]:
    """The control plane's `rollback` op (engine/control.py): checked now, carried out in the
    background — compensations may take longer than a command may wait, and the control link
    takes no other command while one is applied. The answer says what will be undone; the
    events say how it went."""
    from flowscope.engine.control import CommandError

    to_node, force, resume = frame.get("toNode"), frame.get("force", False), frame.get("resume", False)
    new_id, after_seq = frame.get("newExecutionId"), frame.get("afterSeq", 0)
    if not isinstance(to_node, str) or not to_node:
        raise CommandError("bad_request", "rollback needs a toNode")
    if not isinstance(force, bool) or not isinstance(resume, bool):
        raise CommandError("bad_request", "force and resume must be true or false")
    if resume and (not isinstance(new_id, str) or not new_id):
        raise CommandError("bad_request", "a rollback with resume needs a newExecutionId")
    if not isinstance(after_seq, int) or isinstance(after_seq, bool) or not 0 <= after_seq <= MAX_AFTER_SEQ:
        raise CommandError("bad_request", f"afterSeq must be an integer from 0 to {MAX_AFTER_SEQ}")
    try:
        plan = check(engine, previous, to_node, force)
    except NotARollbackPoint as exc:
        raise CommandError("bad_request", str(exc)) from exc
    except RollbackRefused as exc:
        raise CommandError("conflict", str(exc)) from exc
    store = engine.checkpoints
    invalidate = store.invalidate if store is not None else None
    restore = _restorer(engine, previous)
    rollback_id = uuid.uuid4().hex
    state = _state(engine)
    state.active.add(previous.execution_id)
    resume_as = new_id if resume and isinstance(new_id, str) else None
    task = asyncio.ensure_future(
        _carry_out(engine, previous, plan, force, after_seq, rollback_id, (invalidate, restore), resume_as)
    )
    state.tasks.add(task)
    task.add_done_callback(_finished)
    answer: dict[str, Any] = {"executionId": previous.execution_id, "rollbackId": rollback_id, **plan.as_dict()}
    answer["forced"] = force and bool(plan.cannot_undo)
    if resume_as is not None:
        answer["resumeExecutionId"] = resume_as
    return answer


def _restorer(engine: Engine, previous: ExecutionResult) -> Restore | None:
    store, workflow = engine.checkpoints, previous.workflow
    if store is None:
        return None

    async def put_back(execution_id: str, node_id: str, output: Any) -> None:
        attempt = previous.attempts.get(node_id, 1)
        await store.put(execution_id, node_id, output, workflow_id=workflow.id,
                        workflow_version=workflow.version, attempt=attempt)  # fmt: skip

    return put_back


def _finished(task: asyncio.Task[RollbackOutcome]) -> None:
    for state in list(_STATE.values()):
        state.tasks.discard(task)
    if not task.cancelled() and task.exception() is not None:
        logger.error("a rollback failed", exc_info=task.exception())


def resume_after(engine: Engine, previous: ExecutionResult, to_node: str, execution_id: str) -> ExecutionHandle:
    """A new run of `previous`'s workflow continuing from `to_node`: the nodes downstream of it run
    again, every other node that succeeded reuses its output."""
    undone = _descendants(previous.workflow, to_node) | {
        n for n, state in previous.node_states.items() if state is not NodeState.SUCCESS
    }
    reused = {
        node_id: output
        for node_id, output in previous.outputs.items()
        if previous.node_states.get(node_id) is NodeState.SUCCESS and node_id not in undone
    }
    return engine.start(
        previous.workflow,
        previous.workflow_input,
        execution_id=execution_id,
        trigger=TRIGGER_ROLLBACK,
        _resumed_from=previous,
        _reused=reused,
    )


def _descendants(workflow: Workflow, node_id: str) -> set[str]:
    found: set[str] = set()
    stack = [node_id]
    while stack:
        for child in workflow.dependents(stack.pop()):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


class _Rollback:
    """One rollback's spans and events, numbered on after `seq`."""

    def __init__(
        self,
        engine: Engine,
        previous: ExecutionResult,
        plan: RollbackPlan,
        rollback_id: str,
        force: bool,
        seq: int,
        invalidate: Invalidate | None = None,
        restore: Restore | None = None,
    ) -> None:
        self._engine = engine
        self._invalidate = invalidate
        self._restore = restore
        self._tel = engine.telemetry
        self._previous = previous
        self._workflow = previous.workflow
        self._plan = plan
        self._id = rollback_id
        self._force = force
        self.seq = seq
        self._base = {
            t.EXECUTION_ID: previous.execution_id,
            t.WORKFLOW_ID: self._workflow.id,
            t.WORKFLOW_NAME: self._workflow.name,
        }
        self._span: Span = trace.INVALID_SPAN
        self._context: Context = Context()

    async def run(self) -> RollbackOutcome:
        started = time.perf_counter()
        self._start_span()
        compensated: list[str] = []
        undone: list[str] = []
        failed: tuple[str, str] | None = None
        trouble: str | None = None
        for step in self._plan.steps:
            # Forgotten first: a crash during the compensation must not leave it reusable.
            trouble = await self._forget(step.node_id)
            if trouble is not None:
                break
            undone.append(step.node_id)
            if step.action is Action.COMPENSATE:
                error = await self._compensate(self._workflow.node(step.node_id))
                if error is not None:
                    undone.pop()
                    failed = (step.node_id, error)
                    await self._put_back(step.node_id)
                    break
                compensated.append(step.node_id)
        if failed is not None:
            trouble = f"compensation of {failed[0]!r} failed: {failed[1]}"
        result = Result.SUCCESS if trouble is None else Result.FAILURE
        outcome = RollbackOutcome(
            rollback_id=self._id,
            execution_id=self._previous.execution_id,
            plan=self._plan,
            result=result,
            compensated=tuple(compensated),
            undone=tuple(undone),
            failed_node=failed[0] if failed else None,
            error=failed[1] if failed else trouble,
            last_seq=self.seq + 1,
            forced=self._force and bool(self._plan.cannot_undo),
        )
        data = {k: v for k, v in outcome.as_dict().items() if k not in ("executionId", "lastSeq")}
        data["durationMs"] = round((time.perf_counter() - started) * 1000, 3)
        self._emit(EventType.WORKFLOW_ROLLED_BACK, None, self._context, data)
        self._span.set_attribute(t.ROLLBACK_RESULT, result.value)
        if trouble is not None:
            self._span.set_status(Status(StatusCode.ERROR, trouble[:512]))
        self._span.end()
        return outcome

    async def _forget(self, node_id: str) -> str | None:
        """Drops the node's checkpoint; why it could not be dropped, else None."""
        if self._invalidate is None:
            return None
        try:
            done = self._invalidate(self._previous.execution_id, [node_id])
            if inspect.isawaitable(done):
                await done
        except Exception as exc:
            logger.exception("the checkpoint of %s could not be invalidated", node_id)
            return f"the checkpoints of {node_id} could not be invalidated: {exc}"
        return None

    async def _put_back(self, node_id: str) -> None:
        """Its compensation failed, so what the node did stands: its checkpoint is reusable again."""
        if self._restore is None or node_id not in self._previous.outputs:
            return
        try:
            done = self._restore(self._previous.execution_id, node_id, self._previous.outputs[node_id])
            if inspect.isawaitable(done):
                await done
        except Exception:
            logger.exception("the checkpoint of %s could not be put back: a resume runs it again", node_id)

    def _start_span(self) -> None:
        wf, previous = self._workflow, self._previous
        links = []
        if previous.span_context.is_valid:
            links.append(Link(previous.span_context, {t.LINK_TYPE: t.LINK_ROLLBACK_OF}))
        self._span = self._tel.start_span(
            f"rollback_workflow {wf.name}",
            parent=Context(),
            kind=SpanKind.INTERNAL,
            attributes={
                **self._base,
                t.WORKFLOW_VERSION: wf.version,
                t.ROLLBACK_ID: self._id,
                t.ROLLBACK_TO_NODE: self._plan.to_node,
                t.ROLLBACK_FORCED: self._force,
            },
            links=links,
        )
        self._context = trace.set_span_in_context(self._span)

    async def _compensate(self, node: Node) -> str | None:
        """Runs one compensation in its span; the error's description when it failed."""
        attrs = {**self._base, t.COMPENSATION_NODE_ID: node.id, t.NODE_TYPE: node.type, t.ROLLBACK_ID: self._id,
                 t.SIDE_EFFECT: node.side_effect}  # fmt: skip
        span = self._tel.start_child_span(
            f"compensate {node.id}", self._context, self._span.get_span_context(), SpanKind.INTERNAL, attrs
        )
        context = trace.set_span_in_context(span, self._context)
        base = {"rollbackId": self._id, "toNode": self._plan.to_node, "sideEffect": node.side_effect}
        self._emit(EventType.NODE_COMPENSATING, node, context, base)
        started = time.perf_counter()
        known = node.id in self._previous.outputs
        ctx = CompensationContext(
            node,
            self._previous.outputs.get(node.id),
            known,
            self._previous.execution_id,
            self._id,
            self._previous.workflow_input,
            span,
        )
        error: BaseException | None = None
        try:
            done = resolve_compensation(node.compensate)(ctx)  # type: ignore[arg-type]
            if inspect.isawaitable(done):
                await done
        except asyncio.CancelledError:
            span.set_status(Status(StatusCode.ERROR, "the rollback was cancelled"))
            span.end()
            raise
        except Exception as exc:
            error = exc
        duration_ms = round((time.perf_counter() - started) * 1000, 3)
        data: dict[str, Any] = {"rollbackId": self._id, "durationMs": duration_ms}
        if error is None:
            span.set_attribute(t.COMPENSATION_RESULT, Result.SUCCESS.value)
            span.end()
            self._emit(EventType.NODE_COMPENSATED, node, context, {**data, "result": Result.SUCCESS.value})
            return None
        message = describe(error)
        span.set_attribute(t.COMPENSATION_RESULT, Result.FAILURE.value)
        span.set_attribute(t.ERROR_TYPE, type(error).__name__)
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, message[:512]))
        span.end()
        data |= {"result": Result.FAILURE.value, "error": message[:2000], "errorType": type(error).__name__}
        self._emit(EventType.NODE_COMPENSATION_FAILED, node, context, data)
        return message

    def _emit(self, kind: EventType, node: Node | None, context: Context, data: dict[str, Any]) -> None:
        self.seq += 1
        ts_ns = time.time_ns()
        self._tel.emit(kind.value, self.seq, ts_ns, self._base, node, data, context)
        bus = self._engine.events
        if bus.active:
            span_context = trace.get_current_span(context).get_span_context()
            wf = self._workflow
            bus.publish(
                WorkflowEvent(
                    type=kind,
                    seq=self.seq,
                    ts_ns=ts_ns,
                    execution_id=self._previous.execution_id,
                    workflow_id=wf.id,
                    workflow_name=wf.name,
                    trace_id=format(span_context.trace_id, "032x"),
                    span_id=format(span_context.span_id, "016x"),
                    node_id=node.id if node else "",
                    node_type=node.type if node else "",
                    data=data,
                )
            )
