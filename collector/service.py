"""The collector as one object: store, schema, pipeline, OTLP receivers, health and metrics."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clickhouse_connect.driver.client import Client
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from flowscope.collector.admission import TimeWindow, admitting
from flowscope.collector.batcher import Pipeline, Writer
from flowscope.collector.dead_letter import DeadLetterStore
from flowscope.collector.forward import OtlpForwarder
from flowscope.collector.receiver import Authorize, Consume, GrpcReceiver, http_routes
from flowscope.collector.schema import SchemaOptions
from flowscope.collector.serving import serve_asgi
from flowscope.collector.spool import Spool
from flowscope.collector.store import Dsn, connect, migrate, tune_embedded
from flowscope.collector.telemetry import SelfMetrics
from flowscope.collector.types import Outcome, Signal, StreamSubscriber, Unsubscribe
from flowscope.collector.writer import ClickHouseWriter

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CollectorConfig:
    dsn: str | None = None
    schema: SchemaOptions = field(default_factory=SchemaOptions)
    host: str = "127.0.0.1"
    grpc_port: int = 4317
    http_port: int = 4318
    max_queue_rows: int | None = None
    max_batch_rows: int | None = None
    flush_interval_s: float | None = None
    max_message_bytes: int | None = None
    create_schema: bool = True
    # OTLP/gRPC endpoints of remote bridges that get the accepted event stream.
    forward_endpoints: tuple[str, ...] = ()
    # Bearer token (with the ingest grant) the forwarders present to bridges that require one.
    forward_token: str | None = None
    # Write-ahead spool: acknowledged requests are fsync'd here until written. None = off.
    spool_dir: Path | None = None
    spool_max_bytes: int | None = None
    # Rows ClickHouse refuses for good (docs/durability.md); None = `dead-letter` in the
    # spool directory, or only logged without a spool.
    dead_letter_dir: Path | None = None
    # /readyz reports not ready when no write completed for this long while rows wait.
    stall_after_s: float | None = None
    # Checks each OTLP request's Authorization header (flowscope.collector.receiver); None = open.
    authorize: Authorize | None = None
    # Records stamped outside it are refused (collector/admission.py).
    time_window: TimeWindow = field(default_factory=TimeWindow)


class Collector:
    """Receives OTLP and writes ClickHouse. `start()` then `close()`; or `running()`."""

    def __init__(self, config: CollectorConfig, writer_factory: Callable[[Dsn, str], Writer] | None = None) -> None:
        self.config = config
        self._writer_factory = writer_factory or ClickHouseWriter
        self.dsn = Dsn.parse(config.dsn)
        database = self.dsn.database or config.schema.database
        self.schema = SchemaOptions(
            database=database,
            traces_ttl_days=config.schema.traces_ttl_days,
            logs_ttl_days=config.schema.logs_ttl_days,
            metrics_ttl_days=config.schema.metrics_ttl_days,
            workflow_ttl_days=config.schema.workflow_ttl_days,
        )
        self.metrics = SelfMetrics()
        self._admin: Client | None = None
        self.pipeline: Pipeline | None = None
        self._grpc: GrpcReceiver | None = None
        self.grpc_port = 0
        self.http_port = 0
        self._forwarders: list[OtlpForwarder] = []

    @property
    def database(self) -> str:
        return self.schema.database

    def client(self) -> Client:
        """A new ClickHouse client for this store (queries run on their own client)."""
        return connect(self.dsn)

    def start(self) -> None:
        """Open the store, create the schema, start the writer and the gRPC receiver."""
        self._admin = connect(self.dsn)
        if self.config.create_schema:
            migrate(self._admin, self.schema)
        if self.dsn.embedded:
            tune_embedded(self._admin, self.database)
        spool = Spool(self.config.spool_dir, self.config.spool_max_bytes) if self.config.spool_dir else None
        self.pipeline = Pipeline(
            self._writer_factory(self.dsn, self.database),
            self.metrics,
            max_queue_rows=self.config.max_queue_rows,
            max_batch_rows=self.config.max_batch_rows,
            flush_interval_s=self.config.flush_interval_s,
            spool=spool,
            dead_letters=DeadLetterStore(self.dead_letter_dir, self.metrics),
            stall_after_s=self.config.stall_after_s,
        )
        if spool is not None:
            self.replayed = self.pipeline.resume_from_spool()
            if self.replayed:
                logger.warning("replaying %d spooled requests into ClickHouse", self.replayed)
        self._grpc = GrpcReceiver(
            self._consume,
            host=self.config.host,
            port=self.config.grpc_port,
            max_message_bytes=self.config.max_message_bytes,
            counters=self._count_refusal,
            authorize=self.config.authorize,
        )
        self._grpc.start()
        self.grpc_port = self._grpc.port
        for endpoint in self.config.forward_endpoints:
            forwarder = OtlpForwarder(endpoint, self.metrics, token=self.config.forward_token)
            self._forwarders.append(forwarder)
            self.pipeline.subscribe(forwarder)

    replayed = 0

    @property
    def dead_letter_dir(self) -> Path | None:
        spool = self.config.spool_dir
        return self.config.dead_letter_dir or (spool / "dead-letter" if spool is not None else None)

    def subscribe(self, subscriber: StreamSubscriber) -> Unsubscribe:
        if self.pipeline is None:
            raise RuntimeError("Expected a started collector, but got one not started")
        return self.pipeline.subscribe(subscriber)

    def _count_refusal(self, signal: Signal, reason: str) -> None:
        self.metrics.refused.labels(signal.value, reason).inc()

    def _count_inadmissible(self, signal: Signal, count: int) -> None:
        self.metrics.received.labels(signal.value).inc(count)
        self.metrics.rejected.labels(signal.value, "inadmissible").inc(count)

    @property
    def _consume(self) -> Consume:
        if self.pipeline is None:
            raise RuntimeError("Expected a started collector, but got one not started")
        return admitting(self.pipeline.consume, self.config.time_window, self._count_inadmissible)

    def consume_logs(self, request: Any) -> Outcome:
        """Takes an ExportLogsServiceRequest the stack made itself (the control plane's
        workflow.lost, ws_bridge/control_events.py) as a receiver takes one: admitted,
        spooled, written, streamed. Blocking; raises Backpressure like the receivers' intake."""
        return self._consume(Signal.LOGS, request)

    def routes(self) -> list[Route]:
        """OTLP/HTTP plus /metrics, /healthz, /readyz — mountable into another app."""
        if self.pipeline is None:
            raise RuntimeError("Expected a started collector, but got one not started")
        return [
            *http_routes(
                self._consume,
                max_message_bytes=self.config.max_message_bytes,
                count_refusal=self._count_refusal,
                authorize=self.config.authorize,
            ),
            Route("/healthz", self._healthz),
            *self.ops_routes(),
        ]

    def ops_routes(self) -> list[Route]:
        """/metrics and /readyz, for mounting into the app that fronts the collector."""
        return [Route("/metrics", self._metrics_endpoint), Route("/readyz", self._readyz)]

    def http_app(self) -> Starlette:
        return Starlette(routes=self.routes())

    async def _metrics_endpoint(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def _healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    def readiness(self) -> dict[str, Any]:
        pipeline = self.pipeline
        if pipeline is None:
            return {"ready": False, "reason": "not started"}
        # Not ready while writing fails or is stuck, the writer is gone, or intake pushes back.
        problems = pipeline.problems()
        state: dict[str, Any] = {
            "ready": not problems,
            "storage": "ok" if pipeline.store_ok else f"unavailable: {pipeline.last_error}",
            "writer": "running" if pipeline.writer_alive else "stopped",
            "queuedRows": pipeline.queued_rows,
            "queueCapacityRows": pipeline.max_queue_rows,
        }
        if problems:
            state["reason"] = "; ".join(problems)
        return state

    async def _readyz(self, request: Request) -> Response:
        state = self.readiness()
        return JSONResponse(state, status_code=200 if state["ready"] else 503)

    def close(self, drain_timeout_s: float = 30.0) -> int:
        """Stop receiving, drain accepted data into ClickHouse; idempotent. Returns rows left unwritten."""
        if self._grpc is not None:
            self._grpc.stop()
            self._grpc = None
        left = 0
        if self.pipeline is not None:
            left = self.pipeline.close(drain_timeout_s)
        for forwarder in self._forwarders:
            forwarder.close()
        self._forwarders.clear()
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        return left

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Collector]:
        """Start everything including the OTLP/HTTP listener; drain on exit."""
        self.start()
        try:
            async with serve_asgi(self.http_app(), self.config.host, self.config.http_port) as port:
                self.http_port = port
                yield self
        finally:
            self.close()
