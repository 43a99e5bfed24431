"""Registered tools: named callables whose typed signature checks their input."""

from __future__ import annotations

import asyncio
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, overload

F = TypeVar("F", bound=Callable[..., Any])


class ToolInputError(TypeError):
    """The arguments given to a tool do not match its signature."""


@dataclass(frozen=True)
class Tool:
    name: str
    fn: Callable[..., Any]
    description: str

    def check(self, args: dict[str, Any], *, partial: bool = False) -> list[str]:
        """Problems binding `args` to the signature; type-checks plain annotated types."""
        signature = inspect.signature(self.fn)
        try:
            bound = signature.bind_partial(**args) if partial else signature.bind(**args)
        except TypeError as exc:
            return [f"tool {self.name!r}: {exc}"]
        hints = typing.get_type_hints(self.fn)
        problems = []
        for key, value in bound.arguments.items():
            expected = hints.get(key)
            if isinstance(expected, type) and not _is_reference(value) and not isinstance(value, expected):
                if expected is float and isinstance(value, int) and not isinstance(value, bool):
                    continue
                problems.append(
                    f"tool {self.name!r}: argument {key!r} must be {expected.__name__}, got {type(value).__name__}"
                )
        return problems

    async def call(self, args: dict[str, Any]) -> Any:
        problems = self.check(args)
        if problems:
            raise ToolInputError("; ".join(problems))
        if inspect.iscoroutinefunction(self.fn):
            return await self.fn(**args)
        # Sync tools may block (files, SDK calls): keep the event loop free.
        return await asyncio.to_thread(self.fn, **args)


def _is_reference(value: Any) -> bool:
    return isinstance(value, str) and "{{" in value


class ToolRegistry:
    def __init__(self) -> None:
        self._tools: dict[str, Tool] = {}

    @overload
    def register(self, fn: F, *, name: str | None = None) -> F: ...

    @overload
    def register(self, fn: None = None, *, name: str | None = None) -> Callable[[F], F]: ...

    def register(self, fn: F | None = None, *, name: str | None = None) -> F | Callable[[F], F]:
        """Register `fn` as a tool; usable bare (`@tools.register`) or with a name."""

        def add(target: F) -> F:
            tool_name = name or target.__name__
            self._tools[tool_name] = Tool(tool_name, target, inspect.getdoc(target) or "")
            return target

        return add(fn) if fn is not None else add

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def names(self) -> list[str]:
        return sorted(self._tools)
