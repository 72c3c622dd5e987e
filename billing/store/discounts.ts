import { ulid } from "ulid";
import { BillingError, type Db, pageOf, type Queryable, requestSha256 } from "./db.ts";
import type { DiscountKind, DiscountRule, DiscountRuleCursor, NewDiscountRule, Page, PageQuery } from "./types.ts";

interface RuleRow {
  id: string;
  org_id: string;
  name: string;
  kind: DiscountKind;
  priority: number;
  stackable: boolean;
  model: string | null;
  provider: string | null;
  discount_bps: number;
  start_hour: number;
  end_hour: number;
  days_of_week: number[];
  valid_from: Date | null;
  valid_until: Date | null;
  cap_nanos: string;
  created_at: Date;
  /** [from_nanos, discount_bps] pairs, ascending. */
  tiers: [string, number][];
}

const ruleSelect = `SELECT r.id, r.org_id, r.name, r.kind, r.priority, r.stackable, r.model, r.provider, r.discount_bps,
    r.start_hour, r.end_hour, r.days_of_week, r.valid_from, r.valid_until, r.cap_nanos, r.created_at,
    coalesce((SELECT json_agg(json_build_array(t.from_nanos::text, t.discount_bps) ORDER BY t.from_nanos)
              FROM discount_tiers t WHERE t.rule_id = r.id), '[]') AS tiers
  FROM discount_rules r`;

/** Discount rules of an org, highest priority first. */
export async function discountRulesOf(q: Queryable, orgId: string): Promise<DiscountRule[]> {
  const rows = await q.query<RuleRow>(`${ruleSelect} WHERE r.org_id = $1 ORDER BY r.priority DESC, r.id`, [orgId]);
  return rows.map(toRule);
}

/**
 * Most discount rules an org may have. Every invoice of the org weighs each rule against each hour of its usage, while
 * holding the org's invoice lock: a thousand rules took over a second a pass.
 */
export const maxDiscountRulesPerOrg = 100;

export function createDiscountStore(db: Db) {
  return {
    /**
     * Stores a rule and its tiers together. With a `requestId` its org used before, stores nothing and answers with the
     * rule stored then, or already_exists when that was another rule; of two at once, one stores and the other waits.
     * A rule past an org's maxDiscountRulesPerOrg is refused (failed_precondition), a request_id's answer is not.
     */
    createDiscountRule(rule: NewDiscountRule, requestId: string | null = null): Promise<DiscountRule> {
      const sha256 = requestId === null ? null : requestSha256(rule);
      return db.transaction(async (tx) => {
        const id = `disc_${ulid()}`;
        // Creates for one org one at a time, so two at once cannot both take its last place.
        await tx.query("SELECT pg_advisory_xact_lock(hashtextextended('billing.discount_rules:' || $1, 0))", [rule.orgId]);
        const inserted = await tx.query(
          `INSERT INTO discount_rules (id, org_id, name, kind, priority, stackable, model, provider, discount_bps,
             start_hour, end_hour, days_of_week, valid_from, valid_until, cap_nanos, request_id, request_sha256)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)
           ON CONFLICT (org_id, request_id) DO NOTHING RETURNING id`,
          [
            id,
            rule.orgId,
            rule.name,
            rule.kind,
            rule.priority,
            rule.stackable,
            rule.model,
            rule.provider,
            rule.discountBps,
            rule.startHour,
            rule.endHour,
            rule.daysOfWeek,
            rule.validFrom,
            rule.validUntil,
            rule.capNanos.toString(),
            requestId,
            sha256,
          ],
        );
        if (inserted.length === 0) {
          // Committed by the create that took the request_id first (this insert waited for it to end).
          const [earlier] = await tx.query<{ id: string; request_sha256: string }>(
            "SELECT id, request_sha256 FROM discount_rules WHERE org_id = $1 AND request_id = $2",
            [rule.orgId, requestId],
          );
          if (!earlier) throw new BillingError("unavailable", `request_id ${requestId}: its rule was deleted; retry`);
          if (earlier.request_sha256 !== sha256) {
            throw new BillingError(
              "already_exists",
              `request_id ${requestId} was already used to create discount rule ${earlier.id}, which differs from this`,
            );
          }
          const rows = await tx.query<RuleRow>(`${ruleSelect} WHERE r.id = $1`, [earlier.id]);
          return toRule(rows[0] as RuleRow);
        }
        const [held] = await tx.query<{ rules: number }>(
          "SELECT count(*)::int AS rules FROM discount_rules WHERE org_id = $1",
          [rule.orgId],
        );
        if ((held?.rules ?? 0) > maxDiscountRulesPerOrg) {
          throw new BillingError(
            "failed_precondition",
            `organization ${rule.orgId} has ${maxDiscountRulesPerOrg} discount rules, the most it may have: delete one first`,
          );
        }
        if (rule.tiers.length > 0) {
          await tx.query(
            `INSERT INTO discount_tiers (rule_id, from_nanos, discount_bps)
             SELECT $1, * FROM unnest($2::bigint[], $3::int[])`,
            [id, rule.tiers.map((t) => t.fromNanos.toString()), rule.tiers.map((t) => t.discountBps)],
          );
        }
        const rows = await tx.query<RuleRow>(`${ruleSelect} WHERE r.id = $1`, [id]);
        return toRule(rows[0] as RuleRow);
      });
    },

    /** Highest priority first, ties by id; a page goes on after where the last ended, that rule deleted or not. */
    async listDiscountRules(orgId: string, page: PageQuery<DiscountRuleCursor>): Promise<Page<DiscountRule>> {
      const rows = await db.query<RuleRow>(
        `${ruleSelect} WHERE r.org_id = $1
           AND ($2::int IS NULL OR r.priority < $2 OR (r.priority = $2 AND r.id > $3))
         ORDER BY r.priority DESC, r.id
         LIMIT $4`,
        [orgId, page.after?.priority ?? null, page.after?.id ?? null, page.limit + 1],
      );
      const rules = pageOf(rows.map(toRule), page);
      if (rules.items.length === 0) {
        const org = await db.query("SELECT 1 FROM organizations WHERE id = $1", [orgId]);
        if (org.length === 0) throw new BillingError("not_found", `organization ${orgId} not found`);
      }
      return rules;
    },

    /** Deletes a rule; invoices already generated keep the discount lines it produced. */
    async deleteDiscountRule(ruleId: string): Promise<void> {
      const rows = await db.query("DELETE FROM discount_rules WHERE id = $1 RETURNING id", [ruleId]);
      if (rows.length === 0) throw new BillingError("not_found", `discount rule ${ruleId} not found`);
    },
  };
}

function toRule(row: RuleRow): DiscountRule {
  return {
    id: row.id,
    orgId: row.org_id,
    name: row.name,
    kind: row.kind,
    priority: row.priority,
    stackable: row.stackable,
    model: row.model,
    provider: row.provider,
    discountBps: row.discount_bps,
    tiers: row.tiers.map(([fromNanos, discountBps]) => ({ fromNanos: BigInt(fromNanos), discountBps })),
    startHour: row.start_hour,
    endHour: row.end_hour,
    daysOfWeek: row.days_of_week,
    validFrom: row.valid_from,
    validUntil: row.valid_until,
    capNanos: BigInt(row.cap_nanos),
    createdAt: row.created_at,
  };
}
