"""The distributed deployment runs user SQL as a read-only ClickHouse user whose settings
profile holds flowscope's SQL limits — checked statically, without a Docker engine, and the
bridge's side of it against real chdb."""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from flowscope.collector.schema import SchemaOptions
from flowscope.collector.service import Collector
from flowscope.collector.store import Dsn, connect
from flowscope.config import Settings
from flowscope.ws_bridge.history import History, SqlError, SqlLimits

ROOT = Path(__file__).parents[2]
USERS_D = ROOT / "deploy/clickhouse/users.d/flowscope-reader.xml"


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def reader_config() -> ET.Element:
    root = ET.parse(USERS_D).getroot()
    assert root.tag == "clickhouse"
    return root


def profile_settings() -> dict[str, str]:
    profile = reader_config().find("profiles/flowscope_reader")
    assert profile is not None
    return {setting.tag: (setting.text or "").strip() for setting in profile}


def test_the_reader_profile_is_read_only_with_flowscopes_limits() -> None:
    settings = profile_settings()
    limits = SqlLimits()
    # readonly=1, not 2: the profile's limits cannot be changed from a query.
    assert settings["readonly"] == "1"
    assert int(settings["max_memory_usage"]) == limits.max_memory_bytes
    assert float(settings["max_execution_time"]) == limits.timeout_s
    assert int(settings["max_result_rows"]) == limits.max_rows
    assert int(settings["max_result_bytes"]) == limits.max_bytes
    assert settings["result_overflow_mode"] == "throw"


def test_the_reader_user_reads_the_history_database_only() -> None:
    user = reader_config().find("users/flowscope_reader")
    assert user is not None
    assert user.findtext("profile") == "flowscope_reader"
    assert user.findtext("access_management") == "0"
    grants = [(q.text or "").strip() for q in user.findall("grants/query")]
    assert grants == [f"GRANT SELECT ON {SchemaOptions().database}.*"]
    password = user.find("password")
    assert password is not None and password.get("from_env") == "FLOWSCOPE_READER_PASSWORD"
    assert not (password.text or "").strip(), "the password comes from the environment, not the file"


def test_compose_mounts_the_user_and_points_the_bridges_sql_at_it() -> None:
    services = compose()["services"]
    clickhouse, bridge = services["clickhouse"], services["bridge"]
    mounts = {volume.split(":")[0]: volume.split(":")[1] for volume in clickhouse["volumes"]}
    assert mounts["./deploy/clickhouse/users.d/flowscope-reader.xml"].startswith("/etc/clickhouse-server/users.d/")

    settings = Settings.from_env(bridge["environment"])
    assert settings.sql_dsn is not None
    sql = urlparse(settings.sql_dsn)
    assert (sql.scheme, sql.hostname, sql.port) == ("http", "clickhouse", 8123)
    assert sql.username == "flowscope_reader"
    assert sql.password == clickhouse["environment"]["FLOWSCOPE_READER_PASSWORD"]
    assert Dsn.parse(settings.sql_dsn).database == SchemaOptions().database
    # The bridge's main DSN stays the writer's; only user SQL goes through the reader.
    assert urlparse(bridge["environment"]["FLOWSCOPE_CLICKHOUSE_DSN"]).username == "flowscope"

    # A public bind: the Host check lets through the names the healthcheck and a local browser use.
    assert {"localhost", "127.0.0.1"} <= set(settings.allowed_hosts)
    assert "127.0.0.1:8080" in " ".join(bridge["healthcheck"]["test"])


async def test_history_runs_user_sql_under_a_profile_like_the_readers(collector: Collector, chdb_dsn: str) -> None:
    """The profile as the server applies it (limits, then readonly=1) on a real chdb session:
    History sends no settings there, and the profile's limits hold."""
    dsn = Dsn.parse(chdb_dsn)
    settings = profile_settings()

    def reader_session() -> Any:
        return connect(dsn, **{k: settings[k] for k in settings if k not in ("readonly", "allow_ddl")}, readonly=1)

    history = History(collector.client, collector.database, sql_client_factory=reader_session)
    assert (await asyncio.to_thread(history.sql, "SELECT count() AS n FROM workflow_events"))["rows"] == [[0]]
    with pytest.raises(SqlError, match="memory limit exceeded"):
        await asyncio.to_thread(history.sql, "SELECT length(range(400000000))")
    with pytest.raises(SqlError, match="Cannot modify 'max_memory_usage' setting in readonly mode"):
        await asyncio.to_thread(history.sql, "SELECT 1 SETTINGS max_memory_usage = 0")
