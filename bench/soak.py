"""Soak: a steady OTLP load for minutes, sampling the collector's RSS and queue depth.

Run: .venv/bin/python -m bench.soak [--minutes 5] [--spans-per-s 10000] [--spool]
Prints one CSV line per second: elapsed_s, rss_mb, queue_rows, written_rows, refused.
Not part of CI.
"""

from __future__ import annotations

import argparse
import threading
import time

import grpc

from bench.collector_ingest import make_request, metric, start_collector


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main(minutes: float, spans_per_s: int, spool: bool) -> None:
    batch = 500
    proc, ports, stop, _ = start_collector(spool)
    done = threading.Event()
    refused = [0]

    def sender() -> None:
        channel = grpc.insecure_channel(f"127.0.0.1:{ports['grpc']}")
        export = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")
        interval = batch / spans_per_s
        next_send = time.monotonic()
        i = 0
        while not done.is_set():
            try:
                # Fresh spans each time: the collector acknowledges byte-identical retries once.
                export(make_request(batch, i), timeout=10)
            except grpc.RpcError:
                refused[0] += 1
            i += 1
            next_send += interval
            time.sleep(max(0.0, next_send - time.monotonic()))
        channel.close()

    thread = threading.Thread(target=sender)
    thread.start()
    started = time.monotonic()
    print("elapsed_s,rss_mb,queue_rows,written_rows,refused")
    assert proc.pid is not None
    while time.monotonic() - started < minutes * 60:
        time.sleep(1.0)
        http = ports["http"]
        print(
            f"{time.monotonic() - started:.0f},{rss_mb(proc.pid):.1f},"
            f"{metric(http, 'flowscope_collector_queue_rows'):.0f},"
            f"{metric(http, 'flowscope_collector_written_rows_total'):.0f},{refused[0]}",
            flush=True,
        )
    done.set()
    thread.join()
    stop.set()
    proc.join(60)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--spans-per-s", type=int, default=10_000)
    parser.add_argument("--spool", action="store_true")
    args = parser.parse_args()
    main(args.minutes, args.spans_per_s, args.spool)
