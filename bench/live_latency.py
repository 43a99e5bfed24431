"""Live latency: from the engine emitting an event to a WebSocket subscriber receiving it.

Run: .venv/bin/python bench/live_latency.py [--subscribers 1,100,1000] [--rate 2000] [--seconds 10]

Three processes, as in production: the embedded stack (`flowscope up`), an engine exporting
OTLP/gRPC at --rate events/s (with flowscope.runtime.server_runtime, as `flowscope samples` runs),
and this process holding the subscribers. Latency =
receive time − the event's `ts` (set by the engine when it emitted the event; one machine,
one clock). The budget includes the SDK's export batch delay (--batch-delay-ms; default:
what `flowscope.engine.telemetry.setup()` picks).

--room says what each subscriber watches:
- `all`: the firehose; every subscriber receives every event (deliveries = subscribers × rate).
- `workflow`: the engine runs one workflow per subscriber, round-robin, and subscriber k
  watches `workflow:latency-k` — a thousand people each following their own runs
  (deliveries = rate).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import multiprocessing as mp
import os
import resource
import statistics
import tempfile
import time
from typing import Any

from websockets.asyncio.client import connect


def run_stack(data_dir: str, ready: Any, stop: Any, ports: Any) -> None:
    from flowscope.config import Settings
    from flowscope.stack import Stack

    async def main() -> None:
        settings = Settings(data_dir=__import__("pathlib").Path(data_dir), otlp_grpc_port=0, otlp_http_port=0,
                            http_port=0, ws_queue_size=20_000)  # fmt: skip
        async with Stack(settings).running() as stack:
            assert stack.endpoints is not None
            ports["http"], ports["grpc"] = stack.endpoints.http_port, stack.endpoints.otlp_grpc_port
            ready.set()
            # The stop flag is a multiprocessing Event: wait for it off the event loop.
            await asyncio.to_thread(stop.wait)

    asyncio.run(main())


def run_engine(
    grpc_port: int,
    rate: float,
    seconds: float,
    batch_delay_ms: int | None,
    workflows: int,
    emitted: Any,
    cpu: Any,
) -> None:
    from flowscope.engine import Engine, NodeContext, WorkflowBuilder
    from flowscope.engine.telemetry import setup, shutdown
    from flowscope.runtime import server_runtime

    async def step(ctx: NodeContext) -> int:
        return 1

    async def main() -> None:
        engine = Engine(setup(endpoint=f"http://127.0.0.1:{grpc_port}", schedule_delay_millis=batch_delay_ms))
        flows = []
        for k in range(workflows):
            builder = WorkflowBuilder(f"latency-{k}", "Latency").code("n0", step)
            for i in range(1, 5):
                builder.code(f"n{i}", step, depends_on=[f"n{i - 1}"])
            flows.append(builder.build())
        # workflow.started, 5 x (node.started + node.completed), 2 coalesced progress, completed
        per_run = 14
        interval = per_run / rate
        started = time.monotonic()
        deadline = started + seconds
        tasks: set[asyncio.Future[Any]] = set()
        total = 0

        def finished(task: asyncio.Future[Any]) -> None:
            nonlocal total
            tasks.discard(task)
            total += task.result().events_emitted

        count = 0
        # As flowscope's own long-running engine processes do (`flowscope samples`).
        async with server_runtime():
            while time.monotonic() < deadline:
                task = asyncio.ensure_future(engine.run(flows[count % workflows]))
                tasks.add(task)
                task.add_done_callback(finished)
                count += 1
                # Paced on the clock, not by fixed sleeps: the rate holds whatever a launch costs.
                await asyncio.sleep(max(0.0, started + count * interval - time.monotonic()))
            await asyncio.gather(*tasks)
        emitted.value = total
        await engine.aclose()
        shutdown()

    asyncio.run(main())
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu.value = usage.ru_utime + usage.ru_stime


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def connect_all(url: str, n: int, room: str) -> list[Any]:
    sockets = [await connect(url, max_size=None, open_timeout=30) for _ in range(n)]
    for k, ws in enumerate(sockets):
        rooms = ["all"] if room == "all" else [f"workflow:latency-{k}"]
        await ws.send(json.dumps({"op": "subscribe", "id": "b", "rooms": rooms}))
        assert json.loads(await ws.recv())["type"] == "subscribed"
    return sockets


async def read(ws: Any, latencies: list[float]) -> None:
    async for raw in ws:
        now = time.time()
        message = json.loads(raw)
        ts = message.get("ts")
        if "seq" in message and ts and not message.get("derived"):
            sent = dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
            latencies.append((now - sent) * 1000)


def measure(subscribers: int, room: str, rate: float, seconds: float, batch_delay_ms: int | None) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    ports = manager.dict()
    emitted = manager.Value("i", 0)
    engine_cpu = manager.Value("d", 0.0)
    ready, stop = ctx.Event(), ctx.Event()
    stack = ctx.Process(target=run_stack, args=(tempfile.mkdtemp(prefix="flowscope-live-"), ready, stop, ports))
    stack.start()
    assert ready.wait(60)
    url = f"ws://127.0.0.1:{ports['http']}/ws"
    workflows = 1 if room == "all" else subscribers
    engine = ctx.Process(
        target=run_engine, args=(ports["grpc"], rate, seconds, batch_delay_ms, workflows, emitted, engine_cpu)
    )
    latencies: list[float] = []
    elapsed = 0.0
    stack_cpu, own_cpu = [0.0, 0.0], [0.0, 0.0]

    async def go() -> None:
        nonlocal elapsed
        # Every subscriber is in its room before the first event is emitted.
        sockets = await connect_all(url, subscribers, room)
        readers = [asyncio.create_task(read(ws, latencies)) for ws in sockets]
        started = time.perf_counter()
        stack_cpu[0], own_cpu[0] = cpu_seconds(stack.pid or 0), own_cpu_seconds()
        engine.start()
        await asyncio.to_thread(engine.join, seconds + 60)
        elapsed = time.perf_counter() - started
        stack_cpu[1], own_cpu[1] = cpu_seconds(stack.pid or 0), own_cpu_seconds()
        await asyncio.sleep(2.0)  # what is still in flight
        for ws in sockets:
            await ws.close()
        await asyncio.gather(*readers, return_exceptions=True)

    asyncio.run(go())
    received = len(latencies)
    stop.set()
    stack.join(60)
    latencies.sort()
    pick = (lambda q: round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1)) if latencies else None
    return {
        "subscribers": subscribers,
        "room": room,
        "target_events_per_s": rate,
        "events_emitted": emitted.value,
        "deliveries": received,
        "deliveries_per_s": round(received / elapsed),
        "p50_ms": pick(0.5) if pick else None,
        "p99_ms": pick(0.99) if pick else None,
        "max_ms": round(latencies[-1], 1) if latencies else None,
        "mean_ms": round(statistics.fmean(latencies), 1) if latencies else None,
        # Share of one core each process used while the engine ran: 2 cores in all here.
        "cpu_cores_stack": round((stack_cpu[1] - stack_cpu[0]) / elapsed, 2),
        "cpu_cores_engine": round(engine_cpu.value / elapsed, 2),
        "cpu_cores_subscribers": round((own_cpu[1] - own_cpu[0]) / elapsed, 2),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subscribers", default="1,100")
    parser.add_argument("--rate", type=float, default=2000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--room", choices=["all", "workflow"], default="all")
    parser.add_argument("--batch-delay-ms", type=int, default=None)
    args = parser.parse_args()
    results = [
        measure(int(n), args.room, args.rate, args.seconds, args.batch_delay_ms) for n in args.subscribers.split(",")
    ]
    print(json.dumps(results, indent=2))
