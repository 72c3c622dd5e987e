import { ulid } from "ulid";
import {
  buildInvoice,
  type DiscountGrant,
  type InvoiceContent,
  latePeriods,
  type UsageSlice,
} from "../invoices/build.ts";
import { billingPeriod } from "../period.ts";
import { BillingError, type Db, pageOf, type Queryable } from "./db.ts";
import { discountRulesOf } from "./discounts.ts";
import type { Invoice, InvoiceLine, InvoiceStatus, LineTokenType, Page, PageQuery } from "./types.ts";

interface InvoiceRow {
  id: string;
  org_id: string;
  org_name: string;
  number: string | null;
  status: InvoiceStatus;
  period_start: Date;
  period_end: Date;
  subtotal_cents: string;
  discount_cents: string;
  tax_cents: string;
  total_cents: string;
  tax_rate_bps: number;
  created_at: Date;
  issued_at: Date | null;
}

interface LineRow {
  description: string;
  model: string;
  token_type: LineTokenType;
  quantity: string;
  amount_nanos: string;
  discount_rule_id: string | null;
}

type SliceRow = { [K in keyof UsageSlice]: K extends "hour" ? Date : string };

const invoiceColumns = `id, org_id, org_name, number, status, period_start, period_end, subtotal_cents, discount_cents,
  tax_cents, total_cents, tax_rate_bps, created_at, issued_at`;

const allowedTransitions: Record<InvoiceStatus, InvoiceStatus[]> = {
  draft: ["issued", "void"],
  issued: ["paid", "void"],
  paid: [],
  void: [],
};

export function createInvoiceStore(db: Db) {
  const readInvoice = async (q: Queryable, invoiceId: string, lock = false): Promise<Invoice> => {
    const rows = await q.query<InvoiceRow>(
      `SELECT ${invoiceColumns} FROM invoices WHERE id = $1${lock ? " FOR UPDATE" : ""}`,
      [invoiceId],
    );
    if (!rows[0]) throw invoiceNotFound(invoiceId);
    const lines = await q.query<LineRow>(
      `SELECT description, model, token_type, quantity, amount_nanos, discount_rule_id
       FROM invoice_line_items WHERE invoice_id = $1 ORDER BY position`,
      [invoiceId],
    );
    return { ...toInvoice(rows[0]), lines: lines.map(toLine) };
  };

  return {
    /**
     * Builds the invoice of the billing period containing `at` from the usage and discount rules as they are now.
     * A draft of that period is replaced in place (same id and number); an issued or paid one is left alone and
     * the call fails. The draft shows the period's usage and, once the org has an issued invoice of an earlier
     * period, earlier usage that no issued invoice has billed and no draft of its own period waits for (late
     * arrivals, on lines of their own and discounted as part of their own period); issuing it bills exactly that
     * usage as of then (see updateInvoiceStatus).
     */
    generateInvoice(request: { orgId: string; at: Date; now: Date }): Promise<Invoice> {
      return db.transaction(async (tx) => {
        await lockOrgInvoices(tx, request.orgId);
        const org = await orgSettings(tx, request.orgId);
        const period = billingPeriod(request.at, org.billing_day);
        if (period.start > request.now) {
          // Its draft would bill the usage so far of periods before it as theirs, and take an invoice number.
          throw new BillingError(
            "failed_precondition",
            `the billing period starting ${period.start.toISOString()} has not begun; invoice this period or earlier ones`,
          );
        }
        const live = await tx.query<{ id: string; number: string | null; status: InvoiceStatus }>(
          "SELECT id, number, status FROM invoices WHERE org_id = $1 AND period_start = $2 AND status <> 'void'",
          [request.orgId, period.start],
        );
        const existing = live[0];
        if (existing && existing.status !== "draft") {
          throw new BillingError(
            "failed_precondition",
            existing.status === "paid"
              ? `invoice ${existing.number} of this period is paid, which closes the period: usage recorded for it ` +
                  "since is billed on the next invoice generated for a later period"
              : `invoice ${existing.number} of this period is already issued; void it to generate another`,
          );
        }

        const usage = await unbilledSlices(tx, request.orgId, period);
        const content = await compose(tx, request.orgId, org, period.start, usage);
        let invoiceId = existing?.id;
        if (!invoiceId) {
          invoiceId = `inv_${ulid()}`;
          await tx.query(
            `INSERT INTO invoices (id, org_id, org_name, status, period_start, period_end, subtotal_cents,
               discount_cents, tax_cents, total_cents, tax_rate_bps, created_at)
             VALUES ($1, $2, $3, 'draft', $4, $5, 0, 0, 0, 0, $6, $7)`,
            [invoiceId, request.orgId, org.name, period.start, period.end, org.tax_rate_bps, request.now],
          );
        }
        await replaceDraftContent(tx, invoiceId, content, org, request.now);
        return readInvoice(tx, invoiceId);
      });
    },

    /**
     * An org's invoices without their lines, newest period first (of a period, the newest created first); a page goes
     * on after the invoice it ended on, whose period, creation time and id never change (invoices are not deleted). A
     * token's cursor is the client's to write: one naming another org's invoice is as one naming none, an empty page.
     */
    async listInvoices(orgId: string, page: PageQuery): Promise<Page<Invoice>> {
      const rows = await db.query<InvoiceRow>(
        `SELECT ${invoiceColumns} FROM invoices
         WHERE org_id = $1 AND ($2::text IS NULL
           OR (period_start, created_at, id)
             < (SELECT period_start, created_at, id FROM invoices WHERE id = $2 AND org_id = $1))
         ORDER BY period_start DESC, created_at DESC, id DESC
         LIMIT $3`,
        [orgId, page.after, page.limit + 1],
      );
      if (rows.length === 0) {
        const org = await db.query("SELECT 1 FROM organizations WHERE id = $1", [orgId]);
        if (org.length === 0) throw new BillingError("not_found", `organization ${orgId} not found`);
      }
      return pageOf(rows.map(toInvoice), page);
    },

    getInvoice(invoiceId: string): Promise<Invoice> {
      // The invoice and its lines from one snapshot: a draft regenerated or issued between two reads would pair the
      // totals of one version with the lines of the next.
      return db.transaction(async (tx) => {
        await tx.query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY");
        return readInvoice(tx, invoiceId);
      });
    },

    /**
     * Moves an invoice along draft -> issued -> paid or to void; the same status again is a no-op. Issuing needs the
     * period to be over, since an issued invoice never changes; it claims the org's unbilled usage of its range (see
     * unbilledRange) and rebuilds the draft from exactly those records in the same transaction, so a record recorded meanwhile
     * is either on this invoice or left for the next, never both and never neither. Voiding an issued invoice
     * releases its records to the next invoice. The schema's trigger enforces the same transitions.
     */
    updateInvoiceStatus(request: { invoiceId: string; status: InvoiceStatus; now: Date }): Promise<Invoice> {
      return db.transaction(async (tx) => {
        const head = await tx.query<{ org_id: string }>("SELECT org_id FROM invoices WHERE id = $1", [request.invoiceId]);
        if (head[0]) await lockOrgInvoices(tx, head[0].org_id);
        const invoice = await readInvoice(tx, request.invoiceId, true);
        if (invoice.status === request.status) return invoice;
        if (!allowedTransitions[invoice.status].includes(request.status)) {
          throw new BillingError(
            "failed_precondition",
            `invoice ${invoiceName(invoice)} is ${invoice.status} and cannot become ${request.status}`,
          );
        }
        if (request.status === "issued" && invoice.periodEnd > request.now) {
          throw new BillingError(
            "failed_precondition",
            `invoice ${invoiceName(invoice)} cannot be issued before its period ends at ` +
              invoice.periodEnd.toISOString(),
          );
        }
        if (request.status === "issued") {
          // The invoice bills exactly the records it claims now: its draft is rebuilt from them first.
          const org = await orgSettings(tx, invoice.orgId);
          const usage = await claimUnbilledSlices(tx, invoice.orgId, { start: invoice.periodStart, end: invoice.periodEnd }, invoice.id);
          const content = await compose(tx, invoice.orgId, org, invoice.periodStart, usage);
          await replaceDraftContent(tx, invoice.id, content, org, invoice.createdAt);
        } else if (request.status === "void" && invoice.status === "issued") {
          // Its records go back to unbilled, for the invoice that replaces it.
          await tx.query(
            "UPDATE usage_records SET invoice_id = NULL WHERE org_id = $1 AND occurred_at < $2 AND invoice_id = $3",
            [invoice.orgId, invoice.periodEnd, invoice.id],
          );
        }
        const number = request.status === "issued" ? await nextInvoiceNumber(tx, invoice) : null;
        await tx.query(
          `UPDATE invoices SET status = $2, issued_at = CASE WHEN $2 = 'issued' THEN $3 ELSE issued_at END,
             number = coalesce($4, number)
           WHERE id = $1`,
          [request.invoiceId, request.status, request.now, number],
        );
        return readInvoice(tx, request.invoiceId);
      });
    },
  };
}

interface OrgSettings {
  name: string;
  billing_day: number;
  tax_rate_bps: number;
  max_discount_bps: number;
}

/**
 * Serialises invoice generation and status changes of one org, so numbers never collide and two invoices never claim
 * the same usage. An advisory lock rather than a row lock: usage inserts and lease grants keep going meanwhile.
 */
async function lockOrgInvoices(q: Queryable, orgId: string): Promise<void> {
  await q.query("SELECT pg_advisory_xact_lock(hashtextextended('billing.invoices:' || $1, 0))", [orgId]);
}

async function orgSettings(q: Queryable, orgId: string): Promise<OrgSettings> {
  const rows = await q.query<OrgSettings>(
    "SELECT name, billing_day, tax_rate_bps, max_discount_bps FROM organizations WHERE id = $1",
    [orgId],
  );
  if (!rows[0]) throw new BillingError("not_found", `organization ${orgId} not found`);
  return rows[0];
}

/**
 * Lines and totals over `usage` with the org's discount rules and tax as they are now. Usage of each period, the
 * invoice's own and those of late usage, is discounted against what issued invoices already billed and granted of
 * that period.
 */
async function compose(q: Queryable, orgId: string, org: OrgSettings, periodStart: Date, usage: UsageSlice[]) {
  const rules = await discountRulesOf(q, orgId);
  const periods = [billingPeriod(periodStart, org.billing_day), ...latePeriods(usage, periodStart, org.billing_day)];
  const billed = await billedSlices(q, orgId, periods);
  const granted = await grantedDiscounts(q, orgId, periods);
  return buildInvoice(usage, rules, {
    taxRateBps: org.tax_rate_bps,
    maxDiscountBps: org.max_discount_bps,
    period: { start: periodStart, billingDay: org.billing_day, billed, granted },
  });
}

/** Fills a draft with `content` and the org's name and tax rate as they are now. */
async function replaceDraftContent(
  q: Queryable,
  invoiceId: string,
  content: InvoiceContent,
  org: OrgSettings,
  createdAt: Date,
): Promise<void> {
  await q.query("DELETE FROM invoice_line_items WHERE invoice_id = $1", [invoiceId]);
  await q.query("DELETE FROM invoice_discount_grants WHERE invoice_id = $1", [invoiceId]);
  await q.query(
    `UPDATE invoices SET subtotal_cents = $2, discount_cents = $3, tax_cents = $4, total_cents = $5,
       tax_rate_bps = $6, org_name = $7, created_at = $8
     WHERE id = $1`,
    [
      invoiceId,
      content.subtotalCents.toString(),
      content.discountCents.toString(),
      content.taxCents.toString(),
      content.totalCents.toString(),
      org.tax_rate_bps,
      org.name,
      createdAt,
    ],
  );
  await insertLines(q, invoiceId, content.lines);
  if (content.grants.length > 0) {
    await q.query(
      `INSERT INTO invoice_discount_grants (invoice_id, period_start, discount_rule_id, amount_nanos)
       SELECT $1, * FROM unnest($2::timestamptz[], $3::text[], $4::bigint[])`,
      [
        invoiceId,
        content.grants.map((g) => g.periodStart),
        content.grants.map((g) => g.ruleId),
        content.grants.map((g) => g.amountNanos.toString()),
      ],
    );
  }
}

/**
 * The usage an invoice of the period [$2, $3) bills: its own period's, and earlier usage when the org has an issued
 * invoice of an earlier period, whose late arrivals (and those of any period skipped since) it then bills. Usage from
 * before an org's first issued invoice, and usage of an earlier period whose draft is waiting to be issued, is left to
 * invoices of its own period, so drafts may be issued in any order and each still bills what it showed.
 */
const unbilledRange = `org_id = $1 AND invoice_id IS NULL AND occurred_at < $3 AND occurred_at >= least($2,
  (SELECT min(period_start) FROM invoices WHERE org_id = $1 AND status IN ('issued', 'paid')))
  AND NOT EXISTS (SELECT 1 FROM invoices AS d WHERE d.org_id = $1 AND d.status = 'draft'
    AND usage_records.occurred_at >= d.period_start AND usage_records.occurred_at < least(d.period_end, $2))`;

/** Usage of an org in an invoice's range (see unbilledRange) that no issued invoice has billed yet. */
function unbilledSlices(q: Queryable, orgId: string, period: { start: Date; end: Date }): Promise<UsageSlice[]> {
  return slicesOf(q, `SELECT * FROM usage_records WHERE ${unbilledRange}`, [orgId, period.start, period.end]);
}

/** Marks the org's unbilled usage in the invoice's range as billed by it, in the same statement that sums it. */
function claimUnbilledSlices(
  q: Queryable,
  orgId: string,
  period: { start: Date; end: Date },
  invoiceId: string,
): Promise<UsageSlice[]> {
  return slicesOf(
    q,
    `UPDATE usage_records SET invoice_id = $4 WHERE ${unbilledRange} RETURNING *`,
    [orgId, period.start, period.end, invoiceId],
  );
}

/** Usage of an org in `periods` that issued or paid invoices billed. */
function billedSlices(q: Queryable, orgId: string, periods: { start: Date; end: Date }[]): Promise<UsageSlice[]> {
  return slicesOf(
    q,
    `SELECT u.* FROM unnest($2::timestamptz[], $3::timestamptz[]) AS p(start, "end")
     JOIN usage_records u ON u.org_id = $1 AND u.occurred_at >= p.start AND u.occurred_at < p."end"
     WHERE u.invoice_id IN (SELECT id FROM invoices WHERE org_id = $1 AND status IN ('issued', 'paid'))`,
    [orgId, periods.map((p) => p.start), periods.map((p) => p.end)],
  );
}

/** What issued or paid invoices of an org discounted of the usage of `periods`, per period and rule. */
async function grantedDiscounts(q: Queryable, orgId: string, periods: { start: Date }[]): Promise<DiscountGrant[]> {
  const rows = await q.query<{ period_start: Date; discount_rule_id: string; amount_nanos: string }>(
    `SELECT g.period_start, g.discount_rule_id, sum(g.amount_nanos)::text AS amount_nanos
     FROM invoice_discount_grants g JOIN invoices i ON i.id = g.invoice_id
     WHERE i.org_id = $1 AND i.status IN ('issued', 'paid') AND g.period_start = ANY($2::timestamptz[])
     GROUP BY 1, 2`,
    [orgId, periods.map((p) => p.start)],
  );
  return rows.map((r) => ({
    periodStart: r.period_start,
    ruleId: r.discount_rule_id,
    amountNanos: BigInt(r.amount_nanos),
  }));
}

/** The records `source` yields (a query or a data-modifying statement) per UTC hour, model and provider. */
async function slicesOf(q: Queryable, source: string, params: unknown[]): Promise<UsageSlice[]> {
  const rows = await q.query<SliceRow>(
    `WITH source AS (${source})
     SELECT date_trunc('hour', occurred_at, 'UTC') AS hour, model, provider,
       sum(cost_nanos)::text AS "costNanos",
       coalesce(sum(input_tokens - cached_input_tokens) FILTER (WHERE itemised), 0)::text AS "inputTokens",
       coalesce(sum(cached_input_tokens) FILTER (WHERE itemised), 0)::text AS "cachedInputTokens",
       coalesce(sum(output_tokens - reasoning_tokens) FILTER (WHERE itemised), 0)::text AS "outputTokens",
       coalesce(sum(reasoning_tokens) FILTER (WHERE itemised), 0)::text AS "reasoningTokens",
       coalesce(sum(input_cost_nanos), 0)::text AS "inputNanos",
       coalesce(sum(cached_input_cost_nanos), 0)::text AS "cachedInputNanos",
       coalesce(sum(output_cost_nanos), 0)::text AS "outputNanos",
       coalesce(sum(reasoning_cost_nanos), 0)::text AS "reasoningNanos",
       coalesce(sum(input_tokens + output_tokens) FILTER (WHERE NOT itemised), 0)::text AS "unitemisedTokens",
       coalesce(sum(cost_nanos) FILTER (WHERE NOT itemised), 0)::text AS "unitemisedNanos"
     FROM (SELECT *, input_cost_nanos IS NOT NULL AS itemised FROM source) AS r
     GROUP BY 1, 2, 3
     ORDER BY 1, 2, 3`,
    params,
  );
  return rows.map((row) => ({
    hour: row.hour,
    model: row.model,
    provider: row.provider,
    costNanos: BigInt(row.costNanos),
    inputTokens: BigInt(row.inputTokens),
    cachedInputTokens: BigInt(row.cachedInputTokens),
    outputTokens: BigInt(row.outputTokens),
    reasoningTokens: BigInt(row.reasoningTokens),
    inputNanos: BigInt(row.inputNanos),
    cachedInputNanos: BigInt(row.cachedInputNanos),
    outputNanos: BigInt(row.outputNanos),
    reasoningNanos: BigInt(row.reasoningNanos),
    unitemisedTokens: BigInt(row.unitemisedTokens),
    unitemisedNanos: BigInt(row.unitemisedNanos),
  }));
}

async function insertLines(q: Queryable, invoiceId: string, lines: InvoiceLine[]): Promise<void> {
  if (lines.length === 0) return;
  await q.query(
    `INSERT INTO invoice_line_items (invoice_id, position, description, model, token_type, quantity, amount_nanos,
       discount_rule_id)
     SELECT $1, ordinality - 1, d, m, t, qty, amt, rule
     FROM unnest($2::text[], $3::text[], $4::text[], $5::bigint[], $6::bigint[], $7::text[])
       WITH ORDINALITY AS l(d, m, t, qty, amt, rule)`,
    [
      invoiceId,
      lines.map((l) => l.description),
      lines.map((l) => l.model),
      lines.map((l) => l.tokenType),
      lines.map((l) => l.quantity.toString()),
      lines.map((l) => l.amountNanos.toString()),
      lines.map((l) => l.discountRuleId),
    ],
  );
}

/**
 * The number an invoice is issued with: its period's month and the org's last number plus one (the caller holds the
 * org's invoice lock), so an org's issued invoices are numbered in the order they were issued, without gaps.
 */
async function nextInvoiceNumber(q: Queryable, invoice: Invoice): Promise<string> {
  const rows = await q.query<{ last: string }>(
    `SELECT coalesce(max((regexp_match(number, '([0-9]+)$'))[1]::bigint), 0)::text AS last
     FROM invoices WHERE org_id = $1 AND number IS NOT NULL`,
    [invoice.orgId],
  );
  const sequence = String(BigInt(rows[0]?.last ?? "0") + 1n).padStart(4, "0");
  return `INV-${invoice.periodStart.toISOString().slice(0, 7)}-${sequence}`;
}

/** How messages name an invoice: its number, or a draft's id. */
function invoiceName(invoice: Invoice): string {
  return invoice.number ?? `draft ${invoice.id}`;
}

function toInvoice(row: InvoiceRow): Invoice {
  return {
    id: row.id,
    orgId: row.org_id,
    orgName: row.org_name,
    number: row.number,
    status: row.status,
    periodStart: row.period_start,
    periodEnd: row.period_end,
    lines: [],
    subtotalCents: BigInt(row.subtotal_cents),
    discountCents: BigInt(row.discount_cents),
    taxCents: BigInt(row.tax_cents),
    totalCents: BigInt(row.total_cents),
    taxRateBps: row.tax_rate_bps,
    createdAt: row.created_at,
    issuedAt: row.issued_at,
  };
}

function toLine(row: LineRow): InvoiceLine {
  return {
    description: row.description,
    model: row.model,
    tokenType: row.token_type,
    quantity: BigInt(row.quantity),
    amountNanos: BigInt(row.amount_nanos),
    discountRuleId: row.discount_rule_id,
  };
}

/** The answer for an invoice that does not exist, and for one of another org (see BillingAuth.requireOwnRecord). */
export const invoiceNotFound = (invoiceId: string) => new BillingError("not_found", `invoice ${invoiceId} not found`);
