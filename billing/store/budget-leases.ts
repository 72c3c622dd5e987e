import { ulid } from "ulid";
import { billingPeriod, maxUsageClockSkewMs, utcDate } from "../period.ts";
import { BillingError, type Db, type Queryable } from "./db.ts";
import type { BudgetLeaseGrant, BudgetLeaseRequest } from "./types.ts";

interface ScopeRow {
  org_id: string;
  budget: string;
  billing_day: number;
  revoked_at: Date | null;
  expires_at: Date | null;
  suspended_at: Date | null;
  /** The database's time (see `clock`), read once for the transaction. */
  at: Date;
}

export interface BudgetLeaseStoreOptions {
  /**
   * How long a lease that expired without being released (its gateway died) keeps reserving its whole grant.
   * The gateway's spool resends the usage of what it served when it comes back; until that usage is recorded the
   * grant is the only bound on it, so returning it to the pool at once could grant the same money twice. After the
   * window the lease reserves nothing and what it spent counts once its usage is recorded. Default 10 minutes.
   */
  abandonedLeaseGraceMs?: number;
  /**
   * What one holder may hold beyond half of what is left: its active leases of the scope, this grant included, stay
   * within half of what is left to it (unleased budget plus its own holding) plus this, so a replica asking for too
   * much strands at most about half of a budget when it dies, and the last of a budget can still be granted whole.
   * What the request at hand needs is granted beyond it: the cap is on what a holder keeps for later. Default 0.1 USD.
   */
  holderFloorNanos?: bigint;
  /** The same for a key's monthly tokens, in tokens. Default 10,000. */
  holderFloorTokens?: bigint;
  /**
   * The time leases live by in place of Postgres's, for tests, which cannot move the database's clock. Unset, every
   * lifetime (a grant's expiry, whether a lease is live, abandoned or past its grace, when it was released) and every
   * period (the one a grant is of, the one a release settles in, which leases are old enough to delete) is judged by
   * the database's clock within the
   * statement that decides, the one clock every replica shares: a replica's own clock may be off by more than the
   * grace, and judged by it a live lease would be granted again; and a replica behind would grant July's money as
   * June's leftover, not counting what July's leases spent.
   */
  clock?: () => Date;
}

export const defaultAbandonedLeaseGraceMs = 600_000;
/**
 * Fewest days a lease is kept after it expired and after the start of the period it settled in: a grant reads released
 * leases settled in the current period (which started at most 31 days ago) and unreleased ones that expired less than
 * the grace (at most a day) ago.
 */
export const minLeaseRetentionDays = 35;
const pruneBatch = 5_000;
export const defaultHolderFloorNanos = 100_000_000n;
export const defaultHolderFloorTokens = 10_000n;

export function createBudgetLeaseStore(db: Db, options: BudgetLeaseStoreOptions = {}) {
  const graceMs = options.abandonedLeaseGraceMs ?? defaultAbandonedLeaseGraceMs;
  const holderFloorNanos = options.holderFloorNanos ?? defaultHolderFloorNanos;
  const holderFloorTokens = options.holderFloorTokens ?? defaultHolderFloorTokens;
  // null: the database's now(), the start of the deciding transaction.
  const clockAt = () => options.clock?.() ?? null;
  return {
    /**
     * Grants up to `requestedNanos` of what is left of the scope's budget in the current billing period; a key's
     * budget is shared with the keys it was rotated from (its lineage), whose spend and leases count here too. A key's
     * monthly tokens ("api_key_tokens") are a budget in tokens: its usage counts at its input + output tokens, and
     * every amount here (grants, spend, what usage records charge a lease) is in tokens.
     * The scope's row is locked for the transaction, so concurrent grants are serialised and together never exceed
     * the budget. Committed spend is the recorded usage plus what released leases reported spent beyond the usage
     * recorded against them (usage arrives later than releases, and names its leases); active leases reserve their
     * grant beyond their recorded usage, and so do expired unreleased ones for `abandonedLeaseGraceMs` after expiry;
     * older abandoned leases reserve nothing, their usage counting as it is recorded. A lease of the previous
     * period that lives on into this one can be spent in both, so it reserves here too until released, and is
     * settled here when released after its own period ended (see releaseBudgetLease). One whose life (until its release
     * or expiry) ended less than `maxUsageClockSkewMs` before this period began counts here too, as it does in its own,
     * until its usage is recorded: a gateway whose clock runs ahead of Postgres's dates some of that usage here.
     * One holder is granted no more than keeps its active leases within half of what is left to it plus
     * `holderFloorNanos`, or than `neededNanos` when that is more; less than asked when both are less. A request naming
     * a lease already granted to the same scope and holder (its asker lost the answer) grants nothing more: it answers
     * with that lease as granted, even to a key revoked since (so its holder can give it back), and with what is left as
     * of now.
     * Lifetimes and periods are the database's (see `clock`): a grant expires `ttlSeconds` after its transaction began,
     * is of the billing period containing that time, and whether a lease is live or abandoned is judged at that time,
     * as releaseBudgetLease judges which period a release settles in. `request.now` (billing's own clock) only judges
     * the key's expiry, as AuthorizeKey does.
     */
    acquireBudgetLease(request: BudgetLeaseRequest): Promise<BudgetLeaseGrant> {
      return db.transaction(async (tx) => {
        const tokens = request.scope === "api_key_tokens";
        const scopeRows = await tx.query<ScopeRow>(
          request.scope === "organization"
            ? `SELECT id AS org_id, monthly_budget_nanos AS budget, billing_day, NULL AS revoked_at, NULL AS expires_at,
                 suspended_at, coalesce($2::timestamptz, now()) AS at
               FROM organizations WHERE id = $1 FOR NO KEY UPDATE`
            : `SELECT k.org_id, ${tokens ? "k.monthly_tokens" : "k.monthly_budget_nanos"} AS budget, o.billing_day,
                 k.revoked_at, k.expires_at, o.suspended_at, coalesce($2::timestamptz, now()) AS at
               FROM api_keys k JOIN organizations o ON o.id = k.org_id
               WHERE k.id = $1 FOR NO KEY UPDATE OF k`,
          [request.scopeId, clockAt()],
        );
        const scope = scopeRows[0];
        const noun = request.scope === "organization" ? "organization" : "api key";
        if (!scope) throw new BillingError("not_found", `${noun} ${request.scopeId} not found`);
        // Read under the scope's lock, so an ask of the same id still running has committed or rolled back by now.
        const earlier = request.leaseId ? await grantedLease(tx, request, request.leaseId) : undefined;
        // An earlier grant was checked when it was granted.
        if (!earlier) {
          if (scope.revoked_at) throw new BillingError("failed_precondition", `api key ${request.scopeId} is revoked`);
          if (scope.expires_at && scope.expires_at <= request.now) {
            throw new BillingError("failed_precondition", `api key ${request.scopeId} has expired`);
          }
          if (scope.suspended_at) {
            throw new BillingError("permission_denied", `organization ${scope.org_id} is suspended`);
          }
        }

        const budget = BigInt(scope.budget);
        // A key's budget counts its whole lineage: the keys it was rotated from spent from it too. They are revoked,
        // so every grant of the lineage goes through this key's row, locked above.
        const scopeIds =
          request.scope === "organization"
            ? "SELECT $1::text AS id"
            : "SELECT id FROM api_keys WHERE lineage_id = (SELECT lineage_id FROM api_keys WHERE id = $1)";
        // An org's recorded usage from its daily spend, a row a day whatever its number of keys; a key's from the
        // daily summaries of its lineage's keys.
        const recordedUsage =
          request.scope === "organization"
            ? `SELECT coalesce(sum(cost_nanos), 0) FROM usage_org_days
               WHERE org_id = $1 AND day >= $2::date AND day < $3::date`
            : `SELECT coalesce(sum(${tokens ? "input_tokens + output_tokens" : "cost_nanos"}), 0) FROM usage_summaries
               WHERE api_key_id IN (SELECT id FROM scope_ids) AND day >= $2::date AND day < $3::date`;
        // The period and every lease lifetime below are judged at the database's time, the same for every replica.
        const at = scope.at;
        const period = billingPeriod(at, scope.billing_day);
        const previousPeriodStart = billingPeriod(new Date(period.start.getTime() - 1), scope.billing_day).start;
        // Leases of the previous period whose life ended after this still count here (see above).
        const spilloverFrom = new Date(period.start.getTime() - maxUsageClockSkewMs);
        const expiresAt = earlier?.expiresAt ?? new Date(at.getTime() + request.ttlSeconds * 1000);
        let granted = earlier?.grantedNanos ?? request.requestedNanos;
        let remaining: bigint | null = null;
        let leased = 0n;
        if (budget > 0n) {
          // One statement, so one snapshot: a release or a RecordUsage committing meanwhile is counted whole or not at
          // all. Usage records name the leases they were drawn from, so each lease knows how much of its spend is
          // recorded: committed spend is the recorded usage plus what released leases spent beyond theirs, and an
          // open lease reserves its grant beyond its recorded usage.
          // Of the reserved, `live` is what leases not yet expired hold: their holders give back what they leave.
          const usedRows = await tx.query<{ committed: string; reserved: string; live: string; held: string }>(
            `WITH scope_ids AS (${scopeIds}), open_leases AS (
               SELECT greatest(granted_nanos - recorded_nanos, 0) AS unrecorded, holder, expires_at FROM budget_leases
               WHERE released_at IS NULL AND scope = $4
                 AND coalesce(api_key_id, org_id) IN (SELECT id FROM scope_ids)
                 AND period_start >= $7 AND expires_at > greatest($5::timestamptz, $10::timestamptz)
             )
             SELECT
               (${recordedUsage})
               + (SELECT coalesce(sum(spent_nanos - recorded_nanos), 0) FROM budget_leases
                  WHERE spent_nanos > recorded_nanos AND scope = $4
                    AND coalesce(api_key_id, org_id) IN (SELECT id FROM scope_ids)
                    AND settled_period_start IN ($6::timestamptz, $7::timestamptz)
                    AND (settled_period_start = $6 OR least(released_at, expires_at) > $10::timestamptz))
                 AS committed,
               (SELECT coalesce(sum(unrecorded), 0) FROM open_leases) AS reserved,
               (SELECT coalesce(sum(unrecorded) FILTER (WHERE expires_at > $9::timestamptz), 0) FROM open_leases) AS live,
               -- The asking holder's part of live, its expired leases aside: a restarted replica is not refused for
               -- leases of its past life.
               (SELECT coalesce(sum(unrecorded) FILTER (WHERE expires_at > $9::timestamptz AND holder = $8), 0)
                FROM open_leases) AS held`,
            [
              request.scopeId,
              utcDate(period.start),
              utcDate(period.end),
              request.scope,
              new Date(at.getTime() - graceMs),
              period.start,
              previousPeriodStart,
              request.holder,
              at,
              spilloverFrom,
            ],
          );
          const used = usedRows[0];
          const left = budget - BigInt(used?.committed ?? 0) - BigInt(used?.reserved ?? 0);
          const held = BigInt(used?.held ?? 0);
          const share = (left + held) / 2n + (tokens ? holderFloorTokens : holderFloorNanos) - held;
          // A request's own need is not held to the share: refusing it would not leave the money to anyone else.
          const allowed = share > request.neededNanos ? share : request.neededNanos;
          // An earlier grant of this lease is counted in `left` already, and is not granted again.
          if (!earlier) granted = [left, allowed].reduce((min, x) => (x < min ? x : min), request.requestedNanos);
          if (granted < 0n) granted = 0n;
          const after = earlier ? left : left - granted;
          remaining = after > 0n ? after : 0n;
          leased = BigInt(used?.live ?? 0) - held;
        }
        const answer = { grantedNanos: granted, expiresAt, remainingNanos: remaining, leasedNanos: leased };
        if (earlier) return { leaseId: earlier.id, ...answer, repeated: true };
        if (granted === 0n) return { leaseId: null, grantedNanos: 0n, expiresAt, remainingNanos: remaining, leasedNanos: leased };

        const leaseId = request.leaseId ?? `lease_${ulid()}`;
        const inserted = await tx.query(
          `INSERT INTO budget_leases (id, scope, org_id, api_key_id, holder, period_start, granted_nanos, created_at,
             expires_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
           ON CONFLICT (id) DO NOTHING RETURNING id`,
          [
            leaseId,
            request.scope,
            scope.org_id,
            request.scope === "organization" ? null : request.scopeId,
            request.holder,
            period.start,
            granted.toString(),
            at,
            expiresAt,
          ],
        );
        // Taken meanwhile by an ask of another scope, whose lock is not ours.
        if (inserted.length === 0) throw otherLease(leaseId);
        return { leaseId, grantedNanos: granted, expiresAt, remainingNanos: remaining, leasedNanos: leased };
      });
    },

    /**
     * Deletes the leases nothing reads again: expired, and settled in a period (their own while never released) that
     * started, more than `retentionDays` (at least `minLeaseRetentionDays`) ago by the database's clock, as grants judge
     * periods (a billing whose clock runs ahead would delete leases grants still count). No grant counts them, a
     * release naming one finds nothing to settle (its gateway stopped sending it an hour after expiry), and usage that
     * names one is recorded all the same; invoices are made from usage alone. In batches, so no statement holds many
     * rows locked. Returns how many went.
     */
    async pruneBudgetLeases(retentionDays: number): Promise<number> {
      const days = Math.max(retentionDays, minLeaseRetentionDays);
      let pruned = 0;
      for (;;) {
        const rows = await db.query<{ id: string }>(
          `WITH cutoff AS (SELECT coalesce($1::timestamptz, now()) - make_interval(days => $2) AS at), doomed AS (
             SELECT id FROM budget_leases, cutoff
             WHERE expires_at < cutoff.at AND coalesce(settled_period_start, period_start) < cutoff.at
             LIMIT ${pruneBatch} FOR UPDATE OF budget_leases SKIP LOCKED
           )
           DELETE FROM budget_leases l USING doomed WHERE l.id = doomed.id RETURNING l.id`,
          [clockAt(), days],
        );
        pruned += rows.length;
        if (rows.length < pruneBatch) return pruned;
      }
    },

    /**
     * Unreleased leases of current billing periods: still active, or expired without a release (holder gone), by the
     * database's clock as grants judge them. A query not answered within `timeoutMs` fails and gives its connection up.
     */
    async openBudgetLeases(timeoutMs?: number): Promise<{ active: number; abandoned: number }> {
      const rows = await db.query<{ active: number; abandoned: number }>(
        `WITH clock AS (SELECT coalesce($1::timestamptz, now()) AS at)
         SELECT count(*) FILTER (WHERE expires_at > at)::int AS active,
                count(*) FILTER (WHERE expires_at <= at)::int AS abandoned
         FROM budget_leases, clock WHERE released_at IS NULL AND period_start > at - interval '32 days'`,
        [clockAt()],
        timeoutMs,
      );
      return { active: rows[0]?.active ?? 0, abandoned: rows[0]?.abandoned ?? 0 };
    },

    /**
     * Settles a lease at what its holder spent: the rest returns to the pool, and what it spent beyond its recorded
     * usage counts until that usage is recorded. Releasing twice is a no-op. A lease released after its period ended,
     * having lived on into the next, settles in the next: its own period grants no more, and the next must count what
     * it spent there before that usage is recorded (all of it, as a release does not say when it was spent). Released
     * at the database's time (see `clock`), as grants judge lifetimes.
     */
    async releaseBudgetLease(release: { leaseId: string; spentNanos: bigint }): Promise<void> {
      const rows = await db.query<{ known: boolean }>(
        // Periods are whole months from the billing day (at most the 28th), so the next starts a month later.
        `WITH clock AS (SELECT coalesce($3::timestamptz, now()) AS at), lease AS (
           SELECT id, (period_start AT TIME ZONE 'UTC' + interval '1 month') AT TIME ZONE 'UTC' AS next_start
           FROM budget_leases WHERE id = $1
         ), released AS (
           UPDATE budget_leases l SET released_at = clock.at, spent_nanos = $2,
             settled_period_start = CASE WHEN clock.at >= lease.next_start AND l.expires_at > lease.next_start
               THEN lease.next_start ELSE l.period_start END
           FROM lease, clock WHERE l.id = lease.id AND l.released_at IS NULL
         )
         SELECT EXISTS (SELECT 1 FROM lease) AS known`,
        [release.leaseId, release.spentNanos.toString(), clockAt()],
      );
      if (!rows[0]?.known) throw new BillingError("not_found", `budget lease ${release.leaseId} not found`);
    },
  };
}

const otherLease = (leaseId: string) =>
  new BillingError("invalid_argument", `lease_id: ${leaseId} is another scope's or holder's lease, or was released`);

/**
 * The lease of this id already granted for `request`'s scope and holder, if any; a lease of another scope or holder, or
 * one already released, cannot be asked for again.
 */
async function grantedLease(
  tx: Queryable,
  request: BudgetLeaseRequest,
  leaseId: string,
): Promise<{ id: string; grantedNanos: bigint; expiresAt: Date } | undefined> {
  const rows = await tx.query<{
    scope: string;
    scope_id: string;
    holder: string;
    granted_nanos: string;
    expires_at: Date;
    released: boolean;
  }>(
    `SELECT scope, coalesce(api_key_id, org_id) AS scope_id, holder, granted_nanos, expires_at,
       released_at IS NOT NULL AS released
     FROM budget_leases WHERE id = $1`,
    [leaseId],
  );
  const lease = rows[0];
  if (!lease) return undefined;
  if (lease.scope !== request.scope || lease.scope_id !== request.scopeId || lease.holder !== request.holder) {
    throw otherLease(leaseId);
  }
  if (lease.released) throw otherLease(leaseId);
  return { id: leaseId, grantedNanos: BigInt(lease.granted_nanos), expiresAt: lease.expires_at };
}
