"""Node types: what each does when it runs, how its config is checked, how its span is named
and what it adds to its span's attributes, and (for conditions) which dependents a result skips."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from opentelemetry.trace import SpanKind

from flowscope.contract import attributes as t
from flowscope.engine.context import LlmUsage, NodeContext
from flowscope.engine.dag import Node, Workflow, WorkflowValidationError, structural_problems
from flowscope.engine.llm import LlmProvider, LlmRequest, LocalProvider
from flowscope.engine.propagation import inject_headers
from flowscope.engine.template import references, render
from flowscope.engine.tools import ToolRegistry


class NodeError(RuntimeError):
    """A node failed for a reason of its own (bad status, bad output…)."""


class NodeExecutor(Protocol):
    """A node type. Optional: `span_attributes` and `untaken` (see `ExecutorBase`)."""

    kind: SpanKind

    def problems(self, node: Node, workflow: Workflow, registry: NodeRegistry) -> list[str]: ...

    def span_name(self, node: Node) -> str: ...

    async def execute(self, ctx: NodeContext) -> Any: ...


class ExecutorBase:
    """Defaults of a node type's optional parts: no span attributes of its own, no dependent left untaken.

    `span_attributes(node)` is what its attempt spans carry besides the engine's own;
    `untaken(node, output)` maps each dependent its output leaves untaken to the reason.
    """

    def span_attributes(self, node: Node) -> Mapping[str, Any]:
        return {}

    def untaken(self, node: Node, output: Any) -> Mapping[str, str]:
        return {}


@dataclass(frozen=True)
class NodeType:
    """An executor with the optional parts it really has (None: the default, so not asked per step)."""

    executor: NodeExecutor
    span_attributes: Callable[[Node], Mapping[str, Any]] | None
    untaken: Callable[[Node, Any], Mapping[str, str]] | None

    @classmethod
    def of(cls, executor: NodeExecutor) -> NodeType:
        def own(name: str) -> Any:
            # An executor written against the protocol alone may lack the optional parts.
            method = getattr(executor, name, None)
            inherited = getattr(type(executor), name, None) is getattr(ExecutorBase, name)
            return None if method is None or inherited else method

        return cls(executor, own("span_attributes"), own("untaken"))


def scope_for(ctx: NodeContext) -> dict[str, Any]:
    return {"nodes": ctx.inputs, "input": ctx.workflow_input, "execution": {"id": ctx.execution_id}}


def resolve_callable(target: Any) -> Callable[..., Any]:
    if callable(target):
        return target  # type: ignore[no-any-return]
    if not isinstance(target, str) or ":" not in target:
        raise ValueError(f"expected a callable or 'module:attribute', got {target!r}")
    module_name, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{target!r} is not callable")
    return obj  # type: ignore[no-any-return]


def _callable_problem(node: Node, key: str) -> list[str]:
    if key not in node.config:
        return [f"node {node.id!r}: config needs {key!r} (a callable or 'module:attribute')"]
    try:
        resolve_callable(node.config[key])
    except (ValueError, ImportError, AttributeError) as exc:
        return [f"node {node.id!r}: {key}: {exc}"]
    return []


def _reference_problems(node: Node, workflow: Workflow) -> list[str]:
    """A `{{ nodes.x }}` reference must name an upstream dependency, or it can never resolve."""
    refs = references(dict(node.config))
    return [
        f"node {node.id!r}: references nodes.{ref} which is not among its dependencies"
        for ref in sorted(refs - set(node.depends_on))
    ]


async def _call(fn: Callable[..., Any], *args: Any) -> Any:
    result = fn(*args)
    if inspect.isawaitable(result):
        return await result
    return result


class CodeExecutor(ExecutorBase):
    kind = SpanKind.INTERNAL

    def problems(self, node: Node, workflow: Workflow, registry: NodeRegistry) -> list[str]:
        return _callable_problem(node, "fn")

    def span_name(self, node: Node) -> str:
        return f"code {node.id}"

    async def execute(self, ctx: NodeContext) -> Any:
        return await _call(resolve_callable(ctx.node.config["fn"]), ctx)


class ToolExecutor(ExecutorBase):
    kind = SpanKind.INTERNAL

    def problems(self, node: Node, workflow: Workflow, registry: NodeRegistry) -> list[str]:
        name = node.config.get("tool")
        if not isinstance(name, str):
            return [f"node {node.id!r}: config needs 'tool' (a registered tool name)"]
        tool = registry.tools.get(name)
        if tool is None:
            known = ", ".join(registry.tools.names()) or "none registered"
            return [f"node {node.id!r}: unknown tool {name!r} (known: {known})"]
        args = node.config.get("args", {})
        if not isinstance(args, dict):
            return [f"node {node.id!r}: 'args' must be a mapping"]
        return [f"node {node.id!r}: {p}" for p in tool.check(args, partial=True)]

    def span_name(self, node: Node) -> str:
        return f"execute_tool {node.config.get('tool', node.id)}"

    def span_attributes(self, node: Node) -> Mapping[str, Any]:
        return _TOOL_ATTRIBUTES

    async def execute(self, ctx: NodeContext) -> Any:
        tool = ctx.execution.registry.tools.get(ctx.node.config["tool"])
        if tool is None:
            raise NodeError(f"tool {ctx.node.config['tool']!r} is no longer registered")
        ctx.set_attribute(t.GEN_AI_TOOL_NAME, tool.name)
        args = render(dict(ctx.node.config.get("args", {})), scope_for(ctx))
        return await tool.call(args)


_TOOL_ATTRIBUTES: Mapping[str, Any] = {t.GEN_AI_OPERATION: t.OPERATION_EXECUTE_TOOL}
_HTTP_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


class HttpExecutor(ExecutorBase):
    kind = SpanKind.CLIENT

    def problems(self, node: Node, workflow: Workflow, registry: NodeRegistry) -> list[str]:
        found = []
        url = node.config.get("url")
        if not isinstance(url, str) or not url:
            found.append(f"node {node.id!r}: config needs 'url'")
        elif "{{" not in url and not url.startswith(("http://", "https://")):
            found.append(f"node {node.id!r}: url must start with http:// or https://, got {url!r}")
        method = str(node.config.get("method", "GET")).upper()
        if method not in _HTTP_METHODS:
            found.append(f"node {node.id!r}: unsupported HTTP method {method!r}")
        return found

    def span_name(self, node: Node) -> str:
        return f"http {node.id}"

    async def execute(self, ctx: NodeContext) -> Any:
        config = render(dict(ctx.node.config), scope_for(ctx))
        method = str(config.get("method", "GET")).upper()
        headers = {str(k): str(v) for k, v in (config.get("headers") or {}).items()}
        # The attempt span is current here, so the callee joins this trace.
        inject_headers(headers, ctx.otel_context)
        ctx.set_attribute("http.request.method", method)
        ctx.set_attribute("url.full", config["url"])
        response = await ctx.execution.http_client.request(
            method,
            config["url"],
            headers=headers,
            json=config.get("json"),
            content=config.get("body"),
            params=config.get("params"),
            timeout=config.get("timeout_s", 30.0),
        )
        ctx.set_attribute("http.response.status_code", response.status_code)
        expected = config.get("expect_status")
        ok = response.status_code in expected if isinstance(expected, list) else response.status_code < 400
        if not ok:
            raise HttpStatusError(response.status_code, response.text[:300])
        body: Any
        try:
            body = response.json()
        except ValueError:
            body = response.text
        return {"status": response.status_code, "headers": dict(response.headers), "body": body}


class HttpStatusError(NodeError):
    def __init__(self, status: int, body: str) -> None:
        self.status = status
        super().__init__(f"HTTP {status}: {body}")


class LlmExecutor(ExecutorBase):
    kind = SpanKind.CLIENT

    def problems(self, node: Node, workflow: Workflow, registry: NodeRegistry) -> list[str]:
        found = []
        if not isinstance(node.config.get("model"), str):
            found.append(f"node {node.id!r}: config needs 'model'")
        if not isinstance(node.config.get("prompt"), str) and not isinstance(node.config.get("messages"), list):
            found.append(f"node {node.id!r}: config needs 'prompt' or 'messages'")
        provider = node.config.get("provider", "local")
        if provider not in registry.providers:
            found.append(
                f"node {node.id!r}: unknown LLM provider {provider!r} (known: {', '.join(sorted(registry.providers))})"
            )
        return found

    def span_name(self, node: Node) -> str:
        return f"chat {node.config.get('model', node.id)}"

    def span_attributes(self, node: Node) -> Mapping[str, Any]:
        return {t.GEN_AI_OPERATION: t.OPERATION_CHAT, t.GEN_AI_REQUEST_MODEL: str(node.config.get("model", ""))}

    async def execute(self, ctx: NodeContext) -> Any:
        config = render(dict(ctx.node.config), scope_for(ctx))
        provider = ctx.execution.registry.providers[config.get("provider", "local")]
        messages = config.get("messages") or []
        if config.get("system"):
            messages = [{"role": "system", "content": str(config["system"])}, *messages]
        if config.get("prompt"):
            messages = [*messages, {"role": "user", "content": str(config["prompt"])}]
        request = LlmRequest(
            model=config["model"],
            messages=messages,
            max_tokens=int(config.get("max_tokens", 256)),
            temperature=float(config.get("temperature", 0.0)),
        )
        started = time.perf_counter()
        first: float | None = None
        parts: list[str] = []
        input_tokens = output_tokens = 0
        async for chunk in provider.stream(request):
            if chunk.text:
                if first is None:
                    first = time.perf_counter() - started
                parts.append(chunk.text)
            if chunk.input_tokens is not None:
                input_tokens = chunk.input_tokens
                output_tokens = chunk.output_tokens or 0
        ctx.record_llm_usage(LlmUsage(request.model, provider.name, input_tokens, output_tokens, first))
        return {
            "text": "".join(parts),
            "model": request.model,
            "usage": {"inputTokens": input_tokens, "outputTokens": output_tokens},
        }


class ConditionExecutor(ExecutorBase):
    """Chooses one branch; the dependents listed under the others are skipped (`untaken`)."""

    kind = SpanKind.INTERNAL

    def problems(self, node: Node, workflow: Workflow, registry: NodeRegistry) -> list[str]:
        found = []
        branches = node.config.get("branches")
        if not isinstance(branches, dict) or not branches:
            return [f"node {node.id!r}: config needs 'branches' (name -> list of node ids)"]
        dependents = set(workflow.dependents(node.id)) if node.id in workflow.node_ids else set()
        for name, targets in branches.items():
            if not isinstance(targets, list):
                found.append(f"node {node.id!r}: branch {name!r} must list node ids")
                continue
            for target in targets:
                if target not in dependents:
                    found.append(f"node {node.id!r}: branch {name!r} target {target!r} is not a dependent of it")
        if "fn" in node.config:
            found.extend(_callable_problem(node, "fn"))
        elif "value" not in node.config:
            found.append(f"node {node.id!r}: config needs 'fn' or 'value' to choose a branch")
        default = node.config.get("default")
        if default is not None and default not in branches:
            found.append(f"node {node.id!r}: default branch {default!r} is not among the branches")
        return found

    def span_name(self, node: Node) -> str:
        return f"condition {node.id}"

    def untaken(self, node: Node, output: Any) -> Mapping[str, str]:
        if not isinstance(output, dict):
            return {}
        chosen = output.get("branch")
        return {
            target: f"branch {name!r} of {node.id!r} not taken (chose {chosen!r})"
            for name, targets in node.config.get("branches", {}).items()
            if name != chosen
            for target in targets
        }

    async def execute(self, ctx: NodeContext) -> Any:
        config = ctx.node.config
        if "fn" in config:
            choice = await _call(resolve_callable(config["fn"]), ctx)
        else:
            choice = render(config["value"], scope_for(ctx))
        choice = str(choice).lower() if isinstance(choice, bool) else str(choice)
        if choice not in config["branches"]:
            if config.get("default") is None:
                raise NodeError(f"condition chose {choice!r}, which is not a branch ({', '.join(config['branches'])})")
            choice = config["default"]
        return {"branch": choice}


class WaitExecutor(ExecutorBase):
    kind = SpanKind.INTERNAL

    def problems(self, node: Node, workflow: Workflow, registry: NodeRegistry) -> list[str]:
        has_delay = "delay_s" in node.config
        has_signal = "signal" in node.config
        if has_delay == has_signal:
            return [f"node {node.id!r}: config needs exactly one of 'delay_s' or 'signal'"]
        if has_delay and not (isinstance(node.config["delay_s"], int | float) and node.config["delay_s"] >= 0):
            return [f"node {node.id!r}: delay_s must be a number >= 0"]
        return []

    def span_name(self, node: Node) -> str:
        return f"wait {node.id}"

    async def execute(self, ctx: NodeContext) -> Any:
        if "delay_s" in ctx.node.config:
            delay = float(ctx.node.config["delay_s"])
            ctx.execution.node_waiting(ctx, f"delay {delay:g}s")
            await asyncio.sleep(delay)
            return {"waited_s": delay}
        name = str(ctx.node.config["signal"])
        return {"signal": name, "payload": await ctx.wait_for_signal(name)}


class SubworkflowExecutor(ExecutorBase):
    kind = SpanKind.INTERNAL

    def problems(self, node: Node, workflow: Workflow, registry: NodeRegistry) -> list[str]:
        target = node.config.get("workflow")
        if isinstance(target, Workflow):
            try:
                registry.validate(target)
            except WorkflowValidationError as exc:
                return [f"node {node.id!r}: subworkflow {target.id!r}: {p}" for p in exc.problems]
            return []
        if isinstance(target, str) and target:
            return []
        return [f"node {node.id!r}: config needs 'workflow' (a Workflow or a path to a workflow file)"]

    def span_name(self, node: Node) -> str:
        return f"subworkflow {node.id}"

    async def execute(self, ctx: NodeContext) -> Any:
        target = ctx.node.config["workflow"]
        if isinstance(target, str):
            from flowscope.engine.loader import load_workflow

            target = load_workflow(target)
        child_input = render(ctx.node.config.get("input", "{{ input }}"), scope_for(ctx))
        return await ctx.execution.run_child(ctx, target, child_input)


class NodeRegistry:
    """Node types, tools and LLM providers known to an engine."""

    def __init__(
        self,
        executors: Mapping[str, NodeExecutor] | None = None,
        tools: ToolRegistry | None = None,
        providers: Mapping[str, LlmProvider] | None = None,
    ) -> None:
        self.executors: dict[str, NodeExecutor] = dict(executors or _builtin_executors())
        self.tools = tools or ToolRegistry()
        self.providers: dict[str, LlmProvider] = {"local": LocalProvider(), **(providers or {})}
        self._types: dict[str, NodeType] = {}

    def executor(self, node_type: str) -> NodeExecutor:
        return self.executors[node_type]

    def node_type(self, name: str) -> NodeType:
        """The executor of node type `name` with its optional parts, found once per executor."""
        executor = self.executors[name]
        known = self._types.get(name)
        if known is None or known.executor is not executor:
            known = self._types[name] = NodeType.of(executor)
        return known

    def problems(self, workflow: Workflow) -> list[str]:
        found = structural_problems(workflow)
        for node in workflow.nodes:
            executor = self.executors.get(node.type)
            if executor is None:
                found.append(
                    f"node {node.id!r}: unknown node type {node.type!r} (known: {', '.join(sorted(self.executors))})"
                )
                continue
            found.extend(executor.problems(node, workflow, self))
            found.extend(_reference_problems(node, workflow))
        return found

    def validate(self, workflow: Workflow) -> None:
        found = self.problems(workflow)
        if found:
            raise WorkflowValidationError(workflow.id, found)


def _builtin_executors() -> dict[str, NodeExecutor]:
    return {
        "code": CodeExecutor(),
        "tool": ToolExecutor(),
        "http": HttpExecutor(),
        "llm": LlmExecutor(),
        "condition": ConditionExecutor(),
        "wait": WaitExecutor(),
        "subworkflow": SubworkflowExecutor(),
    }
