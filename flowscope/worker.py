"""`flowscope worker`: an engine process the stack steers (docs/control.md).

It serves workflows from YAML/JSON files and `module:attr` catalogs, dials the stack's
control plane, exports its telemetry over OTLP, checkpoints each node's output (so that any
worker sharing the store can resume a run this one could not finish: docs/durability.md), and
runs until SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import importlib
import signal
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import click

from flowscope.engine import Catalog, Workflow, WorkflowValidationError, load_workflow
from flowscope.engine.checkpoints import CheckpointStore
from flowscope.engine.control import control_url
from flowscope.engine.nodes import NodeRegistry
from flowscope.terminal import CliError, console, run_async

_WORKFLOW_SUFFIXES = {".yaml", ".yml", ".json"}


def load_catalog(targets: Sequence[str]) -> Catalog:
    """Every workflow the targets name, with the node registry of the one `Catalog` among them."""
    # `module:attr` references resolve from the current directory, as with `python -m`.
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    workflows: list[Workflow] = []
    registry: NodeRegistry | None = None
    for target in targets:
        for found in _load(target):
            if isinstance(found, Catalog):
                if registry is not None and found.registry is not registry:
                    raise CliError(f"{target}: a second Catalog — an engine runs with one node registry")
                registry = found.registry
                workflows.extend(found.workflows)
            else:
                workflows.append(found)
    return Catalog(workflows, registry or NodeRegistry())


def _load(target: str) -> list[Workflow | Catalog]:
    path = Path(target)
    if path.suffix.lower() in _WORKFLOW_SUFFIXES or path.is_file():
        try:
            return [load_workflow(path)]
        except WorkflowValidationError as exc:
            raise CliError(str(exc)) from exc
    module_name, colon, attr = target.partition(":")
    if not colon or not module_name or not attr:
        raise CliError(f"{target!r} is neither a workflow file (.yaml/.yml/.json) nor a module:attr reference")
    try:
        found: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            found = getattr(found, part)
    except ImportError as exc:
        raise CliError(f"{target}: cannot import {module_name}: {exc}") from exc
    except AttributeError as exc:
        raise CliError(f"{target}: {module_name} has no {attr}") from exc
    if callable(found) and not isinstance(found, Workflow | Catalog):
        try:
            found = found()
        except Exception as exc:
            raise CliError(f"{target}: calling it failed: {exc}") from exc
    return _workflows(target, found)


def _workflows(target: str, found: Any) -> list[Workflow | Catalog]:
    if isinstance(found, Workflow | Catalog):
        return [found]
    if isinstance(found, Iterable) and not isinstance(found, str | bytes | dict):
        items = list(found)
        if all(isinstance(item, Workflow) for item in items):
            return list(items)
    raise CliError(
        f"{target} is a {type(found).__name__}: expected a Workflow, a list of Workflows, a Catalog, "
        "or a function returning one of those"
    )


@click.command()
@click.argument("targets", nargs=-1, required=True, metavar="FILE_OR_MODULE...")
@click.option(
    "--stack",
    envvar="FLOWSCOPE_STACK_URL",
    default="http://127.0.0.1:8080",
    show_default=True,
    help="The stack's web address; the engine dials its control plane there.",
)
@click.option("--token", envvar="FLOWSCOPE_TOKEN", help="Bearer token with the 'engine' and 'ingest' grants.")
@click.option(
    "--otlp-endpoint",
    envvar="OTEL_EXPORTER_OTLP_ENDPOINT",
    default="http://127.0.0.1:4317",
    show_default=True,
    help="Collector OTLP/gRPC address for the runs' telemetry.",
)
@click.option(
    "--checkpoints",
    metavar="URL",
    help="Checkpoint store: sqlite:///path.db, or a ClickHouse DSN shared by engines on several hosts "
    "[default: $FLOWSCOPE_CHECKPOINTS, else checkpoints.db next to the data directory]",
)
@click.option("--no-checkpoints", is_flag=True, help="Store no checkpoints: a run that dies cannot be resumed.")
def worker(
    targets: tuple[str, ...],
    stack: str,
    token: str | None,
    otlp_endpoint: str,
    checkpoints: str | None,
    no_checkpoints: bool,
) -> None:
    """Serve workflows (YAML/JSON files, module:attr catalogs) to a stack that starts and steers them."""
    from flowscope.cli import send_token
    from flowscope.config import Settings

    try:
        control = control_url(stack)
    except ValueError as exc:
        raise CliError(f"--stack: {exc}") from exc
    catalog = load_catalog(targets)
    if not catalog.workflows:
        raise CliError("no workflows to serve")
    store = None if no_checkpoints else open_store(checkpoints or Settings.from_env().checkpoints_url)
    send_token(token)
    run_async(lambda: _serve(catalog, stack, control, token, otlp_endpoint, store))


def open_store(url: str) -> CheckpointStore:
    """The checkpoint store at `url`, or a CliError saying why not."""
    from flowscope.engine.checkpoints import CheckpointError, open_checkpoint_store

    try:
        return open_checkpoint_store(url)
    except (ValueError, OSError, CheckpointError) as exc:
        raise CliError(f"--checkpoints: {exc}") from exc
    except Exception as exc:  # a ClickHouse server that does not answer, refuses the schema…
        raise CliError(f"--checkpoints: cannot open {url}: {exc}") from exc


async def _serve(
    catalog: Catalog, stack: str, control: str, token: str | None, otlp_endpoint: str, store: CheckpointStore | None
) -> None:
    from flowscope.engine import Engine
    from flowscope.engine.telemetry import setup, shutdown
    from flowscope.runtime import server_runtime

    telemetry = setup(service_name="flowscope-worker", endpoint=otlp_endpoint)
    engine = Engine(telemetry, catalog.registry, control=stack, control_token=token, checkpoints=store)
    try:
        engine.serve(*catalog.workflows)
    except WorkflowValidationError as exc:
        if store is not None:
            store.close()
        await asyncio.to_thread(shutdown)
        raise CliError(str(exc)) from exc
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with server_runtime(), engine:
            console.print(f"[bold green]flowscope worker[/] serving {len(engine.served)} workflow(s)")
            for wf in engine.served:
                console.print(f"  {wf.id:<24} version {wf.version:<6} {wf.name}  ({len(wf.nodes)} nodes)")
            console.print(f"  stack       {stack}   (control channel {control})")
            console.print(f"  telemetry   {otlp_endpoint}")
            console.print(f"  checkpoints {_where(store)}")
            console.print("Press Ctrl-C to stop (running executions are cancelled).", style="dim")
            await stop.wait()
            console.print("stopping: cancelling running executions…", style="dim")
    finally:
        if store is not None:
            store.close()
        await asyncio.to_thread(shutdown)
    console.print("stopped cleanly.")


def _where(store: CheckpointStore | None) -> str:
    if store is None:
        return "off (--no-checkpoints): runs cannot be resumed elsewhere"
    return str(getattr(store, "name", type(store).__name__))
