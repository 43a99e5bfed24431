"""Whether the engine may take its fast paths through the OpenTelemetry SDK's private parts.

The fast paths — node spans and events built for the SDK's processors (engine/sdk_direct.py),
histogram records straight into the SDK's aggregations (engine/sdk_metrics.py), OTLP encoding
in place (engine/otlp_encoding.py), and the event queue's back-pressure
(engine/event_backpressure.py) — read private SDK names that any SDK release may change.
They are taken only when, decided once per process:

- `FLOWSCOPE_SDK_FAST_PATH` is not `0` (nor false/no/off),
- the installed `opentelemetry-sdk` is a version they were verified against (`VERIFIED`), and
- every private module attribute and class member they use is there.

Otherwise the engine takes the SDK's public API, slower and equal in what it exports
(tests/engine/test_sdk_fallback.py). The modules with the fast paths are imported only after
a yes, so an SDK that moved a private name cannot break `import engine`. Instance
attributes (a provider's processors, a histogram's consumer) are checked again where they
are read, with the same fallback.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata

logger = logging.getLogger(__name__)

ENV = "FLOWSCOPE_SDK_FAST_PATH"
# [lowest, highest) (major, minor) of opentelemetry-sdk the fast paths were verified against.
VERIFIED = ((1, 45), (1, 46))
_OFF = frozenset({"0", "false", "no", "off"})

# module, then dotted attribute: what the fast paths read that the SDK does not make public.
PRIVATE_PARTS: tuple[tuple[str, str], ...] = (
    ("opentelemetry.attributes", "_clean_attribute_value"),
    ("opentelemetry.sdk.metrics._internal.instrument", "_Histogram"),
    ("opentelemetry.sdk.metrics._internal.instrument", "_Histogram._is_enabled"),
    ("opentelemetry.sdk.metrics._internal.measurement", "Measurement"),
    ("opentelemetry.sdk.metrics._internal._view_instrument_match", "_hash_attributes"),
    ("opentelemetry.sdk.metrics._internal._view_instrument_match", "_ViewInstrumentMatch"),
    ("opentelemetry.sdk._logs", "Logger._is_enabled"),
    ("opentelemetry.sdk._logs", "ReadWriteLogRecord"),
    ("opentelemetry.sdk._logs", "ReadableLogRecord"),
    ("opentelemetry.sdk._logs", "LogRecordLimits"),
    ("opentelemetry.sdk._logs._internal", "SynchronousMultiLogRecordProcessor"),
    ("opentelemetry.sdk._shared_internal", "BatchProcessor.emit"),
    ("opentelemetry.sdk.trace", "Tracer"),
    ("opentelemetry.sdk.trace", "Event"),
    ("opentelemetry.sdk.trace.sampling", "ParentBased"),
    ("opentelemetry.sdk.trace.sampling", "StaticSampler"),
)
# What engine/otlp_encoding.py replaces in the OTLP/gRPC exporters: checked only when those
# exporters are built, so that choosing a path does not import gRPC.
EXPORTER_DISTRIBUTION = "opentelemetry-exporter-otlp-proto-grpc"
EXPORTER_PARTS: tuple[tuple[str, str], ...] = (
    ("opentelemetry.exporter.otlp.proto.grpc.trace_exporter", "OTLPSpanExporter._translate_data"),
    ("opentelemetry.exporter.otlp.proto.grpc._log_exporter", "OTLPLogExporter._translate_data"),
)


@dataclass(frozen=True)
class Decision:
    fast: bool
    reason: str


def installed_version(distribution: str = "opentelemetry-sdk") -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def missing_parts(parts: tuple[tuple[str, str], ...] = PRIVATE_PARTS) -> list[str]:
    """The private parts this SDK lacks, as `module:attribute`."""
    missing = []
    for module_name, path in parts:
        try:
            obj: object = importlib.import_module(module_name)
            for name in path.split("."):
                obj = getattr(obj, name)
        except (ImportError, AttributeError):
            missing.append(f"{module_name}:{path}")
    return missing


# The fields of the SDK's ReadableSpan that engine/sdk_direct.py's StepSpan writes.
_SPAN_FIELDS = ("_name", "_context", "_end_time", "_events", "_status", "_attributes", "_instrumentation_scope")


def _missing_span_fields() -> list[str]:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan

    probe = ReadableSpan(name="probe", resource=Resource.get_empty())
    return [f"opentelemetry.sdk.trace:ReadableSpan().{f}" for f in _SPAN_FIELDS if not hasattr(probe, f)]


def _verified(version: str) -> bool:
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return False
    low, high = VERIFIED
    return low <= (major, minor) < high


def decide(version: str | None, env: Mapping[str, str]) -> Decision:
    """The decision for an SDK of `version` (None: not installed) under `env`."""
    switch = env.get(ENV, "").strip().lower()
    if switch in _OFF:
        return Decision(False, f"{ENV}={env[ENV]}")
    if version is None:
        return Decision(False, "opentelemetry-sdk is not installed as a distribution")
    if not _verified(version):
        low, high = VERIFIED
        verified = f">={low[0]}.{low[1]},<{high[0]}.{high[1]}"
        return Decision(False, f"opentelemetry-sdk {version} is not a verified version ({verified})")
    missing = missing_parts() + _missing_span_fields()
    if missing:
        return Decision(False, f"opentelemetry-sdk {version} lacks {', '.join(missing)}")
    return Decision(True, f"opentelemetry-sdk {version}")


_decision: Decision | None = None


def decision() -> Decision:
    """This process's decision, made on first use and logged once."""
    global _decision
    if _decision is None:
        _decision = decide(installed_version(), os.environ)
        path = "fast paths" if _decision.fast else "public SDK path (fallback)"
        logger.info("flowscope engine telemetry: %s (%s)", path, _decision.reason)
    return _decision


def fast_path() -> bool:
    return decision().fast


def grpc_encoding() -> bool:
    """Whether the OTLP/gRPC exporters may encode in place: the fast paths are on, and the
    installed exporter is a verified version with the hook it replaces."""
    if not fast_path():
        return False
    version = installed_version(EXPORTER_DISTRIBUTION)
    missing = missing_parts(EXPORTER_PARTS)
    if version is not None and _verified(version) and not missing:
        return True
    fell_back("OTLP encoding", f"{EXPORTER_DISTRIBUTION} {version}, lacking {missing or 'nothing'}")
    return False


def fell_back(part: str, error: BaseException | str) -> None:
    """A fast path failed to load although the check passed: the public path is taken for it."""
    logger.warning("flowscope engine telemetry: %s falls back to the public SDK path (%s)", part, error)


def reset() -> None:
    """Forget the decision (tests, or after changing the environment): the next use decides again."""
    global _decision
    _decision = None
