"""Settings of the embedded stack and the CLI: explicit flag, then FLOWSCOPE_* variable, then default.

The one place that reads FLOWSCOPE_* from the environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from flowscope.collector.admission import TimeWindow
from flowscope.collector.schema import SchemaOptions
from flowscope.ws_bridge.auth import AuthConfig

DEFAULT_DATA_DIR = Path(".flowscope") / "data"


@dataclass(frozen=True)
class Settings:
    data_dir: Path = DEFAULT_DATA_DIR
    clickhouse_dsn: str | None = None
    database: str = "otel"
    host: str = "127.0.0.1"
    otlp_grpc_port: int = 4317
    otlp_http_port: int = 4318
    http_port: int = 8080
    bridge_otlp_port: int | None = None
    forward_otlp: tuple[str, ...] = ()
    forward_token: str | None = None
    spool_dir: Path | None = None
    spool_max_bytes: int | None = None
    auth_tokens: Mapping[str, tuple[str, frozenset[str]]] = field(default_factory=dict)
    jwt_secret: str | None = None
    no_auth: bool = False
    cors_origins: tuple[str, ...] = ()
    # Host names the HTTP server answers to besides the loopback names (flowscope.ws_bridge.app.trusted_hosts).
    allowed_hosts: tuple[str, ...] = ()
    # User SQL's own ClickHouse DSN, e.g. a server's read-only user; default: clickhouse_dsn.
    sql_dsn: str | None = None
    jaeger_url: str | None = "http://localhost:16686"
    grafana_url: str | None = "http://localhost:3000"
    traces_ttl_days: int = 0
    logs_ttl_days: int = 0
    metrics_ttl_days: int = 0
    workflow_ttl_days: int = 0
    max_queue_rows: int | None = None
    ws_queue_size: int = 1_000
    heartbeat_interval_s: float = 15.0
    # docs/control.md: how long a command waits for its engine; an engine's silence before its runs are lost.
    control_timeout_s: float = 5.0
    lost_after_s: float = 10.0
    # The checkpoint store engines continue runs from (docs/durability.md); default: checkpoints_url.
    checkpoints: str | None = None
    flush_interval_s: float | None = None
    # The collector refuses records stamped further ahead or further back than this; 0 = no bound.
    ingest_max_future_s: float = 86_400.0
    ingest_max_age_days: int = 365

    @property
    def dsn(self) -> str:
        return self.clickhouse_dsn or f"chdb://{self.data_dir.expanduser().resolve()}"

    @property
    def checkpoints_url(self) -> str:
        """FLOWSCOPE_CHECKPOINTS, else the SQLite file next to the data directory: the one
        `flowscope worker` and the demo write by default, so the embedded stack reads theirs."""
        return self.checkpoints or f"sqlite:///{self.data_dir.expanduser().resolve().with_name('checkpoints.db')}"

    @property
    def schema(self) -> SchemaOptions:
        return SchemaOptions(
            database=self.database,
            traces_ttl_days=self.traces_ttl_days,
            logs_ttl_days=self.logs_ttl_days,
            metrics_ttl_days=self.metrics_ttl_days,
            workflow_ttl_days=self.workflow_ttl_days,
        )

    @property
    def time_window(self) -> TimeWindow:
        return TimeWindow(self.ingest_max_future_s, self.ingest_max_age_days)

    @property
    def auth(self) -> AuthConfig:
        return AuthConfig(tokens=dict(self.auth_tokens), jwt_secret=self.jwt_secret, disabled=self.no_auth)

    def with_overrides(self, **values: Any) -> Settings:
        return replace(self, **{k: v for k, v in values.items() if v is not None})

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        base = cls()
        values: dict[str, Any] = {}
        for name, current in base.__dict__.items():
            raw = env.get(f"FLOWSCOPE_{name.upper()}")
            if raw is None:
                continue
            values[name] = _coerce(name, raw, current)
        return replace(base, **values)


def parse_tokens(raw: str) -> dict[str, tuple[str, frozenset[str]]]:
    """`token=subject:grant|grant,token2=subject2:*` → {token: (subject, grants)}."""
    tokens = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        token, _, rest = item.partition("=")
        subject, _, grants = rest.partition(":")
        if not token or not subject:
            raise ValueError(f"bad token entry {item!r}: use token=subject:grant|grant")
        tokens[token] = (subject, frozenset(g for g in grants.split("|") if g) or frozenset({"*"}))
    return tokens


def _coerce(name: str, raw: str, current: Any) -> Any:
    if name == "auth_tokens":
        return parse_tokens(raw)
    if name == "spool_dir":
        return Path(raw) if raw else None
    if name == "spool_max_bytes":
        return int(raw)
    if name == "data_dir":
        return Path(raw)
    if name in {"cors_origins", "forward_otlp", "allowed_hosts"}:
        return tuple(o.strip() for o in raw.split(",") if o.strip())
    if name == "no_auth":
        return raw.lower() in {"1", "true", "yes"}
    if name in {"otlp_grpc_port", "otlp_http_port", "http_port", "bridge_otlp_port", "max_queue_rows"} or name.endswith(
        "_days"
    ):
        return int(raw)
    if name == "ws_queue_size":
        return int(raw)
    if name in {"flush_interval_s", "heartbeat_interval_s", "ingest_max_future_s", "control_timeout_s", "lost_after_s"}:
        return float(raw)
    return raw or current
