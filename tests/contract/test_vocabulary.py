"""The shared vocabulary agrees with the documents that publish it."""

from __future__ import annotations

import ast
import pathlib
import re

import flowscope.contract as contract
from flowscope.contract import DerivedEventName, EventName, NodeState, Result, RunStatus, attributes
from flowscope.contract.page import page_constants

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_contract_imports_nothing_of_the_project() -> None:
    """The bottom of the dependency graph: any component may import it without a cycle."""
    project = {"engine", "collector", "ws_bridge", "flowscope"}
    for path in (ROOT / "contract").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            parts = [n.split(".") for n in names]
            # flowscope.<component> is the component; any other flowscope.* is the CLI's package
            roots = {p[1] if p[0] == "flowscope" and p[1:2] and p[1] in {"contract", *project} else p[0] for p in parts}
            assert not roots & project, f"{path.name} imports {names}"


def test_every_documented_event_name_is_in_the_contract() -> None:
    docs = (ROOT / "docs" / "telemetry.md").read_text() + (ROOT / "docs" / "live-protocol.md").read_text()
    # `workflow.id`, `workflow.name`… are attribute keys with the same shape as event names.
    named = set(re.findall(r"`((?:workflow|node|execution|performance)\.[a-z_]+)`", docs))
    documented = named - attributes.ATTRIBUTE_KEYS
    names = {str(e) for e in EventName} | {str(e) for e in DerivedEventName}
    assert documented == names
    assert names == set(contract.LIVE_EVENT_TYPES)


def test_results_are_the_documented_ones() -> None:
    text = (ROOT / "docs" / "telemetry.md").read_text()
    paragraph = text[text.index("Results (") :].split("Failed spans", 1)[0]
    assert {str(r) for r in Result} == set(re.findall(r"`([a-z]+)`", paragraph))
    assert set(contract.STORED_RUN_STATUSES) == {
        RunStatus.RUNNING,
        RunStatus.LOST,
        *(r.value for r in Result if r is not Result.SKIP),
    }


def test_a_node_failed_by_cancellation_is_cancelled() -> None:
    assert contract.node_state("node.failed", {"result": "cancellation"}) is NodeState.CANCELLED
    assert contract.node_state("node.failed", {"result": "failure"}) is NodeState.FAILED
    assert contract.node_state("workflow.started", {}) is None


def test_lost_and_recovered_are_run_events_that_end_nothing() -> None:
    """docs/control.md: a lost run may still recover or finish; the list follows both events."""
    for name in (EventName.WORKFLOW_LOST, EventName.WORKFLOW_RECOVERED):
        assert name in contract.RUN_EVENTS and name not in contract.TERMINAL_EVENTS
        assert name in contract.LIVE_EVENT_TYPES
    assert RunStatus.LOST in contract.STORED_RUN_STATUSES
    # Not succeeded, not running: the aggregates count a lost run with the failed ones.
    assert RunStatus.LOST not in contract.NOT_FAILED_RUN_STATUSES
    page = page_constants()
    assert {"workflow.lost", "workflow.recovered"} <= set(page["runEvents"])
    assert "lost" in page["storedRunStatuses"] and page["control"]["CONTROL_RESULT"] == "control.result"
