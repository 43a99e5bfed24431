"""Events the bridge derives: ETA on progress, performance warnings for slow nodes."""

from __future__ import annotations

import asyncio
import itertools
import logging
import statistics
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from flowscope.contract import ACTIVE_NODE_STATES, DONE_NODE_STATES, NodeState
from flowscope.contract.events import EventHeader
from flowscope.ws_bridge.types import LiveEvent

logger = logging.getLogger(__name__)

_DEFAULT_WARNING_MS = 5_000.0
_DEFAULT_CRITICAL_MS = 30_000.0
_MEDIANS_TTL_S = 60.0
_EMPTY_MEDIANS_TTL_S = 1.0
_MAX_WORKFLOWS = 10_000
_MAX_LIVE_NODES = 10_000
_LIVE_SAMPLES = 20
# Workflows per history query.
_FETCH_BATCH = 500


@dataclass(frozen=True)
class Thresholds:
    warning_ms: float = _DEFAULT_WARNING_MS
    critical_ms: float = _DEFAULT_CRITICAL_MS
    # Per node type overrides: {"llm": (20_000, 60_000)}.
    by_type: Mapping[str, tuple[float, float]] = field(default_factory=dict)

    def for_type(self, node_type: str | None) -> tuple[float, float]:
        return self.by_type.get(node_type or "", (self.warning_ms, self.critical_ms))


@dataclass(eq=False)
class NodeTrack:
    state: str = NodeState.PENDING
    attempt: int = 1
    started: float | None = None
    # The node.started event of the attempt still watched for passing its thresholds.
    watched: LiveEvent | None = None
    # (attempt, level): an attempt is warned once per level, whichever of the running
    # sweep, its end event or its span noticed first.
    warned: set[tuple[int, str]] = field(default_factory=set)

    def cancel(self) -> None:
        """Stop watching the running attempt (the deriver's sweep lets go of it: ws_bridge/deriver.py)."""
        self.watched = None


@dataclass
class ExecutionTrack:
    """What the bridge knows of one execution: enough to derive ETA and warnings."""

    workflow_id: str
    workflow_name: str = ""
    user_id: str | None = None
    dag: dict[str, list[str]] = field(default_factory=dict)
    types: dict[str, str] = field(default_factory=dict)
    nodes: dict[str, NodeTrack] = field(default_factory=dict)
    last_seq: int = 0

    def close(self) -> None:
        for node in self.nodes.values():
            node.cancel()


def estimate_eta_ms(track: ExecutionTrack, medians: Mapping[str, float], now: float) -> float | None:
    """Critical-path estimate: each unfinished node's expected remaining time along its dependencies."""
    if not track.dag or not medians:
        return None
    pending = [n for n in track.dag if track.nodes.get(n, _PENDING).state == NodeState.PENDING]
    if any(n not in medians for n in pending):
        return None
    # Kahn's order, iteratively: a 1,000-node chain must not recurse.
    indegree = {n: len(deps) for n, deps in track.dag.items()}
    children: dict[str, list[str]] = {n: [] for n in track.dag}
    for node_id, deps in track.dag.items():
        for dep in deps:
            children.setdefault(dep, []).append(node_id)
    queue = [n for n, d in indegree.items() if d == 0]
    finish: dict[str, float] = {}
    while queue:
        node_id = queue.pop()
        node = track.nodes.get(node_id, _PENDING)
        ready = max((finish.get(d, 0.0) for d in track.dag.get(node_id, [])), default=0.0)
        if node.state in DONE_NODE_STATES:
            remaining = 0.0
        elif node.state in ACTIVE_NODE_STATES and node.started is not None:
            remaining = max(0.0, medians.get(node_id, 0.0) - (now - node.started) * 1000)
        else:
            remaining = medians.get(node_id, 0.0)
        finish[node_id] = ready + remaining
        for child in children.get(node_id, []):
            indegree[child] -= 1
            if indegree[child] == 0:
                queue.append(child)
    return round(max(finish.values(), default=0.0), 1)


_PENDING = NodeTrack()


class MedianCache:
    """Median node durations per workflow: history, refreshed in the background, overlaid
    with the durations of successful node spans seen live (so a workflow's ETA is known
    from its first finished run, before ClickHouse has it, and follows recent behaviour).

    History is asked in batches, one query at a time, whatever the number of workflows
    running: a thousand workflows each on its own query would be a thousand queries in
    the stack's process, measured as most of its CPU (bench/README.md, live latency)."""

    def __init__(self, fetch: Callable[[Sequence[str]], dict[str, dict[str, float]]] | None) -> None:
        self._fetch = fetch
        self._values: dict[str, tuple[float, dict[str, float]]] = {}
        self._live: OrderedDict[str, dict[str, deque[float]]] = OrderedDict()
        self._merged: dict[str, dict[str, float]] = {}
        # Workflows waiting for the next batch, in the order they were asked for.
        self._wanted: dict[str, None] = {}
        self._loader: asyncio.Task[None] | None = None

    def get(self, workflow_id: str) -> dict[str, float]:
        cached = self._values.get(workflow_id)
        # No history yet is worth asking again soon — the first runs of a workflow create it —
        # unless the runs seen live already give medians (a thousand new workflows asked
        # for again every second cost the stack a third of a core).
        known = bool(cached and cached[1]) or workflow_id in self._live
        ttl = _MEDIANS_TTL_S if known else _EMPTY_MEDIANS_TTL_S
        if self._fetch is not None and (cached is None or time.monotonic() - cached[0] > ttl):
            self._refresh(workflow_id)
        merged = self._merged.get(workflow_id)
        if merged is None:
            live = self._live.get(workflow_id, {})
            merged = {**(cached[1] if cached else {}), **{n: statistics.median(d) for n, d in live.items()}}
            self._merged[workflow_id] = merged
            if len(self._merged) > _MAX_WORKFLOWS:
                self._merged.pop(next(iter(self._merged)))
        return merged

    def observe(self, workflow_id: str, node_id: str, duration_ms: float) -> None:
        """One successful node attempt seen live."""
        nodes = self._live.get(workflow_id)
        if nodes is None:
            nodes = self._live[workflow_id] = {}
            if len(self._live) > _MAX_WORKFLOWS:
                evicted, _ = self._live.popitem(last=False)
                self._merged.pop(evicted, None)
        else:
            self._live.move_to_end(workflow_id)
        samples = nodes.get(node_id)
        if samples is None:
            if len(nodes) >= _MAX_LIVE_NODES:
                return
            samples = nodes[node_id] = deque(maxlen=_LIVE_SAMPLES)
        samples.append(duration_ms)
        self._merged.pop(workflow_id, None)

    async def ensure(self, workflow_id: str) -> dict[str, float]:
        """Load (or reload) the medians now and return them."""
        if self._fetch is not None:
            await self._load([workflow_id])
        return self.get(workflow_id)

    def _refresh(self, workflow_id: str) -> None:
        if workflow_id in self._wanted or len(self._wanted) >= _MAX_WORKFLOWS:
            return
        self._wanted[workflow_id] = None
        if self._loader is None or self._loader.done():
            self._loader = asyncio.get_running_loop().create_task(self._load_wanted())

    async def _load_wanted(self) -> None:
        while self._wanted:
            batch = list(itertools.islice(self._wanted, _FETCH_BATCH))
            for workflow_id in batch:
                del self._wanted[workflow_id]
            await self._load(batch)

    async def _load(self, workflow_ids: list[str]) -> None:
        assert self._fetch is not None
        try:
            found = await asyncio.to_thread(self._fetch, workflow_ids)
        except Exception:
            logger.exception("loading node duration medians for %d workflows failed", len(workflow_ids))
            # Keep what was known, and ask again only when its time to live has passed.
            found = {w: self._values[w][1] for w in workflow_ids if w in self._values}
        now = time.monotonic()
        for workflow_id in workflow_ids:
            self._values[workflow_id] = (now, found.get(workflow_id, {}))
            self._merged.pop(workflow_id, None)
        while len(self._values) > _MAX_WORKFLOWS:
            evicted = next(iter(self._values))
            self._values.pop(evicted)
            self._merged.pop(evicted, None)

    async def aclose(self) -> None:
        loader, self._loader = self._loader, None
        if loader is not None:
            loader.cancel()
            await asyncio.gather(loader, return_exceptions=True)


# What a performance warning takes from the event or span that showed the node slow.
WarningBase = EventHeader


def performance_event(base: WarningBase, level: str, threshold_ms: float, actual_ms: float, running: bool) -> LiveEvent:
    return {
        "type": f"performance.{level}",
        "seq": base["seq"],
        "derived": True,
        "ts": base["ts"],
        "executionId": base["executionId"],
        "workflowId": base["workflowId"],
        "workflowName": base["workflowName"],
        "nodeId": base.get("nodeId"),
        "nodeType": base.get("nodeType"),
        "traceId": base.get("traceId", ""),
        "spanId": base.get("spanId", ""),
        "data": {"thresholdMs": threshold_ms, "actualMs": round(actual_ms, 1), "running": running},
    }
