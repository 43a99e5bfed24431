-- flowscope schema version 8, database otel

CREATE DATABASE IF NOT EXISTS otel;

CREATE TABLE IF NOT EXISTS otel.flowscope_schema_migrations (
    Version UInt32,
    Description String,
    AppliedAt DateTime DEFAULT now()
) ENGINE = ReplacingMergeTree
ORDER BY Version;

-- migration 1: OpenTelemetry contrib exporter tables

CREATE TABLE IF NOT EXISTS otel.otel_traces (
    Timestamp DateTime64(9) CODEC(Delta(8), ZSTD(1)),
    TraceId String CODEC(ZSTD(1)),
    SpanId String CODEC(ZSTD(1)),
    ParentSpanId String CODEC(ZSTD(1)),
    TraceState String CODEC(ZSTD(1)),
    SpanName LowCardinality(String) CODEC(ZSTD(1)),
    SpanKind LowCardinality(String) CODEC(ZSTD(1)),
    ServiceName LowCardinality(String) CODEC(ZSTD(1)),
    ResourceAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    ScopeName String CODEC(ZSTD(1)),
    ScopeVersion String CODEC(ZSTD(1)),
    SpanAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    Duration UInt64 CODEC(T64, ZSTD(1)),
    StatusCode LowCardinality(String) CODEC(ZSTD(1)),
    StatusMessage String CODEC(ZSTD(1)),
    Events Nested (
        Timestamp DateTime64(9),
        Name LowCardinality(String),
        Attributes Map(LowCardinality(String), String)
    ) CODEC(ZSTD(1)),
    Links Nested (
        TraceId String,
        SpanId String,
        TraceState String,
        Attributes Map(LowCardinality(String), String)
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

SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1;

CREATE TABLE IF NOT EXISTS otel.otel_traces_trace_id_ts (
    TraceId String CODEC(ZSTD(1)),
    Start SimpleAggregateFunction(min, DateTime) CODEC(ZSTD(1)),
    End SimpleAggregateFunction(max, DateTime) CODEC(ZSTD(1))
) ENGINE = AggregatingMergeTree
PARTITION BY toStartOfWeek(Start)
ORDER BY (TraceId)

SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1;

CREATE MATERIALIZED VIEW IF NOT EXISTS otel.otel_traces_trace_id_ts_mv
TO otel.otel_traces_trace_id_ts
AS SELECT
    TraceId,
    min(Timestamp) AS Start,
    max(Timestamp) AS End
FROM otel.otel_traces
WHERE TraceId != ''
GROUP BY TraceId;

CREATE TABLE IF NOT EXISTS otel.otel_logs (
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
    ResourceAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    ScopeSchemaUrl LowCardinality(String) CODEC(ZSTD(1)),
    ScopeName String CODEC(ZSTD(1)),
    ScopeVersion LowCardinality(String) CODEC(ZSTD(1)),
    ScopeAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    LogAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
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

SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1;

CREATE TABLE IF NOT EXISTS otel.otel_metrics_gauge (
    ResourceAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    ResourceSchemaUrl String CODEC(ZSTD(1)),
    ScopeName String CODEC(ZSTD(1)),
    ScopeVersion String CODEC(ZSTD(1)),
    ScopeAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    ScopeDroppedAttrCount UInt32 CODEC(ZSTD(1)),
    ScopeSchemaUrl String CODEC(ZSTD(1)),
    ServiceName LowCardinality(String) CODEC(ZSTD(1)),
    MetricName String CODEC(ZSTD(1)),
    MetricDescription String CODEC(ZSTD(1)),
    MetricUnit String CODEC(ZSTD(1)),
    Attributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    StartTimeUnix DateTime64(9) CODEC(Delta, ZSTD(1)),
    TimeUnix DateTime64(9) CODEC(Delta, ZSTD(1)),
    Value Float64 CODEC(ZSTD(1)),
    Flags UInt32 CODEC(ZSTD(1)),
    Exemplars Nested (
        FilteredAttributes Map(LowCardinality(String), String),
        TimeUnix DateTime64(9),
        Value Float64,
        SpanId String,
        TraceId String
    ) CODEC(ZSTD(1)),
    INDEX idx_res_attr_key mapKeys(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_res_attr_value mapValues(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_scope_attr_key mapKeys(ScopeAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_scope_attr_value mapValues(ScopeAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_attr_key mapKeys(Attributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_attr_value mapValues(Attributes) TYPE bloom_filter(0.01) GRANULARITY 1
) ENGINE = MergeTree

PARTITION BY toDate(TimeUnix)
ORDER BY (ServiceName, MetricName, Attributes, toUnixTimestamp64Nano(TimeUnix))
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1;

CREATE TABLE IF NOT EXISTS otel.otel_metrics_sum (
    ResourceAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    ResourceSchemaUrl String CODEC(ZSTD(1)),
    ScopeName String CODEC(ZSTD(1)),
    ScopeVersion String CODEC(ZSTD(1)),
    ScopeAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    ScopeDroppedAttrCount UInt32 CODEC(ZSTD(1)),
    ScopeSchemaUrl String CODEC(ZSTD(1)),
    ServiceName LowCardinality(String) CODEC(ZSTD(1)),
    MetricName String CODEC(ZSTD(1)),
    MetricDescription String CODEC(ZSTD(1)),
    MetricUnit String CODEC(ZSTD(1)),
    Attributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    StartTimeUnix DateTime64(9) CODEC(Delta, ZSTD(1)),
    TimeUnix DateTime64(9) CODEC(Delta, ZSTD(1)),
    Value Float64 CODEC(ZSTD(1)),
    Flags UInt32 CODEC(ZSTD(1)),
    Exemplars Nested (
        FilteredAttributes Map(LowCardinality(String), String),
        TimeUnix DateTime64(9),
        Value Float64,
        SpanId String,
        TraceId String
    ) CODEC(ZSTD(1)),
    AggregationTemporality Int32 CODEC(ZSTD(1)),
    IsMonotonic Boolean CODEC(Delta, ZSTD(1)),
    INDEX idx_res_attr_key mapKeys(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_res_attr_value mapValues(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_scope_attr_key mapKeys(ScopeAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_scope_attr_value mapValues(ScopeAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_attr_key mapKeys(Attributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_attr_value mapValues(Attributes) TYPE bloom_filter(0.01) GRANULARITY 1
) ENGINE = MergeTree

PARTITION BY toDate(TimeUnix)
ORDER BY (ServiceName, MetricName, Attributes, toUnixTimestamp64Nano(TimeUnix))
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1;

CREATE TABLE IF NOT EXISTS otel.otel_metrics_histogram (
    ResourceAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    ResourceSchemaUrl String CODEC(ZSTD(1)),
    ScopeName String CODEC(ZSTD(1)),
    ScopeVersion String CODEC(ZSTD(1)),
    ScopeAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    ScopeDroppedAttrCount UInt32 CODEC(ZSTD(1)),
    ScopeSchemaUrl String CODEC(ZSTD(1)),
    ServiceName LowCardinality(String) CODEC(ZSTD(1)),
    MetricName String CODEC(ZSTD(1)),
    MetricDescription String CODEC(ZSTD(1)),
    MetricUnit String CODEC(ZSTD(1)),
    Attributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    StartTimeUnix DateTime64(9) CODEC(Delta, ZSTD(1)),
    TimeUnix DateTime64(9) CODEC(Delta, ZSTD(1)),
    Count UInt64 CODEC(Delta, ZSTD(1)),
    Sum Float64 CODEC(ZSTD(1)),
    BucketCounts Array(UInt64) CODEC(ZSTD(1)),
    ExplicitBounds Array(Float64) CODEC(ZSTD(1)),
    Exemplars Nested (
        FilteredAttributes Map(LowCardinality(String), String),
        TimeUnix DateTime64(9),
        Value Float64,
        SpanId String,
        TraceId String
    ) CODEC(ZSTD(1)),
    Flags UInt32 CODEC(ZSTD(1)),
    Min Float64 CODEC(ZSTD(1)),
    Max Float64 CODEC(ZSTD(1)),
    AggregationTemporality Int32 CODEC(ZSTD(1)),
    INDEX idx_res_attr_key mapKeys(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_res_attr_value mapValues(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_scope_attr_key mapKeys(ScopeAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_scope_attr_value mapValues(ScopeAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_attr_key mapKeys(Attributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_attr_value mapValues(Attributes) TYPE bloom_filter(0.01) GRANULARITY 1
) ENGINE = MergeTree

PARTITION BY toDate(TimeUnix)
ORDER BY (ServiceName, MetricName, Attributes, toUnixTimestamp64Nano(TimeUnix))
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1;

CREATE TABLE IF NOT EXISTS otel.otel_metrics_exponential_histogram (
    ResourceAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    ResourceSchemaUrl String CODEC(ZSTD(1)),
    ScopeName String CODEC(ZSTD(1)),
    ScopeVersion String CODEC(ZSTD(1)),
    ScopeAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    ScopeDroppedAttrCount UInt32 CODEC(ZSTD(1)),
    ScopeSchemaUrl String CODEC(ZSTD(1)),
    ServiceName LowCardinality(String) CODEC(ZSTD(1)),
    MetricName String CODEC(ZSTD(1)),
    MetricDescription String CODEC(ZSTD(1)),
    MetricUnit String CODEC(ZSTD(1)),
    Attributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    StartTimeUnix DateTime64(9) CODEC(Delta, ZSTD(1)),
    TimeUnix DateTime64(9) CODEC(Delta, ZSTD(1)),
    Count UInt64 CODEC(Delta, ZSTD(1)),
    Sum Float64 CODEC(ZSTD(1)),
    Scale Int32 CODEC(ZSTD(1)),
    ZeroCount UInt64 CODEC(ZSTD(1)),
    PositiveOffset Int32 CODEC(ZSTD(1)),
    PositiveBucketCounts Array(UInt64) CODEC(ZSTD(1)),
    NegativeOffset Int32 CODEC(ZSTD(1)),
    NegativeBucketCounts Array(UInt64) CODEC(ZSTD(1)),
    Exemplars Nested (
        FilteredAttributes Map(LowCardinality(String), String),
        TimeUnix DateTime64(9),
        Value Float64,
        SpanId String,
        TraceId String
    ) CODEC(ZSTD(1)),
    Flags UInt32 CODEC(ZSTD(1)),
    Min Float64 CODEC(ZSTD(1)),
    Max Float64 CODEC(ZSTD(1)),
    AggregationTemporality Int32 CODEC(ZSTD(1)),
    INDEX idx_res_attr_key mapKeys(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_res_attr_value mapValues(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_scope_attr_key mapKeys(ScopeAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_scope_attr_value mapValues(ScopeAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_attr_key mapKeys(Attributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_attr_value mapValues(Attributes) TYPE bloom_filter(0.01) GRANULARITY 1
) ENGINE = MergeTree

PARTITION BY toDate(TimeUnix)
ORDER BY (ServiceName, MetricName, Attributes, toUnixTimestamp64Nano(TimeUnix))
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1;

CREATE TABLE IF NOT EXISTS otel.otel_metrics_summary (
    ResourceAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    ResourceSchemaUrl String CODEC(ZSTD(1)),
    ScopeName String CODEC(ZSTD(1)),
    ScopeVersion String CODEC(ZSTD(1)),
    ScopeAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    ScopeDroppedAttrCount UInt32 CODEC(ZSTD(1)),
    ScopeSchemaUrl String CODEC(ZSTD(1)),
    ServiceName LowCardinality(String) CODEC(ZSTD(1)),
    MetricName String CODEC(ZSTD(1)),
    MetricDescription String CODEC(ZSTD(1)),
    MetricUnit String CODEC(ZSTD(1)),
    Attributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    StartTimeUnix DateTime64(9) CODEC(Delta, ZSTD(1)),
    TimeUnix DateTime64(9) CODEC(Delta, ZSTD(1)),
    Count UInt64 CODEC(Delta, ZSTD(1)),
    Sum Float64 CODEC(ZSTD(1)),
    ValueAtQuantiles Nested(
        Quantile Float64,
        Value Float64
    ) CODEC(ZSTD(1)),
    Flags UInt32 CODEC(ZSTD(1)),
    INDEX idx_res_attr_key mapKeys(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_res_attr_value mapValues(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_scope_attr_key mapKeys(ScopeAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_scope_attr_value mapValues(ScopeAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_attr_key mapKeys(Attributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_attr_value mapValues(Attributes) TYPE bloom_filter(0.01) GRANULARITY 1
) ENGINE = MergeTree

PARTITION BY toDate(TimeUnix)
ORDER BY (ServiceName, MetricName, Attributes, toUnixTimestamp64Nano(TimeUnix))
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1;

INSERT INTO otel.flowscope_schema_migrations (Version, Description) VALUES (1, 'OpenTelemetry contrib exporter tables');

-- migration 2: workflow tables and their materialized views

CREATE TABLE IF NOT EXISTS otel.workflow_events (
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
;

CREATE MATERIALIZED VIEW IF NOT EXISTS otel.workflow_events_mv
TO otel.workflow_events
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
FROM otel.otel_logs
WHERE EventName != '' AND LogAttributes['workflow.execution.id'] != '';

CREATE TABLE IF NOT EXISTS otel.workflow_executions (
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
;

CREATE MATERIALIZED VIEW IF NOT EXISTS otel.workflow_executions_started_mv
TO otel.workflow_executions
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
FROM otel.otel_logs
WHERE EventName = 'workflow.started' AND LogAttributes['workflow.execution.id'] != '';

CREATE MATERIALIZED VIEW IF NOT EXISTS otel.workflow_executions_span_mv
TO otel.workflow_executions
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
FROM otel.otel_traces
WHERE SpanAttributes['gen_ai.operation.name'] = 'invoke_workflow'
  AND SpanAttributes['workflow.execution.id'] != '';

CREATE TABLE IF NOT EXISTS otel.node_executions (
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
;

CREATE MATERIALIZED VIEW IF NOT EXISTS otel.node_executions_mv
TO otel.node_executions
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
FROM otel.otel_traces
WHERE SpanAttributes['workflow.node.id'] != '' AND SpanAttributes['workflow.execution.id'] != '';

INSERT INTO otel.flowscope_schema_migrations (Version, Description) VALUES (2, 'workflow tables and their materialized views');

-- migration 3: insert deduplication window for idempotent spool replay

ALTER TABLE otel.otel_traces MODIFY SETTING non_replicated_deduplication_window = 1000;

ALTER TABLE otel.otel_traces_trace_id_ts MODIFY SETTING non_replicated_deduplication_window = 1000;

ALTER TABLE otel.otel_logs MODIFY SETTING non_replicated_deduplication_window = 1000;

ALTER TABLE otel.otel_metrics_gauge MODIFY SETTING non_replicated_deduplication_window = 1000;

ALTER TABLE otel.otel_metrics_sum MODIFY SETTING non_replicated_deduplication_window = 1000;

ALTER TABLE otel.otel_metrics_histogram MODIFY SETTING non_replicated_deduplication_window = 1000;

ALTER TABLE otel.otel_metrics_exponential_histogram MODIFY SETTING non_replicated_deduplication_window = 1000;

ALTER TABLE otel.otel_metrics_summary MODIFY SETTING non_replicated_deduplication_window = 1000;

ALTER TABLE otel.workflow_events MODIFY SETTING non_replicated_deduplication_window = 1000;

ALTER TABLE otel.workflow_executions MODIFY SETTING non_replicated_deduplication_window = 1000;

ALTER TABLE otel.node_executions MODIFY SETTING non_replicated_deduplication_window = 1000;

INSERT INTO otel.flowscope_schema_migrations (Version, Description) VALUES (3, 'insert deduplication window for idempotent spool replay');

-- migration 4: OTLP trace intake converted inside ClickHouse (Null table and view into otel_traces)

CREATE TABLE IF NOT EXISTS otel.otlp_traces_intake (
    resource_spans Array(Tuple(
        resource Tuple(attributes Array(Tuple(key String, value Tuple(value Enum8('none' = 0, 'string_value' = 1, 'bool_value' = 2, 'int_value' = 3, 'double_value' = 4, 'array_value' = 5, 'kvlist_value' = 6, 'bytes_value' = 7), string_value String, bool_value Bool, int_value Int64, double_value Float64, array_value String, kvlist_value String, bytes_value String)))),
        scope_spans Array(Tuple(
            scope Tuple(name String, version String),
            spans Array(Tuple(
                trace_id String, span_id String, trace_state String, parent_span_id String, name String,
                kind Int32, start_time_unix_nano UInt64, end_time_unix_nano UInt64,
                attributes Array(Tuple(key String, value Tuple(value Enum8('none' = 0, 'string_value' = 1, 'bool_value' = 2, 'int_value' = 3, 'double_value' = 4, 'array_value' = 5, 'kvlist_value' = 6, 'bytes_value' = 7), string_value String, bool_value Bool, int_value Int64, double_value Float64, array_value String, kvlist_value String, bytes_value String))),
                events Array(Tuple(time_unix_nano UInt64, name String, attributes Array(Tuple(key String, value Tuple(value Enum8('none' = 0, 'string_value' = 1, 'bool_value' = 2, 'int_value' = 3, 'double_value' = 4, 'array_value' = 5, 'kvlist_value' = 6, 'bytes_value' = 7), string_value String, bool_value Bool, int_value Int64, double_value Float64, array_value String, kvlist_value String, bytes_value String))))),
                links Array(Tuple(trace_id String, span_id String, trace_state String, attributes Array(Tuple(key String, value Tuple(value Enum8('none' = 0, 'string_value' = 1, 'bool_value' = 2, 'int_value' = 3, 'double_value' = 4, 'array_value' = 5, 'kvlist_value' = 6, 'bytes_value' = 7), string_value String, bool_value Bool, int_value Int64, double_value Float64, array_value String, kvlist_value String, bytes_value String))))),
                status Tuple(message String, code Int32)))))))
) ENGINE = Null;

CREATE MATERIALIZED VIEW IF NOT EXISTS otel.otlp_traces_intake_mv TO otel.otel_traces AS
SELECT
    fromUnixTimestamp64Nano(toInt64(s.start_time_unix_nano)) AS Timestamp,
    lower(hex(s.trace_id)) AS TraceId,
    lower(hex(s.span_id)) AS SpanId,
    lower(hex(s.parent_span_id)) AS ParentSpanId,
    s.trace_state AS TraceState,
    s.name AS SpanName,
    if(s.kind BETWEEN 0 AND 5,
       ['Unspecified', 'Internal', 'Server', 'Client', 'Producer', 'Consumer'][s.kind + 1], 'Unspecified') AS SpanKind,
    ResourceAttributes['service.name'] AS ServiceName,
    CAST(arrayReverse(arrayFilter((kv, first) -> first = 1, arrayReverse(arrayMap(kv -> (kv.key, multiIf(
    kv.value.value = 'string_value', kv.value.string_value,
    kv.value.value = 'bool_value', if(kv.value.bool_value, 'true', 'false'),
    kv.value.value = 'int_value', toString(kv.value.int_value),
    kv.value.value = 'double_value', if(isFinite(kv.value.double_value), if(abs(kv.value.double_value) >= 1e21, replaceOne(toString(kv.value.double_value), 'e', 'e+'), toString(kv.value.double_value)),
        concat('json: unsupported value: ', if(isNaN(kv.value.double_value), 'NaN', if(kv.value.double_value > 0, '+Inf', '-Inf')))),
    kv.value.value = 'bytes_value', base64Encode(kv.value.bytes_value),
    kv.value.value IN ('array_value', 'kvlist_value'), toString(throwIf(kv.value.value IN ('array_value', 'kvlist_value'),
        'flowscope intake: nested attribute value')),
    '')), rs.resource.attributes)), arrayEnumerateUniq(arrayReverse(arrayMap(kv -> kv.key, rs.resource.attributes))))), 'Map(LowCardinality(String), String)') AS ResourceAttributes,
    ss.scope.name AS ScopeName,
    ss.scope.version AS ScopeVersion,
    CAST(arrayReverse(arrayFilter((kv, first) -> first = 1, arrayReverse(arrayMap(kv -> (kv.key, multiIf(
    kv.value.value = 'string_value', kv.value.string_value,
    kv.value.value = 'bool_value', if(kv.value.bool_value, 'true', 'false'),
    kv.value.value = 'int_value', toString(kv.value.int_value),
    kv.value.value = 'double_value', if(isFinite(kv.value.double_value), if(abs(kv.value.double_value) >= 1e21, replaceOne(toString(kv.value.double_value), 'e', 'e+'), toString(kv.value.double_value)),
        concat('json: unsupported value: ', if(isNaN(kv.value.double_value), 'NaN', if(kv.value.double_value > 0, '+Inf', '-Inf')))),
    kv.value.value = 'bytes_value', base64Encode(kv.value.bytes_value),
    kv.value.value IN ('array_value', 'kvlist_value'), toString(throwIf(kv.value.value IN ('array_value', 'kvlist_value'),
        'flowscope intake: nested attribute value')),
    '')), s.attributes)), arrayEnumerateUniq(arrayReverse(arrayMap(kv -> kv.key, s.attributes))))), 'Map(LowCardinality(String), String)') AS SpanAttributes,
    if(s.end_time_unix_nano > s.start_time_unix_nano, s.end_time_unix_nano - s.start_time_unix_nano, 0) AS Duration,
    if(s.status.code BETWEEN 0 AND 2, ['Unset', 'Ok', 'Error'][s.status.code + 1], 'Unset') AS StatusCode,
    s.status.message AS StatusMessage,
    arrayMap(e -> fromUnixTimestamp64Nano(toInt64(e.time_unix_nano)), s.events) AS `Events.Timestamp`,
    arrayMap(e -> e.name, s.events) AS `Events.Name`,
    arrayMap(e -> CAST(arrayReverse(arrayFilter((kv, first) -> first = 1, arrayReverse(arrayMap(kv -> (kv.key, multiIf(
    kv.value.value = 'string_value', kv.value.string_value,
    kv.value.value = 'bool_value', if(kv.value.bool_value, 'true', 'false'),
    kv.value.value = 'int_value', toString(kv.value.int_value),
    kv.value.value = 'double_value', if(isFinite(kv.value.double_value), if(abs(kv.value.double_value) >= 1e21, replaceOne(toString(kv.value.double_value), 'e', 'e+'), toString(kv.value.double_value)),
        concat('json: unsupported value: ', if(isNaN(kv.value.double_value), 'NaN', if(kv.value.double_value > 0, '+Inf', '-Inf')))),
    kv.value.value = 'bytes_value', base64Encode(kv.value.bytes_value),
    kv.value.value IN ('array_value', 'kvlist_value'), toString(throwIf(kv.value.value IN ('array_value', 'kvlist_value'),
        'flowscope intake: nested attribute value')),
    '')), e.attributes)), arrayEnumerateUniq(arrayReverse(arrayMap(kv -> kv.key, e.attributes))))), 'Map(LowCardinality(String), String)'), s.events) AS `Events.Attributes`,
    arrayMap(l -> lower(hex(l.trace_id)), s.links) AS `Links.TraceId`,
    arrayMap(l -> lower(hex(l.span_id)), s.links) AS `Links.SpanId`,
    arrayMap(l -> l.trace_state, s.links) AS `Links.TraceState`,
    arrayMap(l -> CAST(arrayReverse(arrayFilter((kv, first) -> first = 1, arrayReverse(arrayMap(kv -> (kv.key, multiIf(
    kv.value.value = 'string_value', kv.value.string_value,
    kv.value.value = 'bool_value', if(kv.value.bool_value, 'true', 'false'),
    kv.value.value = 'int_value', toString(kv.value.int_value),
    kv.value.value = 'double_value', if(isFinite(kv.value.double_value), if(abs(kv.value.double_value) >= 1e21, replaceOne(toString(kv.value.double_value), 'e', 'e+'), toString(kv.value.double_value)),
        concat('json: unsupported value: ', if(isNaN(kv.value.double_value), 'NaN', if(kv.value.double_value > 0, '+Inf', '-Inf')))),
    kv.value.value = 'bytes_value', base64Encode(kv.value.bytes_value),
    kv.value.value IN ('array_value', 'kvlist_value'), toString(throwIf(kv.value.value IN ('array_value', 'kvlist_value'),
        'flowscope intake: nested attribute value')),
    '')), l.attributes)), arrayEnumerateUniq(arrayReverse(arrayMap(kv -> kv.key, l.attributes))))), 'Map(LowCardinality(String), String)'), s.links) AS `Links.Attributes`
FROM otel.otlp_traces_intake
ARRAY JOIN resource_spans AS rs
ARRAY JOIN rs.scope_spans AS ss
ARRAY JOIN ss.spans AS s;

INSERT INTO otel.flowscope_schema_migrations (Version, Description) VALUES (4, 'OTLP trace intake converted inside ClickHouse (Null table and view into otel_traces)');

-- migration 5: OTLP log intake converted inside ClickHouse (Null table and view into otel_logs)

CREATE TABLE IF NOT EXISTS otel.otlp_logs_intake (
    resource_logs Array(Tuple(
        resource Tuple(attributes Array(Tuple(key String, value Tuple(value Enum8('none' = 0, 'string_value' = 1, 'bool_value' = 2, 'int_value' = 3, 'double_value' = 4, 'array_value' = 5, 'kvlist_value' = 6, 'bytes_value' = 7), string_value String, bool_value Bool, int_value Int64, double_value Float64, array_value String, kvlist_value String, bytes_value String)))),
        schema_url String,
        scope_logs Array(Tuple(
            scope Tuple(name String, version String, attributes Array(Tuple(key String, value Tuple(value Enum8('none' = 0, 'string_value' = 1, 'bool_value' = 2, 'int_value' = 3, 'double_value' = 4, 'array_value' = 5, 'kvlist_value' = 6, 'bytes_value' = 7), string_value String, bool_value Bool, int_value Int64, double_value Float64, array_value String, kvlist_value String, bytes_value String)))),
            schema_url String,
            log_records Array(Tuple(
                time_unix_nano UInt64, observed_time_unix_nano UInt64, severity_number Int32, severity_text String,
                body Tuple(value Enum8('none' = 0, 'string_value' = 1, 'bool_value' = 2, 'int_value' = 3, 'double_value' = 4, 'array_value' = 5, 'kvlist_value' = 6, 'bytes_value' = 7), string_value String, bool_value Bool, int_value Int64, double_value Float64, array_value String, kvlist_value String, bytes_value String), attributes Array(Tuple(key String, value Tuple(value Enum8('none' = 0, 'string_value' = 1, 'bool_value' = 2, 'int_value' = 3, 'double_value' = 4, 'array_value' = 5, 'kvlist_value' = 6, 'bytes_value' = 7), string_value String, bool_value Bool, int_value Int64, double_value Float64, array_value String, kvlist_value String, bytes_value String))), flags UInt32, trace_id String, span_id String,
                event_name String))))))
) ENGINE = Null;

CREATE MATERIALIZED VIEW IF NOT EXISTS otel.otlp_logs_intake_mv TO otel.otel_logs AS
SELECT
    fromUnixTimestamp64Nano(toInt64(if(l.time_unix_nano != 0, l.time_unix_nano, l.observed_time_unix_nano)))
        AS Timestamp,
    lower(hex(l.trace_id)) AS TraceId,
    lower(hex(l.span_id)) AS SpanId,
    toUInt8(bitAnd(l.flags, 255)) AS TraceFlags,
    l.severity_text AS SeverityText,
    toUInt8(bitAnd(l.severity_number, 255)) AS SeverityNumber,
    ResourceAttributes['service.name'] AS ServiceName,
    multiIf(
    l.body.value = 'string_value', l.body.string_value,
    l.body.value = 'bool_value', if(l.body.bool_value, 'true', 'false'),
    l.body.value = 'int_value', toString(l.body.int_value),
    l.body.value = 'double_value', if(isFinite(l.body.double_value), if(abs(l.body.double_value) >= 1e21, replaceOne(toString(l.body.double_value), 'e', 'e+'), toString(l.body.double_value)),
        concat('json: unsupported value: ', if(isNaN(l.body.double_value), 'NaN', if(l.body.double_value > 0, '+Inf', '-Inf')))),
    l.body.value = 'bytes_value', base64Encode(l.body.bytes_value),
    l.body.value IN ('array_value', 'kvlist_value'), toString(throwIf(l.body.value IN ('array_value', 'kvlist_value'),
        'flowscope intake: nested attribute value')),
    '') AS Body,
    rl.schema_url AS ResourceSchemaUrl,
    CAST(arrayReverse(arrayFilter((kv, first) -> first = 1, arrayReverse(arrayMap(kv -> (kv.key, multiIf(
    kv.value.value = 'string_value', kv.value.string_value,
    kv.value.value = 'bool_value', if(kv.value.bool_value, 'true', 'false'),
    kv.value.value = 'int_value', toString(kv.value.int_value),
    kv.value.value = 'double_value', if(isFinite(kv.value.double_value), if(abs(kv.value.double_value) >= 1e21, replaceOne(toString(kv.value.double_value), 'e', 'e+'), toString(kv.value.double_value)),
        concat('json: unsupported value: ', if(isNaN(kv.value.double_value), 'NaN', if(kv.value.double_value > 0, '+Inf', '-Inf')))),
    kv.value.value = 'bytes_value', base64Encode(kv.value.bytes_value),
    kv.value.value IN ('array_value', 'kvlist_value'), toString(throwIf(kv.value.value IN ('array_value', 'kvlist_value'),
        'flowscope intake: nested attribute value')),
    '')), rl.resource.attributes)), arrayEnumerateUniq(arrayReverse(arrayMap(kv -> kv.key, rl.resource.attributes))))), 'Map(LowCardinality(String), String)') AS ResourceAttributes,
    sl.schema_url AS ScopeSchemaUrl,
    sl.scope.name AS ScopeName,
    sl.scope.version AS ScopeVersion,
    CAST(arrayReverse(arrayFilter((kv, first) -> first = 1, arrayReverse(arrayMap(kv -> (kv.key, multiIf(
    kv.value.value = 'string_value', kv.value.string_value,
    kv.value.value = 'bool_value', if(kv.value.bool_value, 'true', 'false'),
    kv.value.value = 'int_value', toString(kv.value.int_value),
    kv.value.value = 'double_value', if(isFinite(kv.value.double_value), if(abs(kv.value.double_value) >= 1e21, replaceOne(toString(kv.value.double_value), 'e', 'e+'), toString(kv.value.double_value)),
        concat('json: unsupported value: ', if(isNaN(kv.value.double_value), 'NaN', if(kv.value.double_value > 0, '+Inf', '-Inf')))),
    kv.value.value = 'bytes_value', base64Encode(kv.value.bytes_value),
    kv.value.value IN ('array_value', 'kvlist_value'), toString(throwIf(kv.value.value IN ('array_value', 'kvlist_value'),
        'flowscope intake: nested attribute value')),
    '')), sl.scope.attributes)), arrayEnumerateUniq(arrayReverse(arrayMap(kv -> kv.key, sl.scope.attributes))))), 'Map(LowCardinality(String), String)') AS ScopeAttributes,
    CAST(arrayReverse(arrayFilter((kv, first) -> first = 1, arrayReverse(arrayMap(kv -> (kv.key, multiIf(
    kv.value.value = 'string_value', kv.value.string_value,
    kv.value.value = 'bool_value', if(kv.value.bool_value, 'true', 'false'),
    kv.value.value = 'int_value', toString(kv.value.int_value),
    kv.value.value = 'double_value', if(isFinite(kv.value.double_value), if(abs(kv.value.double_value) >= 1e21, replaceOne(toString(kv.value.double_value), 'e', 'e+'), toString(kv.value.double_value)),
        concat('json: unsupported value: ', if(isNaN(kv.value.double_value), 'NaN', if(kv.value.double_value > 0, '+Inf', '-Inf')))),
    kv.value.value = 'bytes_value', base64Encode(kv.value.bytes_value),
    kv.value.value IN ('array_value', 'kvlist_value'), toString(throwIf(kv.value.value IN ('array_value', 'kvlist_value'),
        'flowscope intake: nested attribute value')),
    '')), l.attributes)), arrayEnumerateUniq(arrayReverse(arrayMap(kv -> kv.key, l.attributes))))), 'Map(LowCardinality(String), String)') AS LogAttributes,
    l.event_name AS EventName
FROM otel.otlp_logs_intake
ARRAY JOIN resource_logs AS rl
ARRAY JOIN rl.scope_logs AS sl
ARRAY JOIN sl.log_records AS l;

INSERT INTO otel.flowscope_schema_migrations (Version, Description) VALUES (5, 'OTLP log intake converted inside ClickHouse (Null table and view into otel_logs)');

-- migration 6: execution owners fixed by the first record stored

CREATE TABLE IF NOT EXISTS otel.execution_owners (
    ExecutionId String,
    Owner SimpleAggregateFunction(min, Tuple(StoredAt DateTime64(9), Row UInt64, WorkflowId String, UserId String)),
    FirstSeen SimpleAggregateFunction(min, DateTime64(9))
) ENGINE = AggregatingMergeTree
ORDER BY ExecutionId
;

CREATE MATERIALIZED VIEW IF NOT EXISTS otel.execution_owners_started_mv
TO otel.execution_owners
AS SELECT
    LogAttributes['workflow.execution.id'] AS ExecutionId,
    tuple(now64(9), rowNumberInAllBlocks(), LogAttributes['workflow.id'], JSONExtractString(Body, 'userId')) AS Owner,
    Timestamp AS FirstSeen
FROM otel.otel_logs
WHERE EventName = 'workflow.started' AND LogAttributes['workflow.execution.id'] != '';

CREATE MATERIALIZED VIEW IF NOT EXISTS otel.execution_owners_span_mv
TO otel.execution_owners
AS SELECT
    SpanAttributes['workflow.execution.id'] AS ExecutionId,
    tuple(now64(9), rowNumberInAllBlocks(), SpanAttributes['workflow.id'], SpanAttributes['enduser.id']) AS Owner,
    Timestamp AS FirstSeen
FROM otel.otel_traces
WHERE SpanAttributes['gen_ai.operation.name'] = 'invoke_workflow'
  AND SpanAttributes['workflow.execution.id'] != '';

INSERT INTO otel.execution_owners
SELECT ExecutionId, tuple(toDateTime64(0, 9), toUInt64(0), WorkflowId, UserId), StartTime
FROM otel.workflow_executions FINAL;

INSERT INTO otel.flowscope_schema_migrations (Version, Description) VALUES (6, 'execution owners fixed by the first record stored');

-- migration 7: lost and recovered runs: workflow.lost / workflow.recovered rows in workflow_executions

CREATE MATERIALIZED VIEW IF NOT EXISTS otel.workflow_executions_liveness_mv
TO otel.workflow_executions
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
FROM otel.otel_logs
WHERE EventName IN ('workflow.lost', 'workflow.recovered')
  AND LogAttributes['workflow.execution.id'] != ''
  AND JSONExtractUInt(Body, 'startTimeUnixNano') > 0;

INSERT INTO otel.flowscope_schema_migrations (Version, Description) VALUES (7, 'lost and recovered runs: workflow.lost / workflow.recovered rows in workflow_executions');

-- migration 8: rollbacks: node_compensations and workflow_rollbacks from their spans

CREATE TABLE IF NOT EXISTS otel.node_compensations (
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
;

CREATE MATERIALIZED VIEW IF NOT EXISTS otel.node_compensations_mv
TO otel.node_compensations
AS SELECT
    SpanAttributes['workflow.execution.id'] AS ExecutionId,
    SpanAttributes['workflow.rollback.id'] AS RollbackId,
    SpanAttributes['workflow.compensation.node.id'] AS NodeId,
    SpanAttributes['workflow.node.type'] AS NodeType,
    SpanAttributes['workflow.node.side_effect'] AS SideEffect,
    SpanAttributes['workflow.compensation.result'] AS Status,
    Timestamp AS StartTime,
    Timestamp + toIntervalNanosecond(Duration) AS EndTime,
    Duration / 1e6 AS DurationMs,
    SpanAttributes['error.type'] AS ErrorType,
    StatusMessage AS Error,
    TraceId,
    SpanId,
    ParentSpanId,
    ServiceName
FROM otel.otel_traces
WHERE SpanAttributes['workflow.compensation.node.id'] != '' AND SpanAttributes['workflow.execution.id'] != '';

CREATE TABLE IF NOT EXISTS otel.workflow_rollbacks (
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
;

CREATE MATERIALIZED VIEW IF NOT EXISTS otel.workflow_rollbacks_mv
TO otel.workflow_rollbacks
AS SELECT
    SpanAttributes['workflow.execution.id'] AS ExecutionId,
    SpanAttributes['workflow.rollback.id'] AS RollbackId,
    SpanAttributes['workflow.id'] AS WorkflowId,
    SpanAttributes['workflow.rollback.to_node'] AS ToNode,
    SpanAttributes['workflow.rollback.forced'] = 'true' AS Forced,
    SpanAttributes['workflow.rollback.result'] AS Status,
    Timestamp AS StartTime,
    Duration / 1e6 AS DurationMs,
    StatusMessage AS Error,
    TraceId,
    SpanId,
    ServiceName
FROM otel.otel_traces
WHERE SpanAttributes['workflow.rollback.to_node'] != '' AND SpanAttributes['workflow.execution.id'] != '';

ALTER TABLE otel.node_compensations MODIFY SETTING non_replicated_deduplication_window = 1000;

ALTER TABLE otel.workflow_rollbacks MODIFY SETTING non_replicated_deduplication_window = 1000;

INSERT INTO otel.flowscope_schema_migrations (Version, Description) VALUES (8, 'rollbacks: node_compensations and workflow_rollbacks from their spans');
