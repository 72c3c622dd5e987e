import type { Db } from "./db.ts";
import type { RateUsage, RateUsageAnswer, RateUsageSync } from "./types.ts";
import { arrayLiteral } from "./usage.ts";

export interface RateUsageStoreOptions {
  /**
   * How often one billing process deletes rows no holder changed for `keptSeconds`, at most (5 s by default): gateways
   * sync several times a second each, and a delete with every sync would cost more than the rows it removes.
   */
  pruneIntervalMs?: number;
}

/**
 * A row no holder changed for this long is deleted. A holder changes a second's row only while that second is in its
 * window (a minute), so this leaves a clock behind the others' by a minute still reading its own window.
 */
export const keptSeconds = 180;
/**
 * How far before a caller's changedAfter rows are read again: a change whose statement began before the caller's last
 * answer was read, and committed after, is stamped before that answer's asOf.
 */
export const lookBackSeconds = 5;
const maxInt64 = "9223372036854775807";

export function createRateUsageStore(db: Db, { pruneIntervalMs = 5_000 }: RateUsageStoreOptions = {}) {
  let nextPruneAt = Number.NEGATIVE_INFINITY;
  return {
    /**
     * Adds `sync.usage` to what its holder counted, changes of one key and second summed (those of seconds before
     * sinceSecond dropped), and answers what the other holders counted from sinceSecond on: in `sync.keyIds`' seconds
     * where one of them changed its count after changedAfter (less lookBackSeconds), and in every second of
     * `sync.newKeyIds` (and of keyIds without changedAfter). Per key and second, the sum of their counts, each holder's
     * taken as at least 0 (a holder whose additions were lost leaves no negative count to cancel another's), 0 included.
     * One statement: the others' counts are those committed when it began, and asOf is when that was. Every
     * pruneIntervalMs it also deletes the rows no holder changed for keptSeconds.
     *
     * Answering only what changed keeps a call's cost to what the replicas counted since the last, not the keys'
     * whole windows: 500 keys counted every second by two other replicas are 60,000 rows to sum at every call.
     */
    async syncRateUsage(sync: RateUsageSync): Promise<RateUsageAnswer> {
      const now = performance.now();
      const prune = now >= nextPruneAt;
      if (prune) nextPruneAt = now + pruneIntervalMs;
      const numbers = (pick: (u: RateUsage) => bigint) => `{${sync.usage.map(pick).join(",")}}`;
      const [keyIds, newKeyIds] = sync.changedAfter ? [sync.keyIds, sync.newKeyIds] : [[], [...sync.keyIds, ...sync.newKeyIds]];
      const rows = await db.query<{
        as_of: Date;
        key_ids: string[] | null;
        seconds: string[] | null;
        requests: string[] | null;
        tokens: string[] | null;
      }>(
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
             SET requests = u.requests + excluded.requests, tokens = u.tokens + excluded.tokens, updated_at = now()
         ), pruned AS (
           DELETE FROM rate_usage WHERE $8::boolean AND updated_at < now() - make_interval(secs => ${keptSeconds})
         ), answered AS (
           SELECT key_id, second FROM rate_usage
           WHERE key_id = ANY($7::text[]) AND second >= $6 AND holder <> $1
             AND updated_at > $9::timestamptz - make_interval(secs => ${lookBackSeconds})
           UNION
           SELECT key_id, second FROM rate_usage WHERE key_id = ANY($10::text[]) AND second >= $6 AND holder <> $1
         ), sums AS (
           SELECT u.key_id, u.second,
             least(sum(greatest(u.requests, 0)), ${maxInt64}) AS requests,
             least(sum(greatest(u.tokens, 0)), ${maxInt64}) AS tokens
           FROM rate_usage u JOIN answered a ON a.key_id = u.key_id AND a.second = u.second
           WHERE u.holder <> $1
           GROUP BY u.key_id, u.second
         )
         SELECT now() AS as_of, array_agg(key_id) AS key_ids, array_agg(second::text) AS seconds,
           array_agg(requests::text) AS requests, array_agg(tokens::text) AS tokens
         FROM sums`,
        [
          sync.holder,
          arrayLiteral(sync.usage.map((u) => u.keyId)),
          numbers((u) => u.second),
          numbers((u) => u.requests),
          numbers((u) => u.tokens),
          sync.sinceSecond.toString(),
          arrayLiteral(keyIds),
          prune,
          sync.changedAfter ?? null,
          arrayLiteral(newKeyIds),
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
      return { others, asOf: row.as_of };
    },
  };
}
