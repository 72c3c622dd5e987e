-- Which issued invoice billed a usage record; null until one has. Issuing an invoice claims every unclaimed record of
-- its org that occurred before its period ended, so usage that arrives after its own period was invoiced is billed
-- by the next invoice, and no record is ever on two live invoices. Voiding an issued invoice releases its records.
-- No foreign key: the column is set in bulk once per invoice, and invoices are never deleted once issued.
ALTER TABLE usage_records ADD COLUMN invoice_id text;

-- Invoices issued before this column existed billed exactly the records of their period.
UPDATE usage_records u SET invoice_id = i.id
FROM invoices i
WHERE i.org_id = u.org_id AND i.status IN ('issued', 'paid')
  AND u.occurred_at >= i.period_start AND u.occurred_at < i.period_end;

-- The records a draft or an issue looks at: an org's unbilled usage, by time.
CREATE INDEX usage_records_unbilled_idx ON usage_records (org_id, occurred_at) WHERE invoice_id IS NULL;
