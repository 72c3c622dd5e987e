import type { Db } from "./db.ts";
import type { RateUsage, RateUsageAnswer, RateUsageSync } from "./types.ts";
import { arrayLiteral } from "./usage.ts";

export interface RateUsageStoreOptions {
  /**
   * How often one billing process deletes rows no holder set for `keptSeconds`, at most (5 s by default): gateways sync
   * several times a second each, and a delete with every sync would cost more than the rows it removes.
   */
  pruneIntervalMs?: number;
}

/**
 * A row no holder set for this long is deleted. A holder sets a second's row only while that second is in its window (a
 * minute), so this leaves a clock behind the others' by a minute still reading its own window.
 */
export const keptSeconds = 180;

export function createRateUsageStore(db: Db, { pruneIntervalMs = 5_000 }: RateUsageStoreOptions = {}) {
  let nextPruneAt = Number.NEGATIVE_INFINITY;
  return {
    /**
     * Sets what `sync.holder` counts in the seconds of `sync.usage` (the last of one key and second in the call; seconds
     * before sinceSecond dropped), unless a later call of the holder set them already, and answers what the other
     * holders count from sinceSecond on: in every key's seconds that one of them set since changesSince (none for 0n),
     * and in every second of newKeyIds. Per key and second answered, the sum of their counts. One statement: the others'
     * counts are those committed when it began.
     *
     * The watermark answered is the oldest transaction still running when the statement began (its snapshot's xmin):
     * every row set by a transaction before it was committed then, and is in this answer if set since changesSince;
     * a row set by one from it on may not have been, and is answered again next time, at worst twice. Transactions'
     * order, not a clock: a change committed after an answer was read, whenever its statement began, is never missed.
     * Every pruneIntervalMs it also deletes the rows no holder set for keptSeconds.
     */
    async syncRateUsage(sync: RateUsageSync): Promise<RateUsageAnswer> {
      const now = performance.now();
      const prune = now >= nextPruneAt;
      if (prune) nextPruneAt = now + pruneIntervalMs;
      const numbers = (pick: (u: RateUsage) => bigint) => `{${sync.usage.map(pick).join(",")}}`;
      const rows = await db.query<{
        watermark: string;
        key_ids: string[] | null;
        seconds: string[] | null;
        requests: string[] | null;
        tokens: string[] | null;
      }>(
        `WITH counts AS (
           -- The last count of a key and second in the call: an upsert cannot change one row twice in a statement.
           SELECT DISTINCT ON (key_id, second) key_id, second, requests, tokens
           FROM unnest($2::text[], $3::bigint[], $4::bigint[], $5::bigint[])
             WITH ORDINALITY AS c(key_id, second, requests, tokens, n)
           WHERE second >= $6::bigint
           ORDER BY key_id, second, n DESC
         ), set AS (
           INSERT INTO rate_usage AS u (key_id, second, holder, requests, tokens, sequence)
           SELECT key_id, second, $1, requests, tokens, $7 FROM counts
           -- A stable order keeps a call its holder gave up on and the one it sent next from deadlocking.
           ORDER BY key_id COLLATE "C", second
           ON CONFLICT (key_id, second, holder) DO UPDATE
             SET requests = excluded.requests, tokens = excluded.tokens, sequence = excluded.sequence,
               txid = pg_current_xact_id(), updated_at = now()
             WHERE u.sequence < excluded.sequence
         ), pruned AS (
           DELETE FROM rate_usage WHERE $8::boolean AND updated_at < now() - make_interval(secs => ${keptSeconds})
         ), changed AS MATERIALIZED (
           -- Found by when they were set, not by key: what changed lately, not every key's whole window.
           SELECT key_id, second FROM rate_usage
           WHERE $9::bigint > 0 AND txid >= $9::text::xid8 AND second >= $6 AND holder <> $1
         ), answered AS (
           SELECT key_id, second FROM changed
           UNION
           SELECT key_id, second FROM rate_usage WHERE key_id = ANY($10::text[]) AND second >= $6 AND holder <> $1
         ), sums AS (
           SELECT u.key_id, u.second, sum(u.requests) AS requests, sum(u.tokens) AS tokens
           FROM rate_usage u JOIN answered a ON a.key_id = u.key_id AND a.second = u.second
           WHERE u.holder <> $1
           GROUP BY u.key_id, u.second
         )
         SELECT pg_snapshot_xmin(pg_current_snapshot())::text AS watermark, array_agg(key_id) AS key_ids,
           array_agg(second::text) AS seconds, array_agg(requests::text) AS requests, array_agg(tokens::text) AS tokens
         FROM sums`,
        [
          sync.holder,
          arrayLiteral(sync.usage.map((u) => u.keyId)),
          numbers((u) => u.second),
          numbers((u) => u.requests),
          numbers((u) => u.tokens),
          sync.sinceSecond.toString(),
          sync.sequence.toString(),
          prune,
          sync.changesSince.toString(),
          arrayLiteral(sync.newKeyIds),
        ],
      );
      const row = rows[0];
      if (!row) throw new Error("rate usage sync answered no row");
      const others = (row.key_ids ?? []).map((keyId, i) => ({
        keyId,
        second: BigInt(row.seconds?.[i] ?? 0),
        requests: BigInt(row.requests?.[i] ?? 0),
        tokens: BigInt(row.tokens?.[i] ?? 0),
      }));
      return { others, watermark: BigInt(row.watermark) };
    },
  };
}
