"""The bridge application: WebSocket endpoints, REST API, live page, and the event feed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket

from flowscope.collector.receiver import GrpcReceiver
from flowscope.collector.serving import serve_asgi
from flowscope.collector.types import Outcome, Signal
from flowscope.ws_bridge.api import Links, api_routes, openapi_route
from flowscope.ws_bridge.auth import AuthConfig, Authenticator, AuthError, require_auth_on_public_bind
from flowscope.ws_bridge.connection import Connection, ConnectionLimits, close_quietly
from flowscope.ws_bridge.control import ControlHub
from flowscope.ws_bridge.control_api import control_routes
from flowscope.ws_bridge.control_engine import EngineChannel
from flowscope.ws_bridge.control_events import EmitLost
from flowscope.ws_bridge.control_resume import CheckpointReader
from flowscope.ws_bridge.control_rollback import rollback_routes
from flowscope.ws_bridge.control_sweep import stored_orphans
from flowscope.ws_bridge.derive import MedianCache, Thresholds
from flowscope.ws_bridge.events import events_from_logs, facts_from_spans
from flowscope.ws_bridge.history import History
from flowscope.ws_bridge.rooms import Hub
from flowscope.ws_bridge.types import LiveEvent

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
# Sequence numbers, like ExecutionQuery's, stay within ClickHouse's UInt64 and JSON's safe range.
MAX_SEQ = 2**62


@dataclass(frozen=True)
class BridgeConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    auth: AuthConfig = field(default_factory=AuthConfig)
    cors_origins: tuple[str, ...] = ()
    limits: ConnectionLimits = field(default_factory=ConnectionLimits)
    thresholds: Thresholds = field(default_factory=Thresholds)
    links: Links = field(default_factory=Links)
    # OTLP/gRPC listener for a remote feed (the contrib collector's otlp exporter); None = in-process only.
    otlp_port: int | None = None
    # Host names (without port; "*.example.com" patterns) the HTTP server answers to, besides
    # the loopback names on a loopback bind: see trusted_hosts.
    allowed_hosts: tuple[str, ...] = ()
    # The server closes a WebSocket whose message exceeds this (1009) before connection.py reads it.
    ws_max_message_bytes: int = 1 << 20
    ws_ping_interval_s: float = 20.0
    # The control plane (docs/control.md): how long a command waits for its engine, and how long
    # an engine may stay silent before its runs are lost.
    control_timeout_s: float = 5.0
    lost_after_s: float = 10.0
    # The checkpoint store resumes read and GET …/checkpoint shows (ws_bridge/control_resume.py).
    checkpoints_url: str | None = None


def trusted_hosts(bind_host: str, allowed: Sequence[str]) -> list[str]:
    """The Host header values served: a check against DNS rebinding.

    A page on a hostile name that resolves to 127.0.0.1 reaches a loopback server with its
    own name as the Host, so a loopback bind answers to the loopback names (any port) and to
    the configured ones only. Any other bind needs auth anyway (require_auth_on_public_bind),
    so it answers to the configured names, or to any name when none are configured."""
    configured = [h.strip().lower() for h in allowed if h.strip()]
    if bind_host in {"127.0.0.1", "localhost", "::1"} or bind_host.startswith("127."):
        bind_name = f"[{bind_host}]" if ":" in bind_host else bind_host
        return list(dict.fromkeys([*LOOPBACK_HOSTS, bind_name, *configured]))
    return configured or ["*"]


class Bridge:
    """Turns the accepted OTLP stream into live events for WebSocket subscribers."""

    def __init__(self, config: BridgeConfig, history: History | None, emit_lost: EmitLost | None = None) -> None:
        require_auth_on_public_bind(config.host, config.auth)
        self.config = config
        self.history = history
        self.emit_lost = emit_lost  # how the control plane records a run lost (docs/control.md)
        self.auth = Authenticator(config.auth)
        self.medians = MedianCache(history.node_duration_medians_of if history else None)
        self.hub = Hub(config.thresholds, self.medians, stored_owners=history.owners_of if history else None)
        self.control = ControlHub(
            stored_owner=history.owner if history else None,
            last_seq=self.hub.last_seq,
            emit_lost=emit_lost,
            timeout_s=config.control_timeout_s,
            lost_after_s=config.lost_after_s,
            max_frame_bytes=config.ws_max_message_bytes,
            stored_run=history.started_run if history else None,
            checkpoints=CheckpointReader(config.checkpoints_url),
        )
        if history is not None:  # after a restart, runs of engines that did not come back are lost
            self.control.stored_orphans = partial(stored_orphans, history)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connections: set[Connection] = set()
        self._otlp: GrpcReceiver | None = None
        self.otlp_port = 0

    # -- the feed ----------------------------------------------------------------------------

    def bind_loop(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()

    def feed(self, signal: Signal, request: Any) -> None:
        """A collector StreamSubscriber: called from receiver threads, hands the request to the loop.

        Read there, not here: the exporter waits for this thread's answer before its next
        batch leaves, so every millisecond spent here is added to the next events' delay."""
        if self._loop is not None and signal in (Signal.LOGS, Signal.TRACES):
            self._loop.call_soon_threadsafe(self._read, signal, request)

    def _read(self, signal: Signal, request: Any) -> None:
        if signal is Signal.LOGS:
            events = events_from_logs(request)
            if events:
                self.control.rollbacks.observe(events)
                self.hub.publish(events)
        else:
            facts = facts_from_spans(request)
            if facts:
                self.hub.observe_spans(facts)

    def _consume_remote(self, signal: Signal, request: Any, raw: bytes | None = None) -> Outcome:
        self.feed(signal, request)
        return Outcome(accepted=_count(signal, request))

    def start_otlp(self) -> None:
        """The remote feed takes what the collector tier admits, from writers holding "ingest"."""
        from flowscope.collector.admission import OFF, admitting

        if self.config.otlp_port is None:
            return
        self._otlp = GrpcReceiver(
            admitting(self._consume_remote, OFF),
            host=self.config.host,
            port=self.config.otlp_port,
            authorize=self.auth.authorize_ingest if self.auth.enabled else None,
        )
        self._otlp.start()
        self.otlp_port = self._otlp.port

    # -- HTTP and WebSocket -----------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        api = [*api_routes(self.history, self.auth, self.config.links), *control_routes(self.control, self.auth)]
        api += rollback_routes(self.control, self.history, self.auth)
        routes: list[BaseRoute] = [
            WebSocketRoute("/ws", self._ws),
            WebSocketRoute("/ws/executions/{execution_id}", self._ws_execution),
            WebSocketRoute("/control/v1/engine", self._engine_ws),
            *api,
            Route("/healthz", self._healthz),
            Route("/", self._index),
            Route("/executions/{execution_id}", self._index),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ]
        routes.append(openapi_route(api))
        return routes

    def app(self, extra_routes: Sequence[BaseRoute] = ()) -> Starlette:
        hosts = trusted_hosts(self.config.host, self.config.allowed_hosts)
        middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=hosts, www_redirect=False)]
        if self.config.cors_origins:
            middleware.append(
                Middleware(
                    CORSMiddleware,
                    allow_origins=list(self.config.cors_origins),
                    allow_methods=["GET", "POST"],
                    allow_headers=["authorization", "content-type", "idempotency-key"],
                )
            )
        return Starlette(routes=[*extra_routes, *self.routes()], middleware=middleware)

    def serve(self, extra_routes: Sequence[BaseRoute] = ()) -> contextlib.AbstractAsyncContextManager[int]:
        """Serve the app on the configured address until the block exits; yields the bound port."""
        return serve_asgi(
            self.app(extra_routes),
            self.config.host,
            self.config.port,
            ws_ping_interval=self.config.ws_ping_interval_s,
            ws_ping_timeout=self.config.ws_ping_interval_s,
            ws_max_size=self.config.ws_max_message_bytes,
            ws_per_message_deflate=True,
        )

    async def _index(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache"})

    async def _healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "live": {**self.hub.stats(), "connections": len(self._connections)}})

    async def _ws(self, websocket: WebSocket) -> None:
        await self._serve(websocket, None)

    async def _ws_execution(self, websocket: WebSocket) -> None:
        execution_id = websocket.path_params["execution_id"]
        raw = websocket.query_params.get("fromSeq", "1")
        # Anything but a plain decimal in range becomes -1, which subscribe refuses with an error frame.
        from_seq = int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 19 else -1
        from_seq = from_seq if from_seq <= MAX_SEQ else -1
        initial = {"op": "subscribe", "id": "execution", "rooms": [f"execution:{execution_id}"], "fromSeq": from_seq}
        await self._serve(websocket, initial)

    async def _serve(self, websocket: WebSocket, initial: dict[str, Any] | None) -> None:
        origin = websocket.headers.get("origin")
        if origin is not None and not self._origin_allowed(origin, websocket.headers.get("host", "")):
            # Closed before accept, which the server answers with an HTTP 403: a page on another
            # origin never gets a connection (browsers show scripts no handshake body anyway).
            logger.info("refused a WebSocket handshake from origin %r", origin[:200])
            await close_quietly(websocket, 4403, "origin not allowed")
            return
        try:
            principal = self.auth.authenticate(
                websocket.headers.get("authorization"), websocket.query_params.get("token")
            )
        except AuthError as exc:
            # Accept then close with an application code, so browsers can read why.
            await websocket.accept()
            await close_quietly(websocket, 4401, str(exc)[:120])
            return
        await websocket.accept()
        connection = Connection(
            websocket,
            principal,
            self.hub,
            self.config.limits,
            self.history.events if self.history else None,
            self._history_since if self.history else None,
            self.history.owner if self.history else None,
            self.control,
        )
        self._connections.add(connection)
        try:
            await connection.run(initial)
        finally:
            self._connections.discard(connection)

    async def _engine_ws(self, websocket: WebSocket) -> None:
        """An engine's control channel (docs/control.md): a bearer token with the `engine` grant."""
        if websocket.headers.get("origin") is not None:
            # Engines send no Origin; a browser always does, and no page may pose as an engine.
            logger.info("refused an engine handshake carrying an Origin")
            await close_quietly(websocket, 4403, "engines connect without an Origin")
            return
        try:
            # No ?token=: an engine can send a header, and a token in a URL ends up in logs.
            principal = self.auth.authenticate(websocket.headers.get("authorization"), None)
        except AuthError as exc:
            await websocket.accept()
            await close_quietly(websocket, 4401, str(exc)[:120])
            return
        await websocket.accept()
        if not principal.may_serve_engine:
            await close_quietly(websocket, 4403, f"{principal.subject[:60]!r} lacks the 'engine' grant")
            return
        await EngineChannel(self.control, websocket, principal).run()

    def _origin_allowed(self, origin: str, host: str) -> bool:
        """Same origin (the page came from this server) or a configured CORS origin.

        Browsers always send Origin on a WebSocket handshake; clients without one are not
        browsers, and a page cannot make a browser leave it out."""
        if origin in self.config.cors_origins or "*" in self.config.cors_origins:
            return True
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and bool(host) and parts.netloc.lower() == host.lower()

    def _history_since(
        self, since: Any, workflow_id: str | None, user_id: str | None, types: frozenset[str] | None
    ) -> list[LiveEvent]:
        assert self.history is not None
        return self.history.events_since(since, workflow_id=workflow_id, user_id=user_id, types=types)

    async def aclose(self) -> None:
        if self._otlp is not None:
            self._otlp.stop()
            self._otlp = None
        await self.control.aclose()
        self.hub.close()
        await self.medians.aclose()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Bridge]:
        self.bind_loop()
        self.start_otlp()
        self.control.start()
        try:
            yield self
        finally:
            await self.aclose()


def _count(signal: Signal, request: Any) -> int:
    if signal is Signal.LOGS:
        return sum(len(sl.log_records) for rl in request.resource_logs for sl in rl.scope_logs)
    if signal is Signal.TRACES:
        return sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
    return sum(len(sm.metrics) for rm in request.resource_metrics for sm in rm.scope_metrics)
