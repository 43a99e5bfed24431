"""No lifecycle event is dropped while the collector takes them; a dead collector never blocks runs.

The engine exports over a real gRPC socket to the collector's `GrpcReceiver`, whose consumer
counts what arrives; the event queue is made small so that an engine emitting faster than the
exporter drains would overflow it.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint
from opentelemetry.sdk.trace import TracerProvider

from flowscope.collector.batcher import Backpressure
from flowscope.collector.convert import Converted
from flowscope.collector.receiver import GrpcReceiver
from flowscope.collector.types import Signal
from flowscope.engine import Engine, NodeContext, Telemetry, Workflow, WorkflowBuilder
from flowscope.engine.otlp_encoding import GrpcLogExporter
from flowscope.engine.telemetry import event_processor, log_queue_sizes

pytestmark = pytest.mark.slow

# A queue this small overflows within one of the engine's GIL slices when nothing holds it back.
SMALL_QUEUE = {"OTEL_BLRP_MAX_QUEUE_SIZE": "64", "OTEL_BLRP_MAX_EXPORT_BATCH_SIZE": "16"}
NODES = 10


class CountingConsumer:
    """Counts received events by name and keeps every execution's seq numbers.

    The first `refuse` event requests are refused as the collector refuses when its queue is full.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.by_name: collections.Counter[str] = collections.Counter()
        self.seqs: dict[str, list[int]] = collections.defaultdict(list)
        self.refuse = 0

    def __call__(self, signal: Signal, request: Any, raw: bytes | None = None) -> Converted:
        count = 0
        with self._lock:
            if signal is Signal.LOGS and self.refuse > 0:
                self.refuse -= 1
                raise Backpressure("queue full", retry_after_s=0.05)
            for resource_logs in getattr(request, "resource_logs", ()):
                for scope_logs in resource_logs.scope_logs:
                    for record in scope_logs.log_records:
                        count += 1
                        self.by_name[record.event_name] += 1
                        attrs = {a.key: a.value for a in record.attributes}
                        execution = attrs["workflow.execution.id"].string_value
                        self.seqs[execution].append(attrs["workflow.event.seq"].int_value)
        return Converted(tables=[], accepted=count, rejected=0, reasons=[])


@pytest.fixture
def receiver() -> Iterator[tuple[GrpcReceiver, CountingConsumer]]:
    consumer = CountingConsumer()
    server = GrpcReceiver(consumer, port=0)
    server.start()
    yield server, consumer
    server.stop(1.0)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def step(ctx: NodeContext) -> int:
    return 1


def chain() -> Workflow:
    builder = WorkflowBuilder("delivery").code("n0", step)
    for i in range(1, NODES):
        builder.code(f"n{i}", step, depends_on=[f"n{i - 1}"])
    return builder.build()


def providers(port: int, **exporter_options: Any) -> tuple[Telemetry, LoggerProvider, InMemoryMetricReader]:
    """The engine's own event pipeline (`event_processor`, as `setup()` wires it) with a small queue."""
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    exporter = GrpcLogExporter(endpoint=f"http://127.0.0.1:{port}", insecure=True, **exporter_options)
    logger_provider = LoggerProvider()
    logger_provider.add_log_record_processor(event_processor(exporter, 20, SMALL_QUEUE, meter_provider))
    return Telemetry(TracerProvider(), logger_provider, meter_provider), logger_provider, reader


def queue_full_drops(reader: InMemoryMetricReader) -> float:
    data = reader.get_metrics_data()
    dropped = 0.0
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name != "otel.sdk.processor.log.processed":
                    continue
                for point in metric.data.data_points:
                    if (
                        isinstance(point, NumberDataPoint)
                        and (point.attributes or {}).get("error.type") == "queue_full"
                    ):
                        dropped += point.value
    return dropped


async def run_many(engine: Engine, runs: int, concurrency: int) -> dict[str, int]:
    """`runs` runs of the chain, `concurrency` at a time; events emitted per execution."""
    workflow = chain()
    emitted: dict[str, int] = {}
    pending = iter(range(runs))

    async def worker() -> None:
        for _ in pending:
            result = await engine.run(workflow)
            assert result.result.value == "success", result.error
            emitted[result.execution_id] = result.events_emitted

    # A bound, not a speed figure: runs blocked forever fail here rather than at the test timeout.
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), timeout=90)
    return emitted


async def run_and_count(receiver: tuple[GrpcReceiver, CountingConsumer], runs: int) -> None:
    """Runs with the engine's event pipeline into `receiver`; every event must arrive, in seq."""
    server, consumer = receiver
    telemetry, logger_provider, reader = providers(server.port)
    engine = Engine(telemetry)
    emitted = await run_many(engine, runs, concurrency=10)
    await engine.aclose()
    assert await asyncio.to_thread(logger_provider.force_flush)
    await asyncio.to_thread(logger_provider.shutdown)

    assert queue_full_drops(reader) == 0
    for name in ("workflow.started", "workflow.completed"):
        assert consumer.by_name[name] == runs, name
    for name in ("node.started", "node.completed"):
        assert consumer.by_name[name] == runs * NODES, name
    assert sum(consumer.by_name.values()) == sum(emitted.values())
    for execution, count in emitted.items():
        assert sorted(consumer.seqs[execution]) == list(range(1, count + 1)), execution


async def test_every_event_arrives_while_the_collector_takes_them(
    monkeypatch: pytest.MonkeyPatch, receiver: tuple[GrpcReceiver, CountingConsumer]
) -> None:
    monkeypatch.setenv("OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED", "true")
    await run_and_count(receiver, runs=150)


async def test_every_event_arrives_while_the_collector_pushes_back(
    monkeypatch: pytest.MonkeyPatch, receiver: tuple[GrpcReceiver, CountingConsumer]
) -> None:
    monkeypatch.setenv("OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED", "true")
    # More refusals in a row than the OTLP exporter retries (six): the collector is busy, not gone.
    receiver[1].refuse = 9
    await run_and_count(receiver, runs=30)
    assert receiver[1].refuse == 0


async def test_unreachable_collector_never_blocks_runs_and_drops_are_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED", "true")
    telemetry, logger_provider, reader = providers(closed_port(), timeout=1)
    engine = Engine(telemetry)
    runs = 40
    emitted = await run_many(engine, runs, concurrency=10)
    await engine.aclose()

    assert len(emitted) == runs
    gate = telemetry.backpressure
    assert gate is not None
    # Runs waited for the queue only until the exporter was seen failing, then went on.
    assert gate.waits >= 1
    assert queue_full_drops(reader) > 0, "what a full queue drops must be counted"
    await asyncio.to_thread(logger_provider.shutdown)


def test_event_queue_is_sized_for_the_engine_and_overridable() -> None:
    assert log_queue_sizes({}) == (16_384, 1_024)
    assert log_queue_sizes(SMALL_QUEUE) == (64, 16)
    # A queue set smaller than our batch takes the batch down with it, as the SDK requires.
    assert log_queue_sizes({"OTEL_BLRP_MAX_QUEUE_SIZE": "256"}) == (256, 256)
