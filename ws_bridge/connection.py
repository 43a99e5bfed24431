"""One WebSocket connection: its subscriptions, its bounded queue, replay, heartbeats.

A slow client never slows anyone else: events are queued per connection up to
a bound; past it they are dropped for this connection only and the client is
told exactly which seq ranges it missed (`lagged`), so it can re-request them.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from flowscope.contract import LIVE_EVENT_TYPES, ControlType
from flowscope.ws_bridge.auth import Principal
from flowscope.ws_bridge.control import ControlHub
from flowscope.ws_bridge.control_commands import OPS, BadCommand, loads, parse_command
from flowscope.ws_bridge.events import user_of_events, wire_json
from flowscope.ws_bridge.rooms import Hub, Subscription
from flowscope.ws_bridge.types import LiveEvent, Message

logger = logging.getLogger(__name__)

EVENT_TYPES = LIVE_EVENT_TYPES
_ROOM = re.compile(r"^(all|(execution|workflow|user):[A-Za-z0-9_.:@\-]{1,200})$")
_SUB_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
# Steering ops (docs/control.md); each is answered by a control.result with the op's id.
CONTROL_OPS = frozenset(OPS)
_MAX_COMMANDS_IN_FLIGHT = 64
_MAX_SEQ = 2**62
# History timestamps are DateTime64(9): 'since' must fall within its range.
_EARLIEST = dt.datetime(1900, 1, 1, tzinfo=dt.UTC)
_LATEST = dt.datetime(2262, 4, 11, tzinfo=dt.UTC)


@dataclass(frozen=True)
class ConnectionLimits:
    queue_size: int = 1_000
    max_subscriptions: int = 16
    max_rooms_per_subscription: int = 16
    max_frame_bytes: int = 64 * 1024
    heartbeat_interval_s: float = 15.0
    max_held_during_replay: int = 10_000


HistoryEvents = Callable[[str, int], list[LiveEvent]]
HistorySince = Callable[[dt.datetime, str | None, str | None, frozenset[str] | None], list[LiveEvent]]
# (workflow id, user id or "") of an execution, as its first stored record named them.
HistoryOwner = Callable[[str], tuple[str, str] | None]


class ProtocolError(Exception):
    def __init__(self, code: str, message: str, sub_id: str | None = None) -> None:
        self.code = code
        self.message = message
        self.sub_id = sub_id
        super().__init__(message)


class Connection:
    def __init__(
        self,
        websocket: WebSocket,
        principal: Principal,
        hub: Hub,
        limits: ConnectionLimits,
        history_events: HistoryEvents | None,
        history_since: HistorySince | None,
        history_owner: HistoryOwner | None = None,
        control: ControlHub | None = None,
    ) -> None:
        self.ws = websocket
        self.principal = principal
        self.hub = hub
        self.limits = limits
        self._history_events = history_events
        self._history_since = history_since
        self._history_owner = history_owner
        self._control_hub = control
        self._commands: set[asyncio.Task[None]] = set()
        # Events are queued with their subscription id; control messages are plain dicts.
        self._events: deque[tuple[LiveEvent, str] | Message] = deque()
        self._control: deque[Message] = deque(maxlen=256)
        self._wake = asyncio.Event()
        self._lag: dict[str, dict[str, list[int]]] = {}
        self.subscriptions: dict[str, Subscription] = {}
        self._replays: dict[str, asyncio.Task[None]] = {}
        self.dropped = 0
        self.closed = False

    # -- delivery (called by the hub, on the loop) -----------------------------------------------

    def offer(self, sub: Subscription, event: LiveEvent, user_id: str | None) -> None:
        if self.closed or not self.principal.may_see(event, user_id) or not sub.wants(event):
            return
        if sub.replaying:
            if len(sub.held) >= self.limits.max_held_during_replay:
                self._record_lag(sub, event)
                return
            sub.held.append((event, user_id))
            return
        self._deliver(sub, event)

    def _deliver(self, sub: Subscription, event: LiveEvent) -> None:
        execution_id = event["executionId"]
        seq = int(event["seq"])
        if not event.get("derived"):
            if seq <= sub.last_seq.get(execution_id, 0):
                return
            sub.mark_sent(execution_id, seq)
        if len(self._events) >= self.limits.queue_size:
            self._record_lag(sub, event)
            return
        self._events.append((event, sub.id))
        self._wake.set()

    def _record_lag(self, sub: Subscription, event: LiveEvent) -> None:
        self.dropped += 1
        if event.get("derived"):
            return
        seq = int(event["seq"])
        span = self._lag.setdefault(sub.id, {}).setdefault(event["executionId"], [seq, seq])
        span[0], span[1] = min(span[0], seq), max(span[1], seq)

    def control(self, message: Message) -> None:
        self._control.append(message)
        self._wake.set()

    # -- the connection's life ----------------------------------------------------------------

    async def run(self, initial: Message | None = None) -> None:
        sender = asyncio.create_task(self._sender())
        heartbeat = asyncio.create_task(self._heartbeat())
        expiry = asyncio.create_task(self._expire())
        try:
            if initial is not None:
                await self._handle_or_report(initial)
            await self._receive_loop(sender)
        finally:
            self.closed = True
            for sub in list(self.subscriptions.values()):
                self._drop_subscription(sub)
            tasks = (sender, heartbeat, expiry, *self._replays.values(), *self._commands)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _receive_loop(self, sender: asyncio.Task[None]) -> None:
        while not sender.done():
            try:
                message = await self.ws.receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                self._error("bad_frame", "binary frames are not supported; send JSON text")
                continue
            if len(text.encode()) > self.limits.max_frame_bytes:
                self._error("frame_too_large", f"frames are limited to {self.limits.max_frame_bytes} bytes")
                continue
            try:
                request = loads(text)
            except json.JSONDecodeError as exc:
                self._error("bad_json", f"malformed JSON: {exc.msg} at position {exc.pos}")
                continue
            except (ValueError, RecursionError) as exc:
                # Valid JSON Python will not hold: nesting past the recursion limit, integers
                # past int_max_str_digits.
                self._error("bad_json", f"unreadable JSON: {str(exc) or 'nested too deeply'}")
                continue
            if not isinstance(request, dict):
                self._error("bad_request", "a frame must be a JSON object with an 'op'")
                continue
            await self._handle_or_report(request)

    async def _handle_or_report(self, request: Message) -> None:
        try:
            await self._handle(request)
        except ProtocolError as exc:
            self._error(exc.code, exc.message, exc.sub_id)

    async def _sender(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._control or self._events:
                item = self._control.popleft() if self._control else self._events.popleft()
                text = _wire(*item) if isinstance(item, tuple) else json.dumps(item, separators=(",", ":"), default=str)
                try:
                    await self.ws.send_text(text)
                except Exception:
                    # The peer is gone; the receive loop sees the disconnect and cleans up.
                    return
                if self._lag and len(self._events) <= self.limits.queue_size // 2:
                    self._flush_lag()

    def _flush_lag(self) -> None:
        for sub_id, ranges in self._lag.items():
            self._control.append(
                {
                    "type": ControlType.LAGGED,
                    "id": sub_id,
                    "executions": [{"executionId": e, "fromSeq": r[0], "toSeq": r[1]} for e, r in ranges.items()],
                    "message": "events were dropped for this connection; re-subscribe with fromSeq to fetch them",
                }
            )
        self._lag.clear()
        self._wake.set()

    async def _expire(self) -> None:
        """The principal was fixed at the handshake: the connection ends with its credentials."""
        expires_at = self.principal.expires_at
        if expires_at is None:
            return
        await asyncio.sleep(max(0.0, expires_at - time.time()))
        with contextlib.suppress(Exception):
            await self.ws.close(4401, "the token has expired")

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.limits.heartbeat_interval_s)
            self.control({"type": ControlType.HEARTBEAT, "ts": _now_iso()})

    def _error(self, code: str, message: str, sub_id: str | None = None) -> None:
        error: Message = {"type": ControlType.ERROR, "code": code, "message": message}
        if sub_id is not None:
            error["id"] = sub_id
        self.control(error)

    # -- operations ---------------------------------------------------------------------------

    async def _handle(self, request: dict[str, Any]) -> None:
        op = request.get("op")
        if op == "ping":
            self.control({"type": ControlType.PONG, "ts": _now_iso()})
        elif op == "subscribe":
            self._subscribe(request)
        elif op == "unsubscribe":
            sub_id = request.get("id")
            sub = self.subscriptions.get(sub_id) if isinstance(sub_id, str) else None
            if sub is None:
                raise ProtocolError("unknown_subscription", f"no subscription {sub_id!r}", str(sub_id))
            self._drop_subscription(sub)
            self.control({"type": ControlType.UNSUBSCRIBED, "id": sub.id})
        elif op in CONTROL_OPS:
            self._command(str(op), request)
        else:
            raise ProtocolError(
                "unknown_op",
                f"unknown op {op!r}: use subscribe, unsubscribe, ping, start, pause, resume, stop or retry",
            )

    def _command(self, op: str, request: dict[str, Any]) -> None:
        """A steering op, answered by a control.result once its engine answers: run as a task, so
        the frames that follow are read meanwhile."""
        request_id = request.get("id")
        if not (isinstance(request_id, str) and 0 < len(request_id) <= 64) and not (
            isinstance(request_id, int) and not isinstance(request_id, bool)
        ):
            raise ProtocolError("bad_request", f"{op} needs an 'id' (a string of 1-64 characters, or an integer)")
        if len(self._commands) >= _MAX_COMMANDS_IN_FLIGHT:
            raise ProtocolError("too_many_commands", f"at most {_MAX_COMMANDS_IN_FLIGHT} commands in flight")
        result: Message = {"type": ControlType.CONTROL_RESULT, "id": request_id}
        hub = self._control_hub
        if hub is None:
            self.control({**result, "ok": False, "code": "unavailable", "error": "this bridge takes no commands"})
            return
        try:
            command = parse_command(op, request)
        except BadCommand as exc:
            self.control({**result, "ok": False, "code": "bad_request", "error": str(exc)})
            return

        async def run() -> None:
            outcome = await hub.command(self.principal, command)
            answer = {**result, "ok": outcome.ok}
            if outcome.ok:
                answer |= outcome.body
            else:
                answer |= {"code": outcome.code, "error": outcome.error}
            self.control(answer)

        task = asyncio.create_task(run())
        self._commands.add(task)
        task.add_done_callback(self._commands.discard)

    def _subscribe(self, request: dict[str, Any]) -> None:
        sub_id = request.get("id")
        if not isinstance(sub_id, str) or not _SUB_ID.match(sub_id):
            raise ProtocolError("bad_request", "subscribe needs an 'id' of 1-64 letters, digits, '.', '_' or '-'")
        if sub_id in self.subscriptions:
            raise ProtocolError("duplicate_subscription", f"subscription {sub_id!r} already exists", sub_id)
        if len(self.subscriptions) >= self.limits.max_subscriptions:
            raise ProtocolError(
                "too_many_subscriptions",
                f"at most {self.limits.max_subscriptions} subscriptions per connection",
                sub_id,
            )
        rooms = request.get("rooms")
        if not isinstance(rooms, list) or not rooms or not all(isinstance(r, str) for r in rooms):
            raise ProtocolError("bad_request", "'rooms' must be a non-empty list of strings", sub_id)
        if len(rooms) > self.limits.max_rooms_per_subscription:
            raise ProtocolError("bad_request", f"at most {self.limits.max_rooms_per_subscription} rooms", sub_id)
        for room in rooms:
            if not _ROOM.match(room):
                raise ProtocolError(
                    "unknown_room",
                    f"unknown room {room!r}: use execution:<id>, workflow:<id>, user:<id> or all",
                    sub_id,
                )
            if not self.principal.may_join(room):
                raise ProtocolError("forbidden", f"not authorised for room {room!r}", sub_id)
        types = _string_set(request.get("types"), "types", sub_id)
        if types is not None and not types <= EVENT_TYPES:
            raise ProtocolError("bad_request", f"unknown event types: {', '.join(sorted(types - EVENT_TYPES))}", sub_id)
        node_types = _string_set(request.get("nodeTypes"), "nodeTypes", sub_id)
        from_seq = request.get("fromSeq")
        if from_seq is not None and (
            not isinstance(from_seq, int) or isinstance(from_seq, bool) or not 0 <= from_seq <= _MAX_SEQ
        ):
            raise ProtocolError("bad_request", f"'fromSeq' must be an integer from 0 to {_MAX_SEQ}", sub_id)
        since = _parse_since(request.get("since"), sub_id)
        executions = [r.split(":", 1)[1] for r in rooms if r.startswith("execution:")]
        if from_seq is not None and not executions:
            raise ProtocolError("bad_request", "'fromSeq' applies to execution rooms; use 'since' for others", sub_id)
        sub = Subscription(sub_id, frozenset(rooms), types, node_types, self)
        self.subscriptions[sub_id] = sub
        # Live first, then backfill: live events are held while history is read.
        self.hub.register(sub)
        self.control({"type": ControlType.SUBSCRIBED, "id": sub_id, "rooms": sorted(rooms), "fromSeq": from_seq})
        self._replays[sub_id] = asyncio.create_task(self._replay(sub, executions, from_seq, since))

    async def _replay(
        self, sub: Subscription, executions: list[str], from_seq: int | None, since: dt.datetime | None
    ) -> None:
        replayed = 0
        try:
            backlog: list[tuple[LiveEvent, str | None]] = []
            if from_seq is not None:
                for execution_id in executions:
                    stored = await self._stored_events(execution_id, max(1, from_seq))
                    merged = {int(e["seq"]): e for e in stored}
                    for event in self.hub.recent_events(execution_id, max(1, from_seq)):
                        merged.setdefault(int(event["seq"]), event)
                    # The store decides who owns a stored execution; the hub's word (which a
                    # remote feed's order may have given another claimant) only for one not stored.
                    stored_owner = await self._stored_owner(execution_id)
                    user = (
                        (stored_owner[1] or None)
                        if stored_owner is not None
                        else self.hub.user_of(execution_id) or user_of_events(merged.values())
                    )
                    backlog.extend((merged[s], user) for s in sorted(merged))
            if since is not None:
                backlog.extend(await self._events_since(sub, since))
            for event, user in backlog:
                if self.principal.may_see(event, user) and sub.wants(event):
                    self._deliver(sub, event)
                    replayed += 1
        except Exception as exc:
            logger.exception("replay for subscription %s failed", sub.id)
            self._error("replay_failed", f"history unavailable: {exc}", sub.id)
        finally:
            # In-band, after the backfill it closes (control messages would overtake it).
            last = dict(sub.last_seq.items())
            self._events.append({"type": ControlType.REPLAY_DONE, "id": sub.id, "replayed": replayed, "lastSeq": last})
            self._wake.set()
            # Handoff: release what arrived live meanwhile; _deliver drops what replay already sent.
            held, sub.held = sub.held, []
            sub.replaying = False
            for event, _user in held:
                self._deliver(sub, event)
            self._replays.pop(sub.id, None)

    async def _stored_owner(self, execution_id: str) -> tuple[str, str] | None:
        """(workflow, user or '') as the execution's first stored record named them: a later record
        claiming the execution for someone else (even one that replaced its workflow.started)
        changes nothing. None for an execution not stored, or no history."""
        if self._history_owner is None:
            return None
        return await asyncio.to_thread(self._history_owner, execution_id)

    async def _stored_events(self, execution_id: str, from_seq: int) -> list[LiveEvent]:
        if self._history_events is None:
            return []
        return await asyncio.to_thread(self._history_events, execution_id, from_seq)

    async def _events_since(self, sub: Subscription, since: dt.datetime) -> list[tuple[LiveEvent, str | None]]:
        found: dict[tuple[str, int], tuple[LiveEvent, str | None]] = {}
        since_iso = since.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        for room in sub.rooms:
            kind, _, key = room.partition(":")
            if kind not in ("workflow", "user", "all"):
                continue
            # `all` is joined by unrestricted principals only, so its events need no user to be seen.
            workflow_id = key if kind == "workflow" else None
            user_id = key if kind == "user" else None
            stored = (
                await asyncio.to_thread(self._history_since, since, workflow_id, user_id, sub.types)
                if self._history_since is not None
                else []
            )
            for event in stored:
                found.setdefault((event["executionId"], int(event["seq"])), (event, user_id))
            for event in self.hub.recent_since(since_iso, workflow_id=workflow_id, user_id=user_id):
                found.setdefault((event["executionId"], int(event["seq"])), (event, user_id))
        return sorted(found.values(), key=lambda pair: (pair[0]["ts"], pair[0]["executionId"], int(pair[0]["seq"])))

    def _drop_subscription(self, sub: Subscription) -> None:
        self.hub.unregister(sub)
        self.subscriptions.pop(sub.id, None)
        task = self._replays.pop(sub.id, None)
        if task is not None:
            task.cancel()


def _wire(event: LiveEvent, sub_id: str) -> str:
    """The event as this subscription receives it: the shared JSON with its `sub` added."""
    return f'{wire_json(event)[:-1]},"sub":{json.dumps(sub_id)}}}'


def _string_set(value: Any, name: str, sub_id: str) -> frozenset[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or len(value) > 64:
        raise ProtocolError("bad_request", f"'{name}' must be a list of strings", sub_id)
    return frozenset(value)


def _parse_since(value: Any, sub_id: str) -> dt.datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ProtocolError("bad_request", "'since' must be an ISO-8601 timestamp", sub_id)
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        parsed = parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)
        in_range = _EARLIEST <= parsed < _LATEST
    except (ValueError, OverflowError) as exc:
        raise ProtocolError("bad_request", f"'since' is not an ISO-8601 timestamp: {value[:64]!r}", sub_id) from exc
    if not in_range:
        raise ProtocolError("bad_request", f"'since' must be between 1900-01-01 and 2262-04-11: {value[:64]!r}", sub_id)
    return parsed.astimezone(dt.UTC)


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def close_quietly(websocket: WebSocket, code: int, reason: str) -> None:
    with contextlib.suppress(Exception):
        await websocket.close(code, reason)
