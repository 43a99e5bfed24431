"""The control plane's REST routes (docs/control.md, "Commands"): start, pause, resume, cancel and
retry runs, and list the connected engines. The commands themselves are ws_bridge/control.py's."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from flowscope.ws_bridge.api import BadRequest, UnsupportedMediaType, _require_json
from flowscope.ws_bridge.auth import Authenticator, AuthError, Principal
from flowscope.ws_bridge.control import ControlHub
from flowscope.ws_bridge.control_commands import BadCommand, ControlOutcome, loads, parse_command
from flowscope.ws_bridge.control_resume import checkpoint_answer

MAX_BODY_BYTES = 1 << 20

Handler = Callable[[Request, Principal], Awaitable[Response]]


def control_routes(control: ControlHub, auth: Authenticator) -> list[Route]:
    def guarded(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                principal = auth.authenticate(request.headers.get("authorization"), request.query_params.get("token"))
            except AuthError as exc:
                return JSONResponse({"error": str(exc)}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
            try:
                if request.method == "POST":
                    _require_json(request)
                return await handler(request, principal)
            except UnsupportedMediaType as exc:
                return _error(415, "unsupported_media_type", str(exc))
            except (BadRequest, BadCommand) as exc:
                return _error(400, "bad_request", str(exc))

        endpoint.__doc__ = handler.__doc__
        return endpoint

    async def command(request: Request, principal: Principal, op: str, fields: dict[str, Any]) -> Response:
        body = await _json_body(request)
        if isinstance(body, dict):
            body = {**body, **fields}
        parsed = parse_command(op, body, request.headers.get("idempotency-key"))
        return _respond(await control.command(principal, parsed))

    async def start(request: Request, principal: Principal) -> Response:
        """
        summary: Start a run of a workflow on a connected engine that serves it (the least loaded)
        parameters:
          - {name: Idempotency-Key, in: header, description: repeats get the first outcome, schema: {type: string}}
        requestBody:
          content:
            application/json:
              schema:
                type: object
                required: [workflowId]
                properties:
                  workflowId: {type: string}
                  version: {type: string}
                  input: {description: the workflow's input, any JSON}
                  trigger: {type: string, description: "default: api"}
                  userId: {type: string}
        responses:
          201: {description: "{executionId, engineId}: the engine started the run"}
          400: {description: "bad body: not an object, wrong types, larger than 1 MiB"}
          401: {description: missing or invalid credentials}
          403: {description: no control grant for the workflow}
          409: {description: "no connected engine serves the workflow (or version), or the key was used elsewhere"}
          413: {description: "the command would be a frame over 1 MiB (engines take at most that)"}
          502: {description: the engine answered with another execution id than the stack chose}
          415: {description: the body is not application/json}
          503: {description: "the engine went away or did not answer in time: the message says if it was delivered"}
        """
        return await command(request, principal, "start", {})

    def on_execution(op: str, summary: str, answer: str) -> Handler:
        async def handler(request: Request, principal: Principal) -> Response:
            return await command(request, principal, op, {"executionId": request.path_params["execution_id"]})

        handler.__doc__ = f"""
        summary: "{summary}"
        parameters:
          - {{name: Idempotency-Key, in: header, description: repeats get the first outcome, schema: {{type: string}}}}
        {_RETRY_BODY if op == "retry" else ""}
        responses:
          {answer}
          400: {{description: "bad body{", or no such node" if op == "retry" else ""}"}}
          401: {{description: missing or invalid credentials}}
          403: {{description: no control grant for the execution's workflow}}
          404: {{description: no such execution}}
          409: {{description: "the run ended, is in no state the command applies to, or no connected engine has it"}}
          502: {{description: "the engine's answer named another execution than the stack chose"}}
          415: {{description: the body is not application/json}}
          503: {{description: "its engine is gone or did not answer in time: the message says if it was delivered"}}
        """
        return handler

    async def engines(request: Request, principal: Principal) -> Response:
        """
        summary: Connected engines, with the workflows they serve and the executions they run
        responses:
          200: {description: "{items: [{engineId, name, connectedAt, lastHeartbeat, workflows, executions}]}"}
          401: {description: missing or invalid credentials}
          403: {description: "neither a control grant nor '*'"}
        """
        if not (principal.may_control_any or principal.unrestricted):
            return _error(403, "forbidden", "listing engines needs a control grant or '*'")
        return JSONResponse({"items": control.listing(principal)})

    pause = on_execution("pause", "Pause a running execution: no new node starts until resume", _ANSWER_PAUSED)
    resume = on_execution(
        "resume",
        "Resume a paused execution; or continue a failed, cancelled or lost one from its checkpoints as a new run",
        _ANSWER_RESUMED,
    )
    cancel = on_execution("stop", "Cancel a running execution: its running nodes are cancelled", _ANSWER_CANCEL)
    retry = on_execution("retry", "Retry an ended execution as a new run, from a node (default: the first failed)",
                         _ANSWER_RETRY)  # fmt: skip

    async def checkpoint(request: Request, principal: Principal) -> Response:
        """
        summary: What a resume of the execution would reuse, from the checkpoint store
        responses:
          200:
            description: >-
              {executionId, workflowId, workflowVersion, resumedFrom, input, reusableNodes, nodes: [{nodeId,
              stored: output|too_large|secret|unserialisable, reusable, sizeBytes, attempt, storedAt, output?}]};
              outputs and the input only with a read grant
          401: {description: missing or invalid credentials}
          404: {description: "no checkpoint of that execution, or a token that may neither read nor steer it"}
          503: {description: no checkpoint store is configured (FLOWSCOPE_CHECKPOINTS) or it cannot be read}
        """
        return _respond(await checkpoint_answer(control, principal, request.path_params["execution_id"]))

    return [
        Route("/api/v1/executions/{execution_id}/checkpoint", guarded(checkpoint)),
        Route("/api/v1/executions", guarded(start), methods=["POST"]),
        Route("/api/v1/executions/{execution_id}/pause", guarded(pause), methods=["POST"]),
        Route("/api/v1/executions/{execution_id}/resume", guarded(resume), methods=["POST"]),
        Route("/api/v1/executions/{execution_id}/cancel", guarded(cancel), methods=["POST"]),
        Route("/api/v1/executions/{execution_id}/retry", guarded(retry), methods=["POST"]),
        Route("/api/v1/engines", guarded(engines)),
    ]


_ANSWER_PAUSED = '200: {description: "{executionId, status: paused}"}'
_ANSWER_RESUMED = (
    '200: {description: "{executionId, status: running}: the paused run goes on"}\n'
    '          201: {description: "{executionId, resumedFrom}: the ended or lost run continues as a new run, on any'
    ' connected engine serving its workflow version (409 if it succeeded or none serves it)"}'
)
_ANSWER_CANCEL = '200: {description: "{executionId, status: cancelling}"}'
_ANSWER_RETRY = '201: {description: "{executionId, retryOf, fromNode}: the new run started"}'
_RETRY_BODY = """requestBody:
          content:
            application/json:
              schema: {type: object, properties: {fromNode: {type: string}}}"""


async def _json_body(request: Request) -> Any:
    """The body as JSON, read no further than MAX_BODY_BYTES; an empty body is `{}`."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise BadRequest(f"the body is larger than {MAX_BODY_BYTES} bytes (1 MiB)")
    if not body.strip():
        return {}
    try:
        return loads(body)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"the body must be a JSON object: {str(exc)[:200] or 'nested too deeply'}") from exc


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "code": code}, status_code=status)


def _respond(outcome: ControlOutcome) -> JSONResponse:
    headers = {"Retry-After": "5"} if outcome.status == 503 else None
    return JSONResponse(outcome.body, status_code=outcome.status, headers=headers)
