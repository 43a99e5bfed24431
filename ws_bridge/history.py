"""History queries over the workflow tables: parameterised SQL only.

The bridge's read model: its REST API and live replay, and the CLI, read through this layer.
User SQL is confined by ClickHouse's own parser (collector/sql_guard.py) and its settings.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from clickhouse_connect.driver.client import Client

from flowscope.collector import sql_guard
from flowscope.contract import NOT_FAILED_RUN_STATUSES, STORED_RUN_STATUSES, Result, RunStatus
from flowscope.ws_bridge.shapes import (
    event_row,
    execution_from_events,
    execution_row,
    finite,
    fold_nodes,
    iso,
    jsonable,
    owned_by,
)
from flowscope.ws_bridge.types import LiveEvent

logger = logging.getLogger(__name__)

_DEFAULT_PAGE = 50
_MAX_PAGE = 500
_MAX_EVENTS = 10_000
SORTS = {
    "-startTime": "StartTime DESC, ExecutionId DESC",
    "startTime": "StartTime ASC, ExecutionId ASC",
}
STATUSES = STORED_RUN_STATUSES
# The aggregates' conditions, their literals from the contract: a run succeeded, is running,
# or failed (neither); a node attempt succeeded.
_SUCCEEDED = f"Status = '{RunStatus.SUCCESS}'"
_RUNNING = f"Status = '{RunStatus.RUNNING}'"
_FAILED = f"Status NOT IN ({', '.join(sorted(repr(str(s)) for s in NOT_FAILED_RUN_STATUSES))})"
_NODE_SUCCEEDED = f"n.Status = '{Result.SUCCESS}'"


class HistoryError(ValueError):
    """A bad request to the history layer (unknown sort, bad cursor, bad bucket…)."""


class HistoryUnavailable(RuntimeError):
    """ClickHouse cannot be reached now: the caller may retry (HTTP 503)."""


class SqlError(ValueError):
    """ClickHouse refused a user query; the message says why."""


@dataclass(frozen=True)
class Scope:
    """What a restricted reader may see: executions of these workflows, of these users, and
    these executions — any of them."""

    workflows: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    executions: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExecutionQuery:
    workflow_id: str | None = None
    status: str | None = None
    user_id: str | None = None
    trigger: str | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    sort: str = "-startTime"
    limit: int = _DEFAULT_PAGE
    cursor: str | None = None
    scope: Scope | None = None


@dataclass(frozen=True)
class SqlLimits:
    """What one user query may take: ClickHouse refuses the query past any of these."""

    max_rows: int = 10_000
    max_bytes: int = 64 * 1024 * 1024
    timeout_s: float = 10.0
    # Memory of the whole query (max_memory_usage), not only of its result.
    max_memory_bytes: int = 512 * 1024 * 1024

    def settings(self) -> dict[str, Any]:
        # Order matters: the limits are set before readonly=1 forbids changing settings.
        return {
            "max_execution_time": self.timeout_s,
            "max_result_rows": self.max_rows,
            "max_result_bytes": self.max_bytes,
            "result_overflow_mode": "throw",
            "max_memory_usage": self.max_memory_bytes,
            "readonly": 1,
        }


_EXECUTION_COLUMNS = (
    "ExecutionId, WorkflowId, WorkflowName, WorkflowVersion, Status, TriggerType, UserId, StartTime, EndTime,"
    " DurationMs, TotalNodes, CompletedNodes, FailedNodes, SkippedNodes, Error, TraceId, SpanId, ServiceName,"
    " ResumedFrom, ParentExecutionId"
)


# workflow_executions with each execution's owner (workflow, user) as its first stored record
# named it (collector/schema.py, execution_owners): who may read an execution never follows a
# later record. `{only}` narrows both sides to one execution when the caller looks one up.
_OWNED = (
    "(SELECT e.* REPLACE (if(o.ExecutionId = '', e.WorkflowId, o.OwnerWorkflowId) AS WorkflowId,"
    " if(o.ExecutionId = '', e.UserId, o.OwnerUserId) AS UserId)"
    " FROM {{db}}.workflow_executions AS e FINAL"
    " LEFT JOIN (SELECT ExecutionId, min(Owner).WorkflowId AS OwnerWorkflowId, min(Owner).UserId AS OwnerUserId"
    " FROM {{db}}.execution_owners {only} GROUP BY ExecutionId) AS o ON e.ExecutionId = o.ExecutionId {e_only})"
)
OWNED_EXECUTIONS = _OWNED.format(only="", e_only="")
_OWNED_EXECUTION = _OWNED.format(only="WHERE ExecutionId = {id:String}", e_only="WHERE e.ExecutionId = {id:String}")


class History:
    """Queries on one database. Clients are per thread: one ClickHouse session is not shared."""

    def __init__(
        self,
        client_factory: Callable[[], Client],
        database: str,
        sql_limits: SqlLimits | None = None,
        background: Mapping[str, Any] | None = None,
        sql_client_factory: Callable[[], Client] | None = None,
    ) -> None:
        self._factory = client_factory
        # User SQL may connect as another, read-only ClickHouse user (FLOWSCOPE_SQL_DSN).
        self._sql_factory = sql_client_factory or client_factory
        # Settings for lookups no request waits on (collector/store.py background_settings).
        self._background = dict(background or {})
        self.database = database
        self.sql_limits = sql_limits or SqlLimits()
        self._local = threading.local()

    def _client(self) -> Client:
        client: Client | None = getattr(self._local, "history", None)
        if client is None:
            client = self._factory()
            self._local.history = client
        return client

    def _rows(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        return self._rows_with(sql, params, None)

    def _rows_with(self, sql: str, params: dict[str, Any], settings: dict[str, Any] | None) -> list[dict[str, Any]]:
        result = self._client().query(sql.replace("{db}", self.database), parameters=params, settings=settings)
        return [dict(zip(result.column_names, row, strict=True)) for row in result.result_rows]

    # -- executions ------------------------------------------------------------------------

    def list_executions(self, q: ExecutionQuery) -> tuple[list[dict[str, Any]], str | None]:
        if q.sort not in SORTS:
            raise HistoryError(f"unknown sort {q.sort!r}: use one of {', '.join(SORTS)}")
        if q.status is not None and q.status not in STATUSES:
            raise HistoryError(f"unknown status {q.status!r}: use one of {', '.join(sorted(STATUSES))}")
        limit = max(1, min(q.limit, _MAX_PAGE))
        where: list[str] = ["1"]
        params: dict[str, Any] = {}
        for column, value, name in (
            ("WorkflowId", q.workflow_id, "workflow"),
            ("Status", q.status, "status"),
            ("UserId", q.user_id, "user"),
            ("TriggerType", q.trigger, "trigger"),
        ):
            if value is not None:
                where.append(f"{column} = {{{name}:String}}")
                params[name] = value
        if q.scope is not None:
            where.append(
                "(WorkflowId IN {scope_workflows:Array(String)} OR UserId IN {scope_users:Array(String)}"
                " OR ExecutionId IN {scope_executions:Array(String)})"
            )
            params.update(
                scope_workflows=list(q.scope.workflows),
                scope_users=list(q.scope.users),
                scope_executions=list(q.scope.executions),
            )
        if q.since is not None:
            where.append("StartTime >= {since:DateTime64(9)}")
            params["since"] = q.since
        if q.until is not None:
            where.append("StartTime < {until:DateTime64(9)}")
            params["until"] = q.until
        if q.cursor:
            start_ns, execution_id = _decode_cursor(q.cursor)
            op = "<" if q.sort.startswith("-") else ">"
            where.append(
                f"(toUnixTimestamp64Nano(StartTime), ExecutionId) {op} ({{cursor_ts:Int64}}, {{cursor_id:String}})"
            )
            params["cursor_ts"] = start_ns
            params["cursor_id"] = execution_id
        rows = self._rows(
            f"SELECT {_EXECUTION_COLUMNS}, toUnixTimestamp64Nano(StartTime) AS _start_ns"
            f" FROM {OWNED_EXECUTIONS} WHERE {' AND '.join(where)}"
            f" ORDER BY {SORTS[q.sort]} LIMIT {limit + 1}",
            **params,
        )
        next_cursor = None
        if len(rows) > limit:
            rows = rows[:limit]
            next_cursor = _encode_cursor(rows[-1]["_start_ns"], rows[-1]["ExecutionId"])
        return [execution_row(r) for r in rows], next_cursor

    def get_execution(self, execution_id: str) -> dict[str, Any] | None:
        rows = self._rows(f"SELECT {_EXECUTION_COLUMNS} FROM {_OWNED_EXECUTION}", id=execution_id)
        owner = (rows[0]["WorkflowId"], rows[0]["UserId"]) if rows else self.owner(execution_id)
        events = self._owned_events(execution_id, owner, 1, None, _MAX_EVENTS)
        if not rows and not events:
            return None
        execution = execution_row(rows[0]) if rows else execution_from_events(execution_id, events, owner)
        attempts = self._rows(
            "SELECT NodeId, Attempt, NodeType, Status, StartTime, EndTime, DurationMs, ErrorType, Error, Model,"
            " InputTokens, OutputTokens, SpanId FROM {db}.node_executions FINAL"
            " WHERE ExecutionId = {id:String} ORDER BY NodeId, Attempt",
            id=execution_id,
        )
        execution["nodes"] = fold_nodes(events, attempts)
        execution["eventCount"] = len(events)
        execution["lastSeq"] = events[-1]["seq"] if events else 0
        return execution

    def last_seq(self, execution_id: str) -> int:
        """The highest seq stored of an execution (0: none): where events added to it after its
        end — a rollback's — number on."""
        rows = self._rows(
            "SELECT max(Seq) AS seq FROM {db}.workflow_events WHERE ExecutionId = {id:String}", id=execution_id
        )
        return int(rows[0]["seq"]) if rows else 0

    def started_run(self, execution_id: str) -> dict[str, Any] | None:
        """An execution's stored row as its engine wrote it (not its owner's view of it), with
        its start in nanoseconds: what a workflow.lost record repeats (ws_bridge/control_events.py)."""
        rows = self._rows_with(
            f"SELECT {_EXECUTION_COLUMNS}, toUnixTimestamp64Nano(StartTime) AS StartTimeUnixNano"
            " FROM {db}.workflow_executions FINAL WHERE ExecutionId = {id:String}",
            {"id": execution_id},
            self._background,
        )
        return rows[0] if rows else None

    def owner(self, execution_id: str) -> tuple[str, str] | None:
        """(workflow id, user id or '') of an execution, as its first stored record named them."""
        rows = self._rows(
            "SELECT min(Owner).WorkflowId AS workflow, min(Owner).UserId AS user FROM {db}.execution_owners"
            " WHERE ExecutionId = {id:String} GROUP BY ExecutionId",
            id=execution_id,
        )
        return (rows[0]["workflow"], rows[0]["user"]) if rows else None

    def owners_of(self, execution_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        """`owner` of several executions in one query; an execution not stored is absent."""
        if not execution_ids:
            return {}
        rows = self._rows(
            "SELECT ExecutionId AS id, min(Owner).WorkflowId AS workflow, min(Owner).UserId AS user"
            " FROM {db}.execution_owners WHERE ExecutionId IN {ids:Array(String)} GROUP BY ExecutionId",
            ids=list(execution_ids),
        )
        return {r["id"]: (r["workflow"], r["user"]) for r in rows}

    def events(
        self, execution_id: str, from_seq: int = 1, to_seq: int | None = None, limit: int = _MAX_EVENTS
    ) -> list[LiveEvent]:
        """Events of one execution by seq, deduplicated (delivery is at least once), without those
        that claim another owner than the execution's (`owner`): they are not its events."""
        return self._owned_events(execution_id, self.owner(execution_id), from_seq, to_seq, limit)

    def _owned_events(
        self, execution_id: str, owner: tuple[str, str] | None, from_seq: int, to_seq: int | None, limit: int
    ) -> list[LiveEvent]:
        events = self._events(execution_id, from_seq, to_seq, limit)
        return events if owner is None else [e for e in events if owned_by(e, owner)]

    def _events(self, execution_id: str, from_seq: int, to_seq: int | None, limit: int) -> list[LiveEvent]:
        upper = "AND Seq <= {to:UInt64}" if to_seq is not None else ""
        rows = self._rows(
            "SELECT Seq, EventName, Timestamp, ExecutionId, WorkflowId, WorkflowName, NodeId, NodeType, TraceId,"
            " SpanId, Data FROM {db}.workflow_events FINAL"
            f" WHERE ExecutionId = {{id:String}} AND Seq >= {{from:UInt64}} {upper}"
            f" ORDER BY Seq LIMIT 1 BY Seq LIMIT {max(1, min(limit, _MAX_EVENTS))}",
            id=execution_id,
            to=to_seq or 0,
            **{"from": max(1, from_seq)},
        )
        return [event_row(r) for r in rows]

    def events_since(
        self,
        since: dt.datetime,
        *,
        workflow_id: str | None = None,
        user_id: str | None = None,
        types: Collection[str] | None = None,
        limit: int = _MAX_EVENTS,
    ) -> list[LiveEvent]:
        """Events since a time, for room replay: of one workflow's executions, one user's, or
        (neither given) every execution's; `types` narrows them to those event names."""
        scopes = ["Timestamp >= {since:DateTime64(9)}"]
        if workflow_id is not None:
            scopes.append("WorkflowId = {workflow:String}")
        if user_id is not None:
            scopes.append(
                "ExecutionId IN (SELECT ExecutionId FROM {db}.execution_owners GROUP BY ExecutionId"
                " HAVING min(Owner).UserId = {user:String})"
            )
        if types is not None:
            scopes.append("EventName IN {types:Array(String)}")
        rows = self._rows(
            "SELECT Seq, EventName, Timestamp, ExecutionId, WorkflowId, WorkflowName, NodeId, NodeType, TraceId,"
            f" SpanId, Data FROM {{db}}.workflow_events FINAL WHERE {' AND '.join(scopes)}"
            " ORDER BY Timestamp, ExecutionId, Seq LIMIT 1 BY ExecutionId, Seq"
            f" LIMIT {max(1, min(limit, _MAX_EVENTS))}",
            workflow=workflow_id or "",
            user=user_id or "",
            types=sorted(types or ()),
            since=since,
        )
        return [event_row(r) for r in rows]

    # -- aggregates ----------------------------------------------------------------------------

    def workflows(self) -> list[dict[str, Any]]:
        rows = self._rows(
            f"SELECT WorkflowId, any(WorkflowName) AS name, count() AS runs, countIf({_SUCCEEDED}) AS succeeded,"
            f" countIf({_FAILED}) AS failed, countIf({_RUNNING}) AS running,"
            f" max(StartTime) AS lastRun, quantileIf(0.5)(DurationMs, {_SUCCEEDED}) AS p50,"
            f" quantileIf(0.95)(DurationMs, {_SUCCEEDED}) AS p95"
            f" FROM {OWNED_EXECUTIONS} GROUP BY WorkflowId ORDER BY lastRun DESC"
        )
        return [
            {
                "workflowId": r["WorkflowId"],
                "name": r["name"],
                "runs": r["runs"],
                "succeeded": r["succeeded"],
                "failed": r["failed"],
                "running": r["running"],
                "lastRun": iso(r["lastRun"]),
                "p50DurationMs": finite(r["p50"]),
                "p95DurationMs": finite(r["p95"]),
            }
            for r in rows
        ]

    def stats(self, since: dt.datetime, until: dt.datetime, bucket_s: int) -> dict[str, Any]:
        if bucket_s < 1 or bucket_s > 86_400 * 31:
            raise HistoryError("bucket must be between 1 second and 31 days")
        window = "StartTime >= {since:DateTime64(9)} AND StartTime < {until:DateTime64(9)}"
        by_status = self._rows(
            f"SELECT Status, count() AS runs FROM {{db}}.workflow_executions FINAL WHERE {window}"
            " GROUP BY Status ORDER BY runs DESC",
            since=since,
            until=until,
        )
        by_workflow = self._rows(
            f"SELECT WorkflowId, count() AS runs, countIf({_FAILED}) AS failed,"
            f" quantileIf(0.95)(DurationMs, {_SUCCEEDED}) AS p95"
            f" FROM {{db}}.workflow_executions FINAL WHERE {window} GROUP BY WorkflowId ORDER BY runs DESC",
            since=since,
            until=until,
        )
        by_time = self._rows(
            "SELECT toStartOfInterval(StartTime, toIntervalSecond({bucket:UInt32})) AS bucket, count() AS runs,"
            f" countIf({_FAILED}) AS failed"
            f" FROM {{db}}.workflow_executions FINAL WHERE {window} GROUP BY bucket ORDER BY bucket",
            since=since,
            until=until,
            bucket=bucket_s,
        )
        return {
            "byStatus": {r["Status"]: r["runs"] for r in by_status},
            "byWorkflow": [
                {
                    "workflowId": r["WorkflowId"],
                    "runs": r["runs"],
                    "failed": r["failed"],
                    "p95DurationMs": finite(r["p95"]),
                }
                for r in by_workflow
            ],
            "byTime": [{"bucket": iso(r["bucket"]), "runs": r["runs"], "failed": r["failed"]} for r in by_time],
        }

    def node_duration_medians(self, workflow_id: str, runs: int = 50) -> dict[str, float]:
        """Median duration per node over recent successful runs: the basis of ETA estimates."""
        return self.node_duration_medians_of([workflow_id], runs).get(workflow_id, {})

    def node_duration_medians_of(self, workflow_ids: Sequence[str], runs: int = 50) -> dict[str, dict[str, float]]:
        """`node_duration_medians` for several workflows in one query; a workflow without
        successful runs is absent."""
        if not workflow_ids:
            return {}
        rows = self._rows_with(
            "WITH recent AS (SELECT ExecutionId, WorkflowId FROM {db}.workflow_executions FINAL"
            f" WHERE WorkflowId IN {{workflows:Array(String)}} AND {_SUCCEEDED}"
            " ORDER BY StartTime DESC LIMIT {runs:UInt32} BY WorkflowId)"
            " SELECT r.WorkflowId AS WorkflowId, n.NodeId AS NodeId, quantile(0.5)(n.DurationMs) AS median"
            " FROM {db}.node_executions AS n FINAL INNER JOIN recent AS r ON n.ExecutionId = r.ExecutionId"
            # The IN repeats the join so the primary key (ExecutionId first) narrows the read.
            f" WHERE {_NODE_SUCCEEDED} AND n.ExecutionId IN (SELECT ExecutionId FROM recent)"
            " GROUP BY WorkflowId, NodeId",
            {"workflows": list(workflow_ids), "runs": runs},
            self._background,
        )
        medians: dict[str, dict[str, float]] = {}
        for r in rows:
            medians.setdefault(r["WorkflowId"], {})[r["NodeId"]] = float(r["median"])
        return medians

    # -- user SQL ----------------------------------------------------------------------------

    def sql(self, query: str) -> dict[str, Any]:
        """Run one reading statement with the configured database as the default.

        ClickHouse's parser decides what the statement is (collector/sql_guard.py); the
        statement that runs is the parser's canonical text of it, under readonly=1 and the
        limits — or, when the session is read-only already (a server user's settings
        profile), under that profile's limits, which forbid any change."""
        try:
            client = self._sql_client()
        except Exception as exc:
            raise HistoryUnavailable(f"the SQL store cannot be reached: {_clickhouse_message(exc)}") from exc
        try:
            checked = sql_guard.check(client, query)
            settings = None if checked.readonly_session else self.sql_limits.settings()
            result = client.query(checked.statement, settings=settings)
        except sql_guard.Refused as exc:
            raise SqlError(str(exc)) from exc
        except Exception as exc:
            # A statement that failed part-way can leave output behind in the session, which
            # would be read as the start of the next statement's answer: start a fresh one.
            self._drop_sql_client()
            raise SqlError(_clickhouse_message(exc)) from exc
        return {
            "columns": list(result.column_names),
            "types": [t.name for t in result.column_types],
            "rows": [[jsonable(v) for v in row] for row in result.result_rows],
        }

    def _drop_sql_client(self) -> None:
        client: Client | None = getattr(self._local, "sql", None)
        self._local.sql = None
        if client is not None:
            try:
                client.close()
            except Exception:
                logger.debug("closing a failed SQL session failed", exc_info=True)

    def _sql_client(self) -> Client:
        # Its own session per thread: user settings never leak into the history queries.
        client: Client | None = getattr(self._local, "sql", None)
        if client is None:
            client = self._sql_factory()
            client.database = self.database
            self._local.sql = client
        return client


def _clickhouse_message(exc: Exception) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        if "DB::Exception" in line or "Code:" in line:
            message = line.split("DB::Exception: ")[-1].strip()
            # "In scope <query with our settings clause>" repeats the query, not the reason.
            return message.split(": In scope ", 1)[0].split(". In scope ", 1)[0].strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _encode_cursor(start_ns: int, execution_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([start_ns, execution_id]).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[int, str]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        start_ns, execution_id = json.loads(base64.urlsafe_b64decode(padded))
    except (ValueError, TypeError, RecursionError) as exc:
        raise HistoryError("invalid cursor") from exc
    # Only what _encode_cursor writes: an Int64 of nanoseconds (not Infinity, 1e300 or true) and an id.
    if type(start_ns) is not int or not -(2**63) <= start_ns < 2**63 or not isinstance(execution_id, str):
        raise HistoryError("invalid cursor")
    return start_ns, execution_id
