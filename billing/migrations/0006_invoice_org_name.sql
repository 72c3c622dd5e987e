-- The organization name an invoice bills, kept on the invoice like its tax rate: a draft takes the org's name each
-- time it is built (generated, regenerated or issued), and an invoice that left draft keeps it when the org is renamed.
ALTER TABLE invoices ADD COLUMN org_name text CHECK (char_length(org_name) BETWEEN 1 AND 200);

-- Invoices from before this column bill the org's current name, the best one known. invoices_guard (0002) refuses any
-- change to an invoice that left draft, this column included, so it is off for this backfill alone.
ALTER TABLE invoices DISABLE TRIGGER invoices_guard;
UPDATE invoices i SET org_name = o.name FROM organizations o WHERE o.id = i.org_id;
ALTER TABLE invoices ENABLE TRIGGER invoices_guard;

ALTER TABLE invoices ALTER COLUMN org_name SET NOT NULL;
