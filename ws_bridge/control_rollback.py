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
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from clickhouse_connect.driver.exceptions import OperationalError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from flowscope.collector.store import StoreError
from flowscope.contract import NodeState
from flowscope.contract.rollback import NodeSpec, rollback_points
from flowscope.ws_bridge.api import BadRequest, UnsupportedMediaType, _require_json
from flowscope.ws_bridge.auth import Authenticator, AuthError, Principal
from flowscope.ws_bridge.control_commands import BadCommand, CommandRequest, ControlOutcome, failure, parse_command
from flowscope.ws_bridge.control_engine import EngineSession
from flowscope.ws_bridge.history import History, HistoryUnavailable
from flowscope.ws_bridge.types import Message

if TYPE_CHECKING:
    from flowscope.ws_bridge.control import ControlHub

logger = logging.getLogger(__name__)

Handler = Callable[[Request, Principal], Awaitable[Response]]
_UNAVAILABLE = (HistoryUnavailable, OperationalError, StoreError)


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
          403: {description: the token may neither read nor steer the execution's workflow}
          404: {description: no such execution}
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
            return _respond(failure(403, f"{principal.subject!r} may neither read nor steer runs of {workflow_id!r}"))
        return _respond(points_of(control, execution))

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


def points_of(control: ControlHub, execution: dict[str, Any]) -> ControlOutcome:
    workflow_id, version = execution["workflowId"], execution.get("workflowVersion")
    graph = _graph(control, workflow_id, version)
    if graph is None:
        which = f"{workflow_id!r}" + (f" version {version!r}" if version else "")
        return failure(409, f"no connected engine serves workflow {which}: its nodes' side effects are unknown")
    folded = {n["nodeId"]: n for n in execution.get("nodes", [])}
    completed = {
        node_id for node_id, n in folded.items() if n.get("state") == NodeState.SUCCESS and not n.get("undone")
    }
    specs = [NodeSpec(n["id"], tuple(n["dependsOn"]), n["sideEffect"], n["compensable"]) for n in graph]
    nodes = [
        {"nodeId": s.id, "sideEffect": s.side_effect, "compensable": s.compensable, "completed": s.id in completed,
         "undone": bool(folded.get(s.id, {}).get("undone"))}
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


def route_rollback(
    hub: ControlHub, request: CommandRequest, workflow_id: str, running: EngineSession | None
) -> ControlOutcome | tuple[str, Message]:
    """Which engine rolls the run back, and the frame it gets (ControlHub._route)."""
    execution_id = request.execution_id
    assert execution_id is not None and request.to_node is not None
    if running is not None:
        return failure(409, f"execution {execution_id!r} is still running: stop it before rolling it back")
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
    frame |= {
        "force": request.force,
        "resume": request.resume,
        "afterSeq": max(hub.last_seq(execution_id), request.after_seq),
    }
    if request.resume:
        frame |= {"newExecutionId": uuid.uuid4().hex, "workflowId": workflow_id}
    return engine.engine_id, frame
