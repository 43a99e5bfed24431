"""Checkpoint store: acknowledged puts/s, put latency p50/p99, and engine steps/s with puts.

Run: .venv/bin/python -m bench.checkpoint_store [--puts 20000] [--chdb-puts 3000] [--nodes 1000] [--repeat 5]
Each put is timed from the call to its acknowledgement (the commit that holds it is done), at
concurrency 1 (a chain: every put waits for its own commit) and 64 (group commit: one commit
for every put waiting). Backends: SQLite in WAL mode at synchronous=NORMAL (the default: commits
on the event loop), the same with `commit=thread` (the writer thread commits), FULL (an fsync per
commit, by the thread), and embedded ClickHouse (chdb, by the thread), each in a fresh temporary
directory. Outputs are distinct ~120-byte objects, so every put stores a new blob: the worst case.
`cpu_us_per_put` is process CPU (the writer thread included) per put: what a put costs one core.

"steps/s with checkpoint puts" runs the real engine with full telemetry (bench/engine_overhead.py's
SDK set-up) on wide and deep 1,000-node workflows whose nodes each await a put of their output
before returning — what a scheduler that checkpoints before dependents start pays — against the
same workflows without puts, rounds interleaved, best round of each; for commits on the loop
(the default) and by the thread.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.engine_overhead import sdk_telemetry
from flowscope.engine import Engine, NodeContext, Workflow, WorkflowBuilder
from flowscope.engine.checkpoint_commit import GroupCommitStore
from flowscope.engine.checkpoints import open_checkpoint_store

WF = {"workflow_id": "bench", "workflow_version": "1"}


def output(i: int) -> dict[str, Any]:
    return {"i": i, "status": "ok", "text": f"result of step {i:08d} " + "x" * 64, "score": i * 0.5}


async def put_latencies(store: GroupCommitStore, puts: int, concurrency: int, run: str) -> dict[str, Any]:
    latencies: list[float] = []

    async def worker(start: int) -> None:
        for i in range(start, puts, concurrency):
            began = time.perf_counter()
            await store.put(run, f"n{i}", output(i), attempt=1, **WF)
            latencies.append(time.perf_counter() - began)

    commits_before = store.commits
    started, started_cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    wall, cpu = time.perf_counter() - started, time.process_time() - started_cpu
    ordered = sorted(latencies)
    commits = store.commits - commits_before
    return {
        "puts": puts,
        "puts_per_s": round(puts / wall),
        "p50_us": round(statistics.median(ordered) * 1e6, 1),
        "p99_us": round(ordered[int(len(ordered) * 0.99) - 1] * 1e6, 1),
        "cpu_us_per_put": round(cpu / puts * 1e6, 1),
        "puts_per_commit": round(puts / max(commits, 1), 1),
    }


async def store_figures(url: str, puts: int, label: str) -> dict[str, Any]:
    store = open_checkpoint_store(url, database="bench_checkpoints")
    try:
        await put_latencies(store, min(puts, 500), 8, f"{label}-warm-up")
        return {f"concurrency_{c}": await put_latencies(store, puts, c, f"{label}-c{c}") for c in (1, 64)}
    finally:
        store.close()


def workflows(nodes: int, store: GroupCommitStore | None) -> dict[str, Workflow]:
    async def step(ctx: NodeContext) -> dict[str, Any]:
        out = {**output(ctx.attempt), "node": ctx.node.id, "execution": ctx.execution_id}  # a new blob each
        if store is not None:
            await store.put(ctx.execution_id, ctx.node.id, out, attempt=ctx.attempt, **WF)
        return out

    def build(shape: str) -> Workflow:
        builder = WorkflowBuilder(shape).code("n0", step)
        for i in range(1, nodes):
            builder.code(f"n{i}", step, depends_on=["n0" if shape == "wide" else f"n{i - 1}"])
        return builder.build()

    return {"wide": build("wide"), "deep": build("deep")}


async def engine_figures(url: str, nodes: int, repeat: int) -> dict[str, Any]:
    """Steps/s of the same workflows with and without a put per node, full telemetry."""
    telemetry, tracer_provider, logger_provider = sdk_telemetry()
    store = open_checkpoint_store(url, database="bench_checkpoints")
    plain, checkpointed = workflows(nodes, None), workflows(nodes, store)
    engine = Engine(telemetry, concurrency=nodes)
    out: dict[str, Any] = {}
    try:
        for shape in ("wide", "deep"):
            best = {"off": (float("inf"), float("inf")), "on": (float("inf"), float("inf"))}
            for round_ in range(repeat + 1):  # round 0 warms up and is dropped
                for label, flows in (("off", plain), ("on", checkpointed)):
                    wall, cpu = await _timed(engine, flows[shape])
                    if round_:
                        best[label] = (min(best[label][0], wall), min(best[label][1], cpu))
            out[shape] = {
                "steps_per_s_checkpoints_off": round(nodes / best["off"][0]),
                "steps_per_s_checkpoints_on": round(nodes / best["on"][0]),
                "steps_per_cpu_s_checkpoints_off": round(nodes / best["off"][1]),
                "steps_per_cpu_s_checkpoints_on": round(nodes / best["on"][1]),
                "checkpoint_cpu_us_per_step": round((best["on"][1] - best["off"][1]) / nodes * 1e6, 1),
            }
    finally:
        await engine.aclose()
        store.close()
        tracer_provider.shutdown()
        logger_provider.shutdown()
    return out


async def _timed(engine: Engine, workflow: Workflow) -> tuple[float, float]:
    started, started_cpu = time.perf_counter(), time.process_time()
    result = await engine.run(workflow)
    assert result.result.value == "success", result.error
    return time.perf_counter() - started, time.process_time() - started_cpu


async def main(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-checkpoints-") as tmp:
        root = Path(tmp)
        if args.puts:
            results["sqlite_normal"] = await store_figures(f"sqlite://{root}/normal.db", args.puts, "normal")
            results["sqlite_normal_thread"] = await store_figures(
                f"sqlite://{root}/thread.db?commit=thread", args.puts, "thread"
            )
            results["sqlite_full"] = await store_figures(f"sqlite://{root}/full.db?synchronous=full", args.puts, "full")
        if args.chdb_puts:
            results["chdb"] = await store_figures(f"chdb://{root}/chdb", args.chdb_puts, "chdb")
        if args.nodes:
            for label, query in (("", ""), ("_thread", "?commit=thread")):
                url = f"sqlite://{root}/engine{label}.db{query}"
                results[f"engine_sqlite_normal{label}"] = await engine_figures(url, args.nodes, args.repeat)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--puts", type=int, default=20_000, help="puts per SQLite measurement; 0 skips SQLite")
    parser.add_argument("--chdb-puts", type=int, default=3_000, help="puts per chdb measurement; 0 skips chdb")
    parser.add_argument("--nodes", type=int, default=1_000, help="nodes of the engine workflows; 0 skips them")
    parser.add_argument("--repeat", type=int, default=5)
    print(json.dumps(asyncio.run(main(parser.parse_args())), indent=2))
