"""Shared vocabulary of the engine package."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    from flowscope.engine.context import NodeContext
    from flowscope.engine.events import WorkflowEvent

JSON: TypeAlias = Any
AttributeValue: TypeAlias = str | int | float | bool
Attributes: TypeAlias = dict[str, AttributeValue]
Config: TypeAlias = Mapping[str, Any]
NodeFn: TypeAlias = Callable[["NodeContext"], Awaitable[Any]]
EventCallback: TypeAlias = Callable[["WorkflowEvent"], None]
