"""What a node sees while it runs: its inputs, and handles back into the execution."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from opentelemetry.context import Context
from opentelemetry.trace import Span

from flowscope.engine.dag import Node

if TYPE_CHECKING:
    from flowscope.engine.scheduler import Execution


@dataclass
class LlmUsage:
    model: str
    provider: str
    input_tokens: int
    output_tokens: int
    time_to_first_token_s: float | None = None


@dataclass
class NodeContext:
    node: Node
    attempt: int
    inputs: dict[str, Any]
    workflow_input: Any
    span: Span
    otel_context: Context
    execution: Execution
    llm_usage: LlmUsage | None = None
    extra_attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def execution_id(self) -> str:
        return self.execution.execution_id

    def log(self, message: str, level: str = "info", **attributes: Any) -> None:
        """A log line that reaches live subscribers as `execution.log`."""
        self.execution.node_log(self, message, level, attributes)

    def set_attribute(self, key: str, value: Any) -> None:
        self.span.set_attribute(key, value)

    async def wait_for_signal(self, name: str) -> Any:
        return await self.execution.wait_for_signal(self, name)

    def record_llm_usage(self, usage: LlmUsage) -> None:
        self.llm_usage = usage

    @property
    def single_input(self) -> Any:
        """The output of the only dependency (or the workflow input for a root node)."""
        if not self.inputs:
            return self.workflow_input
        if len(self.inputs) == 1:
            return next(iter(self.inputs.values()))
        return self.inputs
