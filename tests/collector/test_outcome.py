"""The receiver contract: every consumer answers with an `Outcome` — counts and reasons, no rows.

The rows a request converts to stay inside the collector's queue; the bridge's remote feed,
which stores nothing, has none to make up."""

from __future__ import annotations

import time

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs

from flowscope.collector.admission import OFF, admitting
from flowscope.collector.service import Collector
from flowscope.collector.types import Outcome, Signal
from flowscope.ws_bridge.app import Bridge, BridgeConfig


def lifecycle_log(seq: str, ns: int) -> LogRecord:
    return LogRecord(
        time_unix_nano=ns,
        event_name="node.started",
        attributes=[
            KeyValue(key="workflow.execution.id", value=AnyValue(string_value="exec-outcome")),
            KeyValue(key="workflow.event.seq", value=AnyValue(string_value=seq)),
        ],
        body=AnyValue(string_value="{}"),
    )


def logs(*records: LogRecord) -> ExportLogsServiceRequest:
    return ExportLogsServiceRequest(resource_logs=[ResourceLogs(scope_logs=[ScopeLogs(log_records=records)])])


async def test_the_pipeline_and_the_admission_filter_answer_with_an_outcome(collector: Collector) -> None:
    assert collector.pipeline is not None
    now = time.time_ns()
    stored = collector.pipeline.consume(Signal.LOGS, logs(lifecycle_log("1", now)))
    assert type(stored) is Outcome
    assert stored == Outcome(accepted=1)

    # One record the admission filter cuts out (its seq is no number), one it lets through.
    admitted = admitting(collector.pipeline.consume, OFF)(
        Signal.LOGS, logs(lifecycle_log("2", now), lifecycle_log("two", now))
    )
    assert type(admitted) is Outcome
    assert (admitted.accepted, admitted.rejected) == (1, 1)
    assert len(admitted.reasons) == 1 and "workflow.event.seq" in admitted.reasons[0]


async def test_the_bridge_feed_answers_with_counts_only() -> None:
    bridge = Bridge(BridgeConfig(), None)
    request = logs(lifecycle_log("1", time.time_ns()), lifecycle_log("2", time.time_ns()))
    outcome = bridge._consume_remote(Signal.LOGS, request)
    assert type(outcome) is Outcome
    assert outcome == Outcome(accepted=2, rejected=0, reasons=[])
    await bridge.aclose()
