"""flowscope's workflow engine: an asyncio DAG scheduler that reports every step over OTLP."""

from __future__ import annotations

from engine.context import LlmUsage, NodeContext
from engine.dag import Node, Workflow, WorkflowBuilder, WorkflowValidationError
from engine.events import EventType, WorkflowEvent
from engine.llm import LlmProvider, LocalProvider, OpenAICompatibleProvider
from engine.loader import load_workflow, workflow_from_dict
from engine.nodes import NodeRegistry
from engine.redact import Secret
from engine.retry import Backoff, NonRetryableError, RetryPolicy
from engine.scheduler import Engine, ExecutionHandle, ExecutionResult, NodeState, Result
from engine.telemetry import Telemetry, TelemetryOptions, setup, shutdown
from engine.tools import ToolRegistry

__all__ = [
    "Backoff",
    "Engine",
    "EventType",
    "ExecutionHandle",
    "ExecutionResult",
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
