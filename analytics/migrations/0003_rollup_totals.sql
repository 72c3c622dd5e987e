-- A rollup row totals a minute or an hour of one key and model: a few thousand requests at the most one may cost
-- would pass Int64, and its sums wrapped silently. Int128 holds any total of a 400-day range.
ALTER TABLE {{table requests_1m}}
    MODIFY COLUMN input_tokens Int128, MODIFY COLUMN cached_input_tokens Int128, MODIFY COLUMN output_tokens Int128,
    MODIFY COLUMN reasoning_tokens Int128, MODIFY COLUMN cost_nanos Int128;

{{alter_distributed requests_1m
    MODIFY COLUMN input_tokens Int128, MODIFY COLUMN cached_input_tokens Int128, MODIFY COLUMN output_tokens Int128,
    MODIFY COLUMN reasoning_tokens Int128, MODIFY COLUMN cost_nanos Int128}};

ALTER TABLE {{table requests_1h}}
    MODIFY COLUMN input_tokens Int128, MODIFY COLUMN cached_input_tokens Int128, MODIFY COLUMN output_tokens Int128,
    MODIFY COLUMN reasoning_tokens Int128, MODIFY COLUMN cost_nanos Int128;

{{alter_distributed requests_1h
    MODIFY COLUMN input_tokens Int128, MODIFY COLUMN cached_input_tokens Int128, MODIFY COLUMN output_tokens Int128,
    MODIFY COLUMN reasoning_tokens Int128, MODIFY COLUMN cost_nanos Int128}};
