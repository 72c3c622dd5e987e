-- Totals per minute and per hour by org, project, key, model, provider and status: what dashboards read over
-- long ranges. They are not fed by materialized views, which would also count resent rows that slipped past
-- the insert dedup token. Instead the store rolls up closed minutes from the deduplicated raw table, recomputes
-- minutes that late rows reach, and a recomputation replaces the one before it (ReplacingMergeTree on
-- computed_at). Queries read rollups only for minutes that are rolled up and not awaiting a recomputation.
CREATE TABLE IF NOT EXISTS {{table requests_1m}}
(
    minute DateTime('UTC'),
    org_id String,
    project_id String,
    api_key_id String,
    requested_model LowCardinality(String),
    provider LowCardinality(String),
    status LowCardinality(String),
    requests UInt64,
    input_tokens Int64,
    cached_input_tokens Int64,
    output_tokens Int64,
    reasoning_tokens Int64,
    cost_nanos Int64,
    computed_at DateTime64(6, 'UTC')
)
ENGINE = {{engine ReplacingMergeTree(computed_at)}}
PARTITION BY toYYYYMM(minute)
ORDER BY (org_id, minute, project_id, api_key_id, requested_model, provider, status)
TTL minute + INTERVAL {{ttl_days}} DAY
SETTINGS ttl_only_drop_parts = 1;

{{distributed requests_1m sipHash64(org_id)}};

CREATE TABLE IF NOT EXISTS {{table requests_1h}}
(
    hour DateTime('UTC'),
    org_id String,
    project_id String,
    api_key_id String,
    requested_model LowCardinality(String),
    provider LowCardinality(String),
    status LowCardinality(String),
    requests UInt64,
    input_tokens Int64,
    cached_input_tokens Int64,
    output_tokens Int64,
    reasoning_tokens Int64,
    cost_nanos Int64,
    computed_at DateTime64(6, 'UTC')
)
ENGINE = {{engine ReplacingMergeTree(computed_at)}}
PARTITION BY toYYYYMM(hour)
ORDER BY (org_id, hour, project_id, api_key_id, requested_model, provider, status)
TTL hour + INTERVAL {{ttl_days}} DAY
SETTINGS ttl_only_drop_parts = 1;

{{distributed requests_1h sipHash64(org_id)}};

-- Minutes whose rollups miss late rows: ingest writes a mark after the rows, the roll-up clears it after
-- recomputing the minute. Until then queries read that minute from the raw table.
CREATE TABLE IF NOT EXISTS {{shared_table rollup_dirty}}
(
    org_id String,
    minute DateTime('UTC'),
    marked_at DateTime64(6, 'UTC') DEFAULT now64(6)
)
ENGINE = {{shared_engine MergeTree}}
ORDER BY (org_id, minute);

-- How far the roll-up has come: every minute before done_until is rolled up.
CREATE TABLE IF NOT EXISTS {{shared_table rollup_state}}
(
    name String,
    done_until DateTime('UTC'),
    updated_at DateTime64(6, 'UTC') DEFAULT now64(6)
)
ENGINE = {{shared_engine ReplacingMergeTree(updated_at)}}
ORDER BY name;
