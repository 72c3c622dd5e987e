-- A key and the keys it was rotated from are one lineage: a key's monthly budget and token quota count the period's
-- spend and tokens of its whole lineage, so rotating a key (a leaked one, say) never starts it on a fresh budget.
-- Usage stays recorded under the key that served it.
ALTER TABLE api_keys ADD COLUMN lineage_id text;

-- Keys rotated before this column existed: each chain of rotated_from links takes the id of the key it started from.
WITH RECURSIVE chains AS (
  SELECT id, id AS lineage_id FROM api_keys WHERE rotated_from IS NULL
  UNION ALL
  SELECT k.id, c.lineage_id FROM api_keys k JOIN chains c ON k.rotated_from = c.id
)
UPDATE api_keys k SET lineage_id = c.lineage_id FROM chains c WHERE c.id = k.id;

ALTER TABLE api_keys
  ALTER COLUMN lineage_id SET NOT NULL,
  ADD CONSTRAINT api_keys_lineage_fkey FOREIGN KEY (lineage_id, org_id) REFERENCES api_keys (id, org_id);

CREATE INDEX api_keys_lineage_idx ON api_keys (lineage_id);

-- Set here rather than by each insert, so no key is created outside the lineage of the key it replaced; a key's
-- lineage and predecessor are history and never change.
CREATE FUNCTION api_keys_lineage() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'UPDATE' THEN
    IF (NEW.lineage_id, NEW.rotated_from) IS DISTINCT FROM (OLD.lineage_id, OLD.rotated_from) THEN
      RAISE EXCEPTION 'api key % keeps the lineage it was created in', OLD.id USING ERRCODE = '55000';
    END IF;
    RETURN NEW;
  END IF;
  NEW.lineage_id := coalesce((SELECT lineage_id FROM api_keys WHERE id = NEW.rotated_from), NEW.id);
  RETURN NEW;
END
$$;

CREATE TRIGGER api_keys_lineage BEFORE INSERT OR UPDATE OF lineage_id, rotated_from ON api_keys
  FOR EACH ROW EXECUTE FUNCTION api_keys_lineage();
