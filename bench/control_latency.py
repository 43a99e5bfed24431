"""Control latency: a command's acknowledgement, and the lifecycle event it causes, as a client sees them.

Run: .venv/bin/python bench/control_latency.py [--runs 100] [--rounds 5]

Three processes, as in production: the embedded stack (`flowscope up`), a `flowscope worker`
serving a workflow whose node holds, and this process, which starts --runs executions, then
pauses and resumes every one of them --rounds times over REST, one command at a time
(`sequential`) and all at once (`burst`). Per command:
- ack: from sending the request to its 200 — the engine applied it;
- event: from sending the request to the `workflow.paused` / `workflow.resumed` event reaching
  a WebSocket subscriber of the `all` room (engine → OTLP → collector → bridge → client).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import connect

from flowscope.engine import NodeContext, Workflow, WorkflowBuilder

ROOT = Path(__file__).parents[1]


async def hold(ctx: NodeContext) -> None:
    await asyncio.Event().wait()


def catalog() -> list[Workflow]:
    return [WorkflowBuilder("control-bench", "Control bench").code("hold", hold).build()]


def run_stack(data_dir: str, ready: Any, stop: Any, ports: Any) -> None:
    from flowscope.config import Settings
    from flowscope.stack import Stack

    async def main() -> None:
        settings = Settings(data_dir=Path(data_dir), otlp_grpc_port=0, otlp_http_port=0, http_port=0)
        async with Stack(settings).running() as stack:
            assert stack.endpoints is not None
            ports["http"], ports["grpc"] = stack.endpoints.http_port, stack.endpoints.otlp_grpc_port
            ready.set()
            await asyncio.to_thread(stop.wait)

    asyncio.run(main())


@contextlib.asynccontextmanager
async def worker(web: str, grpc_port: int) -> AsyncIterator[None]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWSCOPE_", "OTEL_"))}
    env.update(PYTHONPATH=str(ROOT), OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{grpc_port}")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "flowscope", "worker", "bench.control_latency:catalog", "--stack", web,
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield
    finally:
        process.terminate()
        await process.wait()


class Events:
    """Receive times of lifecycle events, by (execution, type), from one `all` subscription."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, str], list[float]] = {}
        self.arrived = asyncio.Event()

    async def follow(self, url: str, subscribed: asyncio.Event) -> None:
        async with connect(url, max_size=None) as ws:
            types = ["workflow.paused", "workflow.resumed"]
            await ws.send(json.dumps({"op": "subscribe", "id": "b", "rooms": ["all"], "types": types}))
            async for raw in ws:
                now = time.perf_counter()
                frame = json.loads(raw)
                if frame.get("type") == "subscribed":
                    subscribed.set()
                elif frame.get("type") in types:
                    self.seen.setdefault((frame["executionId"], frame["type"]), []).append(now)
                    self.arrived.set()

    async def wait(self, execution_id: str, kind: str, count: int, deadline_s: float = 30.0) -> float:
        end = time.monotonic() + deadline_s
        while len(self.seen.get((execution_id, kind), [])) < count:
            if time.monotonic() > end:
                raise TimeoutError(f"no {kind} #{count} for {execution_id}")
            self.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), 1.0)
        return self.seen[(execution_id, kind)][count - 1]


async def command(
    http: httpx.AsyncClient, events: Events, execution_id: str, op: str, count: int
) -> tuple[float, float]:
    kind = {"pause": "workflow.paused", "resume": "workflow.resumed"}[op]
    sent = time.perf_counter()
    answer = await http.post(f"/api/v1/executions/{execution_id}/{op}", json={})
    acked = time.perf_counter()
    answer.raise_for_status()
    seen = await events.wait(execution_id, kind, count)
    return (acked - sent) * 1000, (seen - sent) * 1000


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": round(statistics.median(ordered), 2),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 2),
        "max_ms": round(ordered[-1], 2),
    }


async def measure(web: str, runs: int, rounds: int) -> dict[str, Any]:
    events = Events()
    subscribed = asyncio.Event()
    follower = asyncio.create_task(events.follow(web.replace("http://", "ws://") + "/ws", subscribed))
    await asyncio.wait_for(subscribed.wait(), 30)
    async with httpx.AsyncClient(base_url=web, timeout=30) as http:
        deadline = time.monotonic() + 60
        while not (await http.get("/api/v1/engines")).json()["items"]:
            if time.monotonic() > deadline:
                raise TimeoutError("the worker did not connect")
            await asyncio.sleep(0.1)
        executions = []
        for _ in range(runs):
            started = await http.post("/api/v1/executions", json={"workflowId": "control-bench", "input": {}})
            started.raise_for_status()
            executions.append(started.json()["executionId"])
        # Every run must be running (its node holding) before it is paused.
        await asyncio.sleep(1.0)
        results: dict[str, dict[str, list[float]]] = {
            mode: {"ack": [], "event": []} for mode in ("sequential", "burst")
        }
        count = 0
        for _ in range(rounds):
            for mode in ("sequential", "burst"):
                count += 1
                for op in ("pause", "resume"):
                    if mode == "sequential":
                        measured = [await command(http, events, e, op, count) for e in executions]
                    else:
                        measured = await asyncio.gather(*(command(http, events, e, op, count) for e in executions))
                    results[mode]["ack"] += [m[0] for m in measured]
                    results[mode]["event"] += [m[1] for m in measured]
        for execution_id in executions:
            await http.post(f"/api/v1/executions/{execution_id}/cancel", json={})
    follower.cancel()
    await asyncio.gather(follower, return_exceptions=True)
    return {
        mode: {"commands": len(values["ack"]), "ack": summary(values["ack"]), "event": summary(values["event"])}
        for mode, values in results.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as data, ctx.Manager() as manager:
        ports, ready, stop = manager.dict(), ctx.Event(), ctx.Event()
        stack = ctx.Process(target=run_stack, args=(data, ready, stop, ports))
        stack.start()
        try:
            if not ready.wait(120):
                raise SystemExit("the stack did not start")
            web = f"http://127.0.0.1:{ports['http']}"

            async def go() -> dict[str, Any]:
                async with worker(web, ports["grpc"]):
                    return await measure(web, args.runs, args.rounds)

            figures = asyncio.run(go())
        finally:
            stop.set()
            stack.join(60)
    print(json.dumps({"runs": args.runs, "rounds": args.rounds, **figures}, indent=2))


if __name__ == "__main__":
    main()
