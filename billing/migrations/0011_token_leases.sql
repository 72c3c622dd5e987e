-- A key's monthly tokens are leased like budgets: a lease of scope 'api_key_tokens' holds tokens of the key's
-- monthly_tokens, and its granted_nanos, spent_nanos and recorded_nanos count tokens (a usage record charges it its
-- input + output tokens), so one grant, release and recording path serves both units.
ALTER TABLE budget_leases
  DROP CONSTRAINT budget_leases_scope_check,
  ADD CONSTRAINT budget_leases_scope_check CHECK (scope IN ('organization', 'api_key', 'api_key_tokens')),
  DROP CONSTRAINT budget_leases_check,
  ADD CONSTRAINT budget_leases_check CHECK ((scope = 'organization') = (api_key_id IS NULL));
