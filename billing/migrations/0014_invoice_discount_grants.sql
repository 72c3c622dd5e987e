-- What each invoice discounted, by rule, of each billing period whose usage it billed: its discount lines split by
-- period. Usage of a period billed after the period's first invoice is discounted against what the period's issued
-- invoices granted, so a rule's cap and the org's maximum hold over all of them, however many bill parts of it.
CREATE TABLE invoice_discount_grants (
  invoice_id       text NOT NULL REFERENCES invoices (id) ON DELETE CASCADE,
  period_start     timestamptz NOT NULL,
  -- No foreign key, as on the lines: deleting a rule must not rewrite the invoices it discounted.
  discount_rule_id text NOT NULL,
  amount_nanos     bigint NOT NULL CHECK (amount_nanos > 0),
  PRIMARY KEY (invoice_id, period_start, discount_rule_id)
);

-- Invoices issued before this table have one discount line per rule over every period they billed, which cannot be
-- split: each of those periods counts the whole line as granted (its own period when the invoice billed usage of it,
-- each earlier one whose late usage it billed), so a later invoice never takes a rule past its cap nor the org past
-- its maximum, at worst granting late usage less where an invoice billed usage of two periods. Drafts are rebuilt.
INSERT INTO invoice_discount_grants (invoice_id, period_start, discount_rule_id, amount_nanos)
SELECT l.invoice_id, p.period_start, l.discount_rule_id, -sum(l.amount_nanos)
FROM invoices i
JOIN organizations o ON o.id = i.org_id
JOIN invoice_line_items l ON l.invoice_id = i.id AND l.token_type = 'discount' AND l.amount_nanos < 0
JOIN LATERAL (
  SELECT i.period_start
  WHERE EXISTS (SELECT 1 FROM invoice_line_items own WHERE own.invoice_id = i.id AND own.token_type <> 'discount'
    AND own.description NOT LIKE '%, not billed on an earlier invoice)')
  UNION
  SELECT DISTINCT (date_trunc('month', (u.occurred_at AT TIME ZONE 'UTC') - make_interval(days => o.billing_day - 1))
    + make_interval(days => o.billing_day - 1)) AT TIME ZONE 'UTC'
  FROM usage_records u
  WHERE u.org_id = i.org_id AND u.occurred_at < i.period_start AND u.invoice_id = i.id
    AND EXISTS (SELECT 1 FROM invoice_line_items late WHERE late.invoice_id = i.id AND late.token_type <> 'discount'
      AND late.description LIKE '%, not billed on an earlier invoice)')
) AS p ON true
WHERE i.status IN ('issued', 'paid')
GROUP BY 1, 2, 3;

-- Like the lines (and so after the rows above), they change only while their invoice is a draft.
CREATE TRIGGER invoice_discount_grants_guard BEFORE INSERT OR UPDATE OR DELETE ON invoice_discount_grants
  FOR EACH ROW EXECUTE FUNCTION invoice_line_items_guard();
