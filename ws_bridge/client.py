"""LiveClient: an async iterator over one execution's (or a room's) live events.

Reconnects with jittered backoff and resumes from the last seq seen per
execution, so a consumer sees every event once, in order, across drops.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from flowscope.contract import TERMINAL_EVENTS, ControlType, LiveEvent

logger = logging.getLogger(__name__)

# Frames that are no event: answered or skipped, never yielded.
_CONTROL = frozenset(ControlType)


class LiveClientError(RuntimeError):
    """The server refused us for a reason retrying cannot fix (bad token, forbidden room)."""


class LiveClient:
    def __init__(
        self,
        base_url: str,
        *,
        execution_id: str | None = None,
        rooms: list[str] | None = None,
        types: list[str] | None = None,
        token: str | None = None,
        from_seq: int = 1,
        stop_when_finished: bool = True,
        max_retries: int | None = None,
    ) -> None:
        if (execution_id is None) == (rooms is None):
            raise ValueError("give exactly one of execution_id or rooms")
        self._url = base_url.rstrip("/").replace("http://", "ws://").replace("https://", "wss://") + "/ws"
        self._rooms = rooms or [f"execution:{execution_id}"]
        self._execution_id = execution_id
        self._types = types
        self._token = token
        self._next_seq: dict[str, int] = {execution_id: from_seq} if execution_id else {}
        self._stop_when_finished = stop_when_finished and execution_id is not None
        self._max_retries = max_retries
        self.reconnects = 0
        self._ws: ClientConnection | None = None

    def __aiter__(self) -> AsyncIterator[LiveEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[LiveEvent]:
        attempt = 0
        while True:
            try:
                async with connect(self._url, additional_headers=self._headers(), open_timeout=10) as ws:
                    self._ws = ws
                    attempt = 0
                    await ws.send(json.dumps(self._subscribe()))
                    async for raw in ws:
                        message = json.loads(raw)
                        kind = message.get("type")
                        if kind == ControlType.ERROR:
                            if message.get("code") in ("forbidden", "unknown_room", "bad_request"):
                                raise LiveClientError(message.get("message", "refused"))
                            logger.warning("live server error: %s", message)
                            continue
                        if kind == ControlType.HEARTBEAT:
                            await ws.send('{"op":"ping"}')
                            continue
                        if kind in _CONTROL:
                            if kind == ControlType.LAGGED:
                                # Missed ranges come back on the next connection through fromSeq.
                                await ws.close()
                            continue
                        event: LiveEvent = message
                        if not event.get("derived"):
                            execution = event["executionId"]
                            if event["seq"] < self._next_seq.get(execution, 1):
                                continue
                            self._next_seq[execution] = event["seq"] + 1
                        yield event
                        if self._stop_when_finished and kind in TERMINAL_EVENTS:
                            return
            except InvalidStatus as exc:
                raise LiveClientError(f"server refused the connection: HTTP {exc.response.status_code}") from exc
            except (ConnectionClosed, OSError, TimeoutError) as exc:
                if isinstance(exc, ConnectionClosed) and exc.rcvd is not None and exc.rcvd.code == 4401:
                    raise LiveClientError(f"unauthorised: {exc.rcvd.reason}") from exc
                attempt += 1
                self.reconnects += 1
                if self._max_retries is not None and attempt > self._max_retries:
                    raise
                delay = min(10.0, 0.1 * 2 ** min(attempt, 7)) * random.uniform(0.5, 1.5)
                logger.info("live connection lost (%s); reconnecting in %.2fs", exc, delay)
                await asyncio.sleep(delay)
            finally:
                self._ws = None

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    def _subscribe(self) -> dict[str, Any]:
        request: dict[str, Any] = {"op": "subscribe", "id": "live", "rooms": self._rooms}
        if self._execution_id is not None:
            request["fromSeq"] = self._next_seq.get(self._execution_id, 1)
        if self._types:
            request["types"] = self._types
        return request

    async def drop_connection(self) -> None:
        """Close the current socket as a network failure would (tests, manual resume)."""
        if self._ws is not None:
            await self._ws.close(code=1011)


__all__ = ["LiveClient", "LiveClientError", "websockets"]
