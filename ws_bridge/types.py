"""Shared vocabulary of the bridge."""

from __future__ import annotations

from typing import Any, TypeAlias

import flowscope.contract as contract


class LiveEvent(contract.LiveEvent, total=False):
    """A live event as the bridge holds it: flowscope.contract.LiveEvent's keys, plus its JSON cached
    on it once serialised (ws_bridge/events.py `WIRE`), never sent."""

    _wire: str


Message: TypeAlias = dict[str, Any]
