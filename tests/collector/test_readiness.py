"""/readyz says not ready, and why, while writing is stuck or failing; ready again once it is not."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from flowscope.collector.admission import OFF
from flowscope.collector.dead_letter import read
from flowscope.collector.schema import SchemaOptions
from flowscope.collector.service import Collector, CollectorConfig
from flowscope.collector.store import Dsn
from flowscope.collector.types import Signal
from flowscope.collector.writer import ClickHouseWriter
from tests.collector.test_disk_full import fill, small_disk
from tests.collector.test_end_to_end import query
from tests.collector.test_poison import logs_request
from tests.collector.test_receivers import json_spans, span


class HangingWriter(ClickHouseWriter):
    """The real writer behind a ClickHouse that takes the insert and never answers until released."""

    def __init__(self, dsn: Dsn, database: str) -> None:
        super().__init__(dsn, database)
        self.release = threading.Event()

    def insert_otlp(
        self, payloads: list[bytes], dedup_token: str | None = None, signal: Signal = Signal.TRACES
    ) -> None:
        self.release.wait(60)
        super().insert_otlp(payloads, dedup_token, signal)


async def wait_ready(client: httpx.AsyncClient, ready: bool, timeout_s: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        response = await client.get("/readyz")
        state: dict[str, Any] = response.json()
        assert (response.status_code == 200) == state["ready"]
        if state["ready"] == ready:
            return state
        assert time.monotonic() < deadline, f"/readyz stayed {state}"
        await asyncio.sleep(0.05)


async def test_readyz_reports_a_stalled_writer(chdb_dsn: str, database: str) -> None:
    writers: list[HangingWriter] = []

    def factory(dsn: Dsn, db: str) -> HangingWriter:
        writers.append(HangingWriter(dsn, db))
        return writers[-1]

    config = CollectorConfig(
        dsn=chdb_dsn, schema=SchemaOptions(database=database), grpc_port=0, http_port=0,
        flush_interval_s=0.05, stall_after_s=0.5,
    )  # fmt: skip
    async with Collector(config, factory).running() as collector:
        assert collector.pipeline is not None
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{collector.http_port}") as client:
                body = json.dumps(json_spans(*[span(spanId=os.urandom(8).hex()) for _ in range(3)])).encode()
                accepted = await client.post("/v1/traces", content=body, headers={"content-type": "application/json"})
                assert accepted.status_code == 200
                # Nothing failed, the queue is nearly empty: only the wait says the writer is stuck.
                state = await wait_ready(client, False)
                assert "writing stalled" in state["reason"]
                assert state["storage"] == "ok" and state["writer"] == "running"
                writers[0].release.set()
                assert await asyncio.to_thread(collector.pipeline.flush, 30.0)
                await wait_ready(client, True)
        finally:
            writers[0].release.set()
    assert query(collector, "SELECT count() FROM {db}.otel_traces") == [(3,)]


async def test_readyz_reports_failing_writes_and_the_writer_survives_them(
    chdb_dsn: str, database: str, tmp_path: Path
) -> None:
    # ClickHouse refuses a row for good and the dead-letter store's disk is full: the row can
    # go nowhere yet, so writing fails until space returns; nothing is dropped meanwhile.
    with small_disk(tmp_path / "disk", "1m") as disk:
        config = CollectorConfig(
            dsn=chdb_dsn, schema=SchemaOptions(database=database), grpc_port=0, http_port=0,
            flush_interval_s=0.05, dead_letter_dir=disk / "dead", time_window=OFF,
        )  # fmt: skip
        async with Collector(config).running() as collector:
            pipeline = collector.pipeline
            assert pipeline is not None
            query(collector, "ALTER TABLE {db}.otel_logs ADD CONSTRAINT no_poison CHECK Body != 'poison'")
            filler = fill(disk)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{collector.http_port}") as client:
                body = logs_request(["fine", "poison", "also fine"])
                response = await client.post(
                    "/v1/logs", content=body, headers={"content-type": "application/x-protobuf"}
                )
                assert response.status_code == 200
                state = await wait_ready(client, False)
                assert "writes failed" in state["reason"] and "No space left on device" in state["reason"]
                assert state["writer"] == "running" and pipeline.writer_alive
                filler.unlink()
                assert await asyncio.to_thread(pipeline.flush, 30.0)
                await wait_ready(client, True)
                metrics = (await client.get("/metrics")).text
        assert query(collector, "SELECT Body FROM {db}.otel_logs ORDER BY Body") == [("also fine",), ("fine",)]
        assert [row["Body"] for letter in read(disk / "dead") for row in letter["data"]] == ["poison"]
    errors = [line for line in metrics.splitlines() if line.startswith("flowscope_collector_writer_errors_total ")]
    assert errors and float(errors[0].split()[1]) > 0
    assert 'flowscope_dead_letter_rows_total{table="otel_logs"} 1.0' in metrics
