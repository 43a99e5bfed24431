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
--checkpoints adds, in each round, the same telemetry with a checkpoint store (SQLite, the default
URL form, in a temporary directory): each node's output stored before its dependents start
(docs/durability.md). It reports steps/s and per CPU-second with checkpoints, the p99 of a
checkpoint write as the scheduler awaits it, and the time to resume a run of `--nodes` nodes
whose last node failed (the checkpoints read back, every other node reused).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import tempfile
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
from flowscope.engine.checkpoints import open_checkpoint_store


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


class TimedStore:
    """A checkpoint store whose puts are timed as the scheduler awaits them."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.put_s: list[float] = []

    async def put(self, *args: Any, **kwargs: Any) -> None:
        started = time.perf_counter()
        await self.store.put(*args, **kwargs)
        self.put_s.append(time.perf_counter() - started)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def p99_us(samples: list[float]) -> float:
    ordered = sorted(samples)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6, 1) if ordered else 0.0


async def resume_s(telemetry: Telemetry, url: str, nodes: int, repeat: int) -> float:
    """Best time to resume a chain of `nodes` whose last node failed: read its checkpoints in a
    fresh engine (as another process would) and run it to the end, every other node reused."""
    failing = {"on": True}

    async def last(ctx: NodeContext) -> int:
        if failing["on"]:
            raise RuntimeError("fails the first time")
        return 1

    builder = WorkflowBuilder("resumed").code("n0", step)
    for i in range(1, nodes - 1):
        builder.code(f"n{i}", step, depends_on=[f"n{i - 1}"])
    workflow = builder.code("last", last, depends_on=[f"n{nodes - 2}"]).build()
    best = float("inf")
    for _ in range(repeat):
        failing["on"] = True
        async with Engine(telemetry, checkpoints=url) as first:
            failed = await first.run(workflow)
        failing["on"] = False
        async with Engine(telemetry, checkpoints=url) as second:
            second.serve(workflow)
            started = time.perf_counter()
            previous = await second.retry_source.previous(failed.execution_id)  # type: ignore[misc]
            result = await second.resume(previous).result()
            best = min(best, time.perf_counter() - started)
        assert result.result.value == "success", result.error
    return best


async def main(nodes: int, repeat: int, checkpoints: bool = False) -> dict[str, Any]:
    """Each round runs telemetry off, telemetry on and a bare-SDK block back to back, and each
    figure is its best round: a shared machine's slow spells then hit all three alike, so the
    ratios compare like with like."""
    results: dict[str, Any] = {"nodes": nodes, "sdk_path": sdk_path()}
    telemetry, tracer_provider, logger_provider = sdk_telemetry()
    tracer = tracer_provider.get_tracer("bench")
    logger = logger_provider.get_logger("bench")
    bare = float("inf")
    scratch = tempfile.TemporaryDirectory(prefix="flowscope-bench-")
    url = f"sqlite:///{scratch.name}/checkpoints.db"
    for shape, build in (("wide", wide), ("deep", deep)):
        workflow = build(nodes)
        off_engine = Engine(Telemetry.disabled(), concurrency=nodes)
        on_engine = Engine(telemetry, concurrency=nodes)
        # The same telemetry without the event back-pressure checks, for what they cost.
        ungated = copy.copy(telemetry)
        ungated.backpressure = None
        ungated_engine = Engine(ungated, concurrency=nodes)
        engines: tuple[Engine, ...] = (off_engine, on_engine, ungated_engine)
        store = TimedStore(open_checkpoint_store(url)) if checkpoints else None
        checkpointed = Engine(telemetry, concurrency=nodes, checkpoints=store) if store is not None else None
        if checkpointed is not None:
            engines += (checkpointed,)
        for engine in engines:
            await engine.run(workflow)  # warm-up: imports, the HTTP client, first-run allocations
        off = on = on_cpu = no_gate = ckpt = ckpt_cpu = float("inf")
        if store is not None:
            store.put_s.clear()  # the warm-up's
        for _ in range(repeat):
            off = min(off, (await run_s(off_engine, workflow))[0])
            wall, cpu = await run_s(on_engine, workflow)
            on, on_cpu = min(on, wall), min(on_cpu, cpu)
            no_gate = min(no_gate, (await run_s(ungated_engine, workflow))[0])
            if checkpointed is not None:
                wall, cpu = await run_s(checkpointed, workflow)
                ckpt, ckpt_cpu = min(ckpt, wall), min(ckpt_cpu, cpu)
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
        if store is not None:
            store.close()
            results[shape] |= {
                "steps_per_s_checkpoints_on": round(nodes / ckpt),
                "steps_per_cpu_s_checkpoints_on": round(nodes / ckpt_cpu),
                "checkpoint_put_p50_us": round(sorted(store.put_s)[len(store.put_s) // 2] * 1e6, 1),
                "checkpoint_put_p99_us": p99_us(store.put_s),
            }
    if checkpoints:
        results["resume_s"] = {"nodes": nodes, "seconds": round(await resume_s(telemetry, url, nodes, repeat), 3)}
    scratch.cleanup()
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
    parser.add_argument("--checkpoints", action="store_true", help="also with a SQLite checkpoint store")
    args = parser.parse_args()
    if args.sdk_fallback:
        os.environ["FLOWSCOPE_SDK_FAST_PATH"] = "0"
    results = asyncio.run(main(args.nodes, args.repeat, args.checkpoints))
    if args.ablation:
        results["ablation"] = asyncio.run(ablation(args.nodes, max(args.repeat, 5)))
    print(json.dumps(results, indent=2))
