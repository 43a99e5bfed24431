"""User SQL runs confined: one reading statement, decided by ClickHouse's parser, inside the
history database, under memory and result limits — through the endpoint, History and the CLI."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
from clickhouse_connect.driver.client import Client

from flowscope.collector.service import Collector
from flowscope.collector.store import Dsn, connect
from flowscope.stack import Stack
from flowscope.ws_bridge.history import History, SqlError
from tests.conftest import StackFactory
from tests.flowscope.test_cli import cli


async def post_sql(http: httpx.AsyncClient, query: str) -> httpx.Response:
    return await http.post("/api/v1/sql", json={"sql": query})


async def test_only_reading_statements_run(stack: Stack, tmp_path: Path) -> None:
    assert stack.endpoints is not None
    db = stack.collector.database
    written = tmp_path / "written.pth"
    refused = [
        (f"SELECT 1 INTO OUTFILE '{written}'", "INTO OUTFILE is not allowed"),
        (f"SELECT 1 INTO OUTFILE '{written}' APPEND", "INTO OUTFILE is not allowed"),
        (f"select 1 into outfile '{written}' truncate format TSV", "INTO OUTFILE is not allowed"),
        (f"SHOW TABLES INTO OUTFILE '{written}'", "INTO OUTFILE is not allowed"),
        (f"EXPLAIN SELECT 1 INTO OUTFILE '{written}'", "INTO OUTFILE is not allowed"),
        ("KILL QUERY WHERE 1", "KILL is not allowed"),
        ("SYSTEM DROP DNS CACHE", "SYSTEM is not allowed"),
        (f"TRUNCATE TABLE {db}.workflow_executions", "TRUNCATE is not allowed"),
        (f"INSERT INTO {db}.flowscope_schema_migrations (Version) VALUES (99)", "INSERT is not allowed"),
        (f"DROP TABLE {db}.otel_traces", "DROP is not allowed"),
        (f"CREATE TABLE {db}.x (a UInt8) ENGINE = Memory", "CREATE is not allowed"),
        ("SET max_result_rows = 0", "SET is not allowed"),
        (f"EXPLAIN INSERT INTO {db}.flowscope_schema_migrations (Version) VALUES (99)", "EXPLAIN is allowed of"),
        (f"SELECT 1; DROP TABLE {db}.otel_traces", "Multi-statements are not allowed"),
        (f"/* c */ SELECT 1 -- x\n; TRUNCATE TABLE {db}.otel_logs", "Multi-statements are not allowed"),
        # Settings inside the query cannot lift the limits: readonly=1 refuses any change.
        ("SELECT * FROM numbers(100000) SETTINGS max_result_rows = 0", "readonly"),
        ("SELECT 1 SETTINGS readonly = 0", "readonly"),
    ]
    async with httpx.AsyncClient(base_url=stack.endpoints.web, timeout=60) as http:
        for query, message in refused:
            response = await post_sql(http, query)
            assert response.status_code == 400, (query, response.text)
            assert message in response.json()["error"], (query, response.text)
        migrations = await post_sql(http, f"SELECT count() FROM {db}.flowscope_schema_migrations WHERE Version = 99")
        tables = await post_sql(http, f"SELECT count() FROM system.tables WHERE database = '{db}' AND name = 'x'")
    assert not written.exists(), "INTO OUTFILE wrote a file"
    assert migrations.json()["rows"] == [[0]] and tables.json()["rows"] == [[0]]


async def test_functions_reading_outside_the_database_are_refused(stack: Stack) -> None:
    assert stack.endpoints is not None
    refused = [
        ("SELECT * FROM file('/etc/passwd', 'LineAsString')", "table function file() is not allowed"),
        ("SELECT * FROM FILE('/etc/passwd', 'LineAsString')", "table function FILE() is not allowed"),
        ("SELECT file('/etc/passwd')", "function file() is not allowed"),
        ("SELECT 1 WHERE 'x' IN file('/etc/passwd')", "function file() is not allowed"),
        ("SELECT * FROM url('http://127.0.0.1:9/x', 'CSV', 'a String')", "table function url() is not allowed"),
        ("SELECT * FROM remote('127.0.0.1:9', system.one)", "table function remote() is not allowed"),
        ("SELECT * FROM s3('http://127.0.0.1:9/b/k', 'CSV', 'a String')", "table function s3() is not allowed"),
        ("SELECT * FROM executable('id', 'TSV', 'a String')", "table function executable() is not allowed"),
        ("SELECT * FROM input('a String')", "table function input() is not allowed"),
        ("SELECT * FROM Python(globals)", "table function Python() is not allowed"),
        ("DESCRIBE file('/etc/passwd', 'LineAsString')", "table function file() is not allowed"),
        (
            "WITH t AS (SELECT * FROM view(SELECT * FROM file('/etc/passwd', 'LineAsString'))) SELECT * FROM t",
            "table function file() is not allowed",
        ),
        ("SELECT * FROM system.one JOIN url('http://127.0.0.1:9/', 'CSV', 'a String') ON 1", "url() is not allowed"),
    ]
    async with httpx.AsyncClient(base_url=stack.endpoints.web, timeout=60) as http:
        for query, message in refused:
            response = await post_sql(http, query)
            assert response.status_code == 400, (query, response.text)
            assert message in response.json()["error"], (query, response.text)
        generated = await post_sql(http, "SELECT sum(number) AS s FROM numbers(4)")
    assert generated.json()["rows"] == [[6]]


async def test_names_with_line_breaks_cannot_hide_what_a_statement_does(stack: Stack, tmp_path: Path) -> None:
    """ClickHouse prints aliases raw in EXPLAIN AST: a backquoted alias holding a line break
    must not add lines that hide the nodes after it (a file read, an INTO OUTFILE .pth)."""
    assert stack.endpoints is not None
    written = tmp_path / "evil.pth"
    payload = "a\nimport os;open('x','w')\n".replace("'", "\\'")
    attacks = [
        "SELECT 1 AS `a\nX`, file('/etc/hostname') AS f",
        f"SELECT 1 AS `{payload}` INTO OUTFILE '{written}'",
        *(f"SELECT 1 AS `a{sep}X`, file('/etc/hostname') AS f" for sep in ("\u2028", "\x1c", "\x85", "\r")),
        "SELECT 1 AS `a\n    Literal UInt64_2`, file('/etc/hostname') AS f",
    ]
    async with httpx.AsyncClient(base_url=stack.endpoints.web, timeout=60) as http:
        for query in attacks:
            response = await post_sql(http, query)
            assert response.status_code == 400, (query, response.text)
        # A line break in a string literal or a comment is not a name: those still run.
        literal = await post_sql(http, "SELECT 'a\nX' AS s /* b\nY */")
    assert not written.exists()
    assert literal.status_code == 200, literal.text
    assert literal.json()["rows"] == [["a\nX"]]


async def test_memory_is_bounded(stack: Stack) -> None:
    assert stack.endpoints is not None
    async with httpx.AsyncClient(base_url=stack.endpoints.web, timeout=60) as http:
        response = await post_sql(http, "SELECT length(range(400000000))")
        after = await post_sql(http, "SELECT 1 AS one")
    assert response.status_code == 400
    assert "memory limit exceeded" in response.json()["error"] and "512.00 MiB" in response.json()["error"]
    assert after.json()["rows"] == [[1]]


async def test_unqualified_tables_are_the_history_database_and_format_is_refused(stack: Stack) -> None:
    assert stack.endpoints is not None
    async with httpx.AsyncClient(base_url=stack.endpoints.web, timeout=60) as http:
        count = await post_sql(http, "SELECT count() AS runs FROM workflow_executions FINAL")
        tables = await post_sql(http, "SHOW TABLES")
        described = await post_sql(http, "DESCRIBE workflow_executions")
        explained = await post_sql(http, "EXPLAIN SELECT count() FROM workflow_executions")
        with_clause = await post_sql(http, "WITH 2 AS two SELECT two * 3 AS six")
        formatted = await post_sql(http, "SELECT 1 FORMAT JSON")
        formatted_show = await post_sql(http, "SHOW TABLES FORMAT CSV")
    assert count.status_code == 200, count.text
    assert count.json()["rows"] == [[0]]
    assert ["workflow_executions"] in tables.json()["rows"]
    assert described.json()["rows"][0][:2] == ["ExecutionId", "String"]
    assert explained.status_code == 200 and with_clause.json()["rows"] == [[6]]
    for response in (formatted, formatted_show):
        assert response.status_code == 400
        assert "FORMAT clause is not supported" in response.json()["error"] and "Native" not in response.text


async def test_a_read_only_session_runs_under_its_own_profile(collector: Collector, chdb_dsn: str) -> None:
    """A server's read-only user (deploy/clickhouse/users.d) refuses every setting change, so
    History sends none: the profile's limits apply, and the parser's refusals hold all the same."""
    dsn = Dsn.parse(chdb_dsn)

    def profile_session() -> Client:
        # As the flowscope_reader profile sets it: limits first, then readonly.
        return connect(dsn, max_result_rows=100, result_overflow_mode="throw", readonly=1)

    history = History(collector.client, collector.database, sql_client_factory=profile_session)
    result = await asyncio.to_thread(history.sql, "SELECT count() AS runs FROM workflow_executions")
    assert result["rows"] == [[0]]
    with pytest.raises(SqlError, match="max rows: 100"):
        await asyncio.to_thread(history.sql, "SELECT * FROM numbers(1000)")
    with pytest.raises(SqlError, match="Cannot modify 'max_result_rows' setting in readonly mode"):
        await asyncio.to_thread(history.sql, "SELECT * FROM numbers(1000) SETTINGS max_result_rows = 0")
    with pytest.raises(SqlError, match="INTO OUTFILE is not allowed"):
        await asyncio.to_thread(history.sql, "SELECT 1 INTO OUTFILE '/tmp/flowscope-never'")


@pytest.mark.slow
async def test_cli_sql_on_a_data_directory_uses_the_history_database(tmp_path: Path) -> None:
    data = tmp_path / "data"
    applied = await cli("schema", "apply", "--dsn", f"chdb://{data}")
    assert applied.returncode == 0, applied.stderr
    counted = await cli(
        "sql", "SELECT count() AS runs FROM workflow_executions", "--server", "http://127.0.0.1:9",
        "--data-dir", str(data), "--format", "json",
    )  # fmt: skip
    assert counted.returncode == 0, counted.stderr
    assert json.loads(counted.stdout) == [{"runs": 0}]
    refused = await cli("sql", "SELECT file('/etc/passwd')", "--server", "http://127.0.0.1:9", "--data-dir", str(data))
    assert refused.returncode == 1 and "function file() is not allowed" in refused.stderr


async def test_user_sql_goes_through_its_own_dsn_and_an_unreachable_one_is_a_503(
    stack_factory: StackFactory,
) -> None:
    # Nothing listens on port 1: user SQL fails as a store outage, the history API does not use it.
    async with stack_factory(sql_dsn="http://reader:pw@127.0.0.1:1/otel") as stack:
        assert stack.endpoints is not None
        async with httpx.AsyncClient(base_url=stack.endpoints.web) as client:
            sql = await client.post("/api/v1/sql", json={"sql": "SELECT 1"})
            listed = await client.get("/api/v1/executions")
    assert sql.status_code == 503, sql.text
    assert sql.headers["retry-after"] == "5"
    assert "cannot be reached" in sql.json()["error"]
    assert listed.status_code == 200
