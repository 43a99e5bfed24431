"""Shared vocabulary of the bridge."""

from __future__ import annotations

from typing import Any, TypeAlias

# A live event as the bridge holds it: contract.LiveEvent's keys, plus the JSON cached on it
# (ws_bridge/events.py `WIRE`). A plain dict while the deriver (deriver.py) builds partial events
# and the app, auth and some tests pass plain dicts; then it becomes the TypedDict
# `class LiveEvent(contract.LiveEvent, total=False): _wire: str`.
LiveEvent: TypeAlias = dict[str, Any]
Message: TypeAlias = dict[str, Any]
