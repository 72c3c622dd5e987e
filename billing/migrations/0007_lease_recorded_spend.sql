-- older-writers: stop
-- Usage names the budget leases it was drawn from (UsageRecord.budget_charges), and RecordUsage adds each newly
-- recorded request's charge to its lease's recorded_nanos in the same statement. A budget's committed spend in a
-- period is then its recorded usage plus what released leases reported spent beyond the usage recorded against them,
-- and an open lease reserves its grant beyond that. Comparing a budget's recorded usage with its released leases'
-- total spend (the larger of the two) undercounted whenever usage had been recorded without a lease (before the
-- budget was set, or from a lease abandoned past its grace): a release not yet followed by its usage then added
-- nothing, and the same money was granted again.
ALTER TABLE budget_leases
  ADD COLUMN recorded_nanos bigint NOT NULL DEFAULT 0 CHECK (recorded_nanos >= 0),
  -- The period a release counts in: its own, or the next when it lived on into that and was released there.
  ADD COLUMN settled_period_start timestamptz;

-- Leases released before this migration: their usage is taken as recorded (as the comparison above mostly found it),
-- so they add nothing beyond it wherever they settle.
UPDATE budget_leases SET recorded_nanos = spent_nanos, settled_period_start = period_start
WHERE released_at IS NOT NULL;

ALTER TABLE budget_leases
  ADD CONSTRAINT budget_leases_settled_check CHECK ((released_at IS NULL) = (settled_period_start IS NULL));

-- Released leases whose spend is not all recorded yet: the only released ones a grant has to look at. A lease leaves
-- this index once its usage catches up.
CREATE INDEX budget_leases_unrecorded_idx ON budget_leases (scope, (coalesce(api_key_id, org_id)), settled_period_start)
  WHERE spent_nanos > recorded_nanos;

-- Replaced by the leases' own recorded and unrecorded spend.
DROP TABLE budget_settlements;
