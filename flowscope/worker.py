"""`flowscope worker`: an engine process the stack steers (docs/control.md).

It serves workflows from YAML/JSON files and `module:attr` catalogs, dials the stack's
control plane, exports its telemetry over OTLP, and runs until SIGINT/SIGTERM.
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
def worker(targets: tuple[str, ...], stack: str, token: str | None, otlp_endpoint: str) -> None:
    """Serve workflows (YAML/JSON files, module:attr catalogs) to a stack that starts and steers them."""
    from flowscope.cli import send_token

    try:
        control = control_url(stack)
    except ValueError as exc:
        raise CliError(f"--stack: {exc}") from exc
    catalog = load_catalog(targets)
    if not catalog.workflows:
        raise CliError("no workflows to serve")
    send_token(token)
    run_async(lambda: _serve(catalog, stack, control, token, otlp_endpoint))


async def _serve(catalog: Catalog, stack: str, control: str, token: str | None, otlp_endpoint: str) -> None:
    from flowscope.engine import Engine
    from flowscope.engine.telemetry import setup, shutdown
    from flowscope.runtime import server_runtime

    telemetry = setup(service_name="flowscope-worker", endpoint=otlp_endpoint)
    engine = Engine(telemetry, catalog.registry, control=stack, control_token=token)
    try:
        engine.serve(*catalog.workflows)
    except WorkflowValidationError as exc:
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
            console.print("Press Ctrl-C to stop (running executions are cancelled).", style="dim")
            await stop.wait()
            console.print("stopping: cancelling running executions…", style="dim")
    finally:
        await asyncio.to_thread(shutdown)
    console.print("stopped cleanly.")
