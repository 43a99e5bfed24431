"""What every `flowscope` command shares: the consoles, exit codes, user-facing errors."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import click
from rich.console import Console

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


def run_async(coro_fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    try:
        return asyncio.run(coro_fn())
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def server_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--token", envvar="FLOWSCOPE_TOKEN", help="Bearer token for the server.")(fn)
    return click.option(
        "--server",
        envvar="FLOWSCOPE_SERVER",
        default="http://127.0.0.1:8080",
        show_default=True,
        help="A running flowscope (its HTTP address).",
    )(fn)
