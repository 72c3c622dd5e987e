import type { Db } from "./db.ts";
import type { RateUsage, RateUsageSync } from "./types.ts";
import { arrayLiteral } from "./usage.ts";

export interface RateUsageStoreOptions {
  /**
   * How often one billing process deletes the seconds every window has left, at most (5 s by default): gateways sync
   * several times a second each, and a delete with every sync would cost more than the rows it removes.
   */
  pruneIntervalMs?: number;
}

/**
 * Seconds kept before a caller's window: a replica whose clock is behind the others' still reads its own window, and a
 * delete only every pruneIntervalMs lets rows live this long plus that.
 */
export const keptSecondsBeforeWindow = 120;
const maxInt64 = "9223372036854775807";

export function createRateUsageStore(db: Db, { pruneIntervalMs = 5_000 }: RateUsageStoreOptions = {}) {
  let nextPruneAt = Number.NEGATIVE_INFINITY;
  return {
    /**
     * Adds `sync.usage` to what its holder counted, changes of one key and second summed (those of seconds before
     * sinceSecond dropped), and answers what the other holders counted in `sync.keyIds`' seconds from sinceSecond on:
     * per key and second, the sum of their counts, each holder's taken as at least 0 (a holder whose additions were
     * lost leaves no negative count to cancel another's), and none for seconds where that is 0. One statement: the
     * others' counts are those committed when it began. Every pruneIntervalMs it also deletes the seconds that left
     * every window, judged by the caller's window and the database's clock whichever is earlier, so that a gateway
     * whose clock runs ahead cannot delete the others' current counts.
     */
    async syncRateUsage(sync: RateUsageSync): Promise<RateUsage[]> {
      const now = performance.now();
      const prune = now >= nextPruneAt;
      if (prune) nextPruneAt = now + pruneIntervalMs;
      const numbers = (pick: (u: RateUsage) => bigint) => `{${sync.usage.map(pick).join(",")}}`;
      const rows = await db.query<{ key_id: string; second: string; requests: string; tokens: string }>(
        `WITH changes AS (
           -- Summed first: an upsert cannot change one row twice in a statement.
           SELECT key_id, second, sum(requests) AS requests, sum(tokens) AS tokens
           FROM unnest($2::text[], $3::bigint[], $4::bigint[], $5::bigint[]) AS c(key_id, second, requests, tokens)
           WHERE second >= $6::bigint
           GROUP BY key_id, second
         ), added AS (
           INSERT INTO rate_usage AS u (key_id, second, holder, requests, tokens)
           SELECT key_id, second, $1, requests, tokens FROM changes
           -- A stable order keeps two calls of one holder (two processes under one id) from deadlocking.
           ORDER BY key_id COLLATE "C", second
           ON CONFLICT (key_id, second, holder) DO UPDATE
             SET requests = u.requests + excluded.requests, tokens = u.tokens + excluded.tokens
         ), pruned AS (
           DELETE FROM rate_usage
           WHERE $8::boolean
             AND second < least($6, floor(extract(epoch FROM now()))::bigint - 59) - ${keptSecondsBeforeWindow}
         )
         SELECT key_id, second::text AS second,
           least(sum(greatest(requests, 0)), ${maxInt64})::text AS requests,
           least(sum(greatest(tokens, 0)), ${maxInt64})::text AS tokens
         FROM rate_usage
         WHERE key_id = ANY($7::text[]) AND second >= $6 AND holder <> $1
         GROUP BY key_id, second
         HAVING sum(greatest(requests, 0)) > 0 OR sum(greatest(tokens, 0)) > 0`,
        [
          sync.holder,
          arrayLiteral(sync.usage.map((u) => u.keyId)),
          numbers((u) => u.second),
          numbers((u) => u.requests),
          numbers((u) => u.tokens),
          sync.sinceSecond.toString(),
          arrayLiteral(sync.keyIds),
          prune,
        ],
      );
      return rows.map((row) => ({
        keyId: row.key_id,
        second: BigInt(row.second),
        requests: BigInt(row.requests),
        tokens: BigInt(row.tokens),
      }));
    },
  };
}
