-- Discount limits, per-token-type cost of usage, set-wise reference checks on usage, and invoices that cannot change
-- once issued.

-- Most that all discounts together may take off an invoice, in basis points of its subtotal; 0 = no limit.
ALTER TABLE organizations
  ADD COLUMN max_discount_bps integer NOT NULL DEFAULT 0 CHECK (max_discount_bps BETWEEN 0 AND 10000);

-- Cost of a request split by token type, when the caller sent it; all four or none, adding up to cost_nanos.
ALTER TABLE usage_records
  ADD COLUMN input_cost_nanos bigint,
  ADD COLUMN cached_input_cost_nanos bigint,
  ADD COLUMN output_cost_nanos bigint,
  ADD COLUMN reasoning_cost_nanos bigint,
  ADD CONSTRAINT usage_records_cost_breakdown_check CHECK (
    (input_cost_nanos IS NULL AND cached_input_cost_nanos IS NULL AND output_cost_nanos IS NULL
      AND reasoning_cost_nanos IS NULL)
    OR (input_cost_nanos >= 0 AND cached_input_cost_nanos >= 0 AND output_cost_nanos >= 0
      AND reasoning_cost_nanos >= 0
      AND input_cost_nanos + cached_input_cost_nanos + output_cost_nanos + reasoning_cost_nanos = cost_nanos)
  );

-- Usage references its org, project and key through one set-wise check per insert statement instead of a foreign
-- key check (and row lock) per row, which halved bulk insert throughput. The rows referred to are never deleted
-- and never change id or org (guards below), so the check holds as long as the row does.
ALTER TABLE usage_records
  DROP CONSTRAINT usage_records_org_id_fkey,
  DROP CONSTRAINT usage_records_project_fkey,
  DROP CONSTRAINT usage_records_api_key_fkey;

CREATE FUNCTION usage_records_references() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  missing record;
BEGIN
  SELECT i.org_id INTO missing
  FROM (SELECT DISTINCT org_id FROM inserted) i LEFT JOIN organizations o ON o.id = i.org_id
  WHERE o.id IS NULL LIMIT 1;
  IF FOUND THEN
    RAISE foreign_key_violation USING
      MESSAGE = 'insert or update on table "usage_records" violates its organization reference',
      DETAIL = format('Key (org_id)=(%s) is not present in table "organizations".', missing.org_id);
  END IF;
  SELECT i.project_id, i.org_id INTO missing
  FROM (SELECT DISTINCT project_id, org_id FROM inserted WHERE project_id IS NOT NULL) i
    LEFT JOIN projects p ON p.id = i.project_id AND p.org_id = i.org_id
  WHERE p.id IS NULL LIMIT 1;
  IF FOUND THEN
    RAISE foreign_key_violation USING
      MESSAGE = 'insert or update on table "usage_records" violates its project reference',
      DETAIL = format('Key (project_id, org_id)=(%s, %s) is not present in table "projects".', missing.project_id,
        missing.org_id);
  END IF;
  SELECT i.api_key_id, i.org_id INTO missing
  FROM (SELECT DISTINCT api_key_id, org_id FROM inserted WHERE api_key_id IS NOT NULL) i
    LEFT JOIN api_keys k ON k.id = i.api_key_id AND k.org_id = i.org_id
  WHERE k.id IS NULL LIMIT 1;
  IF FOUND THEN
    RAISE foreign_key_violation USING
      MESSAGE = 'insert or update on table "usage_records" violates its api key reference',
      DETAIL = format('Key (api_key_id, org_id)=(%s, %s) is not present in table "api_keys".', missing.api_key_id,
        missing.org_id);
  END IF;
  RETURN NULL;
END
$$;

CREATE TRIGGER usage_records_references AFTER INSERT ON usage_records REFERENCING NEW TABLE AS inserted
  FOR EACH STATEMENT EXECUTE FUNCTION usage_records_references();

-- Billing history refers to orgs, projects and keys: they are revoked, never deleted or renumbered.
CREATE FUNCTION billing_history_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'DELETE' OR (to_jsonb(NEW) ->> 'id') IS DISTINCT FROM (to_jsonb(OLD) ->> 'id')
      OR (to_jsonb(NEW) ->> 'org_id') IS DISTINCT FROM (to_jsonb(OLD) ->> 'org_id') THEN
    RAISE EXCEPTION '% % is part of billing history: it cannot be deleted or moved', TG_TABLE_NAME, OLD.id
      USING ERRCODE = '55000';
  END IF;
  RETURN NEW;
END
$$;

CREATE TRIGGER organizations_history_guard BEFORE UPDATE OF id OR DELETE ON organizations
  FOR EACH ROW EXECUTE FUNCTION billing_history_guard();
CREATE TRIGGER projects_history_guard BEFORE UPDATE OF id, org_id OR DELETE ON projects
  FOR EACH ROW EXECUTE FUNCTION billing_history_guard();
CREATE TRIGGER api_keys_history_guard BEFORE UPDATE OF id, org_id OR DELETE ON api_keys
  FOR EACH ROW EXECUTE FUNCTION billing_history_guard();

-- Rules are evaluated per UTC hour, so windows are non-empty hour ranges and validity bounds whole hours.
ALTER TABLE discount_rules
  ADD CONSTRAINT discount_rules_hours_check CHECK (start_hour < end_hour),
  ADD CONSTRAINT discount_rules_validity_hours_check CHECK (
    (valid_from IS NULL OR date_trunc('hour', valid_from AT TIME ZONE 'UTC') = valid_from AT TIME ZONE 'UTC')
    AND (valid_until IS NULL OR date_trunc('hour', valid_until AT TIME ZONE 'UTC') = valid_until AT TIME ZONE 'UTC')
  );

ALTER TABLE invoice_line_items
  DROP CONSTRAINT invoice_line_items_token_type_check,
  ADD CONSTRAINT invoice_line_items_token_type_check
    CHECK (token_type IN ('input', 'cached_input', 'output', 'reasoning', 'usage', 'discount')),
  -- No foreign key: deleting a rule must not rewrite the invoices it discounted.
  ADD COLUMN discount_rule_id text,
  ADD CONSTRAINT invoice_line_items_rule_check CHECK ((token_type = 'discount') = (discount_rule_id IS NOT NULL));

-- Only these status changes exist, and an invoice that left draft keeps every other column as it was.
CREATE FUNCTION invoices_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'DELETE' THEN
    IF OLD.status <> 'draft' THEN
      RAISE EXCEPTION 'invoice % is %, only drafts can be deleted', OLD.id, OLD.status USING ERRCODE = '55000';
    END IF;
    RETURN OLD;
  END IF;
  IF OLD.status <> 'draft' AND (to_jsonb(NEW) - 'status') IS DISTINCT FROM (to_jsonb(OLD) - 'status') THEN
    RAISE EXCEPTION 'invoice % is %, it can no longer change', OLD.id, OLD.status USING ERRCODE = '55000';
  END IF;
  IF NEW.status <> OLD.status AND (OLD.status, NEW.status) NOT IN
      (('draft', 'issued'), ('issued', 'paid'), ('draft', 'void'), ('issued', 'void')) THEN
    RAISE EXCEPTION 'invoice % cannot go from % to %', OLD.id, OLD.status, NEW.status USING ERRCODE = '55000';
  END IF;
  RETURN NEW;
END
$$;

CREATE TRIGGER invoices_guard BEFORE UPDATE OR DELETE ON invoices FOR EACH ROW EXECUTE FUNCTION invoices_guard();

-- Line items change only while their invoice is a draft (a vanished invoice is a cascade from a draft).
CREATE FUNCTION invoice_line_items_guard() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  invoice_status text;
BEGIN
  SELECT status INTO invoice_status FROM invoices
  WHERE id = CASE WHEN TG_OP = 'DELETE' THEN OLD.invoice_id ELSE NEW.invoice_id END;
  IF invoice_status <> 'draft' THEN
    RAISE EXCEPTION 'invoice % is %, its lines can no longer change',
      CASE WHEN TG_OP = 'DELETE' THEN OLD.invoice_id ELSE NEW.invoice_id END, invoice_status
      USING ERRCODE = '55000';
  END IF;
  RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END
$$;

CREATE TRIGGER invoice_line_items_guard BEFORE INSERT OR UPDATE OR DELETE ON invoice_line_items
  FOR EACH ROW EXECUTE FUNCTION invoice_line_items_guard();

CREATE INDEX invoices_org_period_idx ON invoices (org_id, period_start DESC, created_at DESC);

-- What the released leases of one budget and period reported spent, as a running total kept by the release itself,
-- so a grant reads one row instead of summing every lease of the period.
CREATE TABLE budget_settlements (
  scope        text NOT NULL CHECK (scope IN ('organization', 'api_key')),
  -- Org id or api key id, per scope.
  scope_id     text NOT NULL,
  period_start timestamptz NOT NULL,
  spent_nanos  bigint NOT NULL CHECK (spent_nanos >= 0),
  PRIMARY KEY (scope, scope_id, period_start)
);

INSERT INTO budget_settlements (scope, scope_id, period_start, spent_nanos)
SELECT scope, coalesce(api_key_id, org_id), period_start, sum(spent_nanos)
FROM budget_leases WHERE released_at IS NOT NULL
GROUP BY 1, 2, 3;

-- Leases not yet released, the only ones a grant still has to look at.
CREATE INDEX budget_leases_open_idx ON budget_leases (scope, (coalesce(api_key_id, org_id)), period_start)
  WHERE released_at IS NULL;
