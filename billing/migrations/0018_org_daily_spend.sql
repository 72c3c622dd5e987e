-- older-writers: stop
-- An org's spend per UTC day, kept by RecordUsage in the statement that keeps usage_summaries, from exactly the same
-- rows. An org budget's grant sums the period's days here: at most 31 rows, where summing usage_summaries read one row
-- per key and day (165,000 on the 30th for an org of 20,000 keys, under the org's lock). Days, like the summaries,
-- compose into any billing period whatever the org's billing day, and whatever it was when the usage was recorded.
CREATE TABLE usage_org_days (
  org_id     text NOT NULL REFERENCES organizations (id),
  day        date NOT NULL,
  -- Numeric, as sums of the summaries' bigints are: an org's day is never refused for outgrowing int64 when its keys'
  -- days each fit, and reads it as the sum of those days.
  cost_nanos numeric NOT NULL CHECK (cost_nanos >= 0),
  PRIMARY KEY (org_id, day)
);

-- Usage recorded before this table existed. Reading usage_summaries takes no lock that holds up its writers or readers,
-- however many rows it has: RecordUsage and grants go on meanwhile. Usage from billing replicas without this migration
-- is not counted here, so billing is upgraded to it from an earlier version with no such replica recording usage (see
-- README, Upgrades).
INSERT INTO usage_org_days (org_id, day, cost_nanos)
SELECT org_id, day, sum(cost_nanos) FROM usage_summaries GROUP BY org_id, day;
