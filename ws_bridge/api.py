"""The history REST API: executions, events, workflows, stats and read-only SQL; and the
contract's names as the live page reads them (`/static/contract.js`)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from clickhouse_connect.driver.exceptions import OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.schemas import SchemaGenerator

from flowscope.collector.store import StoreError
from flowscope.contract.page import page_constants
from flowscope.ws_bridge.auth import Authenticator, AuthError, Principal
from flowscope.ws_bridge.events import user_of_events
from flowscope.ws_bridge.history import ExecutionQuery, History, HistoryError, HistoryUnavailable, Scope, SqlError

SCHEMAS = SchemaGenerator(
    {
        "openapi": "3.0.3",
        "info": {"title": "flowscope history API", "version": "1"},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }
)


@dataclass(frozen=True)
class Links:
    jaeger_url: str | None = "http://localhost:16686"
    grafana_url: str | None = "http://localhost:3000"

    def for_execution(self, execution: dict[str, Any]) -> dict[str, str]:
        links = {}
        trace_id = execution.get("traceId")
        if trace_id and self.jaeger_url:
            links["jaeger"] = f"{self.jaeger_url.rstrip('/')}/trace/{trace_id}"
        if trace_id and self.grafana_url:
            links["grafana"] = (
                f"{self.grafana_url.rstrip('/')}/d/flowscope-explorer/execution-explorer"
                f"?var-execution={execution['executionId']}&var-trace={trace_id}"
            )
        return links


class BadRequest(ValueError):
    pass


class UnsupportedMediaType(ValueError):
    """A body that is not JSON where JSON is read: refused before it is read.

    A web page may POST `text/plain` (or a body with no type) to any address without a CORS
    preflight; with auth off (the loopback default) only the content type tells such a
    request from the API's own clients."""


# The history compares timestamps as DateTime64(9), which holds these instants only.
EARLIEST = dt.datetime(1900, 1, 1, tzinfo=dt.UTC)
LATEST = dt.datetime(2262, 4, 11, tzinfo=dt.UTC)


Handler = Callable[[Request, Principal], Awaitable[Response]]


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def api_routes(history: History | None, auth: Authenticator, links: Links) -> list[Route]:
    def guarded(handler: Handler, needs_history: bool = True) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                principal = auth.authenticate(request.headers.get("authorization"), request.query_params.get("token"))
            except AuthError as exc:
                return JSONResponse({"error": str(exc)}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
            if needs_history and history is None:
                return _error(503, "history is not available: no ClickHouse store is configured")
            try:
                if request.method == "POST":
                    _require_json(request)
                return await handler(request, principal)
            except UnsupportedMediaType as exc:
                return _error(415, str(exc))
            except (BadRequest, HistoryError) as exc:
                return _error(400, str(exc))
            except (HistoryUnavailable, OperationalError, StoreError) as exc:
                # The store is down or unreachable: retryable, and not the caller's fault.
                return JSONResponse(
                    {"error": f"history is unavailable: {exc}"}, status_code=503, headers={"Retry-After": "5"}
                )

        endpoint.__doc__ = handler.__doc__
        return endpoint

    def assert_history() -> History:
        # Handlers run only behind `guarded`, which answers 503 when there is no history.
        assert history is not None
        return history

    async def list_executions(request: Request, principal: Principal) -> Response:
        """
        summary: List executions, newest first, with filters and cursor pagination
        parameters:
          - {name: workflow, in: query, schema: {type: string}}
          - name: status
            in: query
            schema: {type: string, enum: [running, success, failure, error, timeout, cancellation, lost]}
          - {name: user, in: query, schema: {type: string}}
          - {name: trigger, in: query, schema: {type: string}}
          - {name: since, in: query, schema: {type: string, format: date-time}}
          - {name: until, in: query, schema: {type: string, format: date-time}}
          - {name: sort, in: query, schema: {type: string, enum: ["-startTime", "startTime"]}}
          - {name: limit, in: query, schema: {type: integer, minimum: 1, maximum: 500}}
          - {name: cursor, in: query, schema: {type: string}}
        responses:
          200: {description: "{items: [...], nextCursor}"}
          400: {description: bad parameter}
        """
        q = request.query_params
        query = ExecutionQuery(
            workflow_id=q.get("workflow"),
            status=q.get("status"),
            user_id=q.get("user"),
            trigger=q.get("trigger"),
            since=_time(q.get("since"), "since"),
            until=_time(q.get("until"), "until"),
            sort=q.get("sort", "-startTime"),
            limit=_int(q.get("limit"), "limit", 50, 1, 500),
            cursor=q.get("cursor"),
        )
        query = _restrict(query, principal)
        items, cursor = await run_in_threadpool(assert_history().list_executions, query)
        for item in items:
            item["links"] = links.for_execution(item)
        return JSONResponse({"items": items, "nextCursor": cursor})

    async def get_execution(request: Request, principal: Principal) -> Response:
        """
        summary: One execution with its nodes (state, attempts, durations, errors) and trace links
        responses:
          200: {description: the execution}
          404: {description: unknown execution}
        """
        execution_id = request.path_params["execution_id"]
        execution = await run_in_threadpool(assert_history().get_execution, execution_id)
        if execution is None or not _visible(principal, execution):
            return _error(404, f"no execution {execution_id!r}")
        execution["links"] = links.for_execution(execution)
        return JSONResponse(execution)

    async def execution_events(request: Request, principal: Principal) -> Response:
        """
        summary: Events of one execution by seq (the same events the live stream carries)
        parameters:
          - {name: fromSeq, in: query, schema: {type: integer, minimum: 1}}
          - {name: toSeq, in: query, schema: {type: integer, minimum: 1}}
          - {name: limit, in: query, schema: {type: integer, minimum: 1, maximum: 10000}}
        responses:
          200: {description: "{items: [...]}"}
          404: {description: unknown execution}
        """
        execution_id = request.path_params["execution_id"]
        q = request.query_params
        from_seq = _int(q.get("fromSeq"), "fromSeq", 1, 1, 2**62)
        to_seq = _int(q.get("toSeq"), "toSeq", 0, 1, 2**62) if q.get("toSeq") else None
        limit = _int(q.get("limit"), "limit", 10_000, 1, 10_000)
        events = await run_in_threadpool(assert_history().events, execution_id, from_seq, to_seq, limit)
        # Who may read is decided by the execution's first stored record, not by whichever
        # events this page holds: a later forged workflow.started changes nothing.
        owner = await run_in_threadpool(assert_history().owner, execution_id)
        if owner is not None:
            claimed = {"workflowId": owner[0], "executionId": execution_id}
            if not principal.may_see(claimed, owner[1] or None):
                return _error(404, f"no execution {execution_id!r}")
        elif not events:
            exists = await run_in_threadpool(assert_history().get_execution, execution_id)
            if exists is None:
                return _error(404, f"no execution {execution_id!r}")
        elif not principal.may_see(events[0], user_of_events(events)):
            return _error(404, f"no execution {execution_id!r}")
        return JSONResponse({"items": events})

    async def workflows(request: Request, principal: Principal) -> Response:
        """
        summary: Workflows seen, with run counts, failures and duration percentiles
        responses:
          200: {description: "{items: [...]}"}
        """
        items = await run_in_threadpool(assert_history().workflows)
        if not principal.unrestricted:
            items = [w for w in items if f"workflow:{w['workflowId']}" in principal.grants]
        return JSONResponse({"items": items})

    async def stats(request: Request, principal: Principal) -> Response:
        """
        summary: Runs by status, by workflow and by time bucket
        parameters:
          - {name: since, in: query, schema: {type: string, format: date-time}}
          - {name: until, in: query, schema: {type: string, format: date-time}}
          - {name: bucket, in: query, description: bucket width in seconds, schema: {type: integer}}
        responses:
          200: {description: "{byStatus, byWorkflow, byTime}"}
        """
        if not principal.unrestricted:
            return _error(403, "stats cover every workflow: an unrestricted token is required")
        q = request.query_params
        now = dt.datetime.now(dt.UTC)
        since = _time(q.get("since"), "since") or now - dt.timedelta(hours=24)
        until = _time(q.get("until"), "until") or now + dt.timedelta(minutes=1)
        if since >= until:
            raise BadRequest("'since' must be before 'until'")
        bucket = _int(q.get("bucket"), "bucket", 3600, 1, 86_400 * 31)
        return JSONResponse(await run_in_threadpool(assert_history().stats, since, until, bucket))

    async def sql(request: Request, principal: Principal) -> Response:
        """
        summary: One reading statement (SELECT, WITH, SHOW, DESCRIBE, EXPLAIN) over the history database
        requestBody:
          content:
            application/json:
              schema: {type: object, properties: {sql: {type: string}}, required: [sql]}
        responses:
          200: {description: "{columns, types, rows}"}
          400: {description: "bad SQL, a refused statement, or a limit exceeded: the message says which"}
          403: {description: restricted token}
          415: {description: the body is not application/json}
        """
        if not principal.unrestricted:
            return _error(403, "SQL reads every table: an unrestricted token is required")
        try:
            body = await request.json()
        except (ValueError, RecursionError) as exc:
            raise BadRequest('body must be JSON: {"sql": "SELECT ..."}') from exc
        query = body.get("sql") if isinstance(body, dict) else None
        if not isinstance(query, str) or not query.strip():
            raise BadRequest('body must be JSON: {"sql": "SELECT ..."}')
        try:
            result = await run_in_threadpool(assert_history().sql, query)
        except SqlError as exc:
            return _error(400, str(exc))
        return JSONResponse(result)

    async def me(request: Request, principal: Principal) -> Response:
        """
        summary: Who the token is, the rooms that carry every live event it may see, and what it may steer
        responses:
          200: {description: "{subject, unrestricted, rooms, control: ['*'] or the workflow ids it may steer}"}
          401: {description: missing or invalid credentials}
        """
        return JSONResponse(
            {
                "subject": principal.subject,
                "unrestricted": principal.unrestricted,
                "rooms": principal.watched_rooms(),
                "control": principal.controls,
            }
        )

    return [
        Route("/api/v1/me", guarded(me, needs_history=False)),
        Route("/api/v1/executions", guarded(list_executions)),
        Route("/api/v1/executions/{execution_id}", guarded(get_execution)),
        Route("/api/v1/executions/{execution_id}/events", guarded(execution_events)),
        Route("/api/v1/workflows", guarded(workflows)),
        Route("/api/v1/stats", guarded(stats)),
        Route("/api/v1/sql", guarded(sql), methods=["POST"]),
        contract_route(),
    ]


# The page's event names and states, from the same source as everyone else's. A script, not a
# fetch, so the page has them before app.js runs; listed before the /static mount, so it wins.
CONTRACT_JS = (
    "// Generated from the contract package (contract/page.py): do not edit.\n"
    f"const CONTRACT = Object.freeze({json.dumps(page_constants(), indent=1)});\n"
)


def contract_route() -> Route:
    async def contract_js(request: Request) -> Response:
        return Response(CONTRACT_JS, media_type="text/javascript", headers={"Cache-Control": "no-cache"})

    return Route("/static/contract.js", contract_js, include_in_schema=False)


def openapi_route(routes: list[Any]) -> Route:
    async def openapi(request: Request) -> Response:
        return JSONResponse(SCHEMAS.get_schema(routes))

    return Route("/openapi.json", openapi, include_in_schema=False)


def _restrict(query: ExecutionQuery, principal: Principal) -> ExecutionQuery:
    """A restricted principal lists what its grants cover, all of them at once; filters narrow that."""
    if principal.unrestricted:
        return query
    rooms = principal.watched_rooms()

    def keys(kind: str) -> tuple[str, ...]:
        return tuple(r.partition(":")[2] for r in rooms if r.startswith(f"{kind}:"))

    scope = Scope(keys("workflow"), keys("user"), keys("execution"))
    return dataclasses.replace(query, scope=scope)


def _visible(principal: Principal, execution: dict[str, Any]) -> bool:
    event = {"workflowId": execution["workflowId"], "executionId": execution["executionId"]}
    return principal.may_see(event, execution.get("userId"))


def _require_json(request: Request) -> None:
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json" and not (
        media_type.startswith("application/") and media_type.endswith("+json")
    ):
        raise UnsupportedMediaType(
            f"the body must be JSON: send 'Content-Type: application/json', not {media_type or 'none'!r}"
        )


def _time(value: str | None, name: str) -> dt.datetime | None:
    if value is None:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        parsed = parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)
        in_range = EARLIEST <= parsed < LATEST
    except (ValueError, OverflowError) as exc:
        raise BadRequest(f"'{name}' must be an ISO-8601 timestamp, got {value!r}") from exc
    if not in_range:
        raise BadRequest(f"'{name}' must be between {EARLIEST.date()} and {LATEST.date()}, got {value!r}")
    return parsed


def _int(value: str | None, name: str, default: int, low: int, high: int) -> int:
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError as exc:
        raise BadRequest(f"'{name}' must be an integer, got {value!r}") from exc
    if not low <= number <= high:
        raise BadRequest(f"'{name}' must be between {low} and {high}, got {number}")
    return number
