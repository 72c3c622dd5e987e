-- The bounds RecordUsage checks, held by the table too, so no other writer can store a record whose sums overflow the
-- totals that invoices and summaries add up: at most $1,000,000 (10^15 nano-USD) and 2^31 tokens of each kind per
-- request. The cost breakdown adds up to cost_nanos (0002), so it is bounded with it. NOT VALID: every new or changed
-- row is checked at once, without scanning (and locking) the rows already stored, which passed the same validation.
ALTER TABLE usage_records
  ADD CONSTRAINT usage_records_bounds_check CHECK (
    cost_nanos <= 1000000000000000
    AND input_tokens <= 2147483648 AND cached_input_tokens <= 2147483648
    AND output_tokens <= 2147483648 AND reasoning_tokens <= 2147483648
  ) NOT VALID;
