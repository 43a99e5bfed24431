"""Rollback with compensation: the stack's side (docs/durability.md, "Rollback"; docs/control.md).

`GET /api/v1/executions/{id}/rollback-points` says, for each node a run can be rolled back to,
what rolling back to it would compensate, skip, and could not undo. The stack knows the graph and
each node's side-effect class from the engines' hellos, and which nodes completed from the
history (the events, which also show what earlier rollbacks undid); the plan is the contract's
(contract/rollback.py), the very rule the engine applies.

`POST /api/v1/executions/{id}/rollback` `{toNode, force?, resume?}` sends the `rollback` op to the
engine that ran the run if it is connected (it remembers the outputs), else to one serving the
run's workflow version (it reads them from the checkpoint store). The engine checks and answers
at once — 409 naming the external nodes without compensation unless `force` — and carries the
compensations out after: 202, then the run's own events (`node.compensating`, …,
`workflow.rolled_back`) say how it went. Its events number on after the run's last seq, which
the stack passes along (`afterSeq`): the engine that rolls back may not be the one that ran it.
A seq past the protocol's range (MAX_AFTER_SEQ) is no run's own — only a forged event reaches
it — and is ignored.

One rollback per run at a time, across engines (`RollbacksInFlight`): from the moment one is
routed until its `workflow.rolled_back` is seen (or its engine is gone, or MAX_ROLLBACK_S), a
resume, retry or another rollback of the run is a 409 — what they would reuse is being undone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from clickhouse_connect.driver.exceptions import OperationalError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from flowscope.collector.store import StoreError
from flowscope.contract import COMPENSATION_STATES, EventName, NodeState
from flowscope.contract.rollback import MAX_AFTER_SEQ, NodeSpec, rollback_points
from flowscope.ws_bridge.api import BadRequest, UnsupportedMediaType, _require_json
from flowscope.ws_bridge.auth import Authenticator, AuthError, Principal
from flowscope.ws_bridge.control_commands import BadCommand, CommandRequest, ControlOutcome, failure, parse_command
from flowscope.ws_bridge.control_engine import EngineSession
from flowscope.ws_bridge.control_resume import CheckpointsUnavailable
from flowscope.ws_bridge.history import History, HistoryUnavailable
from flowscope.ws_bridge.types import LiveEvent, Message

if TYPE_CHECKING:
    from flowscope.ws_bridge.control import ControlHub

logger = logging.getLogger(__name__)

Handler = Callable[[Request, Principal], Awaitable[Response]]
_UNAVAILABLE = (HistoryUnavailable, OperationalError, StoreError)

# How long a rollback the stack never saw end keeps its run from being continued: compensations
# are calls to other systems, each bounded by its own timeouts, and a run held longer is freed.
MAX_ROLLBACK_S = 600.0
MAX_IN_FLIGHT = 10_000
# Node states after which a node no longer counts as completed: compensated, or forgotten by its
# engine before a compensation that never said how it went.
_UNDONE = {COMPENSATION_STATES[EventName.NODE_COMPENSATED], COMPENSATION_STATES[EventName.NODE_COMPENSATING]}


@dataclass
class _InFlight:
    engine_id: str
    since: float
    rollback_id: str | None = None  # None until its engine answered


class RollbacksInFlight:
    """The runs being rolled back, each on one engine: the stack's side of "one rollback per run"."""

    def __init__(self, max_age_s: float = MAX_ROLLBACK_S) -> None:
        self.max_age_s = max_age_s
        self._runs: OrderedDict[str, _InFlight] = OrderedDict()

    def __contains__(self, execution_id: object) -> bool:
        return execution_id in self._runs

    def begin(self, execution_id: str, engine_id: str) -> None:
        self._runs[execution_id] = _InFlight(engine_id, time.monotonic())
        while len(self._runs) > MAX_IN_FLIGHT:
            self._runs.popitem(last=False)

    def answered(self, command: Message, result: Message) -> None:
        """An engine's answer to a command: a rollback it took is in flight, one it refused is not."""
        entry = self._runs.get(command.get("executionId") or "")
        if command.get("op") != "rollback" or entry is None or entry.rollback_id is not None:
            return
        rollback_id = result.get("rollbackId")
        if result.get("ok") is True and isinstance(rollback_id, str):
            entry.rollback_id = rollback_id
        else:
            del self._runs[command["executionId"]]

    def observe(self, events: Iterable[LiveEvent]) -> None:
        """The live feed: a run's `workflow.rolled_back` ends its rollback."""
        if not self._runs:
            # Called for every batch of live events: with no rollback in flight there is nothing to end.
            return
        for event in events:
            if event["type"] != EventName.WORKFLOW_ROLLED_BACK:
                continue
            entry = self._runs.get(event["executionId"])
            data = event.get("data")
            said = data.get("rollbackId") if isinstance(data, dict) else None
            if entry is not None and entry.rollback_id in (None, said):
                del self._runs[event["executionId"]]

    def refusal(self, hub: ControlHub, execution_id: str, op: str) -> ControlOutcome | None:
        """409 while the run is being rolled back; None once it is not (or cannot be any more)."""
        entry = self._runs.get(execution_id)
        if entry is None:
            return None
        session = hub.engines.get(entry.engine_id)
        gone = hub._gone.get(entry.engine_id)  # its compensations may still run while it may return
        alive = session is not None or (gone is not None and hub._may_return(gone))
        if not alive or time.monotonic() - entry.since > self.max_age_s:
            del self._runs[execution_id]
            return None
        return failure(
            409,
            f"execution {execution_id!r} is being rolled back: no {op} until its workflow.rolled_back is in",
        )


def rollback_routes(control: ControlHub, history: History | None, auth: Authenticator) -> list[Route]:
    # Imported here: control_api imports the hub, which imports this module's route_rollback.
    from flowscope.ws_bridge.control_api import _json_body, _respond

    def guarded(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                principal = auth.authenticate(request.headers.get("authorization"), request.query_params.get("token"))
            except AuthError as exc:
                return JSONResponse({"error": str(exc)}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
            if history is None:
                return _respond(failure(503, "history is not available: no ClickHouse store is configured"))
            try:
                if request.method == "POST":
                    _require_json(request)
                return await handler(request, principal)
            except UnsupportedMediaType as exc:
                return JSONResponse({"error": str(exc), "code": "unsupported_media_type"}, status_code=415)
            except (BadRequest, BadCommand) as exc:
                return _respond(failure(400, str(exc)))
            except _UNAVAILABLE as exc:
                return _respond(failure(503, f"history is unavailable: {exc}"))

        endpoint.__doc__ = handler.__doc__
        return endpoint

    async def points(request: Request, principal: Principal) -> Response:
        """
        summary: The nodes a run can be rolled back to, each with what a rollback to it would undo
        responses:
          200:
            description: >-
              {executionId, workflowId, workflowVersion, nodes: [{nodeId, sideEffect, compensable,
              completed, undone}], points: [{toNode, compensate, skipped, cannotUndo, steps}]}
          401: {description: missing or invalid credentials}
          404: {description: "no such execution, or one the token may neither read nor steer"}
          409: {description: "no connected engine announced the run's workflow: its side effects are the engine's word"}
          503: {description: the history store is unavailable}
        """
        assert history is not None
        execution_id = request.path_params["execution_id"]
        execution = await asyncio.to_thread(history.get_execution, execution_id)
        if execution is None:
            return _respond(failure(404, f"no execution {execution_id!r}"))
        workflow_id = execution["workflowId"]
        event = {"workflowId": workflow_id, "executionId": execution_id}
        if not (principal.may_see(event, execution.get("userId")) or principal.may_control(workflow_id)):
            # Neither readable nor steerable: the caller learns nothing of it, not even its workflow.
            return _respond(failure(404, f"no execution {execution_id!r}"))
        return _respond(points_of(control, execution, await forgotten_nodes(control, execution)))

    async def roll_back(request: Request, principal: Principal) -> Response:
        """
        summary: Roll an ended run back to a completed node, compensating the nodes after it (latest first)
        parameters:
          - {name: Idempotency-Key, in: header, description: repeats get the first outcome, schema: {type: string}}
        requestBody:
          content:
            application/json:
              schema:
                type: object
                required: [toNode]
                properties:
                  toNode: {type: string, description: the completed node the run goes back to}
                  force: {type: boolean, description: "pass external nodes without compensation (default: false)"}
                  resume: {type: boolean, description: "then continue from toNode as a new run (default: false)"}
        responses:
          202:
            description: >-
              {executionId, rollbackId, toNode, compensate, skipped, cannotUndo, forced,
              resumeExecutionId?}: checked and started; the run's events follow it
          400: {description: "bad body, unknown node, or a node that did not complete in the run"}
          401: {description: missing or invalid credentials}
          403: {description: no control grant for the execution's workflow}
          404: {description: no such execution}
          409:
            description: >-
              external nodes without compensation would be passed (named; send force), the run
              is still running or being rolled back, or no connected engine serves its workflow
              or holds it
          415: {description: the body is not application/json}
          503: {description: "the engine is gone or did not answer in time, or the history is unavailable"}
        """
        assert history is not None
        execution_id = request.path_params["execution_id"]
        body = await _json_body(request)
        if isinstance(body, dict):
            body = {**body, "executionId": execution_id}
        parsed = parse_command("rollback", body, request.headers.get("idempotency-key"))
        stored = await asyncio.to_thread(history.last_seq, execution_id)
        return _respond(await control.command(principal, dataclasses.replace(parsed, after_seq=stored)))

    return [
        Route("/api/v1/executions/{execution_id}/rollback-points", guarded(points)),
        Route("/api/v1/executions/{execution_id}/rollback", guarded(roll_back), methods=["POST"]),
    ]


def _graph(control: ControlHub, workflow_id: str, version: str | None) -> list[dict[str, Any]] | None:
    """The nodes of the workflow version as a connected engine announced them."""
    for session in control.engines.values():
        for workflow in session.workflows:
            if workflow["workflowId"] == workflow_id and version in (None, "", workflow["version"]):
                nodes: list[dict[str, Any]] = workflow["nodes"]
                return nodes
    return None


async def forgotten_nodes(control: ControlHub, execution: dict[str, Any]) -> frozenset[str]:
    """The nodes the history says completed whose checkpoints a rollback deleted: an engine killed
    mid-rollback may never have exported the events saying so. Every completed node of a
    checkpointed run has a row (a reused one too, a marker for an output not kept), so a missing
    row is one forgotten; a run without checkpoints, or a store that cannot be read, tells nothing."""
    if not control.checkpoints.configured:
        return frozenset()
    try:
        summary = await control.checkpoints.describe(execution["executionId"])
    except CheckpointsUnavailable:
        return frozenset()
    if summary.run is None:
        return frozenset()
    kept = {node.node_id for node in summary.nodes}
    done = {n["nodeId"] for n in execution.get("nodes", []) if n.get("state") == NodeState.SUCCESS}
    return frozenset(done - kept)


def points_of(
    control: ControlHub, execution: dict[str, Any], forgotten: frozenset[str] = frozenset()
) -> ControlOutcome:
    workflow_id, version = execution["workflowId"], execution.get("workflowVersion")
    graph = _graph(control, workflow_id, version)
    if graph is None:
        which = f"{workflow_id!r}" + (f" version {version!r}" if version else "")
        return failure(409, f"no connected engine serves workflow {which}: its nodes' side effects are unknown")
    folded = {n["nodeId"]: n for n in execution.get("nodes", [])}
    undone = {node_id for node_id, n in folded.items() if _undone(n)} | forgotten
    completed = {node_id for node_id, n in folded.items() if n.get("state") == NodeState.SUCCESS} - undone
    specs = [NodeSpec(n["id"], tuple(n["dependsOn"]), n["sideEffect"], n["compensable"]) for n in graph]
    nodes = [
        {"nodeId": s.id, "sideEffect": s.side_effect, "compensable": s.compensable, "completed": s.id in completed,
         "undone": s.id in undone}
        for s in specs
    ]  # fmt: skip
    body = {
        "executionId": execution["executionId"],
        "workflowId": workflow_id,
        "workflowVersion": version,
        "nodes": nodes,
        "points": [plan.as_dict() for plan in rollback_points(specs, completed)],
    }
    return ControlOutcome(200, body)


def _undone(node: dict[str, Any]) -> bool:
    """A rollback passed it, or its own compensation did (or began: an engine killed then forgot
    its checkpoint first, so it is no completed node any more)."""
    compensation = node.get("compensation")
    state = compensation.get("state") if isinstance(compensation, dict) else None
    return bool(node.get("undone")) or state in _UNDONE


def route_rollback(
    hub: ControlHub, request: CommandRequest, workflow_id: str, running: EngineSession | None
) -> ControlOutcome | tuple[str, Message]:
    """Which engine rolls the run back, and the frame it gets (ControlHub._route)."""
    execution_id = request.execution_id
    assert execution_id is not None and request.to_node is not None
    if running is not None:
        return failure(409, f"execution {execution_id!r} is still running: stop it before rolling it back")
    busy = hub.rollbacks.refusal(hub, execution_id, "other rollback")
    if busy is not None:
        return busy
    ran = hub._ran.get(execution_id)  # the hub's routing, kept apart from ControlHub._route
    version = ran.version if ran is not None else ""
    engine = hub.engines.get(ran.engine_id) if ran is not None else None
    if engine is None:
        serving = [s for s in hub.engines.values() if s.serves(workflow_id, version or None)]
        if not serving:
            which = f"{workflow_id!r}" + (f" version {version!r}" if version else "")
            return failure(409, f"no connected engine serves workflow {which}: a rollback needs one")
        engine = min(serving, key=lambda s: len(s.executions))
    if not engine.has_node(workflow_id, version, request.to_node):
        return failure(400, f"workflow {workflow_id!r} has no node {request.to_node!r}")
    frame: Message = {"op": "rollback", "executionId": execution_id, "toNode": request.to_node}
    frame |= {"force": request.force, "resume": request.resume, "afterSeq": _after_seq(hub, request)}
    if request.resume:
        frame |= {"newExecutionId": uuid.uuid4().hex, "workflowId": workflow_id}
    hub.rollbacks.begin(execution_id, engine.engine_id)
    return engine.engine_id, frame


def _after_seq(hub: ControlHub, request: CommandRequest) -> int:
    """The run's last seq as the stack knows it, live or stored; one past the protocol's range is
    a forged event's (an ingest token can write any seq), not where the run ended: ignored."""
    assert request.execution_id is not None
    known = [hub.last_seq(request.execution_id), request.after_seq]
    kept = [seq for seq in known if 0 <= seq <= MAX_AFTER_SEQ]
    if len(kept) < len(known):
        logger.warning("execution %s: a seq past %d ignored (forged?)", request.execution_id, MAX_AFTER_SEQ)
    return max(kept, default=0)
