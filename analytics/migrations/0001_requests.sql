-- One row per finished request, as sent by the gateways. A resend that slips past the insert dedup token leaves
-- a duplicate row until a merge, so every read uses FINAL. The sorting key (and, on a cluster, the sharding key)
-- is a function of the request alone, so duplicates always meet and collapse.
CREATE TABLE IF NOT EXISTS {{table requests}}
(
    request_id String,
    trace_id String,
    span_id String,
    start_time DateTime64(6, 'UTC'),
    first_token_time Nullable(DateTime64(6, 'UTC')),
    end_time DateTime64(6, 'UTC'),
    org_id String,
    project_id String,
    api_key_id String,
    end_user_id String,
    provider LowCardinality(String),
    requested_model LowCardinality(String),
    served_model LowCardinality(String),
    -- Proto enum value names without their prefix, e.g. CHAT_COMPLETIONS, RATE_LIMITED.
    endpoint LowCardinality(String),
    streamed Bool,
    status LowCardinality(String),
    http_status Int32,
    error_code LowCardinality(String),
    input_tokens Int64,
    cached_input_tokens Int64,
    output_tokens Int64,
    reasoning_tokens Int64,
    usage_estimated Bool,
    cost_nanos Int64,
    -- cost_nanos per token type (input not cached, cached input, output not reasoning, reasoning); the parts add up
    -- to cost_nanos. NULL when the gateway did not itemise the cost.
    cost_input_nanos Nullable(Int64),
    cost_cached_input_nanos Nullable(Int64),
    cost_output_nanos Nullable(Int64),
    cost_reasoning_nanos Nullable(Int64),
    total_latency_us Int64,
    upstream_latency_us Int64,
    ttft_us Int64,
    gateway_overhead_us Int64,
    retries Int32,
    fallback_used Bool,
    gateway_instance_id LowCardinality(String),
    tags Map(String, String),
    ingest_time DateTime64(3, 'UTC') DEFAULT now64(3),
    INDEX request_id_bloom request_id TYPE bloom_filter GRANULARITY 4
)
ENGINE = {{engine ReplacingMergeTree}}
PARTITION BY toYYYYMM(start_time)
ORDER BY (org_id, toStartOfHour(start_time), request_id)
TTL toDateTime(start_time) + INTERVAL {{ttl_days}} DAY
-- The deduplication window makes insert_deduplication_token work on non-replicated tables too.
SETTINGS {{dedup_window 10000}}, ttl_only_drop_parts = 1;

{{distributed requests sipHash64(request_id)}};
