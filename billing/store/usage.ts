import { endOfUtcDay, startOfUtcDay, utcDate } from "../period.ts";
import { type Db, pageOf } from "./db.ts";
import type { CostBreakdown, Page, RecordedUsage, TimeRange, UsageRecord, UsageTotals } from "./types.ts";

const totalsColumns = `coalesce(sum(requests), 0) AS requests,
  coalesce(sum(input_tokens), 0) AS input_tokens,
  coalesce(sum(cached_input_tokens), 0) AS cached_input_tokens,
  coalesce(sum(output_tokens), 0) AS output_tokens,
  coalesce(sum(reasoning_tokens), 0) AS reasoning_tokens,
  coalesce(sum(cost_nanos), 0) AS cost_nanos`;

interface TotalsRow {
  requests: string;
  input_tokens: string;
  cached_input_tokens: string;
  output_tokens: string;
  reasoning_tokens: string;
  cost_nanos: string;
}

/** Where a page of usage records continues: after this record in newest-first order. */
export interface UsageCursor {
  occurredAt: Date;
  requestId: string;
}

export interface UsageRecordQuery {
  orgId: string;
  requestId: string | null;
  start: Date | null;
  end: Date | null;
  after: UsageCursor | null;
  limit: number;
}

interface UsageRecordRow {
  request_id: string;
  org_id: string;
  project_id: string | null;
  api_key_id: string | null;
  model: string;
  provider: string;
  endpoint: UsageRecord["endpoint"];
  input_tokens: string;
  cached_input_tokens: string;
  output_tokens: string;
  reasoning_tokens: string;
  cost_nanos: string;
  occurred_at: Date;
  input_cost_nanos: string | null;
  cached_input_cost_nanos: string | null;
  output_cost_nanos: string | null;
  reasoning_cost_nanos: string | null;
}

interface AddedRow {
  org_id: string;
  api_key_id: string | null;
  day: string;
  requests: number;
  cost_nanos: string;
  tokens: string;
  xid: string;
}

export interface PeriodUsage {
  orgSpentNanos: bigint;
  /** Per key asked about that has usage in the period. */
  keys: Map<string, { spentNanos: bigint; tokens: bigint }>;
  /** The snapshot the figures were read in, as Postgres prints a pg_snapshot ("xmin:xmax:xip,..."). */
  snapshot: string;
}

export interface UsageFilter {
  orgId: string;
  projectId?: string | null;
  apiKeyId?: string | null;
}

export function createUsageStore(db: Db) {
  return {
    /**
     * Stores a batch in one statement: rows whose request_id is already known are skipped, and the daily
     * summaries, the orgs' daily spend and the recorded spend of the budget leases they were drawn from grow by exactly
     * the rows inserted, atomically with them. A lease's recorded spend counts only usage dated in its period or later:
     * what it paid for a request begun before its period stays counted in its period as released spend.
     */
    async recordUsage(batch: UsageRecord[]): Promise<RecordedUsage> {
      if (batch.length === 0) return { inserted: 0, duplicates: 0, xid: "", added: [] };
      // A request sent twice in one batch (a resend landing in the flush that holds the original) is inserted once;
      // its budget charges must be counted once too, so the batch keeps its first copy only.
      const seen = new Set<string>();
      const records = batch.filter((r) => !seen.has(r.requestId) && seen.add(r.requestId));
      const column = (pick: (r: UsageRecord) => string | null) => arrayLiteral(records.map(pick));
      // Numbers, and NULL, need no quoting in an array literal.
      const plain = (pick: (r: UsageRecord) => bigint | number | "NULL") => `{${records.map(pick).join(",")}}`;
      const amounts = (pick: (r: UsageRecord) => bigint) => plain((r) => decimal(pick(r)));
      // unnest pads shorter arrays with NULLs, so a batch without breakdowns sends empty arrays.
      const itemised = records.some((r) => r.costBreakdown);
      const charges = records.flatMap((r) =>
        (r.budgetCharges ?? []).map((c) => ({ requestId: r.requestId, leaseId: c.leaseId, nanos: c.nanos })),
      );
      const part = (pick: (b: CostBreakdown) => bigint) =>
        itemised ? plain((r) => (r.costBreakdown ? decimal(pick(r.costBreakdown)) : "NULL")) : "{}";
      const rows = await db.query<AddedRow>(
        `WITH batch AS (
           SELECT request_id, org_id, project_id, api_key_id, model, provider, endpoint, input_tokens,
             cached_input_tokens, output_tokens, reasoning_tokens, cost_nanos,
             -- Sent as milliseconds since 1970: exact in every year 1..9999, and cheaper to read than ISO text.
             to_timestamp(occurred_ms / 1000) + occurred_ms % 1000 * interval '1 millisecond' AS occurred_at,
             input_cost_nanos, cached_input_cost_nanos, output_cost_nanos, reasoning_cost_nanos
           FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
             $8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[], $12::bigint[], $13::bigint[],
             $14::bigint[], $15::bigint[], $16::bigint[], $17::bigint[])
           AS r(request_id, org_id, project_id, api_key_id, model, provider, endpoint, input_tokens,
             cached_input_tokens, output_tokens, reasoning_tokens, cost_nanos, occurred_ms, input_cost_nanos,
             cached_input_cost_nanos, output_cost_nanos, reasoning_cost_nanos)
         ), inserted AS (
           INSERT INTO usage_records (request_id, org_id, project_id, api_key_id, model, provider, endpoint,
             input_tokens, cached_input_tokens, output_tokens, reasoning_tokens, cost_nanos, occurred_at,
             input_cost_nanos, cached_input_cost_nanos, output_cost_nanos, reasoning_cost_nanos)
           -- A stable order keeps concurrent overlapping batches from deadlocking; bytewise is enough and cheapest.
           SELECT * FROM batch ORDER BY request_id COLLATE "C"
           ON CONFLICT (request_id) DO NOTHING
           RETURNING request_id, org_id, project_id, api_key_id, occurred_at, input_tokens, cached_input_tokens,
             output_tokens, reasoning_tokens, cost_nanos
         ), charges AS (
           -- What the newly recorded requests drew from each budget lease (a resent request adds nothing again).
           -- Usage dated before its lease's period (begun before a period edge, granted after it) counts in an
           -- earlier period than the grant: it stays unrecorded on the lease, which keeps it spent in its own period.
           SELECT c.lease_id, sum(c.nanos) AS nanos
           FROM unnest($18::text[], $19::text[], $20::bigint[]) AS c(request_id, lease_id, nanos)
           JOIN inserted USING (request_id)
           JOIN budget_leases l ON l.id = c.lease_id AND inserted.occurred_at >= l.period_start
           GROUP BY c.lease_id
         ), locked AS (
           -- Locked in one order, so concurrent batches charging the same leases cannot deadlock.
           SELECT id FROM budget_leases WHERE id IN (SELECT lease_id FROM charges) ORDER BY id FOR NO KEY UPDATE
         ), recorded AS (
           UPDATE budget_leases l SET recorded_nanos = l.recorded_nanos + charges.nanos
           FROM charges JOIN locked ON locked.id = charges.lease_id
           WHERE l.id = charges.lease_id
         ), added AS (
           SELECT org_id, project_id, api_key_id, (occurred_at AT TIME ZONE 'UTC')::date AS day, count(*) AS requests,
             sum(input_tokens) AS input_tokens, sum(cached_input_tokens) AS cached_input_tokens,
             sum(output_tokens) AS output_tokens, sum(reasoning_tokens) AS reasoning_tokens,
             sum(cost_nanos) AS cost_nanos
           FROM inserted
           GROUP BY 1, 2, 3, 4
         ), summarised AS (
           INSERT INTO usage_summaries AS s (org_id, project_id, api_key_id, day, requests, input_tokens,
             cached_input_tokens, output_tokens, reasoning_tokens, cost_nanos)
           SELECT * FROM added
           ORDER BY 1, 2, 3, 4
           ON CONFLICT ON CONSTRAINT usage_summaries_key DO UPDATE SET
             requests = s.requests + excluded.requests,
             input_tokens = s.input_tokens + excluded.input_tokens,
             cached_input_tokens = s.cached_input_tokens + excluded.cached_input_tokens,
             output_tokens = s.output_tokens + excluded.output_tokens,
             reasoning_tokens = s.reasoning_tokens + excluded.reasoning_tokens,
             cost_nanos = s.cost_nanos + excluded.cost_nanos
         ), org_days AS (
           -- After the summaries, in one order in every batch, so concurrent batches cannot deadlock on an org's day.
           INSERT INTO usage_org_days AS d (org_id, day, cost_nanos)
           SELECT org_id, day, sum(cost_nanos) FROM added GROUP BY 1, 2
           ORDER BY 1, 2
           ON CONFLICT (org_id, day) DO UPDATE SET cost_nanos = d.cost_nanos + excluded.cost_nanos
         )
         SELECT org_id, api_key_id, day::text AS day, requests::int AS requests, cost_nanos::text AS cost_nanos,
           (input_tokens + output_tokens)::text AS tokens, pg_current_xact_id()::text AS xid
         FROM added`,
        [
          column((r) => r.requestId),
          column((r) => r.orgId),
          column((r) => r.projectId),
          column((r) => r.apiKeyId),
          column((r) => r.model),
          column((r) => r.provider),
          column((r) => r.endpoint),
          amounts((r) => r.inputTokens),
          amounts((r) => r.cachedInputTokens),
          amounts((r) => r.outputTokens),
          amounts((r) => r.reasoningTokens),
          amounts((r) => r.costNanos),
          plain((r) => r.occurredAt.getTime()),
          part((b) => b.inputNanos),
          part((b) => b.cachedInputNanos),
          part((b) => b.outputNanos),
          part((b) => b.reasoningNanos),
          arrayLiteral(charges.map((c) => c.requestId)),
          arrayLiteral(charges.map((c) => c.leaseId)),
          `{${charges.map((c) => decimal(c.nanos)).join(",")}}`,
        ],
      );
      const inserted = rows.reduce((sum, row) => sum + row.requests, 0);
      return {
        inserted,
        duplicates: batch.length - inserted,
        xid: rows[0]?.xid ?? "",
        added: rows.map((row) => ({
          orgId: row.org_id,
          apiKeyId: row.api_key_id,
          day: row.day,
          costNanos: BigInt(row.cost_nanos),
          tokens: BigInt(row.tokens),
        })),
      };
    },

    /**
     * Totals over [start, end): whole UTC days come from the daily summaries, the partial days at either
     * edge from the usage rows themselves, so any range is exact.
     */
    async usageTotals(filter: UsageFilter, range: TimeRange): Promise<UsageTotals> {
      const firstDay = endOfUtcDay(range.start);
      const lastDay = startOfUtcDay(range.end);
      const wholeDays = firstDay < lastDay;
      const [daysFrom, daysTo] = wholeDays ? [firstDay, lastDay] : [range.start, range.start];
      const head = wholeDays ? { start: range.start, end: firstDay } : range;
      const tail = wholeDays ? { start: lastDay, end: range.end } : { start: range.end, end: range.end };
      const rows = await db.query<TotalsRow>(
        `SELECT ${totalsColumns} FROM (
           SELECT requests, input_tokens, cached_input_tokens, output_tokens, reasoning_tokens, cost_nanos
           FROM usage_summaries
           WHERE org_id = $1 AND ($2::text IS NULL OR project_id = $2) AND ($3::text IS NULL OR api_key_id = $3)
             AND day >= $4::date AND day < $5::date
           UNION ALL
           SELECT 1, input_tokens, cached_input_tokens, output_tokens, reasoning_tokens, cost_nanos
           FROM usage_records
           WHERE org_id = $1 AND ($2::text IS NULL OR project_id = $2) AND ($3::text IS NULL OR api_key_id = $3)
             AND ((occurred_at >= $6 AND occurred_at < $7) OR (occurred_at >= $8 AND occurred_at < $9))
         ) AS parts`,
        [
          filter.orgId,
          filter.projectId ?? null,
          filter.apiKeyId ?? null,
          utcDate(daysFrom),
          utcDate(daysTo),
          head.start,
          head.end,
          tail.start,
          tail.end,
        ],
      );
      return toTotals(rows[0] as TotalsRow);
    },

    /** Up to `limit` records of an org, newest first, and whether more follow. */
    async listUsageRecords(query: UsageRecordQuery): Promise<Page<UsageRecord>> {
      // A cursor before the end bounds the page alone: given both, Postgres began its backward index scan at the end
      // and read every record after the cursor, so each page of a range was slower than the one before.
      const end = query.after && query.end && query.after.occurredAt < query.end ? null : query.end;
      const rows = await db.query<UsageRecordRow>(
        `SELECT request_id, org_id, project_id, api_key_id, model, provider, endpoint, input_tokens,
           cached_input_tokens, output_tokens, reasoning_tokens, cost_nanos, occurred_at, input_cost_nanos,
           cached_input_cost_nanos, output_cost_nanos, reasoning_cost_nanos
         FROM usage_records
         WHERE org_id = $1
           AND ($2::text IS NULL OR request_id = $2)
           AND ($3::timestamptz IS NULL OR occurred_at >= $3)
           AND ($4::timestamptz IS NULL OR occurred_at < $4)
           AND ($5::timestamptz IS NULL OR (occurred_at, request_id) < ($5, $6::text))
         ORDER BY occurred_at DESC, request_id DESC
         LIMIT $7`,
        [
          query.orgId,
          query.requestId,
          query.start,
          end,
          query.after?.occurredAt ?? null,
          query.after?.requestId ?? null,
          query.limit + 1,
        ],
      );
      return pageOf(rows.map(toUsageRecord), query);
    },

    /**
     * Spend of an org, and spend and input+output tokens of each of `keyIds`, over a period of whole UTC days, and the
     * snapshot they were read in (Postgres pg_snapshot text), which tells later transactions from included ones. The
     * org's from its daily spend and the keys' from their own daily summaries: neither reads the org's other keys.
     */
    async periodUsage(orgId: string, period: TimeRange, keyIds: readonly string[]): Promise<PeriodUsage> {
      type Row = { api_key_id: string | null; spent: string | null; tokens: string | null; snapshot: string | null };
      const rows = await db.query<Row>(
        `SELECT NULL AS api_key_id, coalesce(sum(cost_nanos), 0)::text AS spent, NULL AS tokens,
           pg_current_snapshot()::text AS snapshot
         FROM usage_org_days
         WHERE org_id = $1 AND day >= $2::date AND day < $3::date
         UNION ALL
         SELECT api_key_id, sum(cost_nanos)::text, sum(input_tokens + output_tokens)::text, NULL
         FROM usage_summaries
         WHERE api_key_id = ANY($4::text[]) AND day >= $2::date AND day < $3::date
         GROUP BY api_key_id`,
        [orgId, utcDate(period.start), utcDate(period.end), arrayLiteral(keyIds)],
      );
      const keys = new Map<string, { spentNanos: bigint; tokens: bigint }>();
      let orgSpentNanos = 0n;
      let snapshot = "";
      for (const row of rows) {
        if (row.api_key_id === null) {
          orgSpentNanos = BigInt(row.spent ?? 0);
          snapshot = row.snapshot ?? "";
        } else {
          keys.set(row.api_key_id, { spentNanos: BigInt(row.spent ?? 0), tokens: BigInt(row.tokens ?? 0) });
        }
      }
      return { orgSpentNanos, keys, snapshot };
    },
  };
}

/**
 * A bigint as a Number where that is exact, as every count and amount the schema takes is: Numbers print in half the
 * time. Others stay bigints, for Postgres to refuse as before.
 */
function decimal(value: bigint): number | bigint {
  const number = Number(value);
  return Number.isSafeInteger(number) ? number : value;
}

/**
 * A Postgres array literal of text values (NULL for null), quoted and escaped. Written out here because pg's generic
 * array serialiser, two regex replaces per element, was the largest cost of RecordUsage after protobuf decoding.
 */
export function arrayLiteral(values: readonly (string | null)[]): string {
  // Most columns (ids, models, endpoints) hold no NULL and nothing to escape: one join quotes all their values.
  if (values.length > 0 && values.every((value) => typeof value === "string" && !needsEscape.test(value))) {
    return `{"${values.join('","')}"}`;
  }
  let out = "{";
  for (let i = 0; i < values.length; i++) {
    const value = values[i];
    if (i > 0) out += ",";
    if (value === null || value === undefined) out += "NULL";
    else out += `"${needsEscape.test(value) ? value.replace(escapable, "\\$&") : value}"`;
  }
  return `${out}}`;
}

const needsEscape = /["\\]/;
const escapable = /["\\]/g;

function toUsageRecord(row: UsageRecordRow): UsageRecord {
  return {
    requestId: row.request_id,
    orgId: row.org_id,
    projectId: row.project_id,
    apiKeyId: row.api_key_id,
    model: row.model,
    provider: row.provider,
    endpoint: row.endpoint,
    inputTokens: BigInt(row.input_tokens),
    cachedInputTokens: BigInt(row.cached_input_tokens),
    outputTokens: BigInt(row.output_tokens),
    reasoningTokens: BigInt(row.reasoning_tokens),
    costNanos: BigInt(row.cost_nanos),
    occurredAt: row.occurred_at,
    costBreakdown:
      row.input_cost_nanos === null
        ? null
        : {
            inputNanos: BigInt(row.input_cost_nanos),
            cachedInputNanos: BigInt(row.cached_input_cost_nanos ?? 0),
            outputNanos: BigInt(row.output_cost_nanos ?? 0),
            reasoningNanos: BigInt(row.reasoning_cost_nanos ?? 0),
          },
  };
}

function toTotals(row: TotalsRow): UsageTotals {
  return {
    requests: BigInt(row.requests),
    inputTokens: BigInt(row.input_tokens),
    cachedInputTokens: BigInt(row.cached_input_tokens),
    outputTokens: BigInt(row.output_tokens),
    reasoningTokens: BigInt(row.reasoning_tokens),
    costNanos: BigInt(row.cost_nanos),
  };
}
