"""Engine overhead: node steps/s for wide and deep workflows, telemetry off vs on.

Run: .venv/bin/python bench/engine_overhead.py [--nodes 1000] [--repeat 3] [--ablation] [--sdk-fallback]
Full telemetry goes through the real SDK (batch processors) into exporters
that discard, so the figure is the engine's and the SDK's cost, not a network's. Events go
through the processor `setup()` builds (its queue bound, and the back-pressure checks the
engine makes before each run and node attempt); each round also runs the same telemetry with
those checks switched off, so `backpressure_checks_cost_ratio` (wall time with ÷ without)
is measured within the run.
--ablation adds CPU µs per step with each SDK part (spans, events, metrics) switched on
alone over no-op providers: where the telemetry cost goes.
--sdk-fallback measures the public SDK path the engine falls back to on an SDK it has not been
verified against (as FLOWSCOPE_SDK_FAST_PATH=0 does; engine/sdk_compat.py); `sdk_path` says
which path was measured.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import time
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry._logs import NoOpLoggerProvider
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk._logs import LoggerProvider, ReadableLogRecord
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, LogRecordExporter, LogRecordExportResult
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import NoOpTracerProvider

from flowscope.engine import Engine, NodeContext, Telemetry, Workflow, WorkflowBuilder


class NullSpanExporter(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


class NullLogExporter(LogRecordExporter):
    def export(self, batch: Sequence[ReadableLogRecord]) -> LogRecordExportResult:
        return LogRecordExportResult.SUCCESS

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


async def step(ctx: NodeContext) -> int:
    return 1


def wide(n: int) -> Workflow:
    builder = WorkflowBuilder("wide").code("root", step)
    for i in range(n - 2):
        builder.code(f"n{i}", step, depends_on=["root"])
    builder.code("sink", step, depends_on=[f"n{i}" for i in range(n - 2)])
    return builder.build()


def deep(n: int) -> Workflow:
    builder = WorkflowBuilder("deep").code("n0", step)
    for i in range(1, n):
        builder.code(f"n{i}", step, depends_on=[f"n{i - 1}"])
    return builder.build()


def sdk_telemetry() -> tuple[Telemetry, TracerProvider, LoggerProvider]:
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(NullSpanExporter(), max_queue_size=1 << 20))
    logger_provider = LoggerProvider()
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    try:  # the events' processor as setup() builds it: its queue bound and the back-pressure it drives
        from flowscope.engine.telemetry import event_processor
    except ImportError:  # an engine from before the back-pressure, for a before/after comparison
        logger_provider.add_log_record_processor(BatchLogRecordProcessor(NullLogExporter(), max_queue_size=1 << 20))
    else:
        logger_provider.add_log_record_processor(event_processor(NullLogExporter(), 20, {}, meter_provider))
    return Telemetry(tracer_provider, logger_provider, meter_provider), tracer_provider, logger_provider


async def run_s(engine: Engine, workflow: Workflow) -> tuple[float, float]:
    """Wall-clock and process-CPU seconds (the SDK's worker threads included) of one run."""
    started, started_cpu = time.perf_counter(), time.process_time()
    result = await engine.run(workflow)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - started_cpu
    assert result.result.value == "success", result.error
    return elapsed, cpu


def _bare_block(tracer: trace.Tracer, logger: Any, count: int) -> float:
    """One SDK span plus one SDK log record (an event) per step, the floor any instrumentation pays."""
    started = time.perf_counter()
    for i in range(count):
        span = tracer.start_span("step", attributes={"workflow.node.id": "n", "workflow.node.attempt": 1})
        logger.emit(
            event_name="node.completed",
            attributes={"workflow.execution.id": "e", "workflow.event.seq": i},
            body="{}",
            context=trace.set_span_in_context(span),
        )
        span.end()
    return (time.perf_counter() - started) / count


async def cpu_us_per_step(telemetry: Telemetry, workflow: Workflow, repeat: int) -> float:
    """Best of `repeat` runs, in process CPU time (the SDK's worker threads included)."""
    engine = Engine(telemetry, concurrency=len(workflow.nodes))
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        await engine.run(workflow)
        best = min(best, (time.process_time() - started) / len(workflow.nodes))
    await engine.aclose()
    return round(best * 1e6, 1)


async def ablation(nodes: int, repeat: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    parts = {"none": (0, 0, 0), "spans": (1, 0, 0), "spans+events": (1, 1, 0), "spans+metrics": (1, 0, 1),
             "spans+events+metrics": (1, 1, 1)}  # fmt: skip
    for shape, build in (("wide", wide), ("deep", deep)):
        workflow = build(nodes)
        for label, (spans, events, metrics) in parts.items():
            _, tracer_provider, logger_provider = sdk_telemetry()
            telemetry = Telemetry(
                tracer_provider if spans else NoOpTracerProvider(),
                logger_provider if events else NoOpLoggerProvider(),
                MeterProvider(metric_readers=[InMemoryMetricReader()]) if metrics else NoOpMeterProvider(),
            )
            out[f"{shape} {label} cpu_us_per_step"] = await cpu_us_per_step(telemetry, workflow, repeat)
            tracer_provider.shutdown()
            logger_provider.shutdown()
    return out


def sdk_path() -> str:
    try:
        from flowscope.engine import sdk_compat
    except ImportError:  # an engine from before the check: always the fast paths
        return "fast"
    return "fast" if sdk_compat.fast_path() else f"fallback ({sdk_compat.decision().reason})"


async def main(nodes: int, repeat: int) -> dict[str, Any]:
    """Each round runs telemetry off, telemetry on and a bare-SDK block back to back, and each
    figure is its best round: a shared machine's slow spells then hit all three alike, so the
    ratios compare like with like."""
    results: dict[str, Any] = {"nodes": nodes, "sdk_path": sdk_path()}
    telemetry, tracer_provider, logger_provider = sdk_telemetry()
    tracer = tracer_provider.get_tracer("bench")
    logger = logger_provider.get_logger("bench")
    bare = float("inf")
    for shape, build in (("wide", wide), ("deep", deep)):
        workflow = build(nodes)
        off_engine = Engine(Telemetry.disabled(), concurrency=nodes)
        on_engine = Engine(telemetry, concurrency=nodes)
        # The same telemetry without the event back-pressure checks, for what they cost.
        ungated = copy.copy(telemetry)
        ungated.backpressure = None
        ungated_engine = Engine(ungated, concurrency=nodes)
        engines = (off_engine, on_engine, ungated_engine)
        for engine in engines:
            await engine.run(workflow)  # warm-up: imports, the HTTP client, first-run allocations
        off = on = on_cpu = no_gate = float("inf")
        for _ in range(repeat):
            off = min(off, (await run_s(off_engine, workflow))[0])
            wall, cpu = await run_s(on_engine, workflow)
            on, on_cpu = min(on, wall), min(on_cpu, cpu)
            no_gate = min(no_gate, (await run_s(ungated_engine, workflow))[0])
            bare = min(bare, _bare_block(tracer, logger, nodes))
        for engine in engines:
            await engine.aclose()
        results[shape] = {
            "steps_per_s_telemetry_off": round(nodes / off),
            "steps_per_s_telemetry_on": round(nodes / on),
            # Process CPU per step, the SDK's worker threads included: the rate on one core.
            "steps_per_cpu_s_telemetry_on": round(nodes / on_cpu),
            "telemetry_cost_us_per_step": round((on - off) / nodes * 1e6, 1),
            "steps_per_s_telemetry_on_without_backpressure": round(nodes / no_gate),
            "backpressure_checks_cost_ratio": round(on / no_gate, 3),
        }
    check = getattr(telemetry, "events_backlogged", None)
    if check is not None:  # the check each run and node attempt makes, alone
        started = time.perf_counter()
        for _ in range(100_000):
            check()
        results["backpressure_check_us"] = round((time.perf_counter() - started) / 100_000 * 1e6, 3)
    tracer_provider.shutdown()
    logger_provider.shutdown()
    results["bare_sdk_span_plus_event_us"] = round(bare * 1e6, 1)
    for shape in ("wide", "deep"):
        cost = results[shape]["telemetry_cost_us_per_step"] / 1e6
        results[shape]["telemetry_cost_vs_bare_sdk"] = round(cost / bare, 2)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--ablation", action="store_true")
    parser.add_argument("--sdk-fallback", action="store_true", help="the public SDK path (FLOWSCOPE_SDK_FAST_PATH=0)")
    args = parser.parse_args()
    if args.sdk_fallback:
        os.environ["FLOWSCOPE_SDK_FAST_PATH"] = "0"
    results = asyncio.run(main(args.nodes, args.repeat))
    if args.ablation:
        results["ablation"] = asyncio.run(ablation(args.nodes, max(args.repeat, 5)))
    print(json.dumps(results, indent=2))
