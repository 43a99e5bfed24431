"""Histogram records straight into the OTel SDK's aggregations, for attribute sets seen before.

Why this exists: the SDK's `Histogram.record` cleans the attribute mapping and hashes it
(recursively, sorted) on every call to find its aggregation — about 19 µs a record, and a
node step records two (`workflow.node.queue_wait`, `workflow.node.duration`): a third of
what the whole step's telemetry may cost (bench/engine_overhead.py). The engine's
attribute sets are few and repeat (workflow × node type × result), so here the first
record of a set goes through the SDK's own call, which creates the aggregations every
reader and view wants; later records of the same set hand the SDK's `Measurement` to those
aggregations directly, with the SDK's exemplar filter deciding exemplars as it would.

Anything unusual takes the SDK's call: a value the SDK would warn about, unhashable
attribute values, a reader added or removed since, an aggregation the SDK did not create
(a future cardinality limit). Used only for the SDK's own histogram type;
tests/engine/test_sdk_metrics.py keeps the collected data equal to the SDK path's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from time import time_ns
from typing import Any

from opentelemetry.attributes import _clean_attribute_value
from opentelemetry.context import Context, get_current
from opentelemetry.metrics import Histogram
from opentelemetry.sdk.metrics._internal.instrument import _Histogram as SdkHistogram
from opentelemetry.sdk.metrics._internal.measurement import Measurement
from opentelemetry.util.types import AttributeValue

_NUMBERS = (int, float)


@dataclass(frozen=True, eq=False)
class _Bound:
    attributes: Mapping[str, AttributeValue]  # cleaned, as the SDK's Measurement holds them
    aggregations: tuple[Any, ...]
    storages: object  # the reader storages these were found in; replaced when a reader comes or goes


class DirectHistogram:
    """A drop-in for one SDK histogram's `record` (see the module docstring)."""

    def __init__(self, instrument: Any) -> None:
        self._instrument = instrument
        self._consumer = instrument._measurement_consumer
        self._bound: dict[tuple[tuple[str, Any], ...], _Bound] = {}

    @classmethod
    def wrap(cls, instrument: Histogram) -> Histogram | DirectHistogram:
        """The direct path for the SDK's histogram (while the SDK keeps the parts used here), else `instrument`."""
        if type(instrument) is not SdkHistogram:
            return instrument
        consumer = getattr(instrument, "_measurement_consumer", None)
        if consumer is None or not all(hasattr(consumer, a) for a in ("_reader_storages", "_sdk_config")):
            return instrument
        return cls(instrument)

    def record(self, amount: float, attributes: Mapping[str, Any], context: Context | None = None) -> None:
        instrument, consumer = self._instrument, self._consumer
        try:
            key = tuple(attributes.items())
            bound = self._bound.get(key)
        except TypeError:  # an unhashable value: the SDK cleans it into something hashable
            instrument.record(amount, attributes, context)
            return
        if bound is None or bound.storages is not consumer._reader_storages:
            instrument.record(amount, attributes, context)
            self._bound[key] = self._bind(attributes)
            return
        if not bound.aggregations or type(amount) not in _NUMBERS or not 0 <= amount < math.inf:
            instrument.record(amount, attributes, context)  # the SDK's warnings, or aggregations it did not make
            return
        if not instrument._is_enabled():
            return
        measurement = Measurement(amount, time_ns(), instrument, context or get_current(), None)
        object.__setattr__(measurement, "attributes", bound.attributes)  # cleaned once, when bound
        sample = consumer._sdk_config.exemplar_filter.should_sample(
            amount, measurement.time_unix_nano, bound.attributes, measurement.context
        )
        for aggregation in bound.aggregations:
            aggregation.aggregate(measurement, sample)

    def _bind(self, attributes: Mapping[str, Any]) -> _Bound:
        """The aggregations the SDK's own record just used for `attributes` (none: keep asking the SDK)."""
        from opentelemetry.sdk.metrics._internal._view_instrument_match import _hash_attributes

        storages = self._consumer._reader_storages
        cleaned = _clean_attribute_value(attributes, None)
        aggregations = []
        for storage in storages.values():
            for match in storage._instrument_view_instrument_matches.get(self._instrument, ()):
                keys = match._view._attribute_keys
                view_attributes = dict(cleaned) if keys is None else {k: v for k, v in cleaned.items() if k in keys}
                aggregation = match._attributes_aggregation.get(_hash_attributes(view_attributes))
                if aggregation is None:
                    return _Bound(cleaned, (), storages)
                aggregations.append(aggregation)
        return _Bound(cleaned, tuple(aggregations), storages)
