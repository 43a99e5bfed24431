"""flowscope's workflow engine: an asyncio DAG scheduler that reports every step over OTLP."""

from __future__ import annotations

from flowscope.engine.catalog import Catalog, FinishedRuns, RetrySource
from flowscope.engine.context import LlmUsage, NodeContext
from flowscope.engine.control_link import ControlLink
from flowscope.engine.dag import Node, Workflow, WorkflowBuilder, WorkflowValidationError
from flowscope.engine.events import EventType, WorkflowEvent
from flowscope.engine.llm import LlmProvider, LocalProvider, OpenAICompatibleProvider
from flowscope.engine.loader import load_workflow, workflow_from_dict
from flowscope.engine.nodes import NodeRegistry
from flowscope.engine.redact import Secret
from flowscope.engine.retry import Backoff, NonRetryableError, RetryPolicy
from flowscope.engine.scheduler import Engine, ExecutionHandle, ExecutionResult, NodeState, Result
from flowscope.engine.telemetry import Telemetry, TelemetryOptions, setup, shutdown
from flowscope.engine.tools import ToolRegistry

__all__ = [
    "Backoff",
    "Catalog",
    "ControlLink",
    "Engine",
    "EventType",
    "ExecutionHandle",
    "ExecutionResult",
    "FinishedRuns",
    "LlmProvider",
    "LlmUsage",
    "LocalProvider",
    "Node",
    "NodeContext",
    "NodeRegistry",
    "NodeState",
    "NonRetryableError",
    "OpenAICompatibleProvider",
    "Result",
    "RetryPolicy",
    "RetrySource",
    "Secret",
    "Telemetry",
    "TelemetryOptions",
    "ToolRegistry",
    "Workflow",
    "WorkflowBuilder",
    "WorkflowEvent",
    "WorkflowValidationError",
    "load_workflow",
    "setup",
    "shutdown",
    "workflow_from_dict",
]
