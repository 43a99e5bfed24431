"""The `flowscope` command line."""

from __future__ import annotations

import asyncio
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
from typing import Any

import click

from flowscope.collector.schema import SchemaOptions, ddl
from flowscope.collector.store import Dsn, StoreError, StoreLocked, background_settings, connect, migrate
from flowscope.config import Settings
from flowscope.contract import Result
from flowscope.reading import executions, sql, watch
from flowscope.terminal import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    CliError,
    console,
    err,
    run_async,
)
from flowscope.worker import worker
from flowscope.ws_bridge.auth import require_auth_on_public_bind


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log more.")
@click.version_option(package_name="flowscope")
def main(verbose: bool) -> None:
    """flowscope: see workflow executions live, as traces, and as SQL."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


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


_DEMO_CONNECT_TIMEOUT_S = 30.0
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
    """The demo's engine and its client use a stack that may require tokens: a token of their
    own, minted now and known only to this process, that may write telemetry, serve as an
    engine, and steer and watch the sample workflows' runs (nothing else)."""
    if not settings.auth.configured or settings.no_auth:
        return settings, None
    from flowscope.samples import _user, catalog

    samples = [wf.id for wf in catalog().workflows]
    grants = frozenset(
        {"ingest", "engine", *(f"workflow:{w}" for w in samples), *(f"control:workflow:{w}" for w in samples)}
        | {f"control:user:{_user(n)}" for n in range(3)}  # its runs' users (docs/control.md)
    )
    token = secrets.token_urlsafe(32)
    tokens = {**settings.auth_tokens, token: ("flowscope-demo", grants)}
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
    run_async(lambda: _serve_until_stopped(_settings(**flags), None))


@main.command()
@_stack_options
@click.option("--runs", type=int, default=None, help="Rounds of sample workflows (default: keep running).")
@click.option("--interval", type=float, default=3.0, show_default=True, help="Seconds between rounds.")
@click.option("--exit-after", is_flag=True, help="Stop once the runs are done (default: keep serving).")
def demo(runs: int | None, interval: float, exit_after: bool, **flags: Any) -> None:
    """The embedded stack plus sample workflows: an LLM agent, a retrying ETL, a resumed failure, a slow node."""
    settings, token = with_demo_token(_settings(**flags))

    async def workload(stack: Any) -> None:
        from flowscope import samples
        from flowscope.engine import Engine
        from flowscope.engine.telemetry import TelemetryOptions, setup, shutdown

        endpoints = stack.endpoints
        send_token(token)
        telemetry = setup(
            service_name="flowscope-demo",
            endpoint=endpoints.otlp_grpc,
            protocol="grpc",
            options=TelemetryOptions(capture_io=True),
        )
        # The samples run as any steered engine does: served over the control plane, started
        # through the REST API and followed over the live WebSocket (docs/control.md).
        catalog = samples.catalog()
        # Checkpointed as a worker is (next to the data directory): a run the demo could not
        # finish can be resumed, and the stack shows what a resume would reuse.
        engine = Engine(
            telemetry,
            catalog.registry,
            control=endpoints.web,
            control_token=token,
            checkpoints=settings.checkpoints_url,
        )
        engine.serve(*catalog.workflows)
        runs_api = samples.StackRuns(endpoints.web, token)
        stack.exit_after_work = exit_after
        console.print(f"\n[bold]Open {endpoints.web}/ to watch the sample workflows run live.[/]")
        console.print("SQL examples (in another terminal):")
        console.print(
            '  flowscope sql "SELECT WorkflowId, Status, count() FROM otel.workflow_executions FINAL GROUP BY ALL"'
        )
        console.print(
            '  flowscope sql "SELECT NodeId, quantile(0.95)(DurationMs) FROM otel.node_executions GROUP BY NodeId"'
        )

        def report(round_no: int, results: list[samples.RunEnd]) -> None:
            for result in results:
                mark = "[green]✓[/]" if result.result == Result.SUCCESS else "[red]✗[/]"
                console.print(
                    f"  {mark} {result.workflow_name:<16} {result.result:<8} "
                    f"{result.duration_ms:7.0f} ms  {endpoints.web}/executions/{result.execution_id}"
                )

        try:
            async with engine:
                link = engine.control_link
                assert link is not None
                await asyncio.wait_for(link.connected.wait(), _DEMO_CONNECT_TIMEOUT_S)
                round_no = await samples.repeat_rounds(
                    lambda n: samples.run_stack_round(runs_api, n), runs, interval, report
                )
                tail = "" if exit_after else " The live view, the API and the engine stay up until Ctrl-C."
                console.print(f"[bold]{round_no} round(s) done.[/]{tail}")
                if not exit_after:
                    # The engine stays connected: the page and the API can still start and steer runs.
                    await asyncio.Event().wait()
        except (samples.StackRunError, TimeoutError) as exc:
            raise CliError(f"the demo could not run its samples through the stack: {exc}", EXIT_UNAVAILABLE) from exc
        finally:
            await runs_api.aclose()
            await asyncio.to_thread(shutdown)

    run_async(lambda: _serve_until_stopped(settings, workload))


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
    from flowscope.ws_bridge.control_events import OtlpLogSink, control_endpoint

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
        # Runs whose engine goes silent are written as workflow.lost through the collector tier.
        sink = OtlpLogSink(control_endpoint(), os.environ.get("FLOWSCOPE_TOKEN"))
        try:
            parsed = Dsn.parse(settings.dsn)
            live, lost = assemble_bridge(
                settings, lambda: connect(parsed), parsed.database or settings.database,
                background=background_settings(parsed), otlp_port=otlp_port, lost_sink=sink,
            )  # fmt: skip
            try:
                async with live.running(), live.serve() as port, server_runtime():
                    console.print(f"bridge up: http://{settings.host}:{port}/  OTLP feed on :{live.otlp_port}")
                    await stop.wait()
            finally:
                if lost is not None:
                    await asyncio.to_thread(lost.close)
        except (StoreError, OSError, ValueError) as exc:
            raise CliError(str(exc), EXIT_UNAVAILABLE) from exc
        finally:
            sink.close()

    run_async(go)


@main.command()
@click.option(
    "--otlp-endpoint", envvar="OTEL_EXPORTER_OTLP_ENDPOINT", default="http://127.0.0.1:4317", show_default=True
)
@click.option("--runs", type=int, default=None, help="Rounds (default: keep running).")
@click.option("--interval", type=float, default=5.0, show_default=True)
@click.option("--token", envvar="FLOWSCOPE_TOKEN", help=_INGEST_TOKEN_HELP)
def samples(otlp_endpoint: str, runs: int | None, interval: float, token: str | None) -> None:
    """Run the sample workflows as an engine exporting OTLP anywhere (the compose demo service)."""
    from flowscope import samples as sample_workflows
    from flowscope.engine import Engine
    from flowscope.engine.telemetry import TelemetryOptions, setup, shutdown
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

    run_async(go)


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
    from flowscope.engine import Engine, EventType, WorkflowValidationError, load_workflow
    from flowscope.engine.telemetry import setup, shutdown

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

    sys.exit(run_async(go))


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


for _command in (watch, executions, sql, worker):
    main.add_command(_command)


if __name__ == "__main__":
    main()
