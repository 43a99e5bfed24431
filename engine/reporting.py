"""The run reporter: the one part of a run that knows telemetry.

It turns what the scheduler (engine/scheduler.py) and the attempt runner (engine/attempts.py)
tell it — the run started, a node attempt started or ended, a retry, a skip, a pause — into
OTel spans and their attributes, metrics, and lifecycle events (OTel log records and, for
in-process watchers, `WorkflowEvent`s on the engine's bus). Names follow docs/telemetry.md;
node types add their own span attributes (engine/nodes.py `span_attributes`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Status, StatusCode

from flowscope.contract import attributes as t
from flowscope.engine.attempts import Attempt, describe, error_type
from flowscope.engine.context import NodeContext
from flowscope.engine.dag import Node, Workflow
from flowscope.engine.events import EventBus, EventType, WorkflowEvent
from flowscope.engine.nodes import NodeType
from flowscope.engine.redact import preview
from flowscope.engine.results import DONE_STATES, NodeState, NodeStates, Result, RunOptions
from flowscope.engine.telemetry import Telemetry

if TYPE_CHECKING:
    from flowscope.engine.scheduler import Execution

_NO_IDS = ("0" * 32, "0" * 16)
_END_EVENTS = {Result.SUCCESS: EventType.WORKFLOW_COMPLETED, Result.CANCELLATION: EventType.WORKFLOW_CANCELLED}


class RunReporter:
    """Spans, metrics and events of one run (see the module docstring)."""

    def __init__(
        self,
        telemetry: Telemetry,
        bus: EventBus,
        execution_id: str,
        workflow: Workflow,
        workflow_input: Any,
        options: RunOptions,
        states: NodeStates,
        progress_interval_s: float,
    ) -> None:
        self._tel = telemetry
        self._bus = bus
        self._execution_id = execution_id
        self._workflow = workflow
        self._workflow_input = workflow_input
        self._options = options
        self._states = states
        self._progress_interval_s = progress_interval_s
        self.seq = 0
        self.span: Span = trace.INVALID_SPAN
        self.durations_ms: dict[str, float] = {}
        self._run_context: Context = Context()
        self._ids = _NO_IDS
        # Until the run's span says otherwise, every event is built.
        self._observed = True
        self._exporting = True
        self._event_attributes: dict[str, Any] = {}
        self._run_metric_attrs: dict[str, Any] = {t.WORKFLOW_NAME: workflow.name}
        # Per node type; shared by its nodes' records (the SDK does not keep or change the mapping).
        self._node_metric_attrs: dict[str, dict[str, Any]] = {}
        self._last_progress = 0.0
        self._progress_timer: asyncio.TimerHandle | None = None
        # Back-pressure: before a run or an attempt starts, it awaits `event_room()` when backlogged.
        self.events_backlogged = telemetry.events_backlogged
        self.event_room = telemetry.event_room

    # -- events ----------------------------------------------------------------------------

    def emit(
        self,
        kind: EventType,
        *,
        node: Node | None = None,
        span: Span | None = None,
        context: Context | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        self.seq += 1
        if not self._observed:
            return
        ts_ns = time.time_ns()
        payload = data or {}
        # An ended span no longer records, yet its id still anchors the event.
        if self._exporting:
            otel_ctx = context or (self._run_context if span is None else trace.set_span_in_context(span))
            self._tel.emit(kind.value, self.seq, ts_ns, self._event_attributes, node, payload, otel_ctx)
        if self._bus.active:
            ids = self._ids if span is None else _hex_ids(span.get_span_context())
            wf = self._workflow
            self._bus.publish(
                WorkflowEvent(
                    type=kind,
                    seq=self.seq,
                    ts_ns=ts_ns,
                    execution_id=self._execution_id,
                    workflow_id=wf.id,
                    workflow_name=wf.name,
                    trace_id=ids[0],
                    span_id=ids[1],
                    node_id=node.id if node else "",
                    node_type=node.type if node else "",
                    data=payload,
                )
            )

    def progress(self) -> None:
        """Coalesced: at most one progress event per interval, the latest state always sent.

        Progress follows every state change, but one event per change doubled
        the telemetry cost per step; a deferred flush keeps it current.
        """
        if not self._observed:
            return
        now = time.perf_counter()
        wait = self._last_progress + self._progress_interval_s - now
        if wait <= 0:
            self._flush_progress()
        elif self._progress_timer is None:
            self._progress_timer = asyncio.get_running_loop().call_later(wait, self._flush_progress)

    def _flush_progress(self) -> None:
        if self._progress_timer is not None:
            self._progress_timer.cancel()
            self._progress_timer = None
        self._last_progress = time.perf_counter()
        counts = self._states.counts
        total = len(self._states.states)
        done = sum(counts[s] for s in DONE_STATES)
        self.emit(
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

    def run_started(self, started_ns: int) -> None:
        """The run's span, the run-active metric and `workflow.started`."""
        wf, options = self._workflow, self._options
        attributes: dict[str, Any] = {
            t.GEN_AI_OPERATION: t.OPERATION_INVOKE_WORKFLOW,
            t.WORKFLOW_NAME: wf.name,
            t.WORKFLOW_ID: wf.id,
            t.WORKFLOW_VERSION: wf.version,
            t.EXECUTION_ID: self._execution_id,
            t.TRIGGER_TYPE: options.trigger,
            t.NODE_COUNT: len(wf.nodes),
        }
        if options.user_id:
            attributes[t.ENDUSER_ID] = options.user_id
        links = []
        if options.resumed_from is not None:
            attributes[t.RESUMED_FROM] = options.resumed_from.execution_id
            if options.resumed_from.span_context.is_valid:  # unknown when its run kept no trace
                links.append(Link(options.resumed_from.span_context, {t.LINK_TYPE: t.LINK_RESUMED_FROM}))
        if options.parent_execution_id:
            attributes[t.PARENT_EXECUTION_ID] = options.parent_execution_id
        self.span = self._tel.start_span(
            f"invoke_workflow {wf.name}",
            parent=options.parent,
            kind=SpanKind.SERVER if options.remote else SpanKind.INTERNAL,
            attributes=attributes,
            links=links,
            start_time_ns=started_ns,
        )
        self._ids = _hex_ids(self.span.get_span_context())
        # With telemetry off and no in-process watcher, events are numbered but not built.
        self._exporting = self._ids[0] != _NO_IDS[0]
        self._observed = self._exporting or self._bus.active
        self._event_attributes = {t.EXECUTION_ID: self._execution_id, t.WORKFLOW_ID: wf.id, t.WORKFLOW_NAME: wf.name}
        self._run_context = trace.set_span_in_context(self.span, options.parent)
        self._tel.run_active.add(1, self._run_metric_attrs)
        self.emit(EventType.WORKFLOW_STARTED, data=self._start_data())

    def _start_data(self) -> dict[str, Any]:
        wf, options = self._workflow, self._options
        data: dict[str, Any] = {
            "totalNodes": len(wf.nodes),
            "trigger": options.trigger,
            "userId": options.user_id,
            "workflowVersion": wf.version,
            "nodes": [
                {"id": n.id, "type": n.type, "label": n.display_label, "dependsOn": list(n.depends_on)}
                for n in wf.nodes
            ],
        }
        if options.resumed_from is not None:
            data["resumedFrom"] = options.resumed_from.execution_id
        if options.parent_execution_id:
            data["parentExecutionId"] = options.parent_execution_id
        if options.engine_id:
            data["engineId"] = options.engine_id
        return data

    def run_finished(self, outcome: Result, error: str | None, duration_s: float) -> None:
        """The run's end: its last progress, its span's result, the run's last event and metrics."""
        span = self.span
        if self._progress_timer is not None:
            self._flush_progress()
        counts = self._states.counts
        span.set_attribute(t.WORKFLOW_RESULT, outcome.value)
        span.set_attribute(t.NODES_COMPLETED, counts[NodeState.SUCCESS])
        span.set_attribute(t.NODES_FAILED, counts[NodeState.FAILED])
        span.set_attribute(t.NODES_SKIPPED, counts[NodeState.SKIPPED])
        if outcome is not Result.SUCCESS:
            span.set_attribute(t.ERROR_TYPE, outcome.value)
            span.set_status(Status(StatusCode.ERROR, (error or outcome.value)[:512]))
        data: dict[str, Any] = {
            "durationMs": round(duration_s * 1000, 3),
            "result": outcome.value,
            "performance": self._performance(),
            "completedNodes": counts[NodeState.SUCCESS],
            "failedNodes": counts[NodeState.FAILED],
            "skippedNodes": counts[NodeState.SKIPPED],
        }
        if error:
            data["error"] = error
        self.emit(_END_EVENTS.get(outcome, EventType.WORKFLOW_FAILED), data=data)
        span.end()
        self._tel.run_active.add(-1, self._run_metric_attrs)
        self._tel.run_duration.record(duration_s, {**self._run_metric_attrs, t.WORKFLOW_RESULT: outcome.value})

    def _performance(self) -> dict[str, Any]:
        durations = self.durations_ms
        slowest = max(durations, key=durations.__getitem__) if durations else None
        return {
            "slowestNode": slowest,
            "slowestNodeMs": durations[slowest] if slowest else None,
            "averageNodeMs": round(sum(durations.values()) / len(durations), 3) if durations else None,
            "nodesRun": len(durations),
        }

    def paused(self, reason: str) -> None:
        self.emit(EventType.WORKFLOW_PAUSED, data={"reason": reason})

    def resumed(self, reason: str) -> None:
        self.emit(EventType.WORKFLOW_RESUMED, data={"reason": reason})

    def recovered(self, lost_seq: int, started_ns: int) -> None:
        """`workflow.recovered` after the stack's `workflow.lost` (numbered `lost_seq`): what a
        reader needs to show the run as running again, as workflow.started carried it."""
        # The stack numbered its event within this run's sequence: ours go on after it.
        self.seq = max(self.seq, lost_seq)
        data = {**self._start_data(), "startTimeUnixNano": started_ns, "lostSeq": lost_seq}
        self.emit(EventType.WORKFLOW_RECOVERED, data=data)

    # -- nodes -----------------------------------------------------------------------------

    def attempt_started(
        self, execution: Execution, node: Node, attempt_no: int, node_type: NodeType, inputs: dict[str, Any]
    ) -> tuple[NodeContext, frozenset[str]]:
        """An attempt's span (with the node type's own attributes), the context its node runs in,
        and `node.started`; with the redaction keys its end needs when I/O is captured."""
        attrs: dict[str, Any] = {
            t.EXECUTION_ID: self._execution_id,
            t.NODE_ID: node.id,
            t.NODE_TYPE: node.type,
            t.NODE_LABEL: node.display_label,
            t.NODE_ATTEMPT: attempt_no,
        }
        if self._options.rerun and node.id in self._options.rerun:
            attrs[t.NODE_RERUN] = True
        if node_type.span_attributes is not None:
            attrs.update(node_type.span_attributes(node))
        options = self._tel.options
        secret_keys = frozenset(node.config.get("secret_keys", ())) if options.capture_io else frozenset()
        input_preview = None
        if options.capture_io:
            input_preview = preview(inputs or self._workflow_input, options.max_io_chars, secret_keys=secret_keys)
            attrs[t.NODE_INPUT] = input_preview
        executor = node_type.executor
        span = self._tel.start_child_span(
            executor.span_name(node), self._run_context, self.span.get_span_context(), executor.kind, attrs
        )
        span_ctx = trace.set_span_in_context(span, self._run_context)
        ctx = NodeContext(node, attempt_no, inputs, self._workflow_input, span, span_ctx, execution)
        data: dict[str, Any] = {"attempt": attempt_no, "nodeLabel": node.display_label}
        if input_preview is not None:
            data["input"] = input_preview
        self.emit(EventType.NODE_STARTED, node=node, span=span, context=span_ctx, data=data)
        self.progress()
        return ctx, secret_keys

    def attempt_ended(self, ctx: NodeContext, attempt: Attempt, duration_s: float, secret_keys: frozenset[str]) -> None:
        """The attempt's span ended with its result, its duration recorded, and its event."""
        node, span = ctx.node, ctx.span
        duration_ms = round(duration_s * 1000, 3)
        self.durations_ms[node.id] = duration_ms
        data: dict[str, Any] = {"durationMs": duration_ms, "attempt": ctx.attempt, "result": attempt.result.value}
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
            if options.capture_io:
                data["output"] = preview(attempt.output, options.max_io_chars, secret_keys=secret_keys)
                span.set_attribute(t.NODE_OUTPUT, data["output"])
            event = EventType.NODE_COMPLETED
        else:
            error = attempt.error
            message = describe(error)
            data["error"] = message[: options.max_io_chars]
            data["errorType"] = error_type(attempt.result, error)
            span.set_attribute(t.ERROR_TYPE, data["errorType"])
            if error is not None and not isinstance(error, asyncio.CancelledError):
                span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, message[:512]))
            event = EventType.NODE_FAILED
        span.end()
        self._tel.node_duration.record(
            duration_s,
            {t.WORKFLOW_NAME: self._workflow.name, t.NODE_TYPE: node.type, t.NODE_RESULT: attempt.result.value},
        )
        self.emit(event, node=node, span=span, context=ctx.otel_context, data=data)
        self.progress()

    def _record_llm(self, span: Span, usage: Any, duration_s: float) -> None:
        span.set_attribute(t.GEN_AI_PROVIDER, usage.provider)
        span.set_attribute(t.GEN_AI_INPUT_TOKENS, usage.input_tokens)
        span.set_attribute(t.GEN_AI_OUTPUT_TOKENS, usage.output_tokens)
        if usage.time_to_first_token_s is not None:
            span.set_attribute(t.TIME_TO_FIRST_TOKEN, usage.time_to_first_token_s)
        base = {
            t.GEN_AI_OPERATION: t.OPERATION_CHAT,
            t.GEN_AI_PROVIDER: usage.provider,
            t.GEN_AI_REQUEST_MODEL: usage.model,
        }
        self._tel.token_usage.record(usage.input_tokens, {**base, t.GEN_AI_TOKEN_TYPE: "input"})
        self._tel.token_usage.record(usage.output_tokens, {**base, t.GEN_AI_TOKEN_TYPE: "output"})
        self._tel.llm_duration.record(duration_s, base)

    def _node_metric_attributes(self, node: Node) -> dict[str, Any]:
        found = self._node_metric_attrs.get(node.type)
        if found is None:
            found = self._node_metric_attrs[node.type] = {t.WORKFLOW_NAME: self._workflow.name, t.NODE_TYPE: node.type}
        return found

    def queue_waited(self, node: Node, seconds: float) -> None:
        attrs = self._node_metric_attrs.get(node.type) or self._node_metric_attributes(node)
        self._tel.node_queue_wait.record(seconds, attrs)

    def node_retrying(
        self, node: Node, span: Span, attempt_no: int, delay_s: float, error: BaseException | None
    ) -> None:
        self._tel.node_retries.add(1, self._node_metric_attributes(node))
        self.emit(
            EventType.NODE_RETRYING,
            node=node,
            span=span,
            data={
                "delayMs": round(delay_s * 1000, 3),
                "attempt": attempt_no,
                "nextAttempt": attempt_no + 1,
                "maxAttempts": node.retry.max_attempts,
                "error": describe(error),
            },
        )
        self.progress()

    def node_skipped(self, node: Node, reason: str) -> None:
        self.emit(EventType.NODE_SKIPPED, node=node, data={"reason": reason})
        self.progress()

    def node_reused(self, node: Node) -> None:
        resumed_from = self._options.resumed_from
        source = resumed_from.execution_id if resumed_from else ""
        self.emit(
            EventType.NODE_COMPLETED,
            node=node,
            data={"reused": True, "reusedFrom": source, "durationMs": 0.0, "attempt": 0},
        )
        self.progress()

    def node_waiting(self, ctx: NodeContext, waiting_for: str) -> None:
        self.emit(EventType.NODE_WAITING, node=ctx.node, span=ctx.span, data={"waitingFor": waiting_for})
        self.progress()

    def node_log(self, ctx: NodeContext, message: str, level: str, attributes: Mapping[str, Any]) -> None:
        self.emit(
            EventType.EXECUTION_LOG,
            node=ctx.node,
            span=ctx.span,
            data={"level": level, "message": message, "attributes": dict(attributes), "attempt": ctx.attempt},
        )


def _hex_ids(span_context: SpanContext) -> tuple[str, str]:
    return format(span_context.trace_id, "032x"), format(span_context.span_id, "016x")
