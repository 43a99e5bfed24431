"""The collector's own metrics, exposed at /metrics in Prometheus text format."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class SelfMetrics:
    """One registry per collector, so several collectors (tests, embedded stack) never mix counts."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter(
            "flowscope_collector_received_items",
            "Items (spans, log records, data points) received",
            ["signal"],
            registry=r,
        )
        self.accepted = Counter(
            "flowscope_collector_accepted_items", "Items accepted for storage", ["signal"], registry=r
        )
        self.rejected = Counter(
            "flowscope_collector_rejected_items", "Items refused as invalid", ["signal", "reason"], registry=r
        )
        self.refused = Counter(
            "flowscope_collector_refused_requests",
            "Requests pushed back (queue full, store down); the client retries them",
            ["signal", "reason"],
            registry=r,
        )
        self.dropped = Counter(
            "flowscope_collector_dropped_rows", "Rows lost after acceptance (never expected)", ["table"], registry=r
        )
        self.written = Counter("flowscope_collector_written_rows", "Rows written to ClickHouse", ["table"], registry=r)
        self.insert_errors = Counter(
            "flowscope_collector_insert_errors", "Failed ClickHouse inserts (retried)", ["table"], registry=r
        )
        self.insert_seconds = Histogram(
            "flowscope_collector_insert_seconds",
            "ClickHouse insert latency",
            ["table"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.queue_rows = Gauge("flowscope_collector_queue_rows", "Rows waiting to be written", registry=r)
        self.queue_capacity = Gauge("flowscope_collector_queue_capacity_rows", "Queue bound in rows", registry=r)
        self.forwarded = Counter(
            "flowscope_collector_forwarded_requests", "Requests forwarded to remote bridges", ["endpoint"], registry=r
        )
        self.forward_dropped = Counter(
            "flowscope_collector_forward_dropped_requests",
            "Requests a remote bridge could not take (it replays them from ClickHouse)",
            ["endpoint"],
            registry=r,
        )
        self.duplicate_requests = Counter(
            "flowscope_collector_duplicate_requests",
            "Byte-identical retries of requests already spooled: acknowledged, not stored again",
            registry=r,
        )
        self.spilled = Counter(
            "flowscope_collector_spilled_requests",
            "Requests accepted into the spool only (memory queue full), written later",
            registry=r,
        )
        self.dead_letter_rows = Counter(
            "flowscope_dead_letter_rows",
            "Rows ClickHouse refused for good, isolated and kept in the dead-letter store",
            ["table"],
            registry=r,
        )
        self.dead_letter_records = Counter(
            "flowscope_dead_letter_records", "Records written to the dead-letter store", ["signal"], registry=r
        )
        self.dead_letter_discarded = Counter(
            "flowscope_dead_letter_discarded_records",
            "Dead-letter records deleted because the store exceeded its size bound",
            registry=r,
        )
        self.dead_letter_bytes = Gauge("flowscope_dead_letter_bytes", "Size of the dead-letter files", registry=r)
        self.split_inserts = Counter(
            "flowscope_collector_split_inserts",
            "Inserts ClickHouse refused for good, split in two to isolate the refused rows",
            ["table"],
            registry=r,
        )
        self.writer_errors = Counter(
            "flowscope_collector_writer_errors",
            "Unexpected errors in the writer thread (logged; the writer retries after a pause)",
            registry=r,
        )
        self.subscriber_errors = Counter(
            "flowscope_collector_subscriber_errors", "Stream subscribers that raised", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
