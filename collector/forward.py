"""Forwards the accepted events and spans over OTLP/gRPC to remote bridges (the distributed path).

A stream subscriber must never slow the receiver: requests go through a bounded queue to a
worker thread; when a bridge cannot keep up, the oldest requests are dropped for it and
counted. Nothing durable is lost: ClickHouse holds every event, and bridges replay from it.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

import grpc

from flowscope.collector.receiver import SPECS
from flowscope.collector.telemetry import SelfMetrics
from flowscope.collector.types import Signal

logger = logging.getLogger(__name__)

_DEFAULT_QUEUE = 1_000


class OtlpForwarder:
    def __init__(
        self,
        endpoint: str,
        metrics: SelfMetrics,
        *,
        signals: frozenset[Signal] = frozenset({Signal.LOGS, Signal.TRACES}),
        max_queue: int = _DEFAULT_QUEUE,
        token: str | None = None,
    ) -> None:
        self.endpoint = endpoint.removeprefix("http://")
        # A bridge with auth configured takes its feed only with an ingest token, as any OTLP receiver.
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._signals = signals
        self._metrics = metrics
        self._queue: deque[tuple[Signal, bytes]] = deque(maxlen=max_queue)
        self._cond = threading.Condition()
        self._closed = False
        self._channel = grpc.insecure_channel(self.endpoint)
        self._calls = {
            spec.signal: self._channel.unary_unary(f"/{spec.grpc_service}/Export", request_serializer=None)
            for spec in SPECS.values()
        }
        self._thread = threading.Thread(target=self._run, name=f"forward-{self.endpoint}", daemon=True)
        self._thread.start()

    def __call__(self, signal: Signal, request: Any) -> None:
        if signal not in self._signals:
            return
        with self._cond:
            if len(self._queue) == self._queue.maxlen:
                self._metrics.forward_dropped.labels(self.endpoint).inc()
            self._queue.append((signal, request.SerializeToString()))
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                signal, payload = self._queue.popleft()
            try:
                self._calls[signal](payload, timeout=10, metadata=self._metadata)
                self._metrics.forwarded.labels(self.endpoint).inc()
            except grpc.RpcError as exc:
                self._metrics.forward_dropped.labels(self.endpoint).inc()
                logger.warning("forwarding to %s failed: %s", self.endpoint, exc.code())

    def close(self, timeout_s: float = 5.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout_s)
        self._channel.close()
