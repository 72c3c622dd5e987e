-- What each gateway replica counted in each second of its keys' per-minute windows, added to by SyncRateUsage, so that
-- requests_per_minute and tokens_per_minute hold across replicas. Unlogged: a count lives a minute, and a crash that
-- empties the table only lets keys send one more minute's worth, while writing WAL for thousands of upserts a second
-- would cost every other write. A key id is a lineage's (api_keys.lineage_id) and references nothing: the counts of a
-- key revoked or unknown simply age out.
CREATE UNLOGGED TABLE rate_usage (
  key_id     text NOT NULL CHECK (char_length(key_id) BETWEEN 1 AND 128),
  second     bigint NOT NULL CHECK (second > 0),
  holder     text NOT NULL CHECK (char_length(holder) BETWEEN 1 AND 200),
  -- Sums of changes, which may be negative (requests given back); SyncRateUsage answers them at 0 or more.
  requests   bigint NOT NULL,
  tokens     bigint NOT NULL,
  -- When a holder last changed the row, by the database's clock: a gateway is answered only the rows changed since its
  -- last answer, and rows no holder changed for minutes are deleted.
  updated_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (key_id, second, holder)
);

CREATE INDEX rate_usage_updated_at_idx ON rate_usage (updated_at);
