-- The idempotency key a create of an organization or project was sent with, if any, and the SHA-256 hex of what it
-- asked for, as 0013 keeps for keys and discount rules: a create repeating a request_id answers with the row it
-- created, or is refused when it asks for something else. Organizations' are unique over all; projects' per org.
ALTER TABLE organizations
  ADD COLUMN request_id text CHECK (request_id ~ '^[A-Za-z0-9_-]{1,128}$'),
  ADD COLUMN request_sha256 text CHECK (request_sha256 ~ '^[0-9a-f]{64}$'),
  ADD CHECK ((request_id IS NULL) = (request_sha256 IS NULL)),
  ADD CONSTRAINT organizations_request_key UNIQUE (request_id);

ALTER TABLE projects
  ADD COLUMN request_id text CHECK (request_id ~ '^[A-Za-z0-9_-]{1,128}$'),
  ADD COLUMN request_sha256 text CHECK (request_sha256 ~ '^[0-9a-f]{64}$'),
  ADD CHECK ((request_id IS NULL) = (request_sha256 IS NULL)),
  ADD CONSTRAINT projects_org_request_key UNIQUE (org_id, request_id);
