-- An org is suspended while suspended_at is set: its keys are refused and its budgets grant nothing, and everything
-- else it has (keys, limits, usage, invoices) is kept for when it is reinstated.
ALTER TABLE organizations ADD COLUMN suspended_at timestamptz;
ALTER TABLE organizations ADD COLUMN suspend_reason text NOT NULL DEFAULT ''
  CHECK (char_length(suspend_reason) <= 500 AND (suspended_at IS NOT NULL OR suspend_reason = ''));
