-- The idempotency key a create of an API key or discount rule was sent with, if any, and the SHA-256 hex of what it
-- asked for: a create repeating a request_id of its org answers with the row it created, or is refused when it asks
-- for something else. Unique per org, so two creates of one request_id at once make one row.
ALTER TABLE api_keys
  ADD COLUMN request_id text CHECK (request_id ~ '^[A-Za-z0-9_-]{1,128}$'),
  ADD COLUMN request_sha256 text CHECK (request_sha256 ~ '^[0-9a-f]{64}$'),
  ADD CHECK ((request_id IS NULL) = (request_sha256 IS NULL)),
  ADD CONSTRAINT api_keys_org_request_key UNIQUE (org_id, request_id);

ALTER TABLE discount_rules
  ADD COLUMN request_id text CHECK (request_id ~ '^[A-Za-z0-9_-]{1,128}$'),
  ADD COLUMN request_sha256 text CHECK (request_sha256 ~ '^[0-9a-f]{64}$'),
  ADD CHECK ((request_id IS NULL) = (request_sha256 IS NULL)),
  ADD CONSTRAINT discount_rules_org_request_key UNIQUE (org_id, request_id);
