"""Commands that read a running flowscope: `watch`, `executions`, `sql`.

They talk to the stack's HTTP API (the embedded ClickHouse allows one process per data
directory); `sql --data-dir` opens a stopped stack's data directly.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

import click
import httpx
from rich.table import Table

from flowscope.collector.store import Dsn, StoreError, StoreLocked, connect
from flowscope.config import Settings
from flowscope.contract import NODE_EVENTS, TERMINAL_EVENTS, EventName, LiveEvent, NodeState, RunStatus, node_state
from flowscope.terminal import EXIT_FAILED, EXIT_OK, EXIT_UNAVAILABLE, CliError, console, err, run_async, server_option
from flowscope.ws_bridge.history import History, SqlError
from flowscope.ws_bridge.shapes import node_specs, number, whole


@click.command()
@click.argument("execution_id", required=False)
@click.option("--workflow", help="Watch every execution of a workflow instead.")
@server_option
def watch(execution_id: str | None, workflow: str | None, server: str, token: str | None) -> None:
    """Watch an execution live: the node tree with states, attempts and durations, then a summary."""
    from rich.live import Live

    from flowscope.ws_bridge.client import LiveClient, LiveClientError

    if (execution_id is None) == (workflow is None):
        raise CliError("give an EXECUTION_ID or --workflow ID")

    async def go() -> int:
        client = (
            LiveClient(server, execution_id=execution_id, token=token, max_retries=5)
            if execution_id
            else LiveClient(server, rooms=[f"workflow:{workflow}"], token=token, max_retries=5)
        )
        nodes: dict[str, dict[str, Any]] = {}
        status: dict[str, Any] = {"value": RunStatus.RUNNING, "progress": 0.0, "error": None}

        def table() -> Table:
            t = Table(title=f"{execution_id or workflow}  {status['value']}  {status['progress'] * 100:.0f}%")
            for column in ("node", "type", "state", "attempts", "duration"):
                t.add_column(column)
            for n in nodes.values():
                colour = _STATE_COLOURS.get(n["state"], "")
                ms = n.get("durationMs")
                t.add_row(n["id"], n.get("type") or "", f"[{colour}]{n['state']}[/]" if colour else n["state"],
                          str(n.get("attempts", 0)), f"{ms:.1f} ms" if ms is not None else "")  # fmt: skip
            return t

        try:
            with Live(table(), console=console, refresh_per_second=8, transient=False) as live:
                async for event in client:
                    _watch_fold(nodes, status, event)
                    live.update(table())
        except LiveClientError as exc:
            raise CliError(str(exc), EXIT_UNAVAILABLE) from exc
        except OSError as exc:
            raise CliError(f"cannot reach {server}: is `flowscope up` running? ({exc})", EXIT_UNAVAILABLE) from exc
        if status["error"]:
            err.print(f"[red]{status['error']}[/]")
        succeeded = sum(n["state"] == NodeState.SUCCESS for n in nodes.values())
        console.print(f"summary: {status['value']}, {succeeded}/{len(nodes)} nodes succeeded")
        return EXIT_OK if status["value"] == RunStatus.SUCCESS else EXIT_FAILED

    sys.exit(run_async(go))


_STATE_COLOURS = {
    NodeState.SUCCESS: "green",
    NodeState.FAILED: "red",
    NodeState.RUNNING: "blue",
    NodeState.RETRYING: "yellow",
}


def _watch_fold(nodes: dict[str, dict[str, Any]], status: dict[str, Any], event: LiveEvent) -> None:
    """What `flowscope watch` shows after one more event: node rows and the run's status."""
    data: Any = event.get("data")
    data = data if isinstance(data, dict) else {}
    kind = event["type"]
    node_id = event.get("nodeId")
    if kind == EventName.WORKFLOW_STARTED:
        for spec in node_specs(data.get("nodes")):
            node_type = spec["type"] if isinstance(spec.get("type"), str) else None
            nodes.setdefault(spec["id"], {"id": spec["id"], "type": node_type, "state": NodeState.PENDING})
    elif node_id and kind in NODE_EVENTS:
        n = nodes.setdefault(node_id, {"id": node_id, "state": NodeState.PENDING})
        n["type"] = event.get("nodeType")
        n["state"] = node_state(kind, data) or n["state"]
        n["attempts"] = max(n.get("attempts", 0), whole(data.get("attempt")))
        if "durationMs" in data:
            n["durationMs"] = number(data["durationMs"])
    elif kind == EventName.EXECUTION_PROGRESS:
        status["progress"] = number(data.get("progress")) or 0.0
    elif kind in (EventName.WORKFLOW_LOST, EventName.WORKFLOW_RECOVERED):
        # Its engine went silent, or came back still running it: not an end, watching goes on.
        status["value"] = RunStatus.LOST if kind == EventName.WORKFLOW_LOST else RunStatus.RUNNING
    elif kind in TERMINAL_EVENTS:
        status["value"] = data.get("result", kind.split(".")[1])
        status["progress"] = 1.0 if kind == EventName.WORKFLOW_COMPLETED else status["progress"]
        status["error"] = data.get("error")


def _get(server: str, token: str | None, path: str, **params: Any) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.get(server.rstrip("/") + path, params={k: v for k, v in params.items() if v is not None},
                             headers=headers, timeout=30)  # fmt: skip
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach {server}: is `flowscope up` running? ({exc})", EXIT_UNAVAILABLE) from exc
    if response.status_code >= 400:
        raise CliError(f"{response.status_code}: {response.json().get('error', response.text)}", EXIT_FAILED)
    return response.json()


@click.group()
def executions() -> None:
    """Execution history from the REST API."""


@executions.command("list")
@click.option("--workflow")
@click.option("--status")
@click.option("--user")
@click.option("--limit", type=int, default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@server_option
def executions_list(workflow: str | None, status: str | None, user: str | None, limit: int, as_json: bool,
                    server: str, token: str | None) -> None:  # fmt: skip
    """Recent executions, newest first."""
    body = _get(server, token, "/api/v1/executions", workflow=workflow, status=status, user=user, limit=limit)
    if as_json:
        console.print_json(json.dumps(body))
        return
    table = Table(title="executions")
    for column in ("execution", "workflow", "status", "nodes", "duration", "started", "trigger", "user"):
        table.add_column(column)
    for e in body["items"]:
        duration = f"{e['durationMs']:.0f} ms" if e["durationMs"] is not None else ""
        table.add_row(e["executionId"], e["workflowId"], e["status"], f"{e['completedNodes']}/{e['totalNodes']}",
                      duration, e["startTime"] or "", e["trigger"] or "", e["userId"] or "")  # fmt: skip
    console.print(table)


@executions.command("show")
@click.argument("execution_id")
@server_option
def executions_show(execution_id: str, server: str, token: str | None) -> None:
    """One execution with its nodes."""
    e = _get(server, token, f"/api/v1/executions/{execution_id}")
    console.print(f"[bold]{e['executionId']}[/] {e['workflowName']} — {e['status']}  trace {e['traceId']}")
    for name, url in (e.get("links") or {}).items():
        console.print(f"  {name}: {url}")
    if e.get("error"):
        err.print(f"[red]{e['error']}[/]")
    table = Table()
    for column in ("node", "type", "state", "attempts", "duration", "error"):
        table.add_column(column)
    for n in e["nodes"]:
        duration = f"{n['durationMs']:.1f} ms" if n["durationMs"] is not None else ""
        table.add_row(n["nodeId"], n["nodeType"] or "", n["state"], str(n["attempts"]), duration, n.get("error") or "")
    console.print(table)


@executions.command("resume")
@click.argument("execution_id")
@server_option
def executions_resume(execution_id: str, server: str, token: str | None) -> None:
    """Continue a failed, cancelled or lost execution from its checkpoints, as a new run on any
    connected engine serving its workflow (a paused one just goes on). Needs a control grant."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = f"{server.rstrip('/')}/api/v1/executions/{execution_id}/resume"
    try:
        response = httpx.post(url, json={}, headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach {server}: is `flowscope up` running? ({exc})", EXIT_UNAVAILABLE) from exc
    try:
        body = response.json()
    except ValueError:
        body = {"error": response.text}
    if response.status_code >= 400:
        code = EXIT_UNAVAILABLE if response.status_code == 503 else EXIT_FAILED
        raise CliError(f"{response.status_code}: {body.get('error', response.text)}", code)
    if "resumedFrom" in body:
        console.print(f"resumed {body['resumedFrom']} as [bold]{body['executionId']}[/]")
        console.print(f"  follow it: flowscope watch {body['executionId']}")
    else:
        console.print(f"{body['executionId']} is {body.get('status', RunStatus.RUNNING)} again")


@click.command()
@click.argument("query")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option(
    "--data-dir", type=click.Path(path_type=Path), help="Query this data directory directly when no server runs."
)
@server_option
def sql(query: str, fmt: str, data_dir: Path | None, server: str, token: str | None) -> None:
    """Read-only SQL over the history: through the server, or directly on the data directory."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.post(server.rstrip("/") + "/api/v1/sql", json={"sql": query}, headers=headers, timeout=60)
    except httpx.HTTPError:
        response = None
    if response is not None:
        if response.status_code >= 400:
            raise CliError(response.json().get("error", response.text), EXIT_FAILED)
        result = response.json()
    else:
        settings = Settings.from_env().with_overrides(data_dir=data_dir)
        if not Path(settings.dsn.removeprefix("chdb://")).exists():
            raise CliError(f"no server at {server} and no data directory at {settings.data_dir}", EXIT_UNAVAILABLE)
        try:
            dsn = Dsn.parse(settings.dsn)
            # Table names without a database mean the history's, as on the server's endpoint.
            history = History(lambda: connect(dsn), dsn.database or settings.database)
            result = history.sql(query)
        except (StoreLocked, StoreError) as exc:
            raise CliError(str(exc), EXIT_UNAVAILABLE) from exc
        except SqlError as exc:
            raise CliError(str(exc), EXIT_FAILED) from exc
    _print_result(result, fmt)


def _print_result(result: dict[str, Any], fmt: str) -> None:
    if fmt == "json":
        click.echo(json.dumps([dict(zip(result["columns"], row, strict=True)) for row in result["rows"]]))
    elif fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(result["columns"])
        writer.writerows(result["rows"])
        click.echo(buffer.getvalue(), nl=False)
    else:
        table = Table()
        for column in result["columns"]:
            table.add_column(column)
        for row in result["rows"]:
            table.add_row(*(json.dumps(v) if isinstance(v, list | dict) else str(v) for v in row))
        console.print(table)
