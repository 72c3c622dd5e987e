-- Requests of a key in flight at once on each gateway replica; 0 is no limit, as for the key's other limits.
ALTER TABLE api_keys ADD COLUMN max_concurrent_requests integer NOT NULL DEFAULT 0 CHECK (max_concurrent_requests >= 0);
