"""The stack's side of the control plane (docs/control.md): connected engines, commands, liveness.

Engines dial in on /control/v1/engine (ws_bridge/control_engine.py holds the channel) and
announce the workflows they serve; their heartbeats say which executions each one runs. A
command from REST or the live WebSocket is authorised here, routed to the one engine it
concerns, and waited for: a command whose engine went away stays pending with that engine and
is sent again if the same engineId comes back within the timeout — the engine answers a
repeated commandId from memory, so a command is applied once — else the caller learns whether
it had been delivered. Executions of an engine whose channel closed or that went silent are
declared lost (`EmitLost`), and told so if their engine comes back with them.

Runs on the event loop only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from flowscope.contract import RunStatus
from flowscope.ws_bridge.auth import Principal
from flowscope.ws_bridge.control_commands import AFTER, CommandRequest, ControlOutcome, failure, outcome_of
from flowscope.ws_bridge.control_engine import (
    CLOSE_CONFLICT,
    CLOSE_TOO_MANY,
    EngineSession,
    Pending,
    Refusal,
    RunInfo,
    encode,
)
from flowscope.ws_bridge.control_events import EmitLost, LostRun
from flowscope.ws_bridge.control_resume import NOT_RESUMABLE, CheckpointReader, CheckpointsUnavailable, StoredRun
from flowscope.ws_bridge.control_rollback import RollbacksInFlight, route_rollback
from flowscope.ws_bridge.control_sweep import Orphan
from flowscope.ws_bridge.types import Message

logger = logging.getLogger(__name__)

# The frame that tells an engine one of its runs was declared lost.
LOST_FRAME = RunStatus.LOST.value
# What is remembered of engines, commands and runs that are gone: enough to route a repeated
# command or a retry, and to tell "gone" from "never heard of", never unbounded.
MAX_REMEMBERED = 10_000
# Commands sent with an Idempotency-Key, kept so a repeat is the same frame to the same engine;
# a start's input may be large, so they are bounded by bytes as well.
MAX_KEYED_BYTES = 64 << 20
MAX_GONE_ENGINES = 1_000
# The largest command frame sent to an engine, encoded (engines take up to 4 MiB: docs/control.md).
MAX_COMMAND_BYTES = 1 << 20
# Live engine connections one token subject may hold; each keeps its hello in memory.
MAX_ENGINES_PER_SUBJECT = 32
# A connection that has not said hello by then is closed.
HELLO_TIMEOUT_S = 10.0
# How far a heartbeat's seq may run ahead of the last seq the stack saw of a run (its events may
# lag behind the heartbeat); the lost event takes seq + 1, which stays below the protocol's 2**62.
SEQ_MARGIN = 100_000
MAX_SEQ = 2**62 - 2

# (workflow id, user id or "") of an execution, as its first stored record named them.
StoredOwner = Callable[[str], tuple[str, str] | None]


@dataclass(frozen=True)
class _Ran:
    engine_id: str
    workflow_id: str
    version: str
    ended: str | None = None  # the result of a `finished` run
    # Started by the stack on this engine (of this token subject): no other engine may claim it.
    started: bool = False
    subject: str = ""


class ControlHub:
    def __init__(
        self,
        *,
        stored_owner: StoredOwner | None = None,
        last_seq: Callable[[str], int] | None = None,
        emit_lost: EmitLost | None = None,
        timeout_s: float = 5.0,
        lost_after_s: float = 10.0,
        heartbeat_interval_s: float = 2.0,
        max_frame_bytes: int = 1 << 20,
        stored_run: StoredRun | None = None,
        checkpoints: CheckpointReader | None = None,
    ) -> None:
        self.stored_owner = stored_owner
        # A resume of an ended or lost run: its stored status and version, and the checkpoint store.
        self.stored_run = stored_run
        self.checkpoints = checkpoints or CheckpointReader(None)
        self.last_seq = last_seq or (lambda execution_id: 0)
        self.emit_lost = emit_lost
        self.timeout_s = timeout_s
        self.lost_after_s = lost_after_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.max_frame_bytes = max_frame_bytes
        self.max_engines_per_subject = MAX_ENGINES_PER_SUBJECT
        self.hello_timeout_s = HELLO_TIMEOUT_S
        self.engines: dict[str, EngineSession] = {}
        self._gone: OrderedDict[str, EngineSession] = OrderedDict()
        # The token subject whose engine first went by an engine id.
        self._first_subject: OrderedDict[str, str] = OrderedDict()
        self._pending: dict[str, dict[str, Pending]] = {}
        # Keyed commands: their engine, their frame, the frame's input size, the request's digest.
        self._keyed: OrderedDict[str, tuple[str, Message, int, str]] = OrderedDict()
        self._keyed_bytes = 0
        self._ran: OrderedDict[str, _Ran] = OrderedDict()
        # Runs declared lost: the engine (subject, engineId) that ran them, and the seq.
        self._lost: OrderedDict[str, tuple[tuple[str, str], int]] = OrderedDict()
        # Per run: the last seq the stack saw of it, and when it noticed that seq.
        self._progress: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._stored_owners: OrderedDict[str, str] = OrderedDict()
        self._liveness: asyncio.Task[None] | None = None
        # After a restart: the stored running runs and their engines (ws_bridge/control_sweep.py).
        self.stored_orphans: Callable[[], list[Orphan]] | None = None
        self._sweep: asyncio.Task[None] | None = None
        self.lost_declared = 0
        self.rollbacks = RollbacksInFlight()  # one rollback per run, across engines

    # -- life --------------------------------------------------------------------------------

    def start(self) -> None:
        if self._liveness is None:
            self._liveness = asyncio.create_task(self._watch())
        if self._sweep is None and self.stored_orphans is not None:
            self._sweep = asyncio.create_task(self._sweep_orphans(self.stored_orphans))

    async def aclose(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweep
        if self._liveness is not None:
            self._liveness.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._liveness
            self._liveness = None
        self.checkpoints.close()

    async def _watch(self) -> None:
        # Often enough that a closed channel is noticed well within lost_after_s.
        period = max(0.05, min(1.0, self.lost_after_s / 4))
        while True:
            await asyncio.sleep(period)
            try:
                self.check_liveness()
            except Exception:
                logger.exception("the control plane's liveness check failed")

    # -- engines (called by the channel) ---------------------------------------------------------

    def attach(self, session: EngineSession) -> Refusal | None:
        """Registers an engine after its hello; the refusal when another subject's engine holds
        that engineId, or the subject has its fill of engines. A reconnect of the same engine
        replaces its old session."""
        session.engine_id = engine_id = self._key_for(session.subject, session.announced_id)
        old = self.engines.get(engine_id)
        if old is not None and old.subject != session.subject:
            return "conflict", f"engine id {engine_id!r} is connected for another token subject", CLOSE_CONFLICT
        others = sum(1 for s in self.engines.values() if s.subject == session.subject and s is not old)
        if others >= self.max_engines_per_subject:
            message = f"{session.subject!r} has {others} engines connected, the most one token subject may"
            return "too_many_engines", message, CLOSE_TOO_MANY
        if old is not None:
            old.replace("replaced by a new connection of this engine")
        gone = self._gone.pop(engine_id, None)
        if gone is not None and gone.subject != session.subject:
            # Commands meant for another subject's engine are not handed to this one.
            for pending in self._pending.pop(engine_id, {}).values():
                pending.abandon()
        self.engines[engine_id] = session
        session.send(
            {
                "type": "welcome",
                "engineId": session.announced_id,
                "heartbeatIntervalS": self.heartbeat_interval_s,
                "lostAfterS": self.lost_after_s,
            }
        )
        self.heartbeat(session, session.executions)
        for pending in self._pending.get(engine_id, {}).values():
            session.send(pending.frame, pending)
        logger.info("engine %s (%s) connected for %s", engine_id, session.name, session.subject)
        return None

    def _key_for(self, subject: str, engine_id: str) -> str:
        """The stack's name for an engine: its own id, unless another token subject's engine
        went by that id first — then the id scoped by the subject, so no subject can take
        another's engine id (and its held commands and runs) by saying hello with it first."""
        holder = self.engines.get(engine_id) or self._gone.get(engine_id)
        first = holder.subject if holder is not None else self._first_subject.get(engine_id)
        if first is not None and first != subject:
            return f"{engine_id}@{subject}"
        self._first_subject[engine_id] = subject
        self._first_subject.move_to_end(engine_id)
        while len(self._first_subject) > MAX_REMEMBERED:
            self._first_subject.popitem(last=False)
        return engine_id

    def detach(self, session: EngineSession, *, stack_stopping: bool = False) -> None:
        """Forgets a connection; its runs are lost at the next check, unless the stack itself
        closed it as it stops (its engine still runs them and tells the next stack)."""
        if self.engines.get(session.engine_id) is not session:
            return
        if stack_stopping:
            session.declared.update(session.executions)
        del self.engines[session.engine_id]
        session.closed_at = time.monotonic()
        for execution_id in session.executions:
            self._moved(execution_id, session.closed_at)
        # Only its runs matter once it is gone (lost, held commands, retries): not its graphs.
        session.workflows = []
        self._gone[session.engine_id] = session
        self._gone.move_to_end(session.engine_id)
        while len(self._gone) > MAX_GONE_ENGINES:
            self._gone.popitem(last=False)
        logger.info("engine %s (%s) disconnected", session.engine_id, session.name)

    def heartbeat(self, session: EngineSession, executions: dict[str, RunInfo]) -> None:
        session.executions = self._claimed(session, executions)
        session.seen()
        key = (session.subject, session.engine_id)
        now = time.monotonic()
        for execution_id, run in session.executions.items():
            self._moved(execution_id, now)
            ran = self._ran.get(execution_id)
            started = ran is not None and ran.started
            self._remember(
                execution_id, _Ran(session.engine_id, run.workflow_id, run.version, None, started, session.subject)
            )
            lost = self._lost.get(execution_id)
            if lost is not None and lost[0] in (key, ("", session.announced_id)):
                # It was declared lost but lives: the engine emits workflow.recovered after this seq.
                del self._lost[execution_id]
                session.send({"type": LOST_FRAME, "executionId": execution_id, "seq": lost[1]})
            session.declared.discard(execution_id)

    def _claimed(self, session: EngineSession, executions: dict[str, RunInfo]) -> dict[str, RunInfo]:
        """What an engine lists, less the runs that are another's: a run belongs to the engine
        the stack started it on, else to the first engine that listed it (an engine's id is
        its process's: a run never moves to another under the same execution id). Seqs are
        held near what the stack saw of the run."""
        kept = {}
        for execution_id, run in executions.items():
            # The stack's record decides; only a run it has none of is looked for among the engines.
            ran = self._ran.get(execution_id)
            holder = self._running_on(execution_id) if ran is None else None
            if (holder is not None and holder is not session) or not self._owns(session, execution_id):
                logger.warning(
                    "engine %s claims execution %s, another engine's: ignored", session.engine_id, execution_id
                )
                continue
            known = self.last_seq(execution_id)
            seq = min(run.seq, known + SEQ_MARGIN) if known else run.seq
            kept[execution_id] = run if seq == run.seq else replace(run, seq=seq)
        return kept

    def _owns(self, session: EngineSession, execution_id: str) -> bool:
        ran = self._ran.get(execution_id)
        return ran is None or (ran.subject, ran.engine_id) == (session.subject, session.engine_id)

    def finished(self, session: EngineSession, execution_id: str, workflow_id: str, result: str) -> None:
        if execution_id not in session.executions and not self._owns(session, execution_id):
            logger.warning(
                "engine %s reports the end of %s, another engine's: ignored", session.engine_id, execution_id
            )
            return
        run = session.executions.pop(execution_id, None)
        version = run.version if run is not None else self._version_of(execution_id)
        self._remember(
            execution_id, _Ran(session.engine_id, workflow_id, version, result or "ended", False, session.subject)
        )
        self._lost.pop(execution_id, None)

    def result(self, session: EngineSession, frame: Message) -> None:
        command_id = frame["commandId"]
        pending = self._pending.get(session.engine_id, {}).pop(command_id, None)
        if pending is not None and frame.get("ok") is True:
            chosen = _new_execution(pending.frame)
            if chosen is not None and frame.get("executionId") not in (None, chosen):
                # The id is the stack's choice: an engine answering another run's id started nothing we know.
                logger.warning("engine %s answered %s for %s", session.engine_id, frame.get("executionId"), chosen)
                frame = {
                    **frame,
                    "ok": False,
                    "code": "engine_error",
                    "error": "the engine answered another execution id",
                }
            else:
                self._applied(session, pending.frame, frame)
        if pending is not None:
            self.rollbacks.answered(pending.frame, frame)
            pending.answer(frame)

    def _applied(self, session: EngineSession, command: Message, result: Message) -> None:
        op = command["op"]
        execution_id = _new_execution(command)
        if execution_id is not None:
            workflow_id = str(command.get("workflowId") or self._workflow_of(command["executionId"]) or "")
            version = str(command.get("version") or self._version_of(command["executionId"]))
            session.executions[execution_id] = RunInfo(workflow_id, version, RunStatus.RUNNING.value, 0)
            self._remember(execution_id, _Ran(session.engine_id, workflow_id, version, None, True, session.subject))
        elif op in ("pause", "resume"):
            run = session.executions.get(command["executionId"])
            if run is not None:
                session.executions[command["executionId"]] = run.with_status(AFTER[op])

    # -- liveness ---------------------------------------------------------------------------

    def check_liveness(self) -> None:
        """Declares lost every execution of an engine whose channel closed, or that stayed
        silent for lost_after_s, once."""
        now = time.monotonic()
        for session in list(self._gone.values()):
            if session.closed_at is not None and session.executions.keys() - session.declared:
                # Still since the channel closed, or for lost_after_s if its events went on after.
                self._declare_lost(session, "the engine's control channel closed", now, session.closed_at)
        for session in list(self.engines.values()):
            silent = now - session.last_seen
            if silent > self.lost_after_s and session.executions.keys() - session.declared:
                self._declare_lost(session, f"the engine sent no heartbeat for {silent:.0f} s", now)

    def _moved(self, execution_id: str, now: float) -> float:
        """When the run's events last moved on (as far as the checks and heartbeats noticed);
        -inf for a run without events. An engine whose control channel alone was cut goes on
        exporting: its runs are not lost, and a lost event would take a seq its own next takes."""
        seq = self.last_seq(execution_id)
        if seq == 0:
            return -math.inf
        seen = self._progress.get(execution_id)
        if seen is None or seen[0] != seq:
            self._progress[execution_id] = seen = (seq, now)
            self._progress.move_to_end(execution_id)
            while len(self._progress) > MAX_REMEMBERED:
                self._progress.popitem(last=False)
        return seen[1]

    def _declare_lost(self, session: EngineSession, reason: str, now: float, still_since: float = -math.inf) -> None:
        for execution_id, run in list(session.executions.items()):
            if execution_id in session.declared:
                continue
            moved = self._moved(execution_id, now)
            if moved > still_since and moved > now - self.lost_after_s:
                continue
            session.declared.add(execution_id)
            before = self._lost.get(execution_id)
            last = self.last_seq(execution_id)
            seq = min(max(last, run.seq, before[1] if before is not None else 0) + 1, MAX_SEQ + 1)
            self._lost[execution_id] = ((session.subject, session.engine_id), seq)
            self._lost.move_to_end(execution_id)
            while len(self._lost) > MAX_REMEMBERED:
                self._lost.popitem(last=False)
            self.lost_declared += 1
            logger.warning("execution %s is lost: %s (engine %s)", execution_id, reason, session.engine_id)
            if self.emit_lost is None:
                continue
            ran = self._ran.get(execution_id)
            started = ran is not None and ran.started
            lost = LostRun(
                execution_id=execution_id,
                # The stored owner's workflow when the stack knows it, never only the engine's word.
                workflow_id=self._stored_owners.get(execution_id)
                or (ran.workflow_id if started and ran is not None else run.workflow_id),
                seq=seq,
                engine_id=session.engine_id,
                engine_name=session.name,
                reason=reason,
                last_heartbeat_unix_nano=session.last_heartbeat_ns,
                # Started here, or its events seen: else only its stored start makes it a run at all.
                known=started or last > 0,
            )
            try:
                self.emit_lost(lost)
            except Exception:
                logger.exception("could not emit workflow.lost for %s", execution_id)

    async def _sweep_orphans(self, stored_orphans: Callable[[], list[Orphan]]) -> None:
        """Once every engine still alive had time to say hello, the stored running runs of
        engines that did not are lost (their engines died while the stack was down)."""
        await asyncio.sleep(self.lost_after_s + self.heartbeat_interval_s)
        try:
            orphans = await asyncio.to_thread(stored_orphans)
        except Exception:
            logger.exception("could not read the stored running runs after the start")
            return
        present = {s.announced_id for s in self.engines.values()}
        for orphan in orphans:
            execution_id = orphan.execution_id
            if orphan.engine_id in present or self._running_on(execution_id) or execution_id in self._lost:
                continue
            seq = min(max(orphan.last_seq, self.last_seq(execution_id)) + 1, MAX_SEQ + 1)
            # Told to that engine if it ever lists the run again, whatever its token subject.
            self._lost[execution_id] = (("", orphan.engine_id), seq)
            self.lost_declared += 1
            logger.warning("execution %s is lost: its engine %s did not come back", execution_id, orphan.engine_id)
            if self.emit_lost is not None:
                reason = "its engine did not come back after the stack restarted"
                lost = LostRun(execution_id, orphan.workflow_id, seq, orphan.engine_id, "", reason)
                try:
                    self.emit_lost(lost)
                except Exception:
                    logger.exception("could not emit workflow.lost for %s", execution_id)

    # -- commands ----------------------------------------------------------------------------

    async def command(self, principal: Principal, request: CommandRequest) -> ControlOutcome:
        """Authorises, routes and sends one command, and waits for the engine's answer."""
        if principal.expired:
            return failure(401, "the token has expired: commands need a valid one")
        if not principal.may_control_any:
            return failure(403, f"{principal.subject!r} may not steer runs: the token needs a control grant")
        command_id = _command_id(principal, request.idempotency_key)
        digest = _digest(request) if request.idempotency_key is not None else ""
        repeated = self._keyed.get(command_id)
        if repeated is not None:
            engine_id, frame, _, first = repeated
            if first != digest:
                return failure(409, "this Idempotency-Key was used for a different command")
            workflow_id = frame.get("workflowId") or await self._owner_of(frame["executionId"]) or ""
            if not principal.may_control(workflow_id):
                return failure(403, f"{principal.subject!r} may not steer runs of workflow {workflow_id!r}")
            # The same frame to the same engine: a start keeps its execution id, so it runs once.
            return await self._send(engine_id, frame)
        routed = await self._route(principal, request)
        if isinstance(routed, ControlOutcome):
            return routed
        engine_id, frame = routed
        frame = {"type": "command", "commandId": command_id, **frame}
        size = len(encode(frame).encode())
        if size > MAX_COMMAND_BYTES:
            return failure(413, f"the command would be a {size}-byte frame; engines take at most {MAX_COMMAND_BYTES}")
        if request.idempotency_key is not None:
            self._keep(command_id, engine_id, frame, digest)
        return await self._send(engine_id, frame)

    def _keep(self, command_id: str, engine_id: str, frame: Message, digest: str) -> None:
        size = len(json.dumps(frame.get("input"), default=str)) if frame["op"] == "start" else 0
        self._keyed[command_id] = (engine_id, frame, size, digest)
        self._keyed_bytes += size
        while len(self._keyed) > MAX_REMEMBERED or self._keyed_bytes > MAX_KEYED_BYTES:
            self._keyed_bytes -= self._keyed.popitem(last=False)[1][2]

    async def _route(self, principal: Principal, request: CommandRequest) -> ControlOutcome | tuple[str, Message]:
        if request.op == "start":
            return self._route_start(principal, request)
        assert request.execution_id is not None
        execution_id = request.execution_id
        workflow_id = await self._owner_of(execution_id)
        if workflow_id is None and request.op == "resume":
            workflow_id = await self._checkpointed_workflow(execution_id)
        if workflow_id is None:
            return failure(404, f"no execution {execution_id!r}")
        if not principal.may_control(workflow_id):
            if not principal.may_see({"workflowId": workflow_id, "executionId": execution_id}, None):
                # Neither readable nor steerable: the caller learns nothing of it, not even its workflow.
                return failure(404, f"no execution {execution_id!r}")
            return failure(403, f"{principal.subject!r} may not steer runs of workflow {workflow_id!r}")
        running = self._running_on(execution_id)
        busy = self.rollbacks.refusal(self, execution_id, request.op) if request.op in ("retry", "resume") else None
        if busy is not None and running is None:
            return busy
        if request.op == "rollback":
            return route_rollback(self, request, workflow_id, running)
        if request.op == "retry":
            return self._route_retry(request, execution_id, running)
        if running is not None:
            return running.engine_id, {"op": request.op, "executionId": execution_id}
        gone = self._gone_with(execution_id)
        if request.op == "resume" and (gone is None or not self._may_return(gone)):
            # Not running on a live engine: continued from its checkpoints, on any engine serving it.
            return await self._route_continue(execution_id, workflow_id)
        ran = self._ran.get(execution_id)
        if ran is not None and ran.ended is not None:
            return failure(409, f"execution {execution_id!r} already ended ({ran.ended})")
        if gone is not None and self._may_return(gone):
            # Held for the engine: sent if it is back within the timeout.
            return gone.engine_id, {"op": request.op, "executionId": execution_id}
        if gone is not None:
            return failure(
                503,
                f"the engine running execution {execution_id!r} ({gone.name}) is gone: the command "
                "never left the stack",
            )
        return failure(409, f"execution {execution_id!r} is not running on any connected engine")

    def _route_start(self, principal: Principal, request: CommandRequest) -> ControlOutcome | tuple[str, Message]:
        workflow_id = request.workflow_id
        assert workflow_id is not None
        if not principal.may_control(workflow_id):
            return failure(403, f"{principal.subject!r} may not start workflow {workflow_id!r}")
        if (
            request.user_id not in (None, principal.subject)
            and principal.controls != ["*"]
            and f"control:user:{request.user_id}" not in principal.grants
        ):
            # The user decides who may read the run (user:<id>): naming another needs control:* or control:user:<id>.
            return failure(403, f"{principal.subject!r} may start runs for itself only, not for {request.user_id!r}")
        serving = [s for s in self.engines.values() if s.serves(workflow_id, request.version)]
        if not serving:
            which = f"{workflow_id!r}" + (f" version {request.version!r}" if request.version else "")
            return failure(409, f"no connected engine serves workflow {which}")
        engine = min(serving, key=lambda s: len(s.executions) + len(self._pending.get(s.engine_id, ())))
        version = request.version or engine.version_of(workflow_id)
        frame: Message = {"op": "start", "executionId": uuid.uuid4().hex, "workflowId": workflow_id}
        frame |= {"version": version, "input": request.input, "trigger": request.trigger or "api"}
        if request.user_id is not None:
            frame["userId"] = request.user_id
        return engine.engine_id, frame

    def _route_retry(
        self, request: CommandRequest, execution_id: str, running: EngineSession | None
    ) -> ControlOutcome | tuple[str, Message]:
        if running is not None:
            return failure(409, f"execution {execution_id!r} is still running: stop it before retrying")
        ran = self._ran.get(execution_id)
        if ran is None:
            return failure(409, f"no connected engine ran execution {execution_id!r}: a retry needs its outputs")
        engine = self.engines.get(ran.engine_id) or self._gone.get(ran.engine_id)
        if engine is None or (engine.closed_at is not None and not self._may_return(engine)):
            return failure(409, f"the engine that ran execution {execution_id!r} ({ran.engine_id}) is not connected")
        if request.from_node is not None and not engine.has_node(ran.workflow_id, ran.version, request.from_node):
            return failure(400, f"workflow {ran.workflow_id!r} has no node {request.from_node!r}")
        frame: Message = {"op": "retry", "executionId": execution_id, "newExecutionId": uuid.uuid4().hex}
        if request.from_node is not None:
            frame["fromNode"] = request.from_node
        return engine.engine_id, frame

    async def _checkpointed_workflow(self, execution_id: str) -> str | None:
        """The workflow a run's checkpoints name: a run the stack neither stored nor saw can
        still be resumed from them (engines wrote them, as they report their runs)."""
        if not self.checkpoints.configured:
            return None
        try:
            run = (await self.checkpoints.describe(execution_id)).run
        except CheckpointsUnavailable as exc:
            logger.warning("resume of %s: %s", execution_id, exc)
            return None
        return run.workflow_id if run is not None else None

    async def _route_continue(self, execution_id: str, workflow_id: str) -> ControlOutcome | tuple[str, Message]:
        ran = self._ran.get(execution_id)
        status, version = (ran.ended, ran.version) if ran is not None else (None, "")
        if (status is None or not version) and self.stored_run is not None:
            try:
                stored = await asyncio.to_thread(self.stored_run, execution_id)
            except Exception as exc:
                logger.warning("no stored run %s (%s): its checkpoint decides", execution_id, exc)
                stored = None
            if stored is not None:
                status, version = status or stored.get("Status"), version or stored.get("WorkflowVersion", "")
        if status in NOT_RESUMABLE:
            return failure(409, f"execution {execution_id!r} {NOT_RESUMABLE[status]}: there is nothing to resume")
        if not version and self.checkpoints.configured:
            try:
                run = (await self.checkpoints.describe(execution_id)).run
            except CheckpointsUnavailable as exc:
                logger.warning("resume of %s: %s", execution_id, exc)
                run = None
            version = run.workflow_version if run is not None else ""
        serving = [s for s in self.engines.values() if s.serves(workflow_id, version or None)]
        if not serving:
            which = f"{workflow_id!r}" + (f" version {version!r}" if version else "")
            return failure(409, f"no connected engine serves workflow {which}: a resume needs one")
        engine = min(serving, key=lambda s: len(s.executions) + len(self._pending.get(s.engine_id, ())))
        frame: Message = {"op": "resume", "executionId": execution_id, "newExecutionId": uuid.uuid4().hex}
        # The workflow and version are the stack's, for the new run it will know of; the engine reads its own.
        frame |= {"workflowId": workflow_id, "version": version or engine.version_of(workflow_id)}
        return engine.engine_id, frame

    async def _send(self, engine_id: str, frame: Message) -> ControlOutcome:
        command_id = frame["commandId"]
        queue = self._pending.setdefault(engine_id, {})
        pending = queue.get(command_id)
        if pending is None:
            pending = Pending(command_id, engine_id, frame, asyncio.get_running_loop().create_future())
            queue[command_id] = pending
            session = self.engines.get(engine_id)
            if session is not None:
                session.send(frame, pending)
        pending.waiters += 1
        try:
            answer = await asyncio.wait_for(asyncio.shield(pending.future), self.timeout_s)
        except TimeoutError:
            return self._unavailable(pending)
        finally:
            # Timed out, or its caller went away: nobody waits for it, so no reconnect resends it.
            pending.waiters -= 1
            if pending.waiters == 0 and queue.get(command_id) is pending:
                del queue[command_id]
            if not queue and self._pending.get(engine_id) is queue:
                del self._pending[engine_id]
        if answer is None:
            return failure(503, f"engine {engine_id!r} was taken over by another token subject before it answered")
        return outcome_of(frame, answer, engine_id)

    def _unavailable(self, pending: Pending) -> ControlOutcome:
        session = self.engines.get(pending.engine_id) or self._gone.get(pending.engine_id)
        name = f"engine {pending.engine_id!r}" + (f" ({session.name})" if session and session.name else "")
        wait = f"{self.timeout_s:g} s"
        if pending.engine_id in self.engines and pending.delivered:
            return failure(
                503,
                f"{name} did not answer within {wait}; the command was delivered and may still be applied: "
                "repeat it with the same Idempotency-Key to learn the outcome",
            )
        if pending.delivered:
            return failure(
                503,
                f"{name} went away after the command was delivered and did not come back within {wait}; it may "
                "have been applied: repeat it with the same Idempotency-Key to learn the outcome",
            )
        return failure(503, f"{name} is gone and did not come back within {wait}: the command never left the stack")

    # -- what is known of executions ------------------------------------------------------------

    async def _owner_of(self, execution_id: str) -> str | None:
        """The workflow of an execution for authorisation: its first stored record's, else its engine's word."""
        known = self._stored_owners.get(execution_id)
        if known is not None:
            return known
        if self.stored_owner is not None:
            try:
                stored = await asyncio.to_thread(self.stored_owner, execution_id)
            except Exception as exc:
                logger.warning("no stored owner of %s (%s): the engine's word decides", execution_id, exc)
                stored = None
            if stored is not None:
                # The first stored record never changes: a run steered again costs no query.
                self._stored_owners[execution_id] = stored[0]
                while len(self._stored_owners) > MAX_REMEMBERED:
                    self._stored_owners.popitem(last=False)
                return stored[0]
        return self._workflow_of(execution_id)

    def _workflow_of(self, execution_id: str) -> str | None:
        session = self._running_on(execution_id) or self._gone_with(execution_id)
        if session is not None:
            return session.executions[execution_id].workflow_id
        ran = self._ran.get(execution_id)
        return ran.workflow_id if ran is not None else None

    def _version_of(self, execution_id: str) -> str:
        ran = self._ran.get(execution_id)
        return ran.version if ran is not None else ""

    def _running_on(self, execution_id: str) -> EngineSession | None:
        return next((s for s in self.engines.values() if execution_id in s.executions), None)

    def _gone_with(self, execution_id: str) -> EngineSession | None:
        return next((s for s in reversed(self._gone.values()) if execution_id in s.executions), None)

    def _may_return(self, session: EngineSession) -> bool:
        return session.closed_at is not None and time.monotonic() - session.closed_at < self.timeout_s

    def _remember(self, execution_id: str, ran: _Ran) -> None:
        self._ran[execution_id] = ran
        self._ran.move_to_end(execution_id)
        while len(self._ran) > MAX_REMEMBERED:
            self._ran.popitem(last=False)

    # -- reading -------------------------------------------------------------------------------

    def listing(self, principal: Principal) -> list[dict[str, Any]]:
        """The connected engines, with only the workflows and executions `principal` may steer or see."""

        def visible(workflow_id: str, execution_id: str = "") -> bool:
            event = {"workflowId": workflow_id, "executionId": execution_id}
            return principal.may_control(workflow_id) or principal.may_see(event, None)

        items = []
        for session in sorted(self.engines.values(), key=lambda s: s.connected_at):
            item = session.describe(visible)
            if item["workflows"] or item["executions"] or principal.unrestricted or principal.controls == ["*"]:
                items.append(item)
        return items


def _new_execution(command: Message) -> str | None:
    """The id of the run a command starts (start, retry, resume of an ended run), else None."""
    if command["op"] == "start":
        return str(command["executionId"])
    if command["op"] in ("retry", "resume") and "newExecutionId" in command:
        return str(command["newExecutionId"])
    return None


def _digest(request: CommandRequest) -> str:
    """What a keyed command asked for, to tell a repeat from another command under the same key."""
    fields = dataclasses.asdict(request)
    for own in ("idempotency_key", "after_seq"):  # the key itself; rollback's seq is the stack's
        fields.pop(own)
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _command_id(principal: Principal, key: str | None) -> str:
    """A caller's Idempotency-Key is its own: two callers using the same key are two commands."""
    if key is None:
        return uuid.uuid4().hex
    return hashlib.sha256(f"{principal.subject}\0{key}".encode()).hexdigest()[:32]
