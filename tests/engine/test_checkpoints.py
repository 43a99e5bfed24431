"""The checkpoint store on real storage: SQLite files in tmp_path, embedded ClickHouse (chdb).

Acknowledged means stored: a writer process is killed with SIGKILL mid-stream and every
checkpoint it acknowledged is found when the store is opened again.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from flowscope.collector.store import Dsn, connect
from flowscope.engine.checkpoint_commit import GroupCommitStore
from flowscope.engine.checkpoints import CheckpointError, Stored, open_checkpoint_store
from flowscope.engine.redact import Secret

ROOT = Path(__file__).parents[2]
WF = {"workflow_id": "wf", "workflow_version": "3"}


# sqlite: commits on the loop (the default at synchronous=NORMAL); sqlite-thread: by the writer thread.
@pytest.fixture(params=["sqlite", "sqlite-thread", "chdb"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/checkpoints.db"
    if request.param == "sqlite-thread":
        return f"sqlite://{tmp_path}/checkpoints.db?commit=thread"
    dsn: str = request.getfixturevalue("chdb_dsn")
    return dsn


@pytest.fixture
def open_store(store_url: str, database: str) -> Iterator[Any]:
    opened: list[GroupCommitStore] = []

    def make(**kwargs: Any) -> GroupCommitStore:
        store = open_checkpoint_store(store_url, database=database, **kwargs)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def chdb_rows(dsn: str, sql: str) -> list[tuple[Any, ...]]:
    client = connect(Dsn.parse(dsn))
    try:
        return [tuple(r) for r in client.query(sql).result_rows]
    finally:
        client.close()


async def test_round_trip_outputs_and_run_metadata(open_store: Any) -> None:
    store = open_store()
    await store.put_run("e1", "wf", "3", {"city": "Oslo", "n": [1, 2.5, None, True]}, resumed_from="e0")
    outputs = {"a": {"x": 1, "nested": {"k": ["v", 2]}}, "b": "plain", "c": 42, "d": None, "e": [1.5, False]}
    for node_id, output in outputs.items():
        await store.put("e1", node_id, output, attempt=1, **WF)
    await store.put("e1", "c", 43, attempt=2, **WF)  # a second attempt replaces the first
    await store.put("other", "a", "not this run", attempt=1, **WF)

    checkpoint = await store.load("e1")

    assert checkpoint.outputs == {**outputs, "c": 43}
    assert checkpoint.encoded["a"] == orjson.dumps(outputs["a"])  # byte-identical to what was put
    assert checkpoint.nodes["c"].attempt == 2
    assert all(node.reusable and node.workflow_version == "3" for node in checkpoint.nodes.values())
    assert checkpoint.nodes["b"].size == len(b'"plain"')
    assert checkpoint.nodes["a"].stored_at > 1.7e9
    run = checkpoint.run
    assert run is not None
    assert (run.workflow_id, run.workflow_version, run.resumed_from) == ("wf", "3", "e0")
    assert run.input == {"city": "Oslo", "n": [1, 2.5, None, True]}

    summary = await store.describe("e1")
    assert sorted(n.node_id for n in summary.nodes) == ["a", "b", "c", "d", "e"]
    assert summary.run is not None and summary.run.input is None  # no input, no outputs
    assert not hasattr(summary, "outputs")

    empty = await store.load("never-ran")
    assert empty.run is None and not empty.nodes and not empty.outputs


@pytest.mark.parametrize("query", ["", "?commit=thread"])
async def test_a_put_is_committed_when_it_returns(tmp_path: Path, query: str) -> None:
    store = open_checkpoint_store(f"sqlite://{tmp_path}/checkpoints.db{query}")
    other = sqlite3.connect(tmp_path / "checkpoints.db")  # another process's view of the file
    try:
        for i in range(50):  # one at a time, as a chain of nodes puts them
            await store.put("e1", f"n{i}", {"i": i}, attempt=1, **WF)
            rows = other.execute("SELECT node_id FROM checkpoints WHERE node_id = ?", (f"n{i}",)).fetchall()
            assert rows == [(f"n{i}",)]
        assert store.commits == 50
    finally:
        other.close()
        store.close()


async def test_checkpoints_survive_reopening(open_store: Any) -> None:
    store = open_store()
    await store.put("e1", "a", {"v": 1}, attempt=1, **WF)
    store.close()
    assert (await open_store().load("e1")).outputs == {"a": {"v": 1}}


async def test_identical_outputs_are_stored_once(open_store: Any, store_url: str, database: str) -> None:
    store = open_store()
    same = {"report": "x" * 5000, "rows": list(range(100))}
    for execution in ("e1", "e2", "e3"):
        await asyncio.gather(*(store.put(execution, f"n{i}", same, attempt=1, **WF) for i in range(20)))
    await store.put("e1", "different", {"report": "y" * 5000}, attempt=1, **WF)
    await store.put("e1", "small", {"report": "z"}, attempt=1, **WF)  # kept in its row, not a blob

    for execution in ("e1", "e2", "e3"):
        assert (await store.load(execution)).outputs["n7"] == same
    assert (await store.load("e1")).outputs["small"] == {"report": "z"}
    if store_url.startswith("sqlite"):
        store.close()
        conn = sqlite3.connect(store_url.removeprefix("sqlite://").partition("?")[0])
        blobs = conn.execute("SELECT count(*) FROM checkpoint_blobs").fetchone()[0]
        conn.close()
    else:
        blobs = chdb_rows(store_url, f"SELECT count() FROM {database}.flowscope_checkpoint_blobs")[0][0]
    assert blobs == 2  # `same` once, the different large output once


async def test_an_output_over_the_bound_is_a_marker(open_store: Any, store_url: str, tmp_path: Path) -> None:
    store = open_store(max_output_bytes=1000)
    await store.put("e1", "big", "large-payload-" * 100, attempt=1, **WF)
    await store.put("e1", "small", "fits", attempt=1, **WF)

    checkpoint = await store.load("e1")

    big = checkpoint.nodes["big"]
    assert big.stored is Stored.TOO_LARGE and not big.reusable
    assert big.size == len(orjson.dumps("large-payload-" * 100))
    assert "1000" in big.reason
    assert "big" not in checkpoint.outputs and checkpoint.outputs == {"small": "fits"}
    if store_url.startswith("sqlite"):
        store.close()
        assert b"large-payload-" not in _bytes_under(tmp_path)
        assert b'"fits"' in _bytes_under(tmp_path)


def _bytes_under(path: Path) -> bytes:
    return b"".join(f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file())


async def test_secrets_are_never_written_in_clear(
    open_store: Any, store_url: str, tmp_path: Path, database: str
) -> None:
    store = open_store()
    key = "sk-live-4f9a8e7d6c5b"
    output = {"visible-marker": "kept", "auth": {"header": Secret(key)}, "list": [Secret(key)]}
    await store.put("e1", "login", output, attempt=1, **WF)
    await store.put_run("e1", "wf", "3", {"api_key": Secret(key), "q": "input-marker"})

    checkpoint = await store.load("e1")

    login = checkpoint.nodes["login"]
    assert login.stored is Stored.SECRET and not login.reusable  # resume runs it again
    assert "login" not in checkpoint.outputs
    assert checkpoint.redacted["login"] == {
        "visible-marker": "kept",
        "auth": {"header": "[REDACTED]"},
        "list": ["[REDACTED]"],
    }
    assert checkpoint.run is not None and checkpoint.run.input_stored is Stored.SECRET
    assert checkpoint.run.input == {"api_key": "[REDACTED]", "q": "input-marker"}
    if store_url.startswith("sqlite"):
        store.close()
        stored = _bytes_under(tmp_path)  # the database, its WAL and shared memory
        assert b"visible-marker" in stored and b"input-marker" in stored  # the grep finds what is there
    else:  # ClickHouse compresses its parts: ask it for every stored value instead
        rows = chdb_rows(
            store_url,
            f"SELECT toString(tuple(*)) FROM {database}.flowscope_checkpoint_blobs UNION ALL "
            f"SELECT toString(tuple(*)) FROM {database}.flowscope_checkpoints UNION ALL "
            f"SELECT toString(tuple(*)) FROM {database}.flowscope_checkpoint_runs",
        )
        stored = "\n".join(r[0] for r in rows).encode()
        assert b"visible-marker" in stored and b"input-marker" in stored
    assert key.encode() not in stored


async def test_values_that_would_not_come_back_equal_are_markers(open_store: Any) -> None:
    store = open_store()
    await store.put("e1", "when", {"at": datetime.datetime(2026, 1, 1)}, attempt=1, **WF)
    await store.put("e1", "keys", {1: "int key"}, attempt=1, **WF)
    await store.put("e1", "obj", object(), attempt=1, **WF)

    checkpoint = await store.load("e1")

    assert {n: c.stored for n, c in checkpoint.nodes.items()} == dict.fromkeys(
        ["when", "keys", "obj"], Stored.UNSERIALISABLE
    )
    assert "datetime.datetime" in checkpoint.nodes["when"].reason
    assert "builtins.object" in checkpoint.nodes["obj"].reason
    assert not checkpoint.outputs


async def test_group_commit_of_a_thousand_concurrent_puts(open_store: Any) -> None:
    store = open_store()
    await asyncio.gather(*(store.put("e1", f"n{i}", {"i": i}, attempt=1, **WF) for i in range(1000)))

    checkpoint = await store.load("e1")

    assert checkpoint.outputs == {f"n{i}": {"i": i} for i in range(1000)}
    # Every put was acknowledged after a commit, and commits covered many puts each.
    assert store.rows == 1000
    assert store.commits < 100, store.commits


async def test_a_busy_database_hands_the_loops_commit_to_the_thread(tmp_path: Path) -> None:
    store = open_checkpoint_store(f"sqlite://{tmp_path}/checkpoints.db")
    other = sqlite3.connect(tmp_path / "checkpoints.db", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another engine on the same file, mid-transaction
        put = asyncio.create_task(store.put("e1", "a", {"v": 1}, attempt=1, **WF))
        await asyncio.sleep(0)  # the put gathers its row and schedules the loop's commit
        await asyncio.sleep(0)  # which finds the database busy
        assert store.handed_over == 1
        assert not put.done()  # the thread waits for the lock; nothing acknowledged meanwhile
        other.execute("COMMIT")
        await asyncio.wait_for(put, 30)
        assert (await store.load("e1")).outputs == {"a": {"v": 1}}
    finally:
        other.close()
        store.close()


async def test_the_log_stays_bounded_when_commits_run_on_the_loop(tmp_path: Path) -> None:
    store = open_checkpoint_store(f"sqlite://{tmp_path}/checkpoints.db")
    try:
        for i in range(4000):  # one commit each, ≈ 8 KiB of log each: 32 MiB if nothing reset the log
            await store.put("e1", f"n{i}", {"i": i, "text": "x" * 100}, attempt=1, **WF)
        assert len((await store.load("e1")).outputs) == 4000
        # Housekeeping truncates the log to journal_size_limit (16 MiB): at most that, never the 32 MiB.
        assert (tmp_path / "checkpoints.db-wal").stat().st_size <= 16 * 1024 * 1024
    finally:
        store.close()


@pytest.mark.parametrize("query", ["", "?commit=thread"])
async def test_a_refused_commit_fails_its_puts_and_the_store_goes_on(tmp_path: Path, query: str) -> None:
    store = open_checkpoint_store(f"sqlite://{tmp_path}/checkpoints.db{query}")
    admin = sqlite3.connect(tmp_path / "checkpoints.db", isolation_level=None)
    try:
        admin.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON checkpoints WHEN NEW.node_id = 'bad'"
            " BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
        )
        with pytest.raises(CheckpointError, match="refused by the test"):
            await store.put("e1", "bad", 1, attempt=1, **WF)
        await store.put("e1", "good", 2, attempt=1, **WF)
        assert (await store.load("e1")).outputs == {"good": 2}
    finally:
        admin.close()
        store.close()


async def test_a_closed_store_refuses_puts(open_store: Any) -> None:
    store = open_store()
    store.close()
    store.close()  # idempotent
    with pytest.raises(CheckpointError, match="closed"):
        await store.put("e1", "a", 1, attempt=1, **WF)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "empty"),
        ("ftp://host/x", "unsupported checkpoint store URL scheme 'ftp'"),
        ("/just/a/path.db", "unsupported checkpoint store URL scheme ''"),
        ("sqlite://", "needs a file path"),
        ("sqlite:///tmp/x.db?synchronous=sometimes", "synchronous='sometimes'"),
        ("sqlite:///tmp/x.db?journal=delete", "unknown sqlite checkpoint option"),
        ("sqlite:///tmp/x.db?commit=later", "commit='later'"),
        ("clickhouse://", "needs a host"),
        ("chdb://", "needs a data directory"),
    ],
)
def test_a_bad_url_is_a_clear_value_error(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("?", r"\?")):
        open_checkpoint_store(url)


def test_a_directory_is_not_a_database(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="names a directory"):
        open_checkpoint_store(f"sqlite://{tmp_path}")


# --- acknowledged = stored, through kill -9 ---------------------------------------------------

WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from flowscope.engine.checkpoints import open_checkpoint_store

    async def main(url):
        store = open_checkpoint_store(url, database="killed")
        async def one(i):
            output = {"i": i, "pad": "p" * 200}
            await store.put("run", f"n{i}", output, workflow_id="wf", workflow_version="1", attempt=1)
            sys.stdout.write(f"n{i}\\n")
            sys.stdout.flush()
        i = 0
        while True:  # until killed: a put alone (a chain's), then 16 at once (a group commit)
            await one(i)
            await asyncio.gather(*(one(i + 1 + k) for k in range(16)))
            i += 17

    asyncio.run(main(sys.argv[1]))
    """
)

READER = textwrap.dedent(
    """
    import asyncio, json, sys
    from flowscope.engine.checkpoints import open_checkpoint_store

    async def main(url):
        store = open_checkpoint_store(url, database="killed")
        checkpoint = await store.load("run")
        store.close()
        print(json.dumps({n: v for n, v in checkpoint.outputs.items()}))

    asyncio.run(main(sys.argv[1]))
    """
)


def _env() -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWSCOPE_", "OTEL_"))}
    return {**base, "PYTHONPATH": str(ROOT)}


def _acknowledged_then_killed(url: str, wanted: int) -> list[str]:
    """Run the writer until it acknowledged `wanted` puts, SIGKILL it, return every id it printed."""
    with subprocess.Popen(
        [sys.executable, "-c", WRITER, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), text=True
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        acknowledged: list[str] = []
        try:
            for line in proc.stdout:  # bounded by the test's timeout; an early exit ends the stream
                acknowledged.append(line.strip())
                if len(acknowledged) >= wanted:
                    break
            proc.send_signal(signal.SIGKILL)
            acknowledged.extend(line.strip() for line in proc.stdout)  # printed before it died
        finally:
            proc.kill()
            proc.wait()
        errors = proc.stderr.read()
    assert proc.returncode == -signal.SIGKILL, errors
    assert len(acknowledged) >= wanted, errors
    return acknowledged


def _stored_after_restart(url: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", READER, url], capture_output=True, env=_env(), text=True, timeout=100, check=False
    )
    assert out.returncode == 0, out.stderr
    stored: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return stored


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "sqlite-thread", "chdb"])
def test_every_acknowledged_checkpoint_survives_kill_9(kind: str, tmp_path: Path) -> None:
    url = {
        "sqlite": f"sqlite://{tmp_path}/checkpoints.db",
        "sqlite-thread": f"sqlite://{tmp_path}/checkpoints.db?commit=thread",
        "chdb": f"chdb://{tmp_path}/chdb",
    }[kind]
    acknowledged = _acknowledged_then_killed(url, 200 if kind == "chdb" else 2000)

    stored = _stored_after_restart(url)

    missing = [node for node in acknowledged if node not in stored]
    assert not missing, f"{len(missing)} acknowledged checkpoints lost, e.g. {missing[:5]}"
    assert all(stored[node]["i"] == int(node[1:]) for node in acknowledged)


async def test_a_sqlite_store_is_private_to_its_owner(tmp_path: Path) -> None:
    # Outputs are stored in clear: only the engine's user may read the directory and the files.
    store = open_checkpoint_store(f"sqlite:///{tmp_path}/private/deeper/checkpoints.db")
    try:
        await store.put("e1", "n", {"rows": 3}, workflow_id="wf", workflow_version="1", attempt=1)
        folder = tmp_path / "private" / "deeper"
        assert oct(folder.stat().st_mode & 0o777) == oct(0o700)
        files = {f.name: oct(f.stat().st_mode & 0o777) for f in folder.iterdir()}
        assert files == {name: oct(0o600) for name in ("checkpoints.db", "checkpoints.db-wal", "checkpoints.db-shm")}
    finally:
        store.close()


async def test_a_reader_opens_the_store_read_only_and_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "checkpoints.db"
    with pytest.raises(FileNotFoundError, match="no checkpoint store file"):
        open_checkpoint_store(f"sqlite:///{missing}", read_only=True)
    assert not missing.parent.exists()
    writer = open_checkpoint_store(f"sqlite:///{tmp_path}/c.db")
    reader = open_checkpoint_store(f"sqlite:///{tmp_path}/c.db", read_only=True)
    try:
        await writer.put("e1", "n", "out", workflow_id="wf", workflow_version="1", attempt=1)
        assert dict((await reader.load("e1")).outputs) == {"n": "out"}
    finally:
        reader.close()
        writer.close()


def test_an_unusable_store_url_is_named_without_its_password() -> None:
    with pytest.raises(ValueError, match="unsupported checkpoint store URL scheme") as refused:
        open_checkpoint_store("postgres://admin:hunter2pw@127.0.0.1/x")
    assert "hunter2pw" not in str(refused.value) and "admin:***@" in str(refused.value)
