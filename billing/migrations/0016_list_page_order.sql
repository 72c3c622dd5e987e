-- Each List* RPC reads a page as the rows after the one the last page ended on, in a unique order: an index in that
-- order lets a page start where it is, rather than read and sort every row before it (all of them when the rows tie
-- on created_at, as rows inserted in one statement do), which over 50,000 keys would make each page slower than the
-- one before.
CREATE INDEX organizations_list_idx ON organizations (created_at, id);
CREATE INDEX projects_org_list_idx ON projects (org_id, created_at, id);
DROP INDEX api_keys_org_idx;
CREATE INDEX api_keys_org_list_idx ON api_keys (org_id, created_at, id);
DROP INDEX discount_rules_org_idx;
CREATE INDEX discount_rules_org_list_idx ON discount_rules (org_id, priority DESC, id);
DROP INDEX invoices_org_period_idx;
CREATE INDEX invoices_org_list_idx ON invoices (org_id, period_start DESC, created_at DESC, id DESC);
