"""The embedded stack: collector and bridge in one process on an embedded ClickHouse."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from clickhouse_connect.driver.client import Client

from flowscope.collector.batcher import Writer
from flowscope.collector.service import Collector, CollectorConfig
from flowscope.collector.serving import serve_asgi
from flowscope.collector.store import Dsn, background_settings, connect
from flowscope.config import Settings
from flowscope.runtime import server_runtime
from flowscope.ws_bridge.api import Links
from flowscope.ws_bridge.app import Bridge, BridgeConfig
from flowscope.ws_bridge.auth import ADMIN, INGEST, Authenticator, require_auth_on_public_bind
from flowscope.ws_bridge.connection import ConnectionLimits
from flowscope.ws_bridge.control_events import LogSink, LostEmitter, collector_sink, first_started
from flowscope.ws_bridge.history import History

logger = logging.getLogger(__name__)


def bridge_config(settings: Settings, *, otlp_port: int | None) -> BridgeConfig:
    """The bridge's configuration from the settings: the same for the embedded stack and
    `flowscope bridge`, which differ only in where the OTLP feed comes from."""
    return BridgeConfig(
        host=settings.host,
        port=settings.http_port,
        auth=settings.auth,
        cors_origins=settings.cors_origins,
        allowed_hosts=settings.allowed_hosts,
        links=Links(settings.jaeger_url, settings.grafana_url),
        otlp_port=otlp_port,
        limits=ConnectionLimits(queue_size=settings.ws_queue_size, heartbeat_interval_s=settings.heartbeat_interval_s),
        control_timeout_s=settings.control_timeout_s,
        lost_after_s=settings.lost_after_s,
        checkpoints_url=settings.checkpoints_url,
    )


def assemble_bridge(
    settings: Settings,
    client_factory: Callable[[], Client],
    database: str,
    *,
    background: Mapping[str, Any],
    otlp_port: int | None,
    lost_sink: LogSink | None = None,
) -> tuple[Bridge, LostEmitter | None]:
    """The bridge over the history in `database`; user SQL goes through FLOWSCOPE_SQL_DSN's
    (read-only) user when set. Serve it with `Bridge.serve`. With `lost_sink`, runs whose
    engine goes silent are written as `workflow.lost` through it (ws_bridge/control_events.py):
    close the emitter once the bridge stopped, before the sink goes."""
    sql_dsn = Dsn.parse(settings.sql_dsn) if settings.sql_dsn else None
    history = History(
        client_factory,
        database,
        background=background,
        sql_client_factory=(lambda: connect(sql_dsn)) if sql_dsn is not None else None,
    )

    def live_started(execution_id: str) -> Mapping[str, Any] | None:
        # Called on the loop once the bridge runs: the hub's copy of a start not stored yet.
        return first_started(bridge.hub.recent_events(execution_id, 1))

    lost = LostEmitter(history, lost_sink, live_started=live_started) if lost_sink is not None else None
    bridge = Bridge(bridge_config(settings, otlp_port=otlp_port), history, emit_lost=lost)
    return bridge, lost


@dataclass
class Endpoints:
    host: str
    otlp_grpc_port: int
    otlp_http_port: int
    http_port: int

    @property
    def web(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def otlp_grpc(self) -> str:
        return f"http://{self.host}:{self.otlp_grpc_port}"

    @property
    def otlp_http(self) -> str:
        return f"http://{self.host}:{self.otlp_http_port}"


class Stack:
    def __init__(self, settings: Settings, writer_factory: Callable[[Dsn, str], Writer] | None = None) -> None:
        # Before anything listens: a refused public bind must not leave OTLP open meanwhile.
        require_auth_on_public_bind(settings.host, settings.auth)
        self.settings = settings
        authenticator = Authenticator(settings.auth)
        if (
            authenticator.enabled
            and not settings.jwt_secret
            and not any(grants & {INGEST, ADMIN} for _, grants in settings.auth_tokens.values())
        ):
            logger.warning("no token has the 'ingest' grant: OTLP will refuse every sender (docs/security.md)")
        self.collector = Collector(
            CollectorConfig(
                dsn=settings.dsn,
                schema=settings.schema,
                host=settings.host,
                grpc_port=settings.otlp_grpc_port,
                http_port=settings.otlp_http_port,
                max_queue_rows=settings.max_queue_rows,
                flush_interval_s=settings.flush_interval_s,
                forward_endpoints=settings.forward_otlp,
                forward_token=settings.forward_token,
                spool_dir=settings.spool_dir,
                spool_max_bytes=settings.spool_max_bytes,
                authorize=authenticator.authorize_ingest if authenticator.enabled else None,
                time_window=settings.time_window,
            ),
            writer_factory,
        )
        self.bridge: Bridge | None = None
        self.lost: LostEmitter | None = None
        self.endpoints: Endpoints | None = None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Stack]:
        """Start everything; on exit stop intake first, then drain every accepted row into ClickHouse."""
        s = self.settings
        collector = self.collector
        collector.start()
        try:
            bridge, lost = assemble_bridge(
                s,
                collector.client,
                collector.database,
                background=background_settings(collector.dsn),
                otlp_port=s.bridge_otlp_port,
                lost_sink=collector_sink(collector),
            )
            self.bridge = bridge
            self.lost = lost
            try:
                async with bridge.running():
                    unsubscribe = collector.subscribe(bridge.feed)
                    try:
                        async with (
                            serve_asgi(collector.http_app(), s.host, s.otlp_http_port) as otlp_http_port,
                            bridge.serve(collector.ops_routes()) as http_port,
                        ):
                            collector.http_port = otlp_http_port
                            self.endpoints = Endpoints(s.host, collector.grpc_port, otlp_http_port, http_port)
                            async with server_runtime():
                                yield self
                    finally:
                        unsubscribe()
            finally:
                # Once the bridge declares no more runs lost, and before the collector drains:
                # the lost events already handed over are written with the rest.
                if lost is not None:
                    await asyncio.to_thread(lost.close)
        finally:
            left = collector.close()
            if left:
                logger.error("%d accepted rows could not be written before shutdown", left)
