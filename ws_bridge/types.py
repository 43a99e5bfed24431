"""Shared vocabulary of the bridge."""

from __future__ import annotations

from typing import Any, TypeAlias

# A live event as the bridge holds it: contract.LiveEvent's keys, plus the JSON cached on it
# (ws_bridge/events.py `WIRE`). A plain dict until the hub (rooms.py) and the app stop building
# partial events; then it becomes `class LiveEvent(contract.LiveEvent, total=False): _wire: str`.
LiveEvent: TypeAlias = dict[str, Any]
Message: TypeAlias = dict[str, Any]
