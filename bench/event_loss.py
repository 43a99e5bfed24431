"""Event loss: lifecycle events the engine emitted against those a real OTLP/gRPC receiver got.

Run: .venv/bin/python bench/event_loss.py [--runs 20000] [--concurrency 1000] [--nodes 10] [--busy 2]
     [--receiver collector|counting]

Two processes, as in production: this one runs the engine alone, wired by
`flowscope.engine.telemetry.setup()` (the OTEL_BLRP_* variables apply), and a receiver process takes
the events over a real socket: the whole collector into ClickHouse (chdb), counting what it
accepts, or (`counting`) its gRPC receiver alone with a consumer that only counts.

`--runs` runs of a chain of `--nodes` nodes, `--concurrency` of them in flight at once;
`--busy K` keeps K `yes > /dev/null` processes spinning while the engine runs (stopped
after). Prints `N lost of M` per event name and in total, and how many executions' `seq` has a gap.
Every run's events are numbered 1..events_emitted, so what arrived is checked per execution.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing as mp
import subprocess
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

_PER_RUN = ("workflow.started", "workflow.completed")
_PER_NODE = ("node.started", "node.completed")


class Counter:
    """Counts log records by event name and keeps each execution's seq numbers."""

    def __init__(self) -> None:
        self.by_name: collections.Counter[str] = collections.Counter()
        self.seqs: dict[str, list[int]] = collections.defaultdict(list)

    def count(self, request: Any) -> int:
        count = 0
        for resource_logs in request.resource_logs:
            for scope_logs in resource_logs.scope_logs:
                for record in scope_logs.log_records:
                    count += 1
                    self.by_name[record.event_name] += 1
                    attrs = {a.key: a.value for a in record.attributes}
                    if "workflow.execution.id" in attrs:
                        execution = attrs["workflow.execution.id"].string_value
                        self.seqs[execution].append(attrs["workflow.event.seq"].int_value)
        return count

    def report(self) -> dict[str, Any]:
        gapped = sum(1 for s in self.seqs.values() if sorted(s) != list(range(1, len(s) + 1)))
        per_execution = {e: len(s) for e, s in self.seqs.items()}
        return {"by_name": dict(self.by_name), "per_execution": per_execution, "gapped": gapped}


def receive(conn: Connection, kind: str) -> None:
    """The receiver process, until asked to report: `collector` is the whole collector (OTLP/gRPC
    receiver, admission, queue and batcher, ClickHouse in chdb), counting what it accepts;
    `counting` is its gRPC receiver alone with a consumer that only counts."""
    import tempfile

    from flowscope.collector.convert import Converted
    from flowscope.collector.receiver import GrpcReceiver
    from flowscope.collector.service import Collector, CollectorConfig
    from flowscope.collector.types import Signal

    counter = Counter()
    lock = threading.Lock()

    def count(signal: Signal, request: Any) -> None:
        if signal is Signal.LOGS:
            with lock:
                counter.count(request)

    def consume(signal: Signal, request: Any, raw: bytes | None = None) -> Converted:
        count(signal, request)
        return Converted(tables=[], accepted=1, rejected=0, reasons=[])

    with tempfile.TemporaryDirectory() as data:
        stop: Callable[[], object]
        if kind == "collector":
            collector = Collector(CollectorConfig(dsn=f"chdb://{data}/chdb", grpc_port=0, http_port=0))
            collector.start()
            collector.subscribe(count)
            port, stop = collector.grpc_port, collector.close
        else:
            receiver = GrpcReceiver(consume, port=0, max_workers=4)
            receiver.start()
            port, stop = receiver.port, receiver.stop
        conn.send(port)
        conn.recv()  # the engine has flushed
        with lock:
            conn.send(counter.report())
        stop()


async def drive(port: int, runs: int, concurrency: int, nodes: int) -> tuple[dict[str, int], dict[str, int], float]:
    """Runs the workflows; (events emitted per name, per execution, engine seconds)."""
    from flowscope.engine import Engine, NodeContext, WorkflowBuilder
    from flowscope.engine.telemetry import setup, shutdown

    async def step(ctx: NodeContext) -> int:
        return 1

    builder = WorkflowBuilder("event-loss").code("n0", step)
    for i in range(1, nodes):
        builder.code(f"n{i}", step, depends_on=[f"n{i - 1}"])
    workflow = builder.build()
    engine = Engine(setup(endpoint=f"http://127.0.0.1:{port}", service_name="event-loss"))
    emitted: dict[str, int] = {}
    remaining = iter(range(runs))

    async def worker() -> None:
        for _ in remaining:
            result = await engine.run(workflow)
            assert result.result.value == "success", result.error
            emitted[result.execution_id] = result.events_emitted

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    await engine.aclose()
    shutdown()  # flushes what is queued
    # A chain that succeeds: each run has these exactly; the rest of its seq is progress events.
    expected = {name: runs for name in _PER_RUN} | {name: runs * nodes for name in _PER_NODE}
    fixed = sum(expected.values())
    expected["execution.progress"] = sum(emitted.values()) - fixed
    return expected, emitted, elapsed


def spin(count: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(count)]


def main(runs: int, concurrency: int, nodes: int, busy: int, kind: str) -> dict[str, Any]:
    import flowscope.engine as engine

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    receiver = ctx.Process(target=receive, args=(child, kind), daemon=True)
    receiver.start()
    port = parent.recv()
    spinners = spin(busy)
    try:
        expected, emitted, elapsed = asyncio.run(drive(port, runs, concurrency, nodes))
    finally:
        for proc in spinners:
            proc.kill()
            proc.wait()
    parent.send("report")
    report = parent.recv()
    receiver.join(10)
    received = report["by_name"]
    lines = {name: f"{count - received.get(name, 0)} lost of {count}" for name, count in sorted(expected.items())}
    total = sum(expected.values())
    lines["total"] = f"{total - sum(received.get(n, 0) for n in expected)} lost of {total}"
    per_execution = report["per_execution"]
    short = sum(1 for e, n in emitted.items() if per_execution.get(e, 0) != n)
    return {
        "engine": engine.__file__,
        "runs": runs,
        "concurrency": concurrency,
        "nodes": nodes,
        "busy_processes": busy,
        "receiver": kind,
        "engine_s": round(elapsed, 1),
        "runs_per_s": round(runs / elapsed),
        "lost": lines,
        "executions_missing_events": short,
        "executions_with_seq_gap": report["gapped"],
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=1_000)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--busy", type=int, default=0, help="`yes` processes spinning during the run")
    parser.add_argument("--receiver", choices=("collector", "counting"), default="collector")
    args = parser.parse_args()
    print(json.dumps(main(args.runs, args.concurrency, args.nodes, args.busy, args.receiver), indent=2))
