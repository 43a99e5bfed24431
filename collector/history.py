"""Moved to ws_bridge/history.py (the bridge's read model); kept importable for the callers
not yet updated (ws_bridge/rooms.py, ws_bridge/app.py, flowscope/stack.py)."""

from __future__ import annotations

from ws_bridge.history import (
    NODE_STATES,
    ExecutionQuery,
    History,
    HistoryError,
    HistoryUnavailable,
    Scope,
    SqlError,
    SqlLimits,
    node_specs,
    number,
    whole,
)

__all__ = [
    "NODE_STATES",
    "ExecutionQuery",
    "History",
    "HistoryError",
    "HistoryUnavailable",
    "Scope",
    "SqlError",
    "SqlLimits",
    "node_specs",
    "number",
    "whole",
]
