"""SDK providers exporting over real OTLP (gRPC or HTTP) to a collector under test."""

from __future__ import annotations

from dataclasses import dataclass

from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter as GrpcLogExporter
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetricExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter as HttpLogExporter
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, LogRecordExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

from flowscope.collector.service import Collector
from flowscope.engine import Telemetry, TelemetryOptions


@dataclass
class OtlpProviders:
    tracer_provider: TracerProvider
    logger_provider: LoggerProvider
    meter_provider: MeterProvider

    def telemetry(self) -> Telemetry:
        return Telemetry(
            self.tracer_provider, self.logger_provider, self.meter_provider, TelemetryOptions(capture_io=True)
        )

    def flush(self) -> None:
        assert self.tracer_provider.force_flush()
        assert self.logger_provider.force_flush()
        assert self.meter_provider.force_flush()

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.logger_provider.shutdown()
        self.meter_provider.shutdown()


def otlp_providers(
    collector: Collector, protocol: str, service: str = "svc-test", token: str | None = None
) -> OtlpProviders:
    """`token`: a bearer token with the "ingest" grant, for a collector with auth configured."""
    resource = Resource.create({"service.name": service, "deployment.environment.name": "test"})
    headers = {"authorization": f"Bearer {token}"} if token else None
    spans: SpanExporter
    logs: LogRecordExporter
    metrics: MetricExporter
    if protocol == "grpc":
        endpoint = f"http://127.0.0.1:{collector.grpc_port}"
        spans = GrpcSpanExporter(endpoint=endpoint, insecure=True, headers=headers)
        logs = GrpcLogExporter(endpoint=endpoint, insecure=True, headers=headers)
        metrics = GrpcMetricExporter(endpoint=endpoint, insecure=True, headers=headers)
    else:
        base = f"http://127.0.0.1:{collector.http_port}"
        spans = HttpSpanExporter(endpoint=f"{base}/v1/traces", headers=headers)
        logs = HttpLogExporter(endpoint=f"{base}/v1/logs", headers=headers)
        metrics = HttpMetricExporter(endpoint=f"{base}/v1/metrics", headers=headers)
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(spans, schedule_delay_millis=50))
    logger_provider = LoggerProvider(resource=resource)
    logger_provider.add_log_record_processor(BatchLogRecordProcessor(logs, schedule_delay_millis=50))
    meter_provider = MeterProvider(
        resource=resource, metric_readers=[PeriodicExportingMetricReader(metrics, export_interval_millis=3_600_000)]
    )
    return OtlpProviders(tracer_provider, logger_provider, meter_provider)
