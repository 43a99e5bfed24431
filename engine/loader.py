"""Declarative workflows: the YAML/JSON file format, equivalent to the Python builder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from flowscope.engine.dag import Node, Workflow, WorkflowValidationError, structural_problems
from flowscope.engine.retry import RetryPolicy

_WORKFLOW_KEYS = {"id", "name", "version", "description", "timeout_s", "nodes"}
_NODE_KEYS = {"id", "type", "label", "depends_on", "retry", "timeout_s", "config", "compensate", "side_effect"}


def load_workflow(path: str | Path) -> Workflow:
    """Read a workflow file (.yaml/.yml/.json); every problem is reported at once."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise WorkflowValidationError(str(path), [f"cannot read {path}: {exc.strerror}"]) from exc
    try:
        raw = json.loads(text) if source.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise WorkflowValidationError(str(path), [f"{path} is not valid {source.suffix[1:] or 'YAML'}: {exc}"]) from exc
    return workflow_from_dict(raw, origin=str(path))


def workflow_from_dict(raw: Any, *, origin: str = "<dict>") -> Workflow:
    if not isinstance(raw, dict):
        raise WorkflowValidationError(origin, ["the document must be a mapping with 'id' and 'nodes'"])
    problems: list[str] = []
    unknown = set(raw) - _WORKFLOW_KEYS
    if unknown:
        problems.append(f"unknown workflow keys: {', '.join(sorted(unknown))}")
    workflow_id = str(raw.get("id") or "")
    raw_nodes = raw.get("nodes")
    nodes: list[Node] = []
    if not isinstance(raw_nodes, list):
        problems.append("'nodes' must be a list")
        raw_nodes = []
    for index, item in enumerate(raw_nodes):
        node, node_problems = _node(item, index)
        problems.extend(node_problems)
        if node is not None:
            nodes.append(node)
    timeout = raw.get("timeout_s")
    workflow = Workflow(
        id=workflow_id,
        name=str(raw.get("name") or workflow_id),
        version=str(raw.get("version", "1")),
        description=str(raw.get("description", "")),
        timeout_s=float(timeout) if isinstance(timeout, int | float) else None,
        nodes=tuple(nodes),
    )
    if timeout is not None and not isinstance(timeout, int | float):
        problems.append("timeout_s must be a number")
    problems.extend(structural_problems(workflow))
    if problems:
        raise WorkflowValidationError(workflow_id or origin, problems)
    return workflow


def _node(item: Any, index: int) -> tuple[Node | None, list[str]]:
    where = f"nodes[{index}]"
    if not isinstance(item, dict):
        return None, [f"{where} must be a mapping"]
    problems = []
    node_id = item.get("id")
    if not isinstance(node_id, str) or not node_id:
        return None, [f"{where} needs a string 'id'"]
    unknown = set(item) - _NODE_KEYS
    if unknown:
        problems.append(f"node {node_id!r}: unknown keys {', '.join(sorted(unknown))} (put settings under 'config')")
    node_type = item.get("type")
    if not isinstance(node_type, str):
        problems.append(f"node {node_id!r}: needs a string 'type'")
        node_type = ""
    deps = item.get("depends_on", [])
    if isinstance(deps, str):
        deps = [deps]
    if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
        problems.append(f"node {node_id!r}: depends_on must be a list of node ids")
        deps = []
    config = item.get("config", {})
    if not isinstance(config, dict):
        problems.append(f"node {node_id!r}: config must be a mapping")
        config = {}
    try:
        retry = RetryPolicy.from_config(item.get("retry"))
    except (ValueError, TypeError) as exc:
        problems.append(f"node {node_id!r}: retry: {exc}")
        retry = RetryPolicy()
    timeout = item.get("timeout_s")
    if timeout is not None and not isinstance(timeout, int | float):
        problems.append(f"node {node_id!r}: timeout_s must be a number")
        timeout = None
    compensate, side_effect = item.get("compensate"), item.get("side_effect", "none")
    if compensate is not None and not isinstance(compensate, str):
        problems.append(f"node {node_id!r}: compensate must be a 'module:function' string")
        compensate = None
    if not isinstance(side_effect, str):
        # structural_problems names the allowed values.
        side_effect = repr(side_effect)
    node = Node(
        id=node_id,
        type=node_type,
        label=str(item.get("label", "")),
        config=config,
        depends_on=tuple(deps),
        retry=retry,
        timeout_s=float(timeout) if timeout is not None else None,
        compensate=compensate,
        side_effect=side_effect,
    )
    return node, problems
