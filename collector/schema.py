"""The ClickHouse schema: the contrib exporter's OTel tables plus workflow views.

The `otel_*` tables match the OpenTelemetry Collector contrib ClickHouse
exporter's DDL (column names, types, codecs, indexes, keys, TTL), so that
exporter can write into tables created here and contrib tooling (Grafana's
ClickHouse plugin) reads them unchanged. The workflow tables are filled by
materialized views over those tables, so they fill the same way whichever
collector writes. Migrations are numbered and recorded in
`flowscope_schema_migrations`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from flowscope.contract import attributes as a

_DEFAULT_DATABASE = "otel"
_DEFAULT_TTL_DAYS = 0  # 0 keeps data forever, as the contrib exporter's default does.


@dataclass(frozen=True)
class SchemaOptions:
    database: str = _DEFAULT_DATABASE
    traces_ttl_days: int = _DEFAULT_TTL_DAYS
    logs_ttl_days: int = _DEFAULT_TTL_DAYS
    metrics_ttl_days: int = _DEFAULT_TTL_DAYS
    workflow_ttl_days: int = _DEFAULT_TTL_DAYS

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.database):
            raise ValueError(f"invalid database name {self.database!r}")
        for name in ("traces_ttl_days", "logs_ttl_days", "metrics_ttl_days", "workflow_ttl_days"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")


def _ttl(expr: str, days: int) -> str:
    return f"TTL {expr} + toIntervalDay({days})" if days else ""


_MAP = "Map(LowCardinality(String), String)"

_TRACES = """CREATE TABLE IF NOT EXISTS {db}.otel_traces (
    Timestamp DateTime64(9) CODEC(Delta(8), ZSTD(1)),
    TraceId String CODEC(ZSTD(1)),
    SpanId String CODEC(ZSTD(1)),
    ParentSpanId String CODEC(ZSTD(1)),
    TraceState String CODEC(ZSTD(1)),
    SpanName LowCardinality(String) CODEC(ZSTD(1)),
    SpanKind LowCardinality(String) CODEC(ZSTD(1)),
    ServiceName LowCardinality(String) CODEC(ZSTD(1)),
    ResourceAttributes {map} CODEC(ZSTD(1)),
    ScopeName String CODEC(ZSTD(1)),
    ScopeVersion String CODEC(ZSTD(1)),
    SpanAttributes {map} CODEC(ZSTD(1)),
    Duration UInt64 CODEC(T64, ZSTD(1)),
    StatusCode LowCardinality(String) CODEC(ZSTD(1)),
    StatusMessage String CODEC(ZSTD(1)),
    Events Nested (
        Timestamp DateTime64(9),
        Name LowCardinality(String),
        Attributes {map}
    ) CODEC(ZSTD(1)),
    Links Nested (
        TraceId String,
        SpanId String,
        TraceState String,
        Attributes {map}
    ) CODEC(ZSTD(1)),
    ResourceAttributeItems Array(String) ALIAS arrayMap(kv -> concat(kv.1, '=', kv.2), CAST(ResourceAttributes, 'Array(Tuple(String, String))')),
    SpanAttributeItems Array(String) ALIAS arrayMap(kv -> concat(kv.1, '=', kv.2), CAST(SpanAttributes, 'Array(Tuple(String, String))')),
    INDEX idx_trace_id TraceId TYPE bloom_filter(0.001) GRANULARITY 1,
    INDEX idx_res_attr_key mapKeys(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_res_attr_value mapValues(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_span_attr_key mapKeys(SpanAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_span_attr_value mapValues(SpanAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_duration Duration TYPE minmax GRANULARITY 1,
    INDEX idx_lower_span_name lower(SpanName) TYPE tokenbf_v1(32768, 3, 0) GRANULARITY 8
) ENGINE = MergeTree
PARTITION BY toDate(Timestamp)
PRIMARY KEY (ServiceName, SpanName, toDateTime(Timestamp))
ORDER BY (ServiceName, SpanName, toDateTime(Timestamp), Timestamp)
{ttl}
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1"""

_TRACE_ID_TS = """CREATE TABLE IF NOT EXISTS {db}.otel_traces_trace_id_ts (
    TraceId String CODEC(ZSTD(1)),
    Start SimpleAggregateFunction(min, DateTime) CODEC(ZSTD(1)),
    End SimpleAggregateFunction(max, DateTime) CODEC(ZSTD(1))
) ENGINE = AggregatingMergeTree
PARTITION BY toStartOfWeek(Start)
ORDER BY (TraceId)
{ttl}
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1"""

_TRACE_ID_TS_MV = """CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.otel_traces_trace_id_ts_mv
TO {db}.otel_traces_trace_id_ts
AS SELECT
    TraceId,
    min(Timestamp) AS Start,
    max(Timestamp) AS End
FROM {db}.otel_traces
WHERE TraceId != ''
GROUP BY TraceId"""

_LOGS = """CREATE TABLE IF NOT EXISTS {db}.otel_logs (
    Timestamp DateTime64(9) CODEC(Delta(8), ZSTD(1)),
    TimestampTime DateTime DEFAULT toDateTime(Timestamp),
    TraceId String CODEC(ZSTD(1)),
    SpanId String CODEC(ZSTD(1)),
    TraceFlags UInt8,
    SeverityText LowCardinality(String) CODEC(ZSTD(1)),
    SeverityNumber UInt8,
    ServiceName LowCardinality(String) CODEC(ZSTD(1)),
    Body String CODEC(ZSTD(1)),
    ResourceSchemaUrl LowCardinality(String) CODEC(ZSTD(1)),
    ResourceAttributes {map} CODEC(ZSTD(1)),
    ScopeSchemaUrl LowCardinality(String) CODEC(ZSTD(1)),
    ScopeName String CODEC(ZSTD(1)),
    ScopeVersion LowCardinality(String) CODEC(ZSTD(1)),
    ScopeAttributes {map} CODEC(ZSTD(1)),
    LogAttributes {map} CODEC(ZSTD(1)),
    EventName String CODEC(ZSTD(1)),
    INDEX idx_trace_id TraceId TYPE bloom_filter(0.001) GRANULARITY 1,
    INDEX idx_res_attr_key mapKeys(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_res_attr_value mapValues(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_scope_attr_key mapKeys(ScopeAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_scope_attr_value mapValues(ScopeAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_log_attr_key mapKeys(LogAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_log_attr_value mapValues(LogAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_body Body TYPE tokenbf_v1(32768, 3, 0) GRANULARITY 8
) ENGINE = MergeTree
PARTITION BY toDate(TimestampTime)
PRIMARY KEY (ServiceName, TimestampTime)
ORDER BY (ServiceName, TimestampTime, Timestamp)
{ttl}
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1"""

_METRIC_COMMON = """    ResourceAttributes {map} CODEC(ZSTD(1)),
    ResourceSchemaUrl String CODEC(ZSTD(1)),
    ScopeName String CODEC(ZSTD(1)),
    ScopeVersion String CODEC(ZSTD(1)),
    ScopeAttributes {map} CODEC(ZSTD(1)),
    ScopeDroppedAttrCount UInt32 CODEC(ZSTD(1)),
    ScopeSchemaUrl String CODEC(ZSTD(1)),
    ServiceName LowCardinality(String) CODEC(ZSTD(1)),
    MetricName String CODEC(ZSTD(1)),
    MetricDescription String CODEC(ZSTD(1)),
    MetricUnit String CODEC(ZSTD(1)),
    Attributes {map} CODEC(ZSTD(1)),
    StartTimeUnix DateTime64(9) CODEC(Delta, ZSTD(1)),
    TimeUnix DateTime64(9) CODEC(Delta, ZSTD(1)),
"""

_EXEMPLARS = """    Exemplars Nested (
        FilteredAttributes {map},
        TimeUnix DateTime64(9),
        Value Float64,
        SpanId String,
        TraceId String
    ) CODEC(ZSTD(1)),
"""

_METRIC_INDEXES = """    INDEX idx_res_attr_key mapKeys(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_res_attr_value mapValues(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_scope_attr_key mapKeys(ScopeAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_scope_attr_value mapValues(ScopeAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_attr_key mapKeys(Attributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_attr_value mapValues(Attributes) TYPE bloom_filter(0.01) GRANULARITY 1
) ENGINE = MergeTree
{ttl}
PARTITION BY toDate(TimeUnix)
ORDER BY (ServiceName, MetricName, Attributes, toUnixTimestamp64Nano(TimeUnix))
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1"""

_METRIC_BODIES = {
    "otel_metrics_gauge": "    Value Float64 CODEC(ZSTD(1)),\n    Flags UInt32 CODEC(ZSTD(1)),\n" + _EXEMPLARS,
    "otel_metrics_sum": "    Value Float64 CODEC(ZSTD(1)),\n    Flags UInt32 CODEC(ZSTD(1)),\n"
    + _EXEMPLARS
    + "    AggregationTemporality Int32 CODEC(ZSTD(1)),\n    IsMonotonic Boolean CODEC(Delta, ZSTD(1)),\n",
    "otel_metrics_histogram": """    Count UInt64 CODEC(Delta, ZSTD(1)),
    Sum Float64 CODEC(ZSTD(1)),
    BucketCounts Array(UInt64) CODEC(ZSTD(1)),
    ExplicitBounds Array(Float64) CODEC(ZSTD(1)),
"""
    + _EXEMPLARS
    + """    Flags UInt32 CODEC(ZSTD(1)),
    Min Float64 CODEC(ZSTD(1)),
    Max Float64 CODEC(ZSTD(1)),
    AggregationTemporality Int32 CODEC(ZSTD(1)),
""",
    "otel_metrics_exponential_histogram": """    Count UInt64 CODEC(Delta, ZSTD(1)),
    Sum Float64 CODEC(ZSTD(1)),
    Scale Int32 CODEC(ZSTD(1)),
    ZeroCount UInt64 CODEC(ZSTD(1)),
    PositiveOffset Int32 CODEC(ZSTD(1)),
    PositiveBucketCounts Array(UInt64) CODEC(ZSTD(1)),
    NegativeOffset Int32 CODEC(ZSTD(1)),
    NegativeBucketCounts Array(UInt64) CODEC(ZSTD(1)),
"""
    + _EXEMPLARS
    + """    Flags UInt32 CODEC(ZSTD(1)),
    Min Float64 CODEC(ZSTD(1)),
    Max Float64 CODEC(ZSTD(1)),
    AggregationTemporality Int32 CODEC(ZSTD(1)),
""",
    "otel_metrics_summary": """    Count UInt64 CODEC(Delta, ZSTD(1)),
    Sum Float64 CODEC(ZSTD(1)),
    ValueAtQuantiles Nested(
        Quantile Float64,
        Value Float64
    ) CODEC(ZSTD(1)),
    Flags UInt32 CODEC(ZSTD(1)),
""",
}

# -- workflow tables: derived inside ClickHouse -------------------------------------------

_WORKFLOW_EVENTS = """CREATE TABLE IF NOT EXISTS {db}.workflow_events (
    Timestamp DateTime64(9) CODEC(Delta(8), ZSTD(1)),
    ExecutionId String CODEC(ZSTD(1)),
    Seq UInt64 CODEC(Delta, ZSTD(1)),
    EventName LowCardinality(String),
    WorkflowId LowCardinality(String),
    WorkflowName LowCardinality(String),
    NodeId String CODEC(ZSTD(1)),
    NodeType LowCardinality(String),
    TraceId String CODEC(ZSTD(1)),
    SpanId String CODEC(ZSTD(1)),
    ServiceName LowCardinality(String),
    Data String CODEC(ZSTD(1))
) ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(Timestamp)
ORDER BY (ExecutionId, Seq)
{ttl}"""

_WORKFLOW_EVENTS_MV = """CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.workflow_events_mv
TO {db}.workflow_events
AS SELECT
    Timestamp,
    LogAttributes['workflow.execution.id'] AS ExecutionId,
    toUInt64OrZero(LogAttributes['workflow.event.seq']) AS Seq,
    EventName,
    LogAttributes['workflow.id'] AS WorkflowId,
    LogAttributes['workflow.name'] AS WorkflowName,
    LogAttributes['workflow.node.id'] AS NodeId,
    LogAttributes['workflow.node.type'] AS NodeType,
    TraceId,
    SpanId,
    ServiceName,
    Body AS Data
FROM {db}.otel_logs
WHERE EventName != '' AND LogAttributes['workflow.execution.id'] != ''"""

_WORKFLOW_EXECUTIONS = """CREATE TABLE IF NOT EXISTS {db}.workflow_executions (
    ExecutionId String,
    WorkflowId LowCardinality(String),
    WorkflowName LowCardinality(String),
    WorkflowVersion LowCardinality(String),
    Status LowCardinality(String),
    TriggerType LowCardinality(String),
    UserId String,
    StartTime DateTime64(9),
    EndTime Nullable(DateTime64(9)),
    DurationMs Nullable(Float64),
    TotalNodes UInt32,
    CompletedNodes UInt32,
    FailedNodes UInt32,
    SkippedNodes UInt32,
    Error String,
    TraceId String,
    SpanId String,
    ServiceName LowCardinality(String),
    ResumedFrom String,
    ParentExecutionId String,
    Version UInt8,
    INDEX idx_workflow WorkflowId TYPE set(1000) GRANULARITY 4,
    INDEX idx_status Status TYPE set(16) GRANULARITY 4,
    INDEX idx_user UserId TYPE bloom_filter(0.01) GRANULARITY 4
) ENGINE = ReplacingMergeTree(Version)
PARTITION BY toYYYYMM(StartTime)
ORDER BY ExecutionId
{ttl}"""

# A run appears as 'running' from its workflow.started event, then is replaced
# by the row built from its finished run span (higher Version).
_WORKFLOW_EXECUTIONS_STARTED_MV = """CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.workflow_executions_started_mv
TO {db}.workflow_executions
AS SELECT
    LogAttributes['workflow.execution.id'] AS ExecutionId,
    LogAttributes['workflow.id'] AS WorkflowId,
    LogAttributes['workflow.name'] AS WorkflowName,
    JSONExtractString(Body, 'workflowVersion') AS WorkflowVersion,
    'running' AS Status,
    JSONExtractString(Body, 'trigger') AS TriggerType,
    JSONExtractString(Body, 'userId') AS UserId,
    Timestamp AS StartTime,
    CAST(NULL, 'Nullable(DateTime64(9))') AS EndTime,
    CAST(NULL, 'Nullable(Float64)') AS DurationMs,
    toUInt32(JSONExtractUInt(Body, 'totalNodes')) AS TotalNodes,
    toUInt32(0) AS CompletedNodes,
    toUInt32(0) AS FailedNodes,
    toUInt32(0) AS SkippedNodes,
    '' AS Error,
    TraceId,
    SpanId,
    ServiceName,
    JSONExtractString(Body, 'resumedFrom') AS ResumedFrom,
    JSONExtractString(Body, 'parentExecutionId') AS ParentExecutionId,
    toUInt8(1) AS Version
FROM {db}.otel_logs
WHERE EventName = 'workflow.started' AND LogAttributes['workflow.execution.id'] != ''"""

_WORKFLOW_EXECUTIONS_SPAN_MV = """CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.workflow_executions_span_mv
TO {db}.workflow_executions
AS SELECT
    SpanAttributes['workflow.execution.id'] AS ExecutionId,
    SpanAttributes['workflow.id'] AS WorkflowId,
    SpanAttributes['workflow.name'] AS WorkflowName,
    SpanAttributes['workflow.version'] AS WorkflowVersion,
    SpanAttributes['workflow.result'] AS Status,
    SpanAttributes['workflow.trigger.type'] AS TriggerType,
    SpanAttributes['enduser.id'] AS UserId,
    Timestamp AS StartTime,
    CAST(Timestamp + toIntervalNanosecond(Duration), 'Nullable(DateTime64(9))') AS EndTime,
    CAST(Duration / 1e6, 'Nullable(Float64)') AS DurationMs,
    toUInt32OrZero(SpanAttributes['workflow.node.count']) AS TotalNodes,
    toUInt32OrZero(SpanAttributes['workflow.node.completed_count']) AS CompletedNodes,
    toUInt32OrZero(SpanAttributes['workflow.node.failed_count']) AS FailedNodes,
    toUInt32OrZero(SpanAttributes['workflow.node.skipped_count']) AS SkippedNodes,
    StatusMessage AS Error,
    TraceId,
    SpanId,
    ServiceName,
    SpanAttributes['workflow.resumed_from.execution.id'] AS ResumedFrom,
    SpanAttributes['workflow.parent.execution.id'] AS ParentExecutionId,
    toUInt8(2) AS Version
FROM {db}.otel_traces
WHERE SpanAttributes['gen_ai.operation.name'] = 'invoke_workflow'
  AND SpanAttributes['workflow.execution.id'] != ''"""

# The stack declares a run lost when its engine goes silent (workflow.lost, written by the
# bridge's control plane) and the engine, back, says it still runs it (workflow.recovered).
# Both rows take Version 1 like the started row: with equal versions ReplacingMergeTree keeps
# the row inserted last, so lost → recovered → lost follow each other, while the finished run
# span (Version 2) wins whatever order they came in. A row only replaces one of its own
# partition: the event body carries the run's StartTime and the started row's fields, and a
# body without a start time writes no row (it would sit in another partition, never replaced).
_WORKFLOW_EXECUTIONS_LIVENESS_MV = """CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.workflow_executions_liveness_mv
TO {db}.workflow_executions
AS SELECT
    LogAttributes['workflow.execution.id'] AS ExecutionId,
    LogAttributes['workflow.id'] AS WorkflowId,
    LogAttributes['workflow.name'] AS WorkflowName,
    JSONExtractString(Body, 'workflowVersion') AS WorkflowVersion,
    if(EventName = 'workflow.lost', 'lost', 'running') AS Status,
    JSONExtractString(Body, 'trigger') AS TriggerType,
    JSONExtractString(Body, 'userId') AS UserId,
    fromUnixTimestamp64Nano(toInt64(JSONExtractUInt(Body, 'startTimeUnixNano'))) AS StartTime,
    CAST(NULL, 'Nullable(DateTime64(9))') AS EndTime,
    CAST(NULL, 'Nullable(Float64)') AS DurationMs,
    toUInt32(JSONExtractUInt(Body, 'totalNodes')) AS TotalNodes,
    toUInt32(0) AS CompletedNodes,
    toUInt32(0) AS FailedNodes,
    toUInt32(0) AS SkippedNodes,
    if(EventName = 'workflow.lost',
       concat('lost: ', JSONExtractString(Body, 'reason'), ' (seq ', LogAttributes['workflow.event.seq'], ')'),
       '') AS Error,
    TraceId,
    SpanId,
    if(JSONExtractString(Body, 'serviceName') != '', JSONExtractString(Body, 'serviceName'), ServiceName) AS ServiceName,
    JSONExtractString(Body, 'resumedFrom') AS ResumedFrom,
    JSONExtractString(Body, 'parentExecutionId') AS ParentExecutionId,
    toUInt8(1) AS Version
FROM {db}.otel_logs
WHERE EventName IN ('workflow.lost', 'workflow.recovered')
  AND LogAttributes['workflow.execution.id'] != ''
  AND JSONExtractUInt(Body, 'startTimeUnixNano') > 0"""

_NODE_EXECUTIONS = """CREATE TABLE IF NOT EXISTS {db}.node_executions (
    ExecutionId String,
    NodeId String,
    Attempt UInt32,
    NodeType LowCardinality(String),
    NodeLabel String,
    Status LowCardinality(String),
    StartTime DateTime64(9),
    EndTime DateTime64(9),
    DurationMs Float64,
    ErrorType LowCardinality(String),
    Error String,
    Model LowCardinality(String),
    InputTokens UInt64,
    OutputTokens UInt64,
    TraceId String,
    SpanId String,
    ParentSpanId String,
    ServiceName LowCardinality(String),
    INDEX idx_node_type NodeType TYPE set(64) GRANULARITY 4,
    INDEX idx_status Status TYPE set(16) GRANULARITY 4
) ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(StartTime)
ORDER BY (ExecutionId, NodeId, Attempt)
{ttl}"""

_NODE_EXECUTIONS_MV = """CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.node_executions_mv
TO {db}.node_executions
AS SELECT
    SpanAttributes['workflow.execution.id'] AS ExecutionId,
    SpanAttributes['workflow.node.id'] AS NodeId,
    toUInt32OrZero(SpanAttributes['workflow.node.attempt']) AS Attempt,
    SpanAttributes['workflow.node.type'] AS NodeType,
    SpanAttributes['workflow.node.label'] AS NodeLabel,
    SpanAttributes['workflow.node.result'] AS Status,
    Timestamp AS StartTime,
    Timestamp + toIntervalNanosecond(Duration) AS EndTime,
    Duration / 1e6 AS DurationMs,
    SpanAttributes['error.type'] AS ErrorType,
    StatusMessage AS Error,
    SpanAttributes['gen_ai.request.model'] AS Model,
    toUInt64OrZero(SpanAttributes['gen_ai.usage.input_tokens']) AS InputTokens,
    toUInt64OrZero(SpanAttributes['gen_ai.usage.output_tokens']) AS OutputTokens,
    TraceId,
    SpanId,
    ParentSpanId,
    ServiceName
FROM {db}.otel_traces
WHERE SpanAttributes['workflow.node.id'] != '' AND SpanAttributes['workflow.execution.id'] != ''"""

# Who owns an execution (its workflow and end user) is decided by the first record that
# names it, in the order ClickHouse stored them: min over (insert time, row in the insert).
# Later records claiming another owner — a forged workflow.started, a second run span —
# cannot change who may read the execution (ws_bridge/history.py reads the owner here).
_EXECUTION_OWNERS = """CREATE TABLE IF NOT EXISTS {db}.execution_owners (
    ExecutionId String,
    Owner SimpleAggregateFunction(min, Tuple(StoredAt DateTime64(9), Row UInt64, WorkflowId String, UserId String)),
    FirstSeen SimpleAggregateFunction(min, DateTime64(9))
) ENGINE = AggregatingMergeTree
ORDER BY ExecutionId
{ttl}"""

_EXECUTION_OWNERS_STARTED_MV = """CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.execution_owners_started_mv
TO {db}.execution_owners
AS SELECT
    LogAttributes['workflow.execution.id'] AS ExecutionId,
    tuple(now64(9), rowNumberInAllBlocks(), LogAttributes['workflow.id'], JSONExtractString(Body, 'userId')) AS Owner,
    Timestamp AS FirstSeen
FROM {db}.otel_logs
WHERE EventName = 'workflow.started' AND LogAttributes['workflow.execution.id'] != ''"""

_EXECUTION_OWNERS_SPAN_MV = """CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.execution_owners_span_mv
TO {db}.execution_owners
AS SELECT
    SpanAttributes['workflow.execution.id'] AS ExecutionId,
    tuple(now64(9), rowNumberInAllBlocks(), SpanAttributes['workflow.id'], SpanAttributes['enduser.id']) AS Owner,
    Timestamp AS FirstSeen
FROM {db}.otel_traces
WHERE SpanAttributes['gen_ai.operation.name'] = 'invoke_workflow'
  AND SpanAttributes['workflow.execution.id'] != ''"""

# Executions stored before the owners table existed keep the owner their row shows now.
_EXECUTION_OWNERS_BACKFILL = """INSERT INTO {db}.execution_owners
SELECT ExecutionId, tuple(toDateTime64(0, 9), toUInt64(0), WorkflowId, UserId), StartTime
FROM {db}.workflow_executions FINAL"""


# Rollbacks (docs/durability.md, "Rollback"): one row per compensation span and per rollback
# span. Compensations name their node with their own attribute, so node_executions never takes
# one for an attempt. Literals come from contract/ (rendered in _rollback_views).
_NODE_COMPENSATIONS = """CREATE TABLE IF NOT EXISTS {db}.node_compensations (
    ExecutionId String,
    RollbackId String,
    NodeId String,
    NodeType LowCardinality(String),
    SideEffect LowCardinality(String),
    Status LowCardinality(String),
    StartTime DateTime64(9),
    EndTime DateTime64(9),
    DurationMs Float64,
    ErrorType LowCardinality(String),
    Error String,
    TraceId String,
    SpanId String,
    ParentSpanId String,
    ServiceName LowCardinality(String)
) ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(StartTime)
ORDER BY (ExecutionId, RollbackId, NodeId)
{ttl}"""

_NODE_COMPENSATIONS_MV = """CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.node_compensations_mv
TO {db}.node_compensations
AS SELECT
    SpanAttributes['{execution}'] AS ExecutionId,
    SpanAttributes['{rollback}'] AS RollbackId,
    SpanAttributes['{node}'] AS NodeId,
    SpanAttributes['{node_type}'] AS NodeType,
    SpanAttributes['{side_effect}'] AS SideEffect,
    SpanAttributes['{result}'] AS Status,
    Timestamp AS StartTime,
    Timestamp + toIntervalNanosecond(Duration) AS EndTime,
    Duration / 1e6 AS DurationMs,
    SpanAttributes['{error_type}'] AS ErrorType,
    StatusMessage AS Error,
    TraceId,
    SpanId,
    ParentSpanId,
    ServiceName
FROM {db}.otel_traces
WHERE SpanAttributes['{node}'] != '' AND SpanAttributes['{execution}'] != ''"""

_WORKFLOW_ROLLBACKS = """CREATE TABLE IF NOT EXISTS {db}.workflow_rollbacks (
    ExecutionId String,
    RollbackId String,
    WorkflowId LowCardinality(String),
    ToNode String,
    Forced Bool,
    Status LowCardinality(String),
    StartTime DateTime64(9),
    DurationMs Float64,
    Error String,
    TraceId String,
    SpanId String,
    ServiceName LowCardinality(String)
) ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(StartTime)
ORDER BY (ExecutionId, RollbackId)
{ttl}"""

_WORKFLOW_ROLLBACKS_MV = """CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.workflow_rollbacks_mv
TO {db}.workflow_rollbacks
AS SELECT
    SpanAttributes['{execution}'] AS ExecutionId,
    SpanAttributes['{rollback}'] AS RollbackId,
    SpanAttributes['{workflow}'] AS WorkflowId,
    SpanAttributes['{to_node}'] AS ToNode,
    SpanAttributes['{forced}'] = 'true' AS Forced,
    SpanAttributes['{result}'] AS Status,
    Timestamp AS StartTime,
    Duration / 1e6 AS DurationMs,
    StatusMessage AS Error,
    TraceId,
    SpanId,
    ServiceName
FROM {db}.otel_traces
WHERE SpanAttributes['{to_node}'] != '' AND SpanAttributes['{execution}'] != ''"""

ROLLBACK_TABLES = ("node_compensations", "workflow_rollbacks")

_MIGRATIONS_TABLE = """CREATE TABLE IF NOT EXISTS {db}.flowscope_schema_migrations (
    Version UInt32,
    Description String,
    AppliedAt DateTime DEFAULT now()
) ENGINE = ReplacingMergeTree
ORDER BY Version"""


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: Callable[[SchemaOptions], list[str]]


def _otel_tables(o: SchemaOptions) -> list[str]:
    db = o.database
    stmts = [
        _TRACES.format(db=db, map=_MAP, ttl=_ttl("toDateTime(Timestamp)", o.traces_ttl_days)),
        _TRACE_ID_TS.format(db=db, ttl=_ttl("toDateTime(Start)", o.traces_ttl_days)),
        _TRACE_ID_TS_MV.format(db=db),
        _LOGS.format(db=db, map=_MAP, ttl=_ttl("TimestampTime", o.logs_ttl_days)),
    ]
    for table, body in _METRIC_BODIES.items():
        ddl = f"CREATE TABLE IF NOT EXISTS {{db}}.{table} (\n" + _METRIC_COMMON + body + _METRIC_INDEXES
        stmts.append(ddl.format(db=db, map=_MAP, ttl=_ttl("toDateTime(TimeUnix)", o.metrics_ttl_days)))
    return stmts


def _workflow_tables(o: SchemaOptions) -> list[str]:
    db = o.database
    days = o.workflow_ttl_days
    return [
        _WORKFLOW_EVENTS.format(db=db, ttl=_ttl("toDateTime(Timestamp)", days)),
        _WORKFLOW_EVENTS_MV.format(db=db),
        _WORKFLOW_EXECUTIONS.format(db=db, ttl=_ttl("toDateTime(StartTime)", days)),
        _WORKFLOW_EXECUTIONS_STARTED_MV.format(db=db),
        _WORKFLOW_EXECUTIONS_SPAN_MV.format(db=db),
        _NODE_EXECUTIONS.format(db=db, ttl=_ttl("toDateTime(StartTime)", days)),
        _NODE_EXECUTIONS_MV.format(db=db),
    ]


OTEL_TABLES = (
    "otel_traces",
    "otel_traces_trace_id_ts",
    "otel_logs",
    *tuple(_METRIC_BODIES),
)
WORKFLOW_TABLES = ("workflow_events", "workflow_executions", "node_executions")


def _dedup_window(o: SchemaOptions) -> list[str]:
    # Spool replay re-inserts an interrupted batch with its original deduplication token;
    # non-replicated MergeTree tables honour tokens only with this window.
    tables = [*OTEL_TABLES, *WORKFLOW_TABLES]
    return [
        f"ALTER TABLE {o.database}.{table} MODIFY SETTING non_replicated_deduplication_window = 1000"
        for table in tables
    ]


def _execution_owners(o: SchemaOptions) -> list[str]:
    db = o.database
    return [
        _EXECUTION_OWNERS.format(db=db, ttl=_ttl("toDateTime(FirstSeen)", o.workflow_ttl_days)),
        _EXECUTION_OWNERS_STARTED_MV.format(db=db),
        _EXECUTION_OWNERS_SPAN_MV.format(db=db),
        _EXECUTION_OWNERS_BACKFILL.format(db=db),
    ]


def _liveness(o: SchemaOptions) -> list[str]:
    return [_WORKFLOW_EXECUTIONS_LIVENESS_MV.format(db=o.database)]


def _rollback_views(o: SchemaOptions) -> list[str]:
    db, days = o.database, o.workflow_ttl_days
    names = {"execution": a.EXECUTION_ID, "rollback": a.ROLLBACK_ID, "node_type": a.NODE_TYPE,
             "side_effect": a.SIDE_EFFECT, "error_type": a.ERROR_TYPE, "workflow": a.WORKFLOW_ID,
             "to_node": a.ROLLBACK_TO_NODE, "forced": a.ROLLBACK_FORCED}  # fmt: skip
    return [
        _NODE_COMPENSATIONS.format(db=db, ttl=_ttl("toDateTime(StartTime)", days)),
        _NODE_COMPENSATIONS_MV.format(db=db, node=a.COMPENSATION_NODE_ID, result=a.COMPENSATION_RESULT, **names),
        _WORKFLOW_ROLLBACKS.format(db=db, ttl=_ttl("toDateTime(StartTime)", days)),
        _WORKFLOW_ROLLBACKS_MV.format(db=db, result=a.ROLLBACK_RESULT, **names),
        *(
            f"ALTER TABLE {db}.{table} MODIFY SETTING non_replicated_deduplication_window = 1000"
            for table in ROLLBACK_TABLES
        ),
    ]


def _trace_intake(o: SchemaOptions) -> list[str]:
    from flowscope.collector.intake import intake_statements

    return intake_statements(o.database)


def _log_intake(o: SchemaOptions) -> list[str]:
    from flowscope.collector.intake import log_intake_statements

    return log_intake_statements(o.database)


# Append-only: a released migration is never edited; later changes get a new number.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "OpenTelemetry contrib exporter tables", _otel_tables),
    Migration(2, "workflow tables and their materialized views", _workflow_tables),
    Migration(3, "insert deduplication window for idempotent spool replay", _dedup_window),
    Migration(4, "OTLP trace intake converted inside ClickHouse (Null table and view into otel_traces)", _trace_intake),
    Migration(5, "OTLP log intake converted inside ClickHouse (Null table and view into otel_logs)", _log_intake),
    Migration(6, "execution owners fixed by the first record stored", _execution_owners),
    Migration(7, "lost and recovered runs: workflow.lost / workflow.recovered rows in workflow_executions", _liveness),
    Migration(8, "rollbacks: node_compensations and workflow_rollbacks from their spans", _rollback_views),
)

SCHEMA_VERSION = MIGRATIONS[-1].version


def bootstrap_statements(options: SchemaOptions) -> list[str]:
    return [
        f"CREATE DATABASE IF NOT EXISTS {options.database}",
        _MIGRATIONS_TABLE.format(db=options.database),
    ]


def ddl(options: SchemaOptions | None = None) -> str:
    """The whole schema as one SQL script, for a server (`flowscope schema print`)."""
    o = options or SchemaOptions()
    parts = [f"-- flowscope schema version {SCHEMA_VERSION}, database {o.database}"]
    parts.extend(s + ";" for s in bootstrap_statements(o))
    for migration in MIGRATIONS:
        parts.append(f"-- migration {migration.version}: {migration.description}")
        parts.extend(s + ";" for s in migration.statements(o))
        parts.append(
            f"INSERT INTO {o.database}.flowscope_schema_migrations (Version, Description) "
            f"VALUES ({migration.version}, '{migration.description}');"
        )
    return "\n\n".join(parts) + "\n"
