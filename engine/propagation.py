"""W3C trace context in and out of the engine."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping

from opentelemetry import propagate
from opentelemetry.context import Context


def inject_headers(headers: MutableMapping[str, str], context: Context | None = None) -> None:
    """Add `traceparent`/`tracestate` for the current (or given) span to outgoing headers."""
    propagate.inject(headers, context=context)


def extract_context(carrier: Mapping[str, str]) -> Context:
    """The caller's context from incoming headers, so a remote trigger joins the caller's trace."""
    return propagate.extract(dict(carrier))
