"""The direct histogram path (engine/sdk_metrics.py) aggregates what the SDK's own record would.

The same records go to two meter providers configured alike, one through the SDK's
`Histogram.record` and one through `DirectHistogram`; what their readers collect must be
equal, data point for data point (times aside), exemplars included.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader, MetricsData
from opentelemetry.sdk.metrics.view import DropAggregation, View
from opentelemetry.sdk.trace import TracerProvider

from flowscope.engine import Engine, Telemetry, WorkflowBuilder
from flowscope.engine.sdk_metrics import DirectHistogram

Records = Callable[[Any], None]


def readers() -> list[InMemoryMetricReader]:
    return [
        InMemoryMetricReader(),
        InMemoryMetricReader(preferred_temporality={Histogram: AggregationTemporality.DELTA}),
    ]


def views() -> list[View]:
    # One view keeps a subset of the attributes, one drops a second instrument's data entirely.
    return [
        View(instrument_name="step.duration"),
        View(instrument_name="step.duration", name="step.duration.by_type", attribute_keys={"node.type"}),
        View(instrument_name="dropped", aggregation=DropAggregation()),
    ]


def collected(reader: InMemoryMetricReader) -> list[tuple[Any, ...]]:
    data: MetricsData | None = reader.get_metrics_data()
    assert data is not None
    points = []
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                for point in metric.data.data_points:
                    exemplars = tuple(
                        (e.value, e.span_id, e.trace_id, tuple(sorted((e.filtered_attributes or {}).items())))
                        for e in getattr(point, "exemplars", ())
                    )
                    fields = ("count", "sum", "bucket_counts", "min", "max", "value")
                    values = tuple(_plain(getattr(point, name, None)) for name in fields)
                    points.append((metric.name, tuple(sorted((point.attributes or {}).items())), *values, exemplars))
    return sorted(points, key=repr)


def run_both(records: Callable[[Any, Any, Any], None], late_reader: bool = False) -> list[list[tuple[Any, ...]]]:
    """`records(histogram, dropped, context)` once per path; each path's readers' collections."""
    span = TracerProvider().get_tracer("t").start_span("step")
    context = trace.set_span_in_context(span)
    out = []
    for direct in (False, True):
        path_readers = readers()
        provider = MeterProvider(metric_readers=path_readers[:1] if late_reader else path_readers, views=views())
        meter = provider.get_meter("t")
        histogram: Any = meter.create_histogram("step.duration", unit="s")
        dropped: Any = meter.create_histogram("dropped")
        if direct:
            histogram, dropped = DirectHistogram.wrap(histogram), DirectHistogram.wrap(dropped)
            assert isinstance(histogram, DirectHistogram)
        records(histogram, dropped, context)
        if late_reader:
            provider.add_metric_reader(path_readers[1])
            records(histogram, dropped, context)
        out.append([p for reader in path_readers for p in collected(reader)])
        # A second collection: the delta reader starts again, the cumulative one keeps counting.
        records(histogram, dropped, None)
        out.append([p for reader in path_readers for p in collected(reader)])
    return out


def steps(histogram: Any, dropped: Any, context: Any) -> None:
    attribute_sets = [
        {"workflow.name": "a", "node.type": "code", "result": "success"},
        {"workflow.name": "a", "node.type": "code", "result": "failure"},
        {"workflow.name": "b", "node.type": "llm", "result": "success"},
    ]
    for i in range(60):
        attributes = attribute_sets[i % 3]
        histogram.record(i * 0.37, attributes, context if i % 2 else None)
        dropped.record(i, attributes)
    histogram.record(7, {})  # no attributes, an int value


def test_collected_data_equals_the_sdk_paths() -> None:
    sdk, sdk_again, direct, direct_again = run_both(steps)
    assert direct == sdk and direct_again == sdk_again
    # What was compared is substantial: both views, several sets, exemplars from the sampled span.
    assert {p[0] for p in sdk} == {"step.duration", "step.duration.by_type"}
    assert sum(p[2] for p in sdk if p[0] == "step.duration") == 2 * 61  # two readers
    assert any(p[-1] for p in sdk)
    # The second collection differs (the delta reader started again): the comparison sees time.
    assert sdk_again != sdk


def test_a_reader_added_later_gets_what_the_sdk_would_give_it() -> None:
    sdk, sdk_again, direct, direct_again = run_both(steps, late_reader=True)
    assert direct == sdk and direct_again == sdk_again
    assert len(sdk) > len(run_both(steps)[0]) // 2  # the late reader collected points too


def test_values_the_sdk_rejects_are_rejected_alike(caplog: pytest.LogCaptureFixture) -> None:
    def odd(histogram: Any, dropped: Any, context: Any) -> None:
        attributes = {"k": "v"}
        histogram.record(1.0, attributes)
        with caplog.at_level(logging.WARNING):
            for value in (-1.0, math.nan, math.inf):
                histogram.record(value, attributes)
        histogram.record(2.0, {"list": ["x", "y"]})  # unhashable as given; the SDK makes it a tuple
        histogram.record(3.0, {"list": ["x", "y"]})
        histogram.record(True, attributes)  # a bool is an int to the SDK; not the direct path's plain number

    sdk, _, direct, _ = run_both(odd)
    assert direct == sdk
    assert "non-negative" in caplog.text and "not finite" in caplog.text
    counts = {p[1]: p[2] for p in sdk if p[0] == "step.duration"}
    assert counts == {(("k", "v"),): 2, (("list", ("x", "y")),): 2}


def test_only_sdk_histograms_are_wrapped() -> None:
    from opentelemetry.metrics import NoOpMeterProvider

    noop = NoOpMeterProvider().get_meter("t").create_histogram("h")
    assert DirectHistogram.wrap(noop) is noop
    assert not isinstance(Telemetry.disabled().node_duration, DirectHistogram)


async def test_engine_metrics_are_the_same_on_both_paths() -> None:
    async def ok(ctx: Any) -> int:
        return 1

    workflow = (
        WorkflowBuilder("m").code("a", ok).code("b", ok, depends_on=["a"]).code("c", ok, depends_on=["a"]).build()
    )
    views_by_path = []
    for direct in (False, True):
        reader = InMemoryMetricReader()
        telemetry = Telemetry(TracerProvider(), None, MeterProvider(metric_readers=[reader]), direct_records=direct)
        assert isinstance(telemetry.node_duration, DirectHistogram) is direct
        async with Engine(telemetry) as engine:
            for _ in range(3):
                await engine.run(workflow)
        views_by_path.append([(p[0], p[1], p[2]) for p in collected(reader)])
    assert views_by_path[0] == views_by_path[1]
    durations = [p for p in views_by_path[1] if p[0] == "workflow.node.duration"]
    assert durations and sum(p[2] for p in durations) == 9


def _plain(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def test_known_attribute_sets_bypass_the_sdk_call() -> None:
    provider = MeterProvider(metric_readers=readers(), views=views())
    histogram = DirectHistogram.wrap(provider.get_meter("t").create_histogram("step.duration"))
    assert isinstance(histogram, DirectHistogram)
    calls = 0
    sdk_record = histogram._instrument.record

    def counting(*args: Any, **kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        sdk_record(*args, **kwargs)

    histogram._instrument.record = counting
    for value in range(10):
        histogram.record(value, {"node.type": "code", "workflow.name": "w"})
    # Only the first record asked the SDK; the rest went to its two views' aggregations in both readers.
    assert calls == 1
    (bound,) = histogram._bound.values()
    assert len(bound.aggregations) == 4
