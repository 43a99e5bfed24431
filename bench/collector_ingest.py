"""Collector ingest: spans/s through OTLP/gRPC into chdb, against raw inserts of the same rows.

Run: .venv/bin/python bench/collector_ingest.py [--spans 200000] [--batch 1000] [--senders 4]
     [--overload-seconds 120]

The collector runs in its own process (as `flowscope up` would); load comes from this
process over real gRPC. "Raw" converts the same requests once and inserts the rows straight
into a fresh chdb database with the same client code, so the ratio is the pipeline's cost.
With --overload-seconds, senders push as fast as they can for that long while the
collector's peak RSS (VmHWM) is sampled; refusals (UNAVAILABLE) are counted, not errors.
"Storing nothing" runs the same collector with the trace intake's view dropped: ClickHouse
still parses every request into the intake's Null table, and nothing is stored — the
collector's own CPU per span, the basis of the contrib exporter's per-core figure (which
excludes the ClickHouse server).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import tempfile
import threading
import time
import urllib.request
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span


def make_request(size: int, seed: int) -> bytes:
    def kv(key: str, value: str) -> KeyValue:
        return KeyValue(key=key, value=AnyValue(string_value=value))

    spans = []
    for i in range(size):
        rnd = os.urandom(24)
        spans.append(
            Span(
                trace_id=rnd[:16], span_id=rnd[16:], parent_span_id=os.urandom(8), name=f"code step-{i % 50}",
                kind=Span.SPAN_KIND_INTERNAL,
                start_time_unix_nano=time.time_ns(), end_time_unix_nano=time.time_ns() + 1_000_000,
                attributes=[
                    kv("workflow.execution.id", f"exec-{seed}-{i // 20}"), kv("workflow.node.id", f"n{i % 20}"),
                    kv("workflow.node.type", "code"), kv("workflow.node.label", f"step {i % 20}"),
                    KeyValue(key="workflow.node.attempt", value=AnyValue(int_value=1)),
                    kv("workflow.node.result", "success"),
                ],
            )
        )  # fmt: skip
    request = ExportTraceServiceRequest(
        resource_spans=[
            ResourceSpans(
                resource=Resource(attributes=[kv("service.name", "bench")]),
                scope_spans=[ScopeSpans(spans=spans)],
            )
        ]
    )
    return bytes(request.SerializeToString())


def run_collector(
    data_dir: str, ready: Any, stop: Any, ports: Any, spool: bool = False, store: bool = True, batch_rows: int = 0
) -> None:
    import asyncio
    from pathlib import Path

    from flowscope.collector.schema import SchemaOptions
    from flowscope.collector.service import Collector, CollectorConfig
    from flowscope.collector.store import Dsn, connect, migrate

    dsn = f"chdb://{data_dir}/ch"
    if not store:
        client = connect(Dsn.parse(dsn))
        migrate(client, SchemaOptions())
        client.command(f"DROP VIEW {SchemaOptions().database}.otlp_traces_intake_mv")
        client.close()

    async def main() -> None:
        spool_dir = Path(data_dir) / "spool" if spool else None
        config = CollectorConfig(
            dsn=dsn, grpc_port=0, http_port=0, spool_dir=spool_dir, max_batch_rows=batch_rows or None
        )
        collector = Collector(config)
        async with collector.running():
            ports["grpc"], ports["http"] = collector.grpc_port, collector.http_port
            ready.set()
            # The stop flag is a multiprocessing Event: wait for it off the event loop.
            await asyncio.to_thread(stop.wait)

    asyncio.run(main())


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    return sum(float(m) for m in re.findall(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M))


def send(port: int, payloads: list[bytes], deadline: float | None, counts: dict[str, int]) -> None:
    """Send each payload once; with a deadline, keep sending fresh requests until it passes
    (the collector acknowledges byte-identical retries without storing them again)."""
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)])
    export = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")
    i = 0
    while (deadline is None and i < len(payloads)) or (deadline is not None and time.monotonic() < deadline):
        try:
            payload = payloads[i] if deadline is None else make_request(1000, i)
            export(payload, timeout=30)
            counts["ok"] += 1
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
                counts["refused"] += 1
                time.sleep(0.05)
                continue
            raise
        i += 1
    channel.close()


def vm_hwm_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def raw_insert_rate(payloads: list[bytes], data_dir: str) -> float:
    from flowscope.collector.convert import convert_traces
    from flowscope.collector.schema import SchemaOptions
    from flowscope.collector.store import Dsn, connect, migrate

    client = connect(Dsn.parse(f"chdb://{data_dir}"))
    migrate(client, SchemaOptions(database="raw"))
    converted = [convert_traces(ExportTraceServiceRequest.FromString(p)).tables[0] for p in payloads]
    merged = converted[0]
    for more in converted[1:]:
        merged.extend(more)
    started = time.perf_counter()
    for chunk in merged.split(20_000):
        client.insert("raw.otel_traces", chunk.data, column_names=list(chunk.names), column_oriented=True)
    elapsed = time.perf_counter() - started
    client.close()
    return merged.rows / elapsed


def start_collector(spool: bool, store: bool = True, batch_rows: int = 0) -> tuple[Any, Any, Any, str]:
    """A collector process on a fresh data directory: (process, ports, stop event, data dir)."""
    data_dir = tempfile.mkdtemp(prefix="flowscope-bench-")
    ctx = mp.get_context("spawn")
    ports = ctx.Manager().dict()
    ready, stop = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=run_collector, args=(data_dir, ready, stop, ports, spool, store, batch_rows))
    proc.start()
    assert ready.wait(60), "collector did not start"
    return proc, ports, stop, data_dir


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads, the embedded engine's included)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def push_all(ports: Any, payloads: list[bytes], batch: int, senders: int, pid: int = 0) -> tuple[float, float]:
    """Send every payload once over `senders` threads: (spans/s until all are written,
    spans per second of the collector's CPU time — its rate on one core)."""
    counts = {"ok": 0, "refused": 0}
    cpu_before = cpu_seconds(pid) if pid else 0.0
    started = time.perf_counter()
    threads = [
        threading.Thread(target=send, args=(ports["grpc"], payloads[i::senders], None, counts)) for i in range(senders)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    while metric(ports["http"], "flowscope_collector_written_rows_total") < len(payloads) * batch:
        time.sleep(0.05)
    spans = len(payloads) * batch
    cpu = cpu_seconds(pid) - cpu_before if pid else 0.0
    return spans / (time.perf_counter() - started), spans / cpu if cpu else 0.0


def main(spans: int, batch: int, senders: int, overload_s: float, batch_rows: int = 0) -> dict[str, Any]:
    payloads = [make_request(batch, seed) for seed in range(max(1, spans // batch))]
    proc, ports, stop, _ = start_collector(spool=False, batch_rows=batch_rows)
    no_spool, no_spool_cpu = push_all(ports, payloads, batch, senders, proc.pid or 0)
    stop.set()
    proc.join(60)
    proc, ports, stop, _ = start_collector(spool=False, store=False, batch_rows=batch_rows)
    nothing, nothing_cpu = push_all(ports, payloads, batch, senders, proc.pid or 0)
    stop.set()
    proc.join(60)
    proc, ports, stop, data_dir = start_collector(spool=True, batch_rows=batch_rows)
    grpc_port, http_port = ports["grpc"], ports["http"]
    rate, rate_cpu = push_all(ports, payloads, batch, senders, proc.pid or 0)
    total = len(payloads) * batch
    results: dict[str, Any] = {
        "spans": total,
        "batch": batch,
        "senders": senders,
        "max_batch_rows": batch_rows or "default",
        "pipeline_spans_per_s": round(rate),
        "pipeline_spans_per_s_without_spool": round(no_spool),
        "spool_on_vs_off": round(rate / no_spool, 3),
        "pipeline_spans_per_cpu_s": round(rate_cpu),
        "pipeline_spans_per_cpu_s_without_spool": round(no_spool_cpu),
        # The collector's own cost: ClickHouse parses each request and stores nothing.
        "storing_nothing_spans_per_s": round(nothing),
        "storing_nothing_spans_per_cpu_s": round(nothing_cpu),
        "collector_peak_rss_mb_sustained": round(vm_hwm_mb(proc.pid or 0), 1),
    }
    if overload_s > 0:
        counts = {"ok": 0, "refused": 0}
        deadline = time.monotonic() + overload_s
        peak = 0.0
        threads = [
            threading.Thread(target=send, args=(grpc_port, payloads, deadline, counts)) for _ in range(senders * 2)
        ]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            peak = max(peak, vm_hwm_mb(proc.pid or 0))
            time.sleep(0.5)
        results["overload_seconds"] = overload_s
        results["overload_requests_accepted"] = counts["ok"]
        results["overload_requests_refused_with_retry_hint"] = counts["refused"]
        results["collector_peak_rss_mb_overload"] = round(peak, 1)
        results["dropped_rows"] = metric(http_port, "flowscope_collector_dropped_rows_total")
    stop.set()
    proc.join(60)
    raw = raw_insert_rate(payloads, f"{data_dir}/ch")
    results["raw_insert_spans_per_s"] = round(raw)
    results["pipeline_vs_raw"] = round(results["pipeline_spans_per_s"] / raw, 3)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spans", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--overload-seconds", type=float, default=0.0)
    parser.add_argument(
        "--max-batch-rows", type=int, default=0, help="the collector's rows per insert (0: its default)"
    )
    args = parser.parse_args()
    print(json.dumps(main(args.spans, args.batch, args.senders, args.overload_seconds, args.max_batch_rows), indent=2))
