-- An invoice is numbered when it is issued, from the org's last number plus one, so an org's issued invoices are
-- numbered in the order they were issued without gaps. Drafts have no number: generating one for a period that was
-- later voided, or regenerated, took numbers no invoice the customer received ever had.
ALTER TABLE invoices ALTER COLUMN number DROP NOT NULL;
UPDATE invoices SET number = NULL WHERE status = 'draft';
-- Voided drafts from before this migration keep the numbers they were given (invoices_guard keeps them as they are).
ALTER TABLE invoices ADD CONSTRAINT invoices_number_check CHECK (number IS NOT NULL OR status IN ('draft', 'void'));
