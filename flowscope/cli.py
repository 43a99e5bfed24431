"""The `flowscope` command line."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import os
import secrets
import signal
import sys
import urllib.parse
from collections.abc import Callable, Coroutine, MutableMapping
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import click
import httpx
from rich.console import Console
from rich.table import Table

from collector.schema import SchemaOptions, ddl
from collector.store import Dsn, StoreError, StoreLocked, background_settings, connect, migrate
from contract import NODE_EVENTS, TERMINAL_EVENTS, EventName, LiveEvent, NodeState, Result, RunStatus, node_state
from flowscope.config import Settings
from ws_bridge.auth import require_auth_on_public_bind
from ws_bridge.history import History, SqlError, node_specs, number, whole

# soft_wrap: URLs and SQL stay on one line when output is not a terminal.
console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
T = TypeVar("T")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3


class CliError(click.ClickException):
    """A user-facing error: a message and an exit code, never a traceback."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        # ClickException declares exit_code on the class; this error carries its own.
        vars(self)["exit_code"] = code

    def show(self, file: Any = None) -> None:
        err.print(f"[bold red]error:[/] {self.format_message()}")


def _run(coro_fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    try:
        return asyncio.run(coro_fn())
    except KeyboardInterrupt:
        raise SystemExit(130) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log more.")
@click.version_option(package_name="flowscope")
def main(verbose: bool) -> None:
    """flowscope: see workflow executions live, as traces, and as SQL."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


def _server_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--token", envvar="FLOWSCOPE_TOKEN", help="Bearer token for the server.")(fn)
    return click.option(
        "--server",
        envvar="FLOWSCOPE_SERVER",
        default="http://127.0.0.1:8080",
        show_default=True,
        help="A running flowscope (its HTTP address).",
    )(fn)


def _stack_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(
        [
            click.option("--data-dir", type=click.Path(path_type=Path), help="Embedded ClickHouse data directory."),
            click.option("--dsn", help="ClickHouse DSN (chdb:///path or http://user:pw@host:8123/db)."),
            click.option("--host", help="Address to bind (default 127.0.0.1)."),
            click.option("--http-port", type=int, help="Web/API/WebSocket port (default 8080)."),
            click.option("--otlp-grpc-port", type=int, help="OTLP/gRPC port (default 4317)."),
            click.option("--otlp-http-port", type=int, help="OTLP/HTTP port (default 4318)."),
            click.option("--no-auth", is_flag=True, default=None, help="Serve without auth on a public address."),
            click.option(
                "--spool-dir", type=click.Path(path_type=Path), help="Write-ahead spool (default <data dir>.spool)."
            ),
            click.option("--no-spool", is_flag=True, help="Acknowledge from memory only (faster, not crash-safe)."),
        ]
    ):
        fn = option(fn)
    return fn


def _settings(**flags: Any) -> Settings:
    settings = Settings.from_env()
    if flags.get("no_spool"):
        spool_dir = None
    else:
        # The spool belongs to one data directory: replaying it into another would be wrong.
        data_dir = flags.get("data_dir") or settings.data_dir
        spool_dir = flags.get("spool_dir") or settings.spool_dir or data_dir.with_name(f"{data_dir.name}.spool")
    return replace(settings, spool_dir=spool_dir).with_overrides(
        data_dir=flags.get("data_dir"),
        clickhouse_dsn=flags.get("dsn"),
        host=flags.get("host"),
        http_port=flags.get("http_port"),
        otlp_grpc_port=flags.get("otlp_grpc_port"),
        otlp_http_port=flags.get("otlp_http_port"),
        no_auth=flags.get("no_auth"),
    )


_INGEST_TOKEN_HELP = "Bearer token with the 'ingest' grant, sent with every OTLP export."


def send_token(token: str | None, env: MutableMapping[str, str] | None = None) -> None:
    """Put `token` where the OTLP exporters read their headers (OTEL_EXPORTER_OTLP_HEADERS),
    keeping any other header already there."""
    if not token:
        return
    env = os.environ if env is None else env
    kept = [
        item
        for item in env.get("OTEL_EXPORTER_OTLP_HEADERS", "").split(",")
        if item.strip() and item.partition("=")[0].strip().lower() != "authorization"
    ]
    env["OTEL_EXPORTER_OTLP_HEADERS"] = ",".join([*kept, f"authorization=Bearer%20{urllib.parse.quote(token)}"])


def with_demo_token(settings: Settings) -> tuple[Settings, str | None]:
    """The demo's engines write to a stack that may require tokens: an ingest-only token of
    their own, minted now and known only to this process."""
    if not settings.auth.configured or settings.no_auth:
        return settings, None
    token = secrets.token_urlsafe(32)
    tokens = {**settings.auth_tokens, token: ("flowscope-demo", frozenset({"ingest"}))}
    return replace(settings, auth_tokens=tokens), token


async def _serve_until_stopped(settings: Settings, on_ready: Callable[[Any], Coroutine[Any, Any, None]] | None) -> None:
    from flowscope.stack import Stack

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with Stack(settings).running() as stack:
            endpoints = stack.endpoints
            assert endpoints is not None
            console.print(f"[bold green]flowscope is up[/] (data: {settings.dsn})")
            console.print(f"  live view   {endpoints.web}/")
            console.print(f"  REST API    {endpoints.web}/api/v1/executions   (OpenAPI: {endpoints.web}/openapi.json)")
            console.print(f"  WebSocket   {endpoints.web.replace('http', 'ws')}/ws")
            console.print(f"  OTLP        gRPC {endpoints.otlp_grpc}   HTTP {endpoints.otlp_http}")
            console.print(f"  metrics     {endpoints.web}/metrics   ready: {endpoints.web}/readyz")
            console.print("Press Ctrl-C to stop (accepted data is flushed to ClickHouse first).", style="dim")
            work = asyncio.create_task(on_ready(stack)) if on_ready else None
            waiter = asyncio.create_task(stop.wait())
            await asyncio.wait([t for t in (work, waiter) if t], return_when=asyncio.FIRST_COMPLETED)
            if work is not None:
                if work.done():
                    work.result()
                    if not stop.is_set() and getattr(stack, "exit_after_work", False):
                        stop.set()
                    else:
                        await waiter
                else:
                    work.cancel()
                    await asyncio.gather(work, return_exceptions=True)
            waiter.cancel()
            console.print("stopping: draining accepted data into ClickHouse…", style="dim")
    except StoreLocked as exc:
        raise CliError(str(exc), EXIT_UNAVAILABLE) from exc
    except (StoreError, OSError, ValueError) as exc:
        raise CliError(str(exc), EXIT_UNAVAILABLE) from exc
    console.print("stopped cleanly.")


@main.command()
@_stack_options
def up(**flags: Any) -> None:
    """Run the embedded stack: collector (OTLP) + live bridge + embedded ClickHouse."""
    _run(lambda: _serve_until_stopped(_settings(**flags), None))


@main.command()
@_stack_options
@click.option("--runs", type=int, default=None, help="Rounds of sample workflows (default: keep running).")
@click.option("--interval", type=float, default=3.0, show_default=True, help="Seconds between rounds.")
@click.option("--exit-after", is_flag=True, help="Stop once the runs are done (default: keep serving).")
def demo(runs: int | None, interval: float, exit_after: bool, **flags: Any) -> None:
    """The embedded stack plus sample workflows: an LLM agent, a retrying ETL, a resumed failure, a slow node."""
    settings, token = with_demo_token(_settings(**flags))

    async def workload(stack: Any) -> None:
        from engine import Engine, Result
        from engine.telemetry import TelemetryOptions, setup, shutdown
        from flowscope import samples

        endpoints = stack.endpoints
        send_token(token)
        telemetry = setup(
            service_name="flowscope-demo",
            endpoint=endpoints.otlp_grpc,
            protocol="grpc",
            options=TelemetryOptions(capture_io=True),
        )
        engine = Engine(telemetry, samples.registry())
        stack.exit_after_work = exit_after
        console.print(f"\n[bold]Open {endpoints.web}/ to watch the sample workflows run live.[/]")
        console.print("SQL examples (in another terminal):")
        console.print(
            '  flowscope sql "SELECT WorkflowId, Status, count() FROM otel.workflow_executions FINAL GROUP BY ALL"'
        )
        console.print(
            '  flowscope sql "SELECT NodeId, quantile(0.95)(DurationMs) FROM otel.node_executions GROUP BY NodeId"'
        )

        def report(round_no: int, results: list[Any]) -> None:
            for result in results:
                mark = "[green]✓[/]" if result.result is Result.SUCCESS else "[red]✗[/]"
                console.print(
                    f"  {mark} {result.workflow.name:<16} {result.result.value:<8} "
                    f"{result.duration_s * 1000:7.0f} ms  {endpoints.web}/executions/{result.execution_id}"
                )

        try:
            round_no = await samples.run_rounds(engine, runs, interval, report)
        finally:
            await engine.aclose()
            await asyncio.to_thread(shutdown)
        tail = "" if exit_after else " The live view and API stay up until Ctrl-C."
        console.print(f"[bold]{round_no} round(s) done.[/]{tail}")

    _run(lambda: _serve_until_stopped(settings, workload))


@main.command()
@click.option("--dsn", envvar="FLOWSCOPE_CLICKHOUSE_DSN", required=True, help="ClickHouse server holding the history.")
@click.option("--host", default=None, help="Address to bind (default 127.0.0.1).")
@click.option("--http-port", type=int, default=None, help="Web/API/WebSocket port (default 8080).")
@click.option("--otlp-port", type=int, default=4319, show_default=True, help="OTLP/gRPC feed from the collector tier.")
@click.option("--no-auth", is_flag=True, default=None, help="Serve without auth on a public address.")
def bridge(dsn: str, host: str | None, http_port: int | None, otlp_port: int, no_auth: bool | None) -> None:
    """Run the live bridge alone: fed over OTLP by a collector tier, history from a ClickHouse server."""
    from flowscope.runtime import server_runtime
    from flowscope.stack import assemble_bridge

    settings = Settings.from_env().with_overrides(clickhouse_dsn=dsn, host=host, http_port=http_port, no_auth=no_auth)
    try:
        require_auth_on_public_bind(settings.host, settings.auth)
    except ValueError as exc:
        raise CliError(str(exc)) from exc

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            parsed = Dsn.parse(settings.dsn)
            live = assemble_bridge(
                settings, lambda: connect(parsed), parsed.database or settings.database,
                background=background_settings(parsed), otlp_port=otlp_port,
            )  # fmt: skip
            async with live.running(), live.serve() as port, server_runtime():
                console.print(f"bridge up: http://{settings.host}:{port}/  OTLP feed on :{live.otlp_port}")
                await stop.wait()
        except (StoreError, OSError, ValueError) as exc:
            raise CliError(str(exc), EXIT_UNAVAILABLE) from exc

    _run(go)


@main.command()
@click.option(
    "--otlp-endpoint", envvar="OTEL_EXPORTER_OTLP_ENDPOINT", default="http://127.0.0.1:4317", show_default=True
)
@click.option("--runs", type=int, default=None, help="Rounds (default: keep running).")
@click.option("--interval", type=float, default=5.0, show_default=True)
@click.option("--token", envvar="FLOWSCOPE_TOKEN", help=_INGEST_TOKEN_HELP)
def samples(otlp_endpoint: str, runs: int | None, interval: float, token: str | None) -> None:
    """Run the sample workflows as an engine exporting OTLP anywhere (the compose demo service)."""
    from engine import Engine
    from engine.telemetry import TelemetryOptions, setup, shutdown
    from flowscope import samples as sample_workflows
    from flowscope.runtime import server_runtime

    send_token(token)

    async def go() -> None:
        engine = Engine(
            setup(service_name="flowscope-samples", endpoint=otlp_endpoint, options=TelemetryOptions(capture_io=True)),
            sample_workflows.registry(),
        )

        def report(round_no: int, results: list[Any]) -> None:
            console.print(f"round {round_no + 1}: " + ", ".join(f"{r.workflow.id}={r.result.value}" for r in results))

        try:
            async with server_runtime():
                await sample_workflows.run_rounds(engine, runs, interval, report)
        finally:
            await engine.aclose()
            await asyncio.to_thread(shutdown)

    _run(go)


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--input", "input_json", help="Workflow input as JSON.")
@click.option("--otlp-endpoint", envvar="OTEL_EXPORTER_OTLP_ENDPOINT", help="Collector OTLP/gRPC address.")
@click.option("--standalone", is_flag=True, help="No collector: print telemetry to the console.")
@click.option("--user", help="End-user id recorded on the run.")
@click.option("--token", envvar="FLOWSCOPE_TOKEN", help=_INGEST_TOKEN_HELP)
def run(
    file: Path, input_json: str | None, otlp_endpoint: str | None, standalone: bool, user: str | None, token: str | None
) -> None:
    """Run a declarative workflow FILE (YAML/JSON) and report each step."""
    from engine import Engine, EventType, WorkflowValidationError, load_workflow
    from engine.telemetry import setup, shutdown

    send_token(token)

    # `module:function` references resolve from the current directory, as with `python -m`.
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        workflow = load_workflow(file)
        payload = json.loads(input_json) if input_json else None
    except WorkflowValidationError as exc:
        raise CliError(str(exc)) from exc
    except json.JSONDecodeError as exc:
        raise CliError(f"--input is not valid JSON: {exc}") from exc

    async def go() -> int:
        telemetry = setup(console=standalone, endpoint=otlp_endpoint or "http://127.0.0.1:4317")
        engine = Engine(telemetry)
        try:
            engine.validate(workflow)
        except WorkflowValidationError as exc:
            raise CliError(str(exc)) from exc

        def show(event: Any) -> None:
            if event.type in (EventType.NODE_COMPLETED, EventType.NODE_FAILED, EventType.NODE_RETRYING,
                              EventType.NODE_SKIPPED):  # fmt: skip
                detail = event.data.get("error") or event.data.get("reason") or ""
                ms = event.data.get("durationMs")
                timing = f"{ms:8.1f} ms" if isinstance(ms, int | float) else " " * 11
                err.print(f"  {event.type.value:<15} {event.node_id:<20} {timing} {detail}")

        engine.events.add_callback(show)
        handle = engine.start(workflow, payload, trigger="cli", user_id=user)
        err.print(f"execution {handle.execution_id} of {workflow.id} started")
        result = await handle.result()
        await engine.aclose()
        await asyncio.to_thread(shutdown)
        colour = "green" if result.result.value == Result.SUCCESS else "red"
        console.print(
            f"[{colour}]{result.result.value}[/] in {result.duration_s * 1000:.0f} ms  execution {result.execution_id}"
        )
        if result.error:
            err.print(result.error)
        return EXIT_OK if result.result.value == Result.SUCCESS else EXIT_FAILED

    sys.exit(_run(go))


@main.command()
@click.argument("execution_id", required=False)
@click.option("--workflow", help="Watch every execution of a workflow instead.")
@_server_option
def watch(execution_id: str | None, workflow: str | None, server: str, token: str | None) -> None:
    """Watch an execution live: the node tree with states, attempts and durations, then a summary."""
    from rich.live import Live

    from ws_bridge.client import LiveClient, LiveClientError

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

    sys.exit(_run(go))


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


@main.group()
def executions() -> None:
    """Execution history from the REST API."""


@executions.command("list")
@click.option("--workflow")
@click.option("--status")
@click.option("--user")
@click.option("--limit", type=int, default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_server_option
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
@_server_option
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


@main.command()
@click.argument("query")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option(
    "--data-dir", type=click.Path(path_type=Path), help="Query this data directory directly when no server runs."
)
@_server_option
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


@main.group()
def schema() -> None:
    """The ClickHouse schema (contrib exporter tables + workflow views)."""


def _schema_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(
        [
            click.option("--database", default="otel", show_default=True),
            click.option("--traces-ttl-days", type=int, default=0, show_default=True, help="0 keeps data forever."),
            click.option("--logs-ttl-days", type=int, default=0, show_default=True),
            click.option("--metrics-ttl-days", type=int, default=0, show_default=True),
            click.option("--workflow-ttl-days", type=int, default=0, show_default=True),
        ]
    ):
        fn = option(fn)
    return fn


def _schema(**values: Any) -> SchemaOptions:
    try:
        return SchemaOptions(**values)
    except ValueError as exc:
        raise CliError(str(exc)) from exc


@schema.command("print")
@_schema_options
def schema_print(**values: Any) -> None:
    """Print the DDL, to apply on a ClickHouse server by hand or at container start."""
    click.echo(ddl(_schema(**values)), nl=False)


@schema.command("apply")
@click.option("--dsn", required=True, help="ClickHouse DSN (chdb:///path or http://user:pw@host:8123).")
@_schema_options
def schema_apply(dsn: str, **values: Any) -> None:
    """Create or migrate the schema on a ClickHouse server (idempotent)."""
    options = _schema(**values)
    try:
        client = connect(Dsn.parse(dsn))
        applied = migrate(client, options)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    except StoreError as exc:
        raise CliError(str(exc), EXIT_UNAVAILABLE) from exc
    console.print(f"schema up to date in {options.database}; applied migrations: {applied or 'none'}")


if __name__ == "__main__":
    main()
