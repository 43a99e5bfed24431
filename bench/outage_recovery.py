"""Recovery after a ClickHouse outage: acknowledged vs stored, and the time to drain the backlog.

Run: .venv/bin/python -m bench.outage_recovery [--outage-seconds 10] [--spans-per-s 5000]

An in-process collector on a fresh chdb with the spool on; the outage is the network path to
ClickHouse switched off at the writer (the store itself stays real). Load runs at a steady
rate before, during and after the outage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
from clickhouse_connect.driver.exceptions import OperationalError

from bench.collector_ingest import make_request
from flowscope.collector.convert import Columns
from flowscope.collector.service import Collector, CollectorConfig
from flowscope.collector.store import Dsn
from flowscope.collector.types import Signal
from flowscope.collector.writer import ClickHouseWriter


class SwitchableWriter(ClickHouseWriter):
    down = threading.Event()

    def insert(self, columns: Columns, dedup_token: str | None = None) -> None:
        if self.down.is_set():
            raise OperationalError("Connection refused (outage)")
        super().insert(columns, dedup_token)

    def insert_otlp(
        self, payloads: list[bytes], dedup_token: str | None = None, signal: Signal = Signal.TRACES
    ) -> None:
        if self.down.is_set():
            raise OperationalError("Connection refused (outage)")
        super().insert_otlp(payloads, dedup_token, signal)


async def main(outage_s: float, spans_per_s: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="outage-"))
    config = CollectorConfig(dsn=f"chdb://{tmp / 'ch'}", grpc_port=0, http_port=0, spool_dir=tmp / "spool")
    batch = 500
    acked = [0]
    stop = threading.Event()

    def load(port: int) -> None:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        export = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")
        next_send, i = time.monotonic(), 0
        while not stop.is_set():
            try:
                export(make_request(batch, i), timeout=10)
                acked[0] += batch
            except grpc.RpcError:
                pass
            i += 1
            next_send += batch / spans_per_s
            time.sleep(max(0.0, next_send - time.monotonic()))
        channel.close()

    def writer(dsn: Dsn, database: str) -> SwitchableWriter:
        return SwitchableWriter(dsn, database)

    collector = Collector(config, writer)
    async with collector.running():
        assert collector.pipeline is not None
        sender = threading.Thread(target=load, args=(collector.grpc_port,))
        sender.start()
        await asyncio.sleep(3)
        SwitchableWriter.down.set()
        await asyncio.sleep(outage_s)
        backlog_spans = acked[0]
        SwitchableWriter.down.clear()
        restored = time.perf_counter()
        stop.set()
        await asyncio.to_thread(sender.join)
        assert await asyncio.to_thread(collector.pipeline.flush, 600.0)
        recovery_s = time.perf_counter() - restored
        client = collector.client()
        stored, unique = client.query(
            f"SELECT count(), uniqExact(SpanId) FROM {collector.database}.otel_traces"
        ).result_rows[0]
        client.close()
    return {
        "spans_per_s": spans_per_s,
        "outage_seconds": outage_s,
        "spans_acknowledged": acked[0],
        "spans_acknowledged_before_restore": backlog_spans,
        "spans_in_clickhouse": stored,
        "distinct_span_ids": unique,
        "recovery_seconds_to_drain_backlog": round(recovery_s, 2),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outage-seconds", type=float, default=10)
    parser.add_argument("--spans-per-s", type=int, default=5000)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.outage_seconds, args.spans_per_s)), indent=2))
