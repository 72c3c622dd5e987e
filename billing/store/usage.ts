import { endOfUtcDay, startOfUtcDay, utcDate } from "../period.ts";
import type { Db } from "./db.ts";
import type { TimeRange, UsageRecord, UsageTotals } from "./types.ts";

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
     * summaries grow by exactly the rows inserted, atomically with them.
     */
    async recordUsage(records: UsageRecord[]): Promise<{ inserted: number; duplicates: number }> {
      if (records.length === 0) return { inserted: 0, duplicates: 0 };
      const column = <T>(pick: (r: UsageRecord) => T) => records.map(pick);
      const rows = await db.query<{ inserted: number }>(
        `WITH batch AS (
           SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
             $8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[], $12::bigint[], $13::timestamptz[])
           AS r(request_id, org_id, project_id, api_key_id, model, provider, endpoint, input_tokens,
             cached_input_tokens, output_tokens, reasoning_tokens, cost_nanos, occurred_at)
         ), inserted AS (
           INSERT INTO usage_records (request_id, org_id, project_id, api_key_id, model, provider, endpoint,
             input_tokens, cached_input_tokens, output_tokens, reasoning_tokens, cost_nanos, occurred_at)
           -- A stable order keeps concurrent overlapping batches from deadlocking.
           SELECT * FROM batch ORDER BY request_id
           ON CONFLICT (request_id) DO NOTHING
           RETURNING org_id, project_id, api_key_id, occurred_at, input_tokens, cached_input_tokens, output_tokens,
             reasoning_tokens, cost_nanos
         ), summarised AS (
           INSERT INTO usage_summaries AS s (org_id, project_id, api_key_id, day, requests, input_tokens,
             cached_input_tokens, output_tokens, reasoning_tokens, cost_nanos)
           SELECT org_id, project_id, api_key_id, (occurred_at AT TIME ZONE 'UTC')::date, count(*), sum(input_tokens),
             sum(cached_input_tokens), sum(output_tokens), sum(reasoning_tokens), sum(cost_nanos)
           FROM inserted
           GROUP BY 1, 2, 3, 4
           ORDER BY 1, 2, 3, 4
           ON CONFLICT ON CONSTRAINT usage_summaries_key DO UPDATE SET
             requests = s.requests + excluded.requests,
             input_tokens = s.input_tokens + excluded.input_tokens,
             cached_input_tokens = s.cached_input_tokens + excluded.cached_input_tokens,
             output_tokens = s.output_tokens + excluded.output_tokens,
             reasoning_tokens = s.reasoning_tokens + excluded.reasoning_tokens,
             cost_nanos = s.cost_nanos + excluded.cost_nanos
         )
         SELECT count(*)::int AS inserted FROM inserted`,
        [
          column((r) => r.requestId),
          column((r) => r.orgId),
          column((r) => r.projectId),
          column((r) => r.apiKeyId),
          column((r) => r.model),
          column((r) => r.provider),
          column((r) => r.endpoint),
          column((r) => r.inputTokens.toString()),
          column((r) => r.cachedInputTokens.toString()),
          column((r) => r.outputTokens.toString()),
          column((r) => r.reasoningTokens.toString()),
          column((r) => r.costNanos.toString()),
          column((r) => r.occurredAt.toISOString()),
        ],
      );
      const inserted = rows[0]?.inserted ?? 0;
      return { inserted, duplicates: records.length - inserted };
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
    async listUsageRecords(query: UsageRecordQuery): Promise<{ records: UsageRecord[]; more: boolean }> {
      const rows = await db.query<UsageRecordRow>(
        `SELECT request_id, org_id, project_id, api_key_id, model, provider, endpoint, input_tokens,
           cached_input_tokens, output_tokens, reasoning_tokens, cost_nanos, occurred_at
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
          query.end,
          query.after?.occurredAt ?? null,
          query.after?.requestId ?? null,
          query.limit + 1,
        ],
      );
      return { records: rows.slice(0, query.limit).map(toUsageRecord), more: rows.length > query.limit };
    },

    /** Spend of an org and one of its keys, and the key's input+output tokens, over a period of whole UTC days. */
    async periodSpend(
      ids: { orgId: string; apiKeyId: string },
      period: TimeRange,
    ): Promise<{ orgSpentNanos: bigint; keySpentNanos: bigint; keyTokens: bigint }> {
      const rows = await db.query<{ org_spent: string; key_spent: string; key_tokens: string }>(
        `SELECT coalesce(sum(cost_nanos), 0) AS org_spent,
           coalesce(sum(cost_nanos) FILTER (WHERE api_key_id = $2), 0) AS key_spent,
           coalesce(sum(input_tokens + output_tokens) FILTER (WHERE api_key_id = $2), 0) AS key_tokens
         FROM usage_summaries
         WHERE org_id = $1 AND day >= $3::date AND day < $4::date`,
        [ids.orgId, ids.apiKeyId, utcDate(period.start), utcDate(period.end)],
      );
      const row = rows[0];
      return {
        orgSpentNanos: BigInt(row?.org_spent ?? 0),
        keySpentNanos: BigInt(row?.key_spent ?? 0),
        keyTokens: BigInt(row?.key_tokens ?? 0),
      };
    },
  };
}

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
