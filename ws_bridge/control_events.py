"""Lifecycle events the stack itself writes into the pipeline: `workflow.lost` (docs/control.md).

When a run's engine goes silent the control plane (ws_bridge/control.py) calls `EmitLost`
with a `LostRun`. The `LostEmitter` turns it into an OTLP log record shaped exactly like the
engine's own lifecycle events — EventName, the execution/workflow attributes, the seq, the
body JSON as `data` — so every reader takes it the same way: the collector admits, spools and
stores it, the workflow views mark the run `lost` (collector/schema.py), and the live feed
delivers it with its seq. The run's stored fields (start time, workflow.started's data) go
into the body because the view writes a whole `workflow_executions` row from it.

Where the record goes is the sink's choice: the embedded stack hands it to its collector's
intake (`collector_sink`), `flowscope bridge` exports it over OTLP/gRPC to the collector tier
(`OtlpLogSink`). Lookups and sending happen on one worker thread, never on the event loop,
one run after another so a run's lost events keep their order.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

import grpc
import orjson
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2_grpc import LogsServiceStub
from opentelemetry.proto.logs.v1.logs_pb2 import SeverityNumber

from flowscope.contract import EventName, RunStatus
from flowscope.contract.attributes import EVENT_SEQ, EXECUTION_ID, WORKFLOW_ID, WORKFLOW_NAME

logger = logging.getLogger(__name__)

SERVICE_NAME = "flowscope-control"
# Runs handed over and not yet sent: past this, more are dropped (logged) rather than queued.
MAX_QUEUED = 10_000
SCOPE = "flowscope.control"
_LIVE_STATUSES = frozenset({RunStatus.RUNNING, RunStatus.LOST})


@dataclass(frozen=True)
class LostRun:
    execution_id: str
    workflow_id: str
    seq: int
    engine_id: str
    engine_name: str
    reason: str
    trace_id: str = ""
    span_id: str = ""
    last_heartbeat_unix_nano: int = 0
    # The stack started the run or saw its events; an engine's word alone is not enough for a
    # lost event: then the run's stored start must exist (looked up once, not waited for).
    known: bool = True


EmitLost = Callable[[LostRun], None]
LogSink = Callable[[ExportLogsServiceRequest], None]
# The run's workflow.started as the live hub saw it (Hub.recent_events), else None.
LiveStarted = Callable[[str], Mapping[str, Any] | None]


class StoredRuns(Protocol):
    """What the emitter reads of a run: History.started_run and History.owner."""

    def started_run(self, execution_id: str) -> dict[str, Any] | None: ...

    def owner(self, execution_id: str) -> tuple[str, str] | None: ...


def first_started(events: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The workflow.started among a run's events (its first, as readers take it)."""
    return next((e for e in events if e.get("type") == EventName.WORKFLOW_STARTED), None)


def row_of_started(event: Mapping[str, Any]) -> dict[str, Any]:
    """The stored row a workflow.started live event stands for, as far as it tells: all but
    the engine's service name, and the start to the microsecond (same partition, same run)."""
    data = event.get("data") or {}
    start = dt.datetime.fromisoformat(str(event["ts"]).replace("Z", "+00:00"))
    return {
        "Status": RunStatus.RUNNING,
        "WorkflowName": event.get("workflowName") or "",
        "WorkflowVersion": _text(data.get("workflowVersion")),
        "TriggerType": _text(data.get("trigger")),
        "UserId": _text(data.get("userId")),
        "TotalNodes": data.get("totalNodes") if isinstance(data.get("totalNodes"), int) else 0,
        "ResumedFrom": _text(data.get("resumedFrom")),
        "ParentExecutionId": _text(data.get("parentExecutionId")),
        "StartTimeUnixNano": (int(start.timestamp()) * 1_000_000 + start.microsecond) * 1000,
        "TraceId": event.get("traceId") or "",
        "SpanId": event.get("spanId") or "",
        "ServiceName": "",
    }


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def lost_body(run: LostRun, stored: Mapping[str, Any] | None) -> dict[str, Any]:
    """The `workflow.lost` data: workflow.started's fields as stored, the start time the view
    partitions by, and why and whose engine was lost."""
    body: dict[str, Any] = {
        "reason": run.reason,
        "engineId": run.engine_id,
        "engineName": run.engine_name,
        "lastHeartbeatUnixNano": run.last_heartbeat_unix_nano,
    }
    if stored is not None:
        body |= {
            "totalNodes": stored["TotalNodes"],
            "trigger": stored["TriggerType"],
            "userId": stored["UserId"] or None,
            "workflowVersion": stored["WorkflowVersion"],
            "resumedFrom": stored["ResumedFrom"] or None,
            "parentExecutionId": stored["ParentExecutionId"] or None,
            "startTimeUnixNano": stored["StartTimeUnixNano"],
        }
        if stored["ServiceName"]:
            body["serviceName"] = stored["ServiceName"]
    return body


def lost_request(run: LostRun, stored: Mapping[str, Any] | None, now_ns: int | None = None) -> ExportLogsServiceRequest:
    """One `workflow.lost` log record as the engine writes its own lifecycle events."""
    now_ns = now_ns or time.time_ns()
    request = ExportLogsServiceRequest()
    resource_logs = request.resource_logs.add()
    service = resource_logs.resource.attributes.add()
    service.key, service.value.string_value = "service.name", SERVICE_NAME
    scope_logs = resource_logs.scope_logs.add()
    scope_logs.scope.name = SCOPE
    record = scope_logs.log_records.add()
    record.time_unix_nano = now_ns
    record.observed_time_unix_nano = now_ns
    record.event_name = EventName.WORKFLOW_LOST
    record.severity_number = SeverityNumber.SEVERITY_NUMBER_WARN
    record.severity_text = "WARN"
    trace_id = run.trace_id or (stored or {}).get("TraceId", "")
    span_id = run.span_id or (stored or {}).get("SpanId", "")
    if _is_hex(trace_id, 16):
        record.trace_id = bytes.fromhex(trace_id)
    if _is_hex(span_id, 8):
        record.span_id = bytes.fromhex(span_id)
    workflow_name = (stored or {}).get("WorkflowName", "")
    for key, text in ((EXECUTION_ID, run.execution_id), (WORKFLOW_ID, run.workflow_id), (WORKFLOW_NAME, workflow_name)):
        attribute = record.attributes.add()
        attribute.key, attribute.value.string_value = key, text
    seq = record.attributes.add()
    seq.key, seq.value.int_value = EVENT_SEQ, run.seq
    record.body.string_value = orjson.dumps(lost_body(run, stored)).decode()
    return request


def _is_hex(text: str, size: int) -> bool:
    if len(text) != 2 * size:
        return False
    try:
        return any(bytes.fromhex(text))
    except ValueError:
        return False


class LostEmitter:
    """`EmitLost`: looks the run up in the store, builds its `workflow.lost`, hands it to the sink.

    The run's workflow.started may still be on its way to the store when its engine goes
    (a run lost in its first second, or while ClickHouse is away and rows wait in the queue):
    then the hub's copy of that event (`live_started`, read on the loop when the run is
    handed over) gives the fields, and without either the store is asked again for
    `lookup_timeout_s`, after which the event goes out without them — the live stream and the
    events table still get it, the executions row stays as it is. A run whose stored row
    already holds a result (its run span arrived first) is not declared lost."""

    def __init__(
        self,
        runs: StoredRuns | None,
        sink: LogSink,
        *,
        live_started: LiveStarted | None = None,
        lookup_timeout_s: float = 5.0,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self._runs = runs
        self._live_started = live_started
        self._sink = sink
        self._lookup_timeout_s = lookup_timeout_s
        self._on_close = on_close
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="flowscope-lost")
        self._closed = threading.Event()
        self._queued = 0
        self._lock = threading.Lock()
        self.dropped = 0

    def __call__(self, run: LostRun) -> None:
        if self._closed.is_set():
            logger.warning("run %s lost after the emitter closed: not recorded", run.execution_id)
            return
        with self._lock:
            if self._queued >= MAX_QUEUED:
                self.dropped += 1
                logger.error("run %s lost with %d runs still to record: not recorded", run.execution_id, MAX_QUEUED)
                return
            self._queued += 1
        seen = self._live_started(run.execution_id) if self._live_started is not None else None
        self._worker.submit(self._emit, run, row_of_started(seen) if seen is not None else None)

    def _emit(self, run: LostRun, seen: dict[str, Any] | None) -> None:
        try:
            stored = self._stored(run.execution_id, seen is not None or not run.known) or seen
            if stored is None and not run.known:
                logger.warning(
                    "run %s, listed by engine %s, is unknown: not declared lost", run.execution_id, run.engine_id
                )
                return
            if stored is not None and stored["Status"] not in _LIVE_STATUSES:
                logger.info("run %s already ended (%s): not declared lost", run.execution_id, stored["Status"])
                return
            self._sink(lost_request(self._owned(run, seen), stored))
        except Exception:  # the emitter must outlive any failure: the next run still gets its event
            logger.exception("could not record run %s as lost", run.execution_id)
        finally:
            with self._lock:
                self._queued -= 1

    def _owned(self, run: LostRun, seen: Mapping[str, Any] | None) -> LostRun:
        """The run with the workflow its first stored record names (else its live start's),
        whatever its engine said."""
        owner = None
        if self._runs is not None:
            try:
                owner = self._runs.owner(run.execution_id)
            except Exception as exc:
                logger.warning("looking up the owner of lost run %s failed: %s", run.execution_id, exc)
        workflow_id = owner[0] if owner is not None else (seen or {}).get("workflowId") or run.workflow_id
        return run if workflow_id == run.workflow_id else replace(run, workflow_id=str(workflow_id))

    def _stored(self, execution_id: str, once: bool) -> dict[str, Any] | None:
        if self._runs is None:
            return None
        deadline = time.monotonic() + (0 if once else self._lookup_timeout_s)
        delay = 0.05
        while True:
            try:
                stored = self._runs.started_run(execution_id)
            except Exception as exc:  # a store that is down: the event still goes out, without the row
                logger.warning("looking up lost run %s failed: %s", execution_id, exc)
                stored = None
            if stored is not None or time.monotonic() + delay > deadline or self._closed.is_set():
                return stored
            self._closed.wait(delay)
            delay = min(delay * 2, 0.5)

    def close(self, timeout_s: float = 10.0) -> None:
        """Sends what was already handed over, then stops; idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        done = threading.Event()
        self._worker.submit(done.set)
        if not done.wait(timeout_s):
            logger.warning("lost events still unsent after %.0f s at shutdown", timeout_s)
        self._worker.shutdown(wait=False, cancel_futures=True)
        if self._on_close is not None:
            self._on_close()


class Consumer(Protocol):
    def consume_logs(self, request: ExportLogsServiceRequest) -> Any: ...


def collector_sink(collector: Consumer, attempts: int = 5) -> LogSink:
    """The embedded stack's sink: the collector's own intake, as a receiver would call it
    (admitted, spooled, written, streamed to the bridge)."""
    from flowscope.collector.types import Backpressure

    def sink(request: ExportLogsServiceRequest) -> None:
        for attempt in range(attempts):
            try:
                outcome = collector.consume_logs(request)
            except Backpressure as exc:
                if attempt == attempts - 1:
                    raise
                time.sleep(exc.retry_after_s)
                continue
            if outcome.rejected:
                logger.error("the collector refused a workflow.lost record: %s", "; ".join(outcome.reasons))
            return

    return sink


def control_endpoint(env: Mapping[str, str] | None = None) -> str:
    """Where `flowscope bridge` sends its records: FLOWSCOPE_CONTROL_OTLP_ENDPOINT, else the
    standard OTEL_EXPORTER_OTLP_ENDPOINT, else a collector on this host."""
    env = os.environ if env is None else env
    return (
        env.get("FLOWSCOPE_CONTROL_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "http://127.0.0.1:4317"
    )


class OtlpLogSink:
    """`flowscope bridge`'s sink: OTLP/gRPC Export to the collector tier, with the bearer token
    (an `ingest` grant) when one is set. Retried with backoff; a record that still cannot be
    sent is logged, never raised into the bridge."""

    def __init__(self, endpoint: str, token: str | None = None, *, attempts: int = 4, timeout_s: float = 5.0) -> None:
        target = endpoint.removeprefix("http://")
        self.secure = target.startswith("https://")
        target = target.removeprefix("https://")
        self._channel = (
            grpc.secure_channel(target, grpc.ssl_channel_credentials())
            if self.secure
            else (grpc.insecure_channel(target))
        )
        self._stub = LogsServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._attempts = attempts
        self._timeout_s = timeout_s
        self.endpoint = target

    def __call__(self, request: ExportLogsServiceRequest) -> None:
        delay = 0.2
        for attempt in range(1, self._attempts + 1):
            try:
                response = self._stub.Export(request, timeout=self._timeout_s, metadata=self._metadata)
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else None
                retryable = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, None)
                if not retryable or attempt == self._attempts:
                    logger.error("sending workflow.lost to %s failed: %s", self.endpoint, code)
                    return
                time.sleep(delay)
                delay *= 2
                continue
            if response.partial_success.rejected_log_records:
                logger.error(
                    "%s refused a workflow.lost record: %s", self.endpoint, response.partial_success.error_message
                )
            return

    def close(self) -> None:
        self._channel.close()
