-- What each gateway replica counts in each second of its keys' per-minute windows, replaced by its SyncRateUsage calls,
-- so that requests_per_minute and tokens_per_minute hold across replicas. Unlogged: a count lives a minute, and a crash
-- that empties the table only lets keys send one more minute's worth, while writing WAL for thousands of upserts a
-- second would cost every other write. A key id is a lineage's (api_keys.lineage_id) and references nothing: the counts
-- of a key revoked or unknown simply age out.
CREATE UNLOGGED TABLE rate_usage (
  key_id     text NOT NULL CHECK (char_length(key_id) BETWEEN 1 AND 128),
  second     bigint NOT NULL CHECK (second > 0),
  holder     text NOT NULL CHECK (char_length(holder) BETWEEN 1 AND 200),
  requests   bigint NOT NULL CHECK (requests >= 0),
  tokens     bigint NOT NULL CHECK (tokens >= 0),
  -- The holder's call that last set the row: an earlier call finishing late leaves it alone.
  sequence   bigint NOT NULL,
  -- The transaction that last set the row: a gateway is answered the rows set since its last answer's snapshot.
  txid       xid8 NOT NULL DEFAULT pg_current_xact_id(),
  -- When the row was last set, by the database's clock: rows no holder set for minutes are deleted.
  updated_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (key_id, second, holder)
);

CREATE INDEX rate_usage_txid_idx ON rate_usage (txid);
CREATE INDEX rate_usage_updated_at_idx ON rate_usage (updated_at);
