"""Shared vocabulary of the bridge."""

from __future__ import annotations

from typing import Any, TypeAlias

# A live event exactly as it goes on the wire (LIVE_PROTOCOL.md): camelCase keys.
LiveEvent: TypeAlias = dict[str, Any]
Message: TypeAlias = dict[str, Any]
