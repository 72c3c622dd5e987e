import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import fc from "fast-check";
import pg from "pg";
import { billingPeriod } from "../../lib/billing-period.ts";
import { divRoundHalfUp, NANOS_PER_CENT, nanosToCents } from "../../lib/money.ts";
import { calculateDiscounts } from "../discounts/calculate.ts";
import { unscopedRule } from "../discounts/test-rules.ts";
import { type BillingError, createDb, type Queryable } from "./db.ts";
import { createInvoiceStore } from "./invoices.ts";
import { type BillingStore, createBillingStore } from "./store.ts";
import { allRows, createTestDatabase, type TestDatabase } from "./test-db.ts";
import type { DiscountRule, Invoice, NewDiscountRule, Organization, UsageRecord } from "./types.ts";

let db: TestDatabase;
let store: BillingStore;
beforeAll(async () => {
  db = await createTestDatabase();
  store = createBillingStore(db.pool);
}, 60_000);
afterAll(() => db.drop());

const march = new Date("2026-03-15T12:00:00Z");
const afterMarch = new Date("2026-04-02T00:00:00Z");
const kind = (e: unknown) => (e as BillingError).kind;

let orgs = 0;
const newOrg = (extra: Partial<Organization> = {}) =>
  store.createOrganization({
    name: `invoice-org-${++orgs}`,
    taxRateBps: 2000,
    billingDay: 1,
    monthlyBudgetNanos: 0n,
    maxDiscountBps: 0,
    ...extra,
  });

let requests = 0;
const usage = (orgId: string, overrides: Partial<UsageRecord> = {}): UsageRecord => ({
  requestId: `req_inv_${++requests}`,
  orgId,
  projectId: null,
  apiKeyId: null,
  model: "gpt-4o",
  provider: "openai",
  endpoint: "chat_completions",
  inputTokens: 1000n,
  cachedInputTokens: 200n,
  outputTokens: 500n,
  reasoningTokens: 100n,
  costNanos: 10_000_000n,
  occurredAt: march,
  costBreakdown: { inputNanos: 4_000_000n, cachedInputNanos: 500_000n, outputNanos: 4_500_000n, reasoningNanos: 1_000_000n },
  ...overrides,
});

test("an invoice itemises the period's usage per model and token type, with discounts and tax", async () => {
  const org = await newOrg();
  await store.recordUsage([
    usage(org.id),
    usage(org.id),
    usage(org.id, { model: "mini", costNanos: 333_333n, costBreakdown: null }),
    // Outside March: not on this invoice.
    usage(org.id, { occurredAt: new Date("2026-04-01T00:00:00Z") }),
    usage(org.id, { occurredAt: new Date("2026-02-28T23:59:59Z") }),
  ]);
  const rule = await store.createDiscountRule({
    orgId: org.id,
    name: "gpt-4o promo",
    kind: "promotional",
    discountBps: 2500,
    ...unscopedRule,
    model: "gpt-4o",
  });

  const invoice = await store.generateInvoice({ orgId: org.id, at: march, now: march });
  expect(invoice).toMatchObject({
    orgId: org.id,
    number: null,
    status: "draft",
    periodStart: new Date("2026-03-01T00:00:00Z"),
    periodEnd: new Date("2026-04-01T00:00:00Z"),
    taxRateBps: 2000,
    issuedAt: null,
  });
  expect(invoice.lines.map((l) => [l.tokenType, l.model, l.quantity, l.amountNanos, l.discountRuleId])).toEqual([
    ["input", "gpt-4o", 1600n, 8_000_000n, null],
    ["cached_input", "gpt-4o", 400n, 1_000_000n, null],
    ["output", "gpt-4o", 800n, 9_000_000n, null],
    ["reasoning", "gpt-4o", 200n, 2_000_000n, null],
    ["usage", "mini", 1500n, 333_333n, null],
    ["discount", "gpt-4o", 0n, -5_000_000n, rule.id],
  ]);
  // $0.020333333 -> 2 cents; $0.005 discount -> 1 cent (half-up); tax 20% of $0.015333333 -> 0 cents;
  // total $0.0183999996 -> 2 cents.
  expect(invoice).toMatchObject({ subtotalCents: 2n, discountCents: 1n, taxCents: 0n, totalCents: 2n });
  expect(await store.getInvoice(invoice.id)).toEqual(invoice);
});

test("a discount line of exactly 2^63-1 nano-USD is invoiced; one more nano-USD discounted fails in words, not wrapped", async () => {
  const org = await newOrg();
  const maxInt64 = 2n ** 63n - 1n;
  const maxCost = 10n ** 15n;
  // As the table holds them (each at most the per-request bound), one model's records adding up to exactly 2^63-1.
  const insert = (model: string, count: number, cost: bigint, from: number) =>
    db.pool.query(
      `INSERT INTO usage_records (request_id, org_id, model, provider, endpoint, input_tokens, cached_input_tokens,
         output_tokens, reasoning_tokens, cost_nanos, occurred_at)
       SELECT 'req_edge_' || $1 || '_' || i, $1, $2, 'p', 'chat_completions', 1, 0, 1, 0, $3, $4
       FROM generate_series($5::int, $5::int + $6::int - 1) AS i`,
      [org.id, model, String(cost), march.toISOString(), from, count],
    );
  const whole = maxInt64 / maxCost;
  await insert("big", Number(whole), maxCost, 0);
  await insert("big", 1, maxInt64 - whole * maxCost, Number(whole));
  await store.createDiscountRule({ ...unscopedRule, orgId: org.id, name: "all of it", kind: "promotional", discountBps: 10_000 });
  const invoice = await store.generateInvoice({ orgId: org.id, at: march, now: afterMarch });
  expect(invoice.lines.map((l) => [l.tokenType, l.amountNanos])).toEqual([
    ["usage", maxInt64],
    ["discount", -maxInt64],
  ]);
  expect(invoice).toMatchObject({ subtotalCents: nanosToCents(maxInt64), discountCents: nanosToCents(maxInt64), totalCents: 0n });
  // Another model's line fits, but the discount of both does not: the draft stays as it was.
  await insert("small", 1, 1n, Number(whole) + 1);
  const refused = await store.generateInvoice({ orgId: org.id, at: march, now: afterMarch }).catch((e: unknown) => e);
  expect([kind(refused), (refused as BillingError).message]).toEqual([
    "failed_precondition",
    "a total would exceed the largest amount billing can hold (2^63-1)",
  ]);
  expect(await store.getInvoice(invoice.id)).toEqual(invoice);
});

test("a period that has not begun is not invoiced: its draft would bill earlier usage as its own", async () => {
  const org = await newOrg();
  await store.recordUsage([usage(org.id)]);
  const april = new Date("2026-04-01T00:00:00Z");
  const early = await store.generateInvoice({ orgId: org.id, at: april, now: new Date(april.getTime() - 1) }).catch((e) => e);
  expect(kind(early)).toBe("failed_precondition");
  expect(String(early.message)).toContain("has not begun");
  expect((await store.listInvoices(org.id, allRows)).items).toEqual([]);
  expect((await store.generateInvoice({ orgId: org.id, at: april, now: april })).periodStart).toEqual(april);
});

test("regenerating a draft replaces it in place; issued invoices never change", async () => {
  const org = await newOrg();
  await store.recordUsage([usage(org.id)]);
  const draft = await store.generateInvoice({ orgId: org.id, at: march, now: march });
  await store.recordUsage([usage(org.id, { occurredAt: new Date("2026-03-31T23:00:00Z") })]);
  const later = new Date("2026-03-31T23:30:00Z");
  const regenerated = await store.generateInvoice({ orgId: org.id, at: march, now: later });
  expect(regenerated).toMatchObject({ id: draft.id, number: draft.number, createdAt: later });
  expect(regenerated.lines[0]?.quantity).toBe(2n * 800n);
  expect((await store.listInvoices(org.id, allRows)).items).toHaveLength(1);

  const tooEarly = await store.updateInvoiceStatus({ invoiceId: draft.id, status: "issued", now: later }).catch((e) => e);
  expect(kind(tooEarly)).toBe("failed_precondition");
  const issued = await store.updateInvoiceStatus({ invoiceId: draft.id, status: "issued", now: afterMarch });
  expect(issued).toMatchObject({ status: "issued", issuedAt: afterMarch });

  // More usage arrives for March: the issued invoice stays as it was.
  await store.recordUsage([usage(org.id)]);
  const again = await store.generateInvoice({ orgId: org.id, at: march, now: afterMarch }).catch((e) => e);
  expect(again).toMatchObject({
    kind: "failed_precondition",
    message: `invoice ${issued.number} of this period is already issued; void it to generate another`,
  });
  expect(await store.getInvoice(draft.id)).toEqual(issued);

  // Not even SQL behind billing's back can change it.
  const edits = [
    "UPDATE invoices SET total_cents = 0 WHERE id = $1",
    "UPDATE invoices SET org_name = 'renamed' WHERE id = $1",
    "UPDATE invoices SET status = 'draft' WHERE id = $1",
    "DELETE FROM invoices WHERE id = $1",
    "UPDATE invoice_line_items SET amount_nanos = 1 WHERE invoice_id = $1",
    "DELETE FROM invoice_line_items WHERE invoice_id = $1",
    `INSERT INTO invoice_line_items (invoice_id, position, description, token_type, quantity, amount_nanos)
     VALUES ($1, 99, 'extra', 'input', 1, 1)`,
  ];
  for (const sql of edits) {
    await expect(db.pool.query(sql, [draft.id])).rejects.toThrow(/issued/);
  }
  expect(await store.getInvoice(draft.id)).toEqual(issued);
});

test("an invoice read while its draft is regenerated is read as it was or as it is, never lines of one and totals of the other", async () => {
  const org = await newOrg();
  await store.recordUsage([usage(org.id)]);
  const draft = await store.generateInvoice({ orgId: org.id, at: march, now: march });
  // The regeneration (twice the usage) holds the lines until the read of the invoice waits for them, then commits.
  const regeneration = await db.pool.connect();
  try {
    await regeneration.query("BEGIN");
    await regeneration.query("LOCK TABLE invoice_line_items IN ACCESS EXCLUSIVE MODE");
    const read = store.getInvoice(draft.id);
    let waiting = 0;
    for (let i = 0; i < 200 && waiting === 0; i++) {
      if (i > 0) await Bun.sleep(10);
      const rows = await db.pool.query<{ n: number }>(
        "SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
      );
      waiting = rows.rows[0]?.n ?? 0;
    }
    expect(waiting).toBe(1);
    await regeneration.query(
      "UPDATE invoice_line_items SET quantity = quantity * 2, amount_nanos = amount_nanos * 2 WHERE invoice_id = $1",
      [draft.id],
    );
    await regeneration.query(
      `UPDATE invoices SET subtotal_cents = subtotal_cents * 2, tax_cents = tax_cents * 2, total_cents = total_cents * 2
       WHERE id = $1`,
      [draft.id],
    );
    await regeneration.query("COMMIT");
    expect(await read).toEqual(draft);
  } finally {
    regeneration.release();
  }
  const regenerated = await store.getInvoice(draft.id);
  expect([regenerated.subtotalCents, regenerated.lines[0]?.amountNanos]).toEqual([
    2n * draft.subtotalCents,
    2n * (draft.lines[0]?.amountNanos ?? 0n),
  ]);
});

test("a paid invoice closes its period: generating it again says so rather than asking for a void", async () => {
  const org = await newOrg();
  const draft = await store.generateInvoice({ orgId: org.id, at: march, now: march });
  await store.updateInvoiceStatus({ invoiceId: draft.id, status: "issued", now: afterMarch });
  const paid = await store.updateInvoiceStatus({ invoiceId: draft.id, status: "paid", now: afterMarch });
  const again = await store.generateInvoice({ orgId: org.id, at: march, now: afterMarch }).catch((e) => e);
  expect(again).toMatchObject({
    kind: "failed_precondition",
    message:
      `invoice ${paid.number} of this period is paid, which closes the period: usage recorded for it since is ` +
      "billed on the next invoice generated for a later period",
  });
  const voiding = store.updateInvoiceStatus({ invoiceId: draft.id, status: "void", now: afterMarch });
  expect(kind(await voiding.catch((e) => e))).toBe("failed_precondition");
});

test("status moves draft -> issued -> paid or to void, and nowhere else", async () => {
  const org = await newOrg();
  const set = (invoiceId: string, status: "draft" | "issued" | "paid" | "void") =>
    store.updateInvoiceStatus({ invoiceId, status, now: afterMarch });
  const draft = await store.generateInvoice({ orgId: org.id, at: march, now: march });
  expect(draft.lines).toEqual([]);
  expect(kind(await set(draft.id, "paid").catch((e) => e))).toBe("failed_precondition");
  expect((await set(draft.id, "draft")).status).toBe("draft");
  await set(draft.id, "issued");
  expect((await set(draft.id, "issued")).issuedAt).toEqual(afterMarch);
  const paid = await set(draft.id, "paid");
  expect(paid.status).toBe("paid");
  for (const status of ["draft", "issued", "void"] as const) {
    expect(kind(await set(draft.id, status).catch((e) => e))).toBe("failed_precondition");
  }

  // Voiding frees the period for a new invoice. Numbers are given at issue: a voided draft takes none, a voided
  // issued invoice keeps its own.
  const april = new Date("2026-04-10T00:00:00Z");
  const afterApril = new Date("2026-05-01T00:00:00Z");
  const first = await store.generateInvoice({ orgId: org.id, at: april, now: april });
  expect((await set(first.id, "void")).status).toBe("void");
  const second = await store.generateInvoice({ orgId: org.id, at: april, now: new Date(april.getTime() + 1_000) });
  const issue = (invoiceId: string) => store.updateInvoiceStatus({ invoiceId, status: "issued", now: afterApril });
  expect((await issue(second.id)).number).toBe("INV-2026-04-0002");
  expect((await set(second.id, "void")).number).toBe("INV-2026-04-0002");
  const third = await store.generateInvoice({ orgId: org.id, at: april, now: afterApril });
  expect(third.number).toBeNull();
  expect((await issue(third.id)).number).toBe("INV-2026-04-0003");
  expect((await store.listInvoices(org.id, allRows)).items.map((i) => [i.number, i.status])).toEqual([
    ["INV-2026-04-0003", "issued"],
    ["INV-2026-04-0002", "void"],
    [null, "void"],
    ["INV-2026-03-0001", "paid"],
  ]);
  expect(kind(await set("inv_missing", "void").catch((e) => e))).toBe("not_found");
  expect(kind(await store.getInvoice("inv_missing").catch((e) => e))).toBe("not_found");
  expect(kind(await store.listInvoices("org_missing", allRows).catch((e) => e))).toBe("not_found");
  expect(kind(await store.generateInvoice({ orgId: "org_missing", at: march, now: march }).catch((e) => e))).toBe(
    "not_found",
  );
});

test("invoice numbers are given at issue, unique per org and without gaps, by constraint and concurrently", async () => {
  const org = await newOrg();
  const other = await newOrg();
  const months = [1, 2, 3, 4, 5, 6].map((m) => new Date(Date.UTC(2026, m, 10)));
  const later = new Date(Date.UTC(2026, 8, 1));
  // Drafts take no number; issuing them all at once numbers them 1 to 6, each under its own period's month.
  const drafts = await Promise.all(months.map((at) => store.generateInvoice({ orgId: org.id, at, now: later })));
  expect(drafts.map((i) => i.number)).toEqual(months.map(() => null));
  const generated = await Promise.all(
    drafts.map((d) => store.updateInvoiceStatus({ invoiceId: d.id, status: "issued", now: later })),
  );
  const numbers = generated.map((i) => (i.number ?? "").slice(-4)).sort();
  expect(numbers).toEqual(["0001", "0002", "0003", "0004", "0005", "0006"]);
  for (const i of generated) expect(i.number?.slice(4, 11)).toBe(i.periodStart.toISOString().slice(0, 7));
  // The same period at once: one draft, generated twice.
  const same = await Promise.all([1, 2, 3].map(() => store.generateInvoice({ orgId: other.id, at: march, now: march })));
  expect(new Set(same.map((i) => i.id)).size).toBe(1);

  const [first] = generated;
  const copy = db.pool.query(
    `INSERT INTO invoices (id, org_id, org_name, number, status, period_start, period_end, subtotal_cents,
       discount_cents, tax_cents, total_cents, tax_rate_bps)
     VALUES ('inv_copy', $1, 'copy', $2, 'void', '2020-01-01', '2020-02-01', 0, 0, 0, 0, 0)`,
    [org.id, first?.number],
  );
  await expect(copy).rejects.toThrow(/invoices_org_number_key/);
  const unnumbered = db.pool.query(
    `INSERT INTO invoices (id, org_id, org_name, status, period_start, period_end, subtotal_cents, discount_cents,
       tax_cents, total_cents, tax_rate_bps)
     VALUES ('inv_unnumbered', $1, 'copy', 'issued', '2020-01-01', '2020-02-01', 0, 0, 0, 0, 0)`,
    [org.id],
  );
  await expect(unnumbered).rejects.toThrow(/invoices_number_check/);
}, 60_000);

test("the org's billing day sets the period; the maximum discount applies", async () => {
  const org = await newOrg({ billingDay: 15, maxDiscountBps: 1000, taxRateBps: 0 });
  await store.recordUsage([usage(org.id, { occurredAt: new Date("2026-03-14T23:59:59Z") }), usage(org.id)]);
  await store.createDiscountRule({
    orgId: org.id,
    name: "half off",
    kind: "promotional",
    discountBps: 5000,
    ...unscopedRule,
  });
  const invoice = await store.generateInvoice({ orgId: org.id, at: march, now: march });
  expect(invoice.periodStart).toEqual(new Date("2026-03-15T00:00:00Z"));
  expect(invoice.periodEnd).toEqual(new Date("2026-04-15T00:00:00Z"));
  expect(invoice.number).toBeNull();
  expect(invoice.lines.at(-1)?.amountNanos).toBe(-1_000_000n);
});

test("usage recorded after its period's invoice was issued is billed once, by the next invoice", async () => {
  const org = await newOrg({ taxRateBps: 0 });
  const april = new Date("2026-04-10T12:00:00Z");
  const afterApril = new Date("2026-05-02T00:00:00Z");
  await store.recordUsage([usage(org.id), usage(org.id)]);
  const march1 = await store.generateInvoice({ orgId: org.id, at: march, now: afterMarch });
  const issuedMarch = await store.updateInvoiceStatus({ invoiceId: march1.id, status: "issued", now: afterMarch });
  expect(issuedMarch.subtotalCents).toBe(2n);

  // A gateway's spool delivers one more March request after March was issued, then April's usage arrives.
  await store.recordUsage([usage(org.id, { costNanos: 7_000_000n, costBreakdown: null })]);
  await store.recordUsage([usage(org.id, { occurredAt: april })]);
  expect(await store.getInvoice(march1.id)).toEqual(issuedMarch);

  const aprilDraft = await store.generateInvoice({ orgId: org.id, at: april, now: afterApril });
  const describe = (lines: { description: string; amountNanos: bigint }[]) =>
    lines.map((l) => [l.description, l.amountNanos]);
  expect(describe(aprilDraft.lines)).toEqual([
    ["gpt-4o: input tokens", 4_000_000n],
    ["gpt-4o: cached input tokens", 500_000n],
    ["gpt-4o: output tokens", 4_500_000n],
    ["gpt-4o: reasoning tokens", 1_000_000n],
    ["gpt-4o: usage not itemised by token type (used before 2026-04-01, not billed on an earlier invoice)", 7_000_000n],
  ]);
  const issuedApril = await store.updateInvoiceStatus({ invoiceId: aprilDraft.id, status: "issued", now: afterApril });
  expect(issuedApril).toMatchObject({ subtotalCents: 2n, lines: aprilDraft.lines });

  const billedBy = async () =>
    (
      await db.pool.query<{ invoice_id: string | null; n: number; cost: string }>(
        `SELECT invoice_id, count(*)::int AS n, sum(cost_nanos)::text AS cost FROM usage_records WHERE org_id = $1
         GROUP BY 1 ORDER BY 2`,
        [org.id],
      )
    ).rows;
  expect(await billedBy()).toEqual([
    { invoice_id: march1.id, n: 2, cost: "20000000" },
    { invoice_id: aprilDraft.id, n: 2, cost: "17000000" },
  ]);

  // Voiding April's invoice releases its usage to the one that replaces it.
  await store.updateInvoiceStatus({ invoiceId: aprilDraft.id, status: "void", now: afterApril });
  const replacement = await store.generateInvoice({ orgId: org.id, at: april, now: afterApril });
  expect(replacement).toMatchObject({ number: null, status: "draft" });
  expect(replacement.id).not.toBe(aprilDraft.id);
  expect(describe(replacement.lines)).toEqual(describe(aprilDraft.lines));
  await store.updateInvoiceStatus({ invoiceId: replacement.id, status: "issued", now: afterApril });
  expect(await billedBy()).toEqual([
    { invoice_id: march1.id, n: 2, cost: "20000000" },
    { invoice_id: replacement.id, n: 2, cost: "17000000" },
  ]);
});

test("drafts issued out of period order each bill their own period, on one replica or two at once", async () => {
  const usd = 1_000_000_000n;
  const months = [6, 7, 8].map((m) => new Date(Date.UTC(2026, m, 10))); // July, August, September
  const afterSeptember = new Date("2026-10-02T00:00:00Z");
  const draftsOf = async (orgId: string) => {
    for (const occurredAt of months) {
      await store.recordUsage([usage(orgId, { occurredAt, costNanos: 5n * usd, costBreakdown: null })]);
    }
    return Promise.all(months.map((at) => store.generateInvoice({ orgId, at, now: afterSeptember })));
  };
  const issue = (s: BillingStore, invoiceId: string) =>
    s.updateInvoiceStatus({ invoiceId, status: "issued", now: afterSeptember });

  const org = await newOrg({ taxRateBps: 0 });
  const [july, august, september] = await draftsOf(org.id);
  expect([july, august, september].map((d) => d?.totalCents)).toEqual([500n, 500n, 500n]);
  const issued = [];
  for (const draft of [july, september, august]) issued.push(await issue(store, draft?.id as string));
  // September's invoice leaves August's usage to August's draft rather than billing it as late usage.
  expect(issued.map((i) => [i.periodStart.getUTCMonth(), i.totalCents, i.lines.length])).toEqual([
    [6, 500n, 1],
    [8, 500n, 1],
    [7, 500n, 1],
  ]);

  // Two billing replicas issuing an org's drafts at once: every draft bills its own period, whatever the order.
  const replica = new pg.Pool({ connectionString: db.connectionString });
  try {
    const other = createBillingStore(replica);
    for (let round = 0; round < 3; round++) {
      const next = await newOrg({ taxRateBps: 0 });
      const drafts = await draftsOf(next.id);
      const totals = await Promise.all(drafts.map((d, i) => issue(i % 2 ? other : store, d.id)));
      expect(totals.map((i) => i.totalCents)).toEqual([500n, 500n, 500n]);
    }
  } finally {
    await replica.end();
  }

  // Usage of August that arrives now is late usage again, for the next invoice; so is that of a voided draft.
  const [october, november] = [new Date("2026-10-10T00:00:00Z"), new Date("2026-11-10T00:00:00Z")];
  await store.recordUsage([usage(org.id, { occurredAt: months[1], costNanos: usd, costBreakdown: null })]);
  const voided = await store.generateInvoice({ orgId: org.id, at: october, now: november });
  await store.updateInvoiceStatus({ invoiceId: voided.id, status: "void", now: november });
  await store.recordUsage([usage(org.id, { occurredAt: october, costNanos: 2n * usd, costBreakdown: null })]);
  const next = await store.generateInvoice({ orgId: org.id, at: november, now: november });
  expect(next.lines.map((l) => [l.description, l.amountNanos])).toEqual([
    ["gpt-4o: usage not itemised by token type (used before 2026-11-01, not billed on an earlier invoice)", 3n * usd],
  ]);
});

test("issuing while usage keeps arriving bills every record exactly once across invoices", async () => {
  const org = await newOrg({ taxRateBps: 0 });
  await store.generateInvoice({ orgId: org.id, at: march, now: afterMarch });
  const draft = (await store.listInvoices(org.id, allRows)).items[0];
  let writing = true;
  const writer = (async () => {
    let batches = 0;
    while (writing || batches < 5) {
      await store.recordUsage(Array.from({ length: 50 }, () => usage(org.id, { costNanos: 1_000n, costBreakdown: null })));
      batches++;
    }
    return batches * 50;
  })();
  await Bun.sleep(30);
  const issued = await store.updateInvoiceStatus({ invoiceId: draft?.id as string, status: "issued", now: afterMarch });
  writing = false;
  const written = await writer;
  const april = new Date("2026-04-10T12:00:00Z");
  const next = await store.generateInvoice({ orgId: org.id, at: april, now: new Date("2026-05-02T00:00:00Z") });
  const billed = (invoice: { lines: { amountNanos: bigint }[] }) => invoice.lines.reduce((sum, l) => sum + l.amountNanos, 0n);
  // Every record is on the issued invoice or on the next one's late lines, and nowhere twice.
  expect(billed(issued) + billed(next)).toBe(BigInt(written) * 1_000n);
  expect(billed(issued)).toBeGreaterThan(0n);
  const { rows } = await db.pool.query<{ n: number }>(
    "SELECT count(*)::int AS n FROM usage_records WHERE org_id = $1 AND invoice_id = $2",
    [org.id, issued.id],
  );
  expect(BigInt(rows[0]?.n ?? 0) * 1_000n).toBe(billed(issued));
});

describe("late usage is discounted as part of its own period", () => {
  const usd = 1_000_000_000n;
  const october = new Date("2026-10-10T12:00:00Z");
  const november = new Date("2026-11-10T12:00:00Z");
  const afterOctober = new Date("2026-11-02T00:00:00Z");
  const afterNovember = new Date("2026-12-02T00:00:00Z");
  const spend = (orgId: string, occurredAt: Date, ...costs: bigint[]) =>
    store.recordUsage(costs.map((costNanos) => usage(orgId, { occurredAt, costNanos, costBreakdown: null })));
  const discountLines = (invoice: Invoice) =>
    invoice.lines.filter((l) => l.tokenType === "discount").map((l) => [l.discountRuleId, l.amountNanos]);
  /** 10% off, up to `capNanos` a period. */
  const promotion = (orgId: string, capNanos: bigint) =>
    store.createDiscountRule({ orgId, name: "promo", kind: "promotional", discountBps: 1000, ...unscopedRule, capNanos });
  const volume = (orgId: string, kind: "volume_graduated" | "volume_all_units", tiers: { fromNanos: bigint; discountBps: number }[]) =>
    store.createDiscountRule({ orgId, name: "volume", kind, discountBps: 0, ...unscopedRule, tiers });
  const issueOctober = async (orgId: string) => {
    const draft = await store.generateInvoice({ orgId, at: october, now: afterOctober });
    return store.updateInvoiceStatus({ invoiceId: draft.id, status: "issued", now: afterOctober });
  };

  test("a cap reached in October gives late October usage nothing more; November has its own", async () => {
    const org = await newOrg({ taxRateBps: 0 });
    const rule = await promotion(org.id, usd / 5n);
    await spend(org.id, october, usd, usd, usd);
    expect(discountLines(await issueOctober(org.id))).toEqual([[rule.id, -usd / 5n]]);

    // Three October records arrive after October's invoice was issued; November has $1 so far.
    await spend(org.id, new Date("2026-10-31T23:00:00Z"), usd, usd, usd);
    await spend(org.id, november, usd);
    const draft = await store.generateInvoice({ orgId: org.id, at: november, now: november });
    expect(draft).toMatchObject({ subtotalCents: 400n, discountCents: 10n, totalCents: 390n });
    expect(discountLines(draft)).toEqual([[rule.id, -usd / 10n]]);

    await spend(org.id, november, usd, usd);
    const issued = await store.updateInvoiceStatus({ invoiceId: draft.id, status: "issued", now: afterNovember });
    expect(issued).toMatchObject({ subtotalCents: 600n, discountCents: 20n, totalCents: 580n });
    expect(discountLines(issued)).toEqual([[rule.id, -usd / 5n]]);
  });

  test("a period invoiced after a later invoice billed part of it as late usage keeps its cap for the whole period", async () => {
    const org = await newOrg({ taxRateBps: 0 });
    const rule = await promotion(org.id, 3n * usd);
    // September is invoiced; October is not, so November's invoice bills October's $50 as late usage, at the cap.
    await spend(org.id, new Date("2026-09-10T12:00:00Z"), usd);
    const september = await store.generateInvoice({ orgId: org.id, at: new Date("2026-09-10T12:00:00Z"), now: afterOctober });
    await store.updateInvoiceStatus({ invoiceId: september.id, status: "issued", now: afterOctober });
    await spend(org.id, october, 50n * usd);
    const draft = await store.generateInvoice({ orgId: org.id, at: november, now: afterNovember });
    const issued = await store.updateInvoiceStatus({ invoiceId: draft.id, status: "issued", now: afterNovember });
    expect(discountLines(issued)).toEqual([[rule.id, -3n * usd]]);

    // Another $50 of October arrives and October's own invoice is issued: its cap was used up by the $50 billed late.
    await spend(org.id, october, 50n * usd);
    const octoberInvoice = await issueOctober(org.id);
    expect(discountLines(octoberInvoice)).toEqual([]);
    expect(octoberInvoice).toMatchObject({ subtotalCents: 5000n, discountCents: 0n, totalCents: 5000n });
  });

  test("late usage continues October's volume tiers and leaves November's alone", async () => {
    const org = await newOrg({ taxRateBps: 0 });
    const tiers = [
      { fromNanos: 0n, discountBps: 0 },
      { fromNanos: 2n * usd, discountBps: 1000 },
      { fromNanos: 4n * usd, discountBps: 2000 },
    ];
    const rule = await volume(org.id, "volume_graduated", tiers);
    // October billed $3: 10% of its last $1.
    await spend(org.id, october, usd, 2n * usd);
    expect(discountLines(await issueOctober(org.id))).toEqual([[rule.id, -usd / 10n]]);

    // $2 more of October is 10% of $1 and 20% of $1; November's $1.50 alone is below the first tier.
    await spend(org.id, october, 2n * usd);
    await spend(org.id, november, (3n * usd) / 2n);
    const draft = await store.generateInvoice({ orgId: org.id, at: november, now: november });
    expect(discountLines(draft)).toEqual([[rule.id, -(3n * usd) / 10n]]);
    expect(draft).toMatchObject({ subtotalCents: 350n, discountCents: 30n, totalCents: 320n });

    // Usage billed late by an issued invoice counts as October's too.
    await store.updateInvoiceStatus({ invoiceId: draft.id, status: "issued", now: afterNovember });
    await spend(org.id, october, usd);
    const december = await store.generateInvoice({ orgId: org.id, at: afterNovember, now: afterNovember });
    expect(discountLines(december)).toEqual([[rule.id, -usd / 5n]]);
  });

  test("late usage lifting October into an all-units tier gets its rate, not a credit for October's", async () => {
    const org = await newOrg({ taxRateBps: 0, maxDiscountBps: 5000 });
    const tiers = [
      { fromNanos: 0n, discountBps: 0 },
      { fromNanos: 100n * usd, discountBps: 5000 },
    ];
    const rule = await volume(org.id, "volume_all_units", tiers);
    await spend(org.id, october, 9_999n * (usd / 100n));
    expect(await issueOctober(org.id)).toMatchObject({ subtotalCents: 9_999n, discountCents: 0n });
    // $0.02 of October arrives late, November has $1: October's whole $100.01 is now at 50%, but the $99.99 billed
    // stays billed; the late $0.02 gets at most the org's 50% of itself. The invoice was refused before (total < 0).
    await spend(org.id, new Date("2026-10-20T12:00:00Z"), 2n * (usd / 100n));
    await spend(org.id, november, usd);
    const draft = await store.generateInvoice({ orgId: org.id, at: november, now: afterNovember });
    expect(discountLines(draft)).toEqual([[rule.id, -usd / 100n]]);
    expect(draft).toMatchObject({ subtotalCents: 102n, discountCents: 1n, totalCents: 101n });
    const issued = await store.updateInvoiceStatus({ invoiceId: draft.id, status: "issued", now: afterNovember });
    expect(issued).toMatchObject({ subtotalCents: 102n, discountCents: 1n, totalCents: 101n });
  });

  test("a cap holds over all of a period's invoices when a stacking rule before it grows with late usage", async () => {
    const org = await newOrg({ taxRateBps: 0 });
    const bulk = await store.createDiscountRule({
      orgId: org.id,
      name: "bulk",
      kind: "volume_all_units",
      discountBps: 0,
      ...unscopedRule,
      priority: 2,
      tiers: [
        { fromNanos: 0n, discountBps: 0 },
        { fromNanos: 100n * usd, discountBps: 9000 },
      ],
    });
    const capped = await store.createDiscountRule({
      orgId: org.id,
      name: "half off",
      kind: "promotional",
      discountBps: 5000,
      ...unscopedRule,
      priority: 1,
      capNanos: 20n * usd,
    });
    // October's $40 reaches the $20 cap; $80 of October billed late by November's invoice lifts "bulk" to 90%.
    await spend(org.id, october, 40n * usd);
    const invoices = [await issueOctober(org.id)];
    await spend(org.id, october, 80n * usd);
    const novemberDraft = await store.generateInvoice({ orgId: org.id, at: november, now: afterNovember });
    const issuedNovember = { invoiceId: novemberDraft.id, status: "issued" as const, now: afterNovember };
    invoices.push(await store.updateInvoiceStatus(issuedNovember));
    // $200 more of October for December's invoice: recomputed over the $120 billed, "bulk" leaves the capped rule $6
    // of the $20 it granted in October, and $10 more on $320 would take its October total to $30.
    await spend(org.id, october, 200n * usd);
    invoices.push(await store.generateInvoice({ orgId: org.id, at: afterNovember, now: afterNovember }));
    expect(invoices.map(discountLines)).toEqual([
      [[capped.id, -20n * usd]],
      [[bulk.id, -72n * usd]],
      [[bulk.id, -180n * usd]],
    ]);
    const lines = invoices.flatMap((i) => i.lines);
    const total = (ruleId: string) =>
      -lines.reduce((sum, l) => sum + (l.discountRuleId === ruleId ? l.amountNanos : 0n), 0n);
    expect(total(capped.id)).toBe(20n * usd);
    // 90% of October's $320 as a whole would be $288: the late usage got 90% of itself.
    expect(total(bulk.id)).toBe(252n * usd);
  });

  test("a percentage without a cap gives late usage the same percentage", async () => {
    const org = await newOrg({ taxRateBps: 0 });
    const rule = await store.createDiscountRule({
      orgId: org.id,
      name: "ten percent",
      kind: "promotional",
      discountBps: 1000,
      ...unscopedRule,
    });
    await spend(org.id, october, 5n * usd);
    await issueOctober(org.id);
    await spend(org.id, october, 2n * usd);
    await spend(org.id, november, usd);
    const draft = await store.generateInvoice({ orgId: org.id, at: november, now: november });
    expect(discountLines(draft)).toEqual([[rule.id, -(3n * usd) / 10n]]);
  });

  test("voiding and reissuing October, November or both after late usage keeps October's cap, once", async () => {
    const org = await newOrg({ taxRateBps: 0 });
    const rule = await promotion(org.id, usd);
    const issue = (invoiceId: string) => store.updateInvoiceStatus({ invoiceId, status: "issued", now: afterNovember });
    const voidInvoice = (invoiceId: string) =>
      store.updateInvoiceStatus({ invoiceId, status: "void", now: afterNovember });
    const reissue = async (at: Date) =>
      issue((await store.generateInvoice({ orgId: org.id, at, now: afterNovember })).id);
    // October's $20 reaches the $1 cap; $5 of October billed late on November's invoice gets nothing.
    await spend(org.id, october, 20n * usd);
    const firstOctober = await issueOctober(org.id);
    await spend(org.id, october, 5n * usd);
    const firstNovember = await reissue(november);
    expect([firstOctober, firstNovember].map(discountLines)).toEqual([[[rule.id, -usd]], []]);

    // October's replacement bills its $20 again: November granted October nothing, so it gets the whole $1 again.
    await voidInvoice(firstOctober.id);
    const october2 = await reissue(october);
    expect(october2).toMatchObject({ subtotalCents: 2000n, discountCents: 100n });
    expect(discountLines(october2)).toEqual([[rule.id, -usd]]);

    // November's replacement bills the late $5 again, against the $1 October's replacement granted.
    await voidInvoice(firstNovember.id);
    const november2 = await reissue(november);
    expect(november2).toMatchObject({ subtotalCents: 500n, discountCents: 0n });

    // Both void: October's next invoice bills all of its $25, with the $1 cap once; November has none of it.
    await voidInvoice(october2.id);
    await voidInvoice(november2.id);
    const october3 = await reissue(october);
    expect(october3).toMatchObject({ subtotalCents: 2500n, discountCents: 100n });
    const november3 = await reissue(november);
    expect(november3).toMatchObject({ subtotalCents: 0n, discountCents: 0n });
  });

  /** A percentage off, stacking and unscoped. */
  const percent = (orgId: string, name: string, discountBps: number, priority: number, capNanos = 0n) =>
    store.createDiscountRule({ orgId, name, kind: "promotional", discountBps, ...unscopedRule, priority, capNanos });

  test("a deleted rule's grants leave live rules their share of late usage", async () => {
    const org = await newOrg({ taxRateBps: 0 });
    const a = await percent(org.id, "a", 5000, 2);
    const b = await percent(org.id, "b", 1000, 1);
    await spend(org.id, october, 100n * usd);
    expect(discountLines(await issueOctober(org.id))).toEqual([
      [a.id, -50n * usd],
      [b.id, -5n * usd],
    ]);
    // With "a" gone, "b" takes $20 off October's $200 as a whole, $5 of it granted: its 10% of the late $100.
    await store.deleteDiscountRule(a.id);
    await spend(org.id, october, 100n * usd);
    const draft = await store.generateInvoice({ orgId: org.id, at: november, now: november });
    expect(discountLines(draft)).toEqual([[b.id, -10n * usd]]);
  });

  test("a rule deleted and created again is a new rule, with a cap of its own", async () => {
    const org = await newOrg({ taxRateBps: 0 });
    const first = await percent(org.id, "x", 1000, 2, usd);
    const z = await percent(org.id, "z", 500, 1);
    await spend(org.id, october, 20n * usd);
    const octoberInvoice = await issueOctober(org.id);
    expect(discountLines(octoberInvoice)).toEqual([
      [first.id, -usd],
      [z.id, -(95n * usd) / 100n],
    ]);
    await store.deleteDiscountRule(first.id);
    const y = await percent(org.id, "x", 1000, 2, usd);
    // October's $30 as a whole: $1 to "y" (capped, none granted), $1.45 to "z" ($0.95 granted): each its rate on $10.
    await spend(org.id, october, 10n * usd);
    const issue = (invoiceId: string) => store.updateInvoiceStatus({ invoiceId, status: "issued", now: afterNovember });
    const voidInvoice = (invoiceId: string) =>
      store.updateInvoiceStatus({ invoiceId, status: "void", now: afterNovember });
    const reissue = async (at: Date) =>
      issue((await store.generateInvoice({ orgId: org.id, at, now: afterNovember })).id);
    const firstNovember = await reissue(november);
    expect(discountLines(firstNovember)).toEqual([
      [y.id, -usd],
      [z.id, -usd / 2n],
    ]);

    // October's replacement bills its $20 against what November granted: "y" is at its cap, "z" gets the rest of its
    // $1.45 for the period. November's replacement then bills the late $10 as November did.
    await voidInvoice(octoberInvoice.id);
    expect(discountLines(await reissue(october))).toEqual([[z.id, -(95n * usd) / 100n]]);
    await voidInvoice(firstNovember.id);
    expect(discountLines(await reissue(november))).toEqual([
      [y.id, -usd],
      [z.id, -usd / 2n],
    ]);
    // More late October usage: "y" has had its $1 for October; "z" its 5% of the $10 more.
    await spend(org.id, october, 10n * usd);
    const december = await store.generateInvoice({ orgId: org.id, at: afterNovember, now: afterNovember });
    expect(discountLines(december)).toEqual([[z.id, -usd / 2n]]);
  });

  test("the org's maximum counts what deleted rules granted", async () => {
    const org = await newOrg({ taxRateBps: 0 });
    const a = await percent(org.id, "a", 5000, 2);
    const b = await percent(org.id, "b", 1000, 1);
    await spend(org.id, october, 100n * usd);
    await issueOctober(org.id);
    // A 30% maximum set since: $60 of October's $200, $55 of it granted on October's invoice, "a"'s $50 included.
    await store.updateOrganization(org.id, { maxDiscountBps: 3000 });
    await store.deleteDiscountRule(a.id);
    await spend(org.id, october, 100n * usd);
    const draft = await store.generateInvoice({ orgId: org.id, at: november, now: november });
    expect(discountLines(draft)).toEqual([[b.id, -5n * usd]]);
  });

  test("billed usage of the invoice's own and earlier periods is read in one statement, late usage or not", async () => {
    const org = await newOrg({ taxRateBps: 0 });
    const statements: string[] = [];
    const pool = createDb(db.pool);
    const counted = (q: Queryable): Queryable => ({
      query<R extends pg.QueryResultRow>(sql: string, params?: unknown[]) {
        statements.push(sql);
        return q.query<R>(sql, params);
      },
    });
    const invoices = createInvoiceStore({
      ...counted(pool),
      transaction: (fn) => pool.transaction((tx) => fn(counted(tx))),
    });
    const generate = async () => {
      statements.length = 0;
      await invoices.generateInvoice({ orgId: org.id, at: november, now: november });
      return statements.length;
    };
    await spend(org.id, october, usd);
    await issueOctober(org.id);
    await spend(org.id, november, usd);
    await generate();
    // The draft exists now, so each generation below runs the same statements, late usage adding none.
    const withoutLate = await generate();
    await spend(org.id, october, usd);
    expect(await generate()).toBe(withoutLate);
  });
});

describe("a period's invoices, issued, voided and reissued in any order", () => {
  const usd = 1_000_000_000n;
  const now = new Date("2027-02-02T00:00:00Z");
  type Rule = Omit<NewDiscountRule, "orgId" | "name">;
  const percentArb = fc
    .record({
      discountBps: fc.constantFrom(1000, 2500, 5000),
      capNanos: fc.constantFrom(0n, usd / 2n, usd, 3n * usd),
      stackable: fc.boolean(),
      priority: fc.nat(2),
      model: fc.constantFrom(null, "a"),
    })
    .map((r): Rule => ({ ...unscopedRule, kind: "promotional", ...r }));
  const volumeArb = fc
    .record({
      graduated: fc.boolean(),
      fromNanos: fc.constantFrom(usd, 5n * usd, 20n * usd),
      discountBps: fc.constantFrom(1000, 3000),
      capNanos: fc.constantFrom(0n, 2n * usd),
      stackable: fc.boolean(),
      priority: fc.nat(2),
    })
    .map(({ graduated, fromNanos, discountBps, ...r }): Rule => {
      const tiers = [{ fromNanos: 0n, discountBps: 0 }, { fromNanos, discountBps }];
      const kind = graduated ? "volume_graduated" : "volume_all_units";
      return { ...unscopedRule, kind, discountBps: 0, tiers, ...r };
    });
  const ruleArb = fc.oneof(percentArb, volumeArb);
  const period = fc.nat(2);
  // Usage of one of three periods, in any of them (late or not); generating, issuing, voiding, or voiding an issued
  // invoice and issuing its replacement; adding and deleting rules.
  const stepArb = fc.oneof(
    {
      weight: 4,
      arbitrary: fc.record({
        step: fc.constant("spend" as const),
        period,
        cents: fc.integer({ min: 1, max: 1500 }),
        nanos: fc.nat(999),
        model: fc.constantFrom("a", "b"),
        hour: fc.nat(27 * 24),
      }),
    },
    { weight: 2, arbitrary: fc.record({ step: fc.constant("generate" as const), period }) },
    { weight: 2, arbitrary: fc.record({ step: fc.constant("issue" as const), period }) },
    { weight: 1, arbitrary: fc.record({ step: fc.constant("void" as const), period }) },
    { weight: 2, arbitrary: fc.record({ step: fc.constant("reissue" as const), period }) },
    { weight: 1, arbitrary: fc.record({ step: fc.constant("add" as const), rule: ruleArb }) },
    { weight: 1, arbitrary: fc.record({ step: fc.constant("delete" as const), index: fc.nat(5) }) },
  );
  type Step = typeof stepArb extends fc.Arbitrary<infer S> ? S : never;

  /** Checks every invoice of the org and, over the issued ones, each period's discounts; `rules` when none changed. */
  async function check(org: Organization, caps: Map<string, bigint>, starts: Date[], rules?: DiscountRule[]) {
    const q = async <R extends pg.QueryResultRow>(sql: string, params: unknown[]) =>
      (await db.pool.query<R>(sql, params)).rows;
    const issued = new Set<string>();
    const granted = new Map<number, Map<string, bigint>>();
    for (const summary of (await store.listInvoices(org.id, allRows)).items) {
      const invoice = await store.getInvoice(summary.id);
      const sum = (lines: Invoice["lines"]) => lines.reduce((total, l) => total + l.amountNanos, 0n);
      const subtotal = sum(invoice.lines.filter((l) => l.tokenType !== "discount"));
      const discount = -sum(invoice.lines.filter((l) => l.tokenType === "discount"));
      const net = subtotal - discount;
      expect(invoice).toMatchObject({
        subtotalCents: nanosToCents(subtotal),
        discountCents: nanosToCents(discount),
        taxCents: divRoundHalfUp(net * BigInt(org.taxRateBps), 10_000n * NANOS_PER_CENT),
        totalCents: divRoundHalfUp(net * BigInt(10_000 + org.taxRateBps), 10_000n * NANOS_PER_CENT),
      });
      // Its grants are its discount lines, split by period.
      const grants = await q<{ period_start: Date; discount_rule_id: string; amount_nanos: string }>(
        "SELECT period_start, discount_rule_id, amount_nanos FROM invoice_discount_grants WHERE invoice_id = $1",
        [invoice.id],
      );
      const byRule = new Map<string, bigint>();
      for (const g of grants) {
        byRule.set(g.discount_rule_id, (byRule.get(g.discount_rule_id) ?? 0n) + BigInt(g.amount_nanos));
      }
      const lines = invoice.lines.filter((l) => l.tokenType === "discount");
      expect(byRule).toEqual(new Map(lines.map((l) => [l.discountRuleId as string, -l.amountNanos])));
      if (invoice.status !== "issued") continue;
      issued.add(invoice.id);
      const [claimed] = await q<{ cost: string }>(
        "SELECT coalesce(sum(cost_nanos), 0)::text AS cost FROM usage_records WHERE invoice_id = $1",
        [invoice.id],
      );
      expect(BigInt(claimed?.cost ?? "")).toBe(subtotal);
      for (const g of grants) {
        const of = granted.get(g.period_start.getTime()) ?? new Map<string, bigint>();
        of.set(g.discount_rule_id, (of.get(g.discount_rule_id) ?? 0n) + BigInt(g.amount_nanos));
        granted.set(g.period_start.getTime(), of);
      }
    }
    const [stray] = await q<{ n: number }>(
      `SELECT count(*)::int AS n FROM usage_records u JOIN invoices i ON i.id = u.invoice_id
       WHERE u.org_id = $1 AND i.status <> 'issued'`,
      [org.id],
    );
    expect(stray?.n).toBe(0);
    for (const start of starts) {
      const of = granted.get(start.getTime()) ?? new Map<string, bigint>();
      for (const [ruleId, amount] of of) {
        const cap = caps.get(ruleId) ?? 0n;
        if (cap > 0n) expect(amount).toBeLessThanOrEqual(cap);
      }
      const total = [...of.values()].reduce((sum, amount) => sum + amount, 0n);
      const slices = await q<{ hour: Date; model: string; provider: string; cost: string }>(
        `SELECT date_trunc('hour', u.occurred_at, 'UTC') AS hour, u.model, u.provider, sum(u.cost_nanos)::text AS cost
         FROM usage_records u JOIN invoices i ON i.id = u.invoice_id
         WHERE u.org_id = $1 AND i.status = 'issued' AND u.occurred_at >= $2 AND u.occurred_at < $3
         GROUP BY 1, 2, 3`,
        [org.id, start, billingPeriod(start, org.billingDay).end],
      );
      const usage = slices.map((s) => ({ ...s, costNanos: BigInt(s.cost) }));
      const billed = usage.reduce((sum, u) => sum + u.costNanos, 0n);
      if (org.maxDiscountBps > 0) expect(total).toBeLessThanOrEqual((billed * BigInt(org.maxDiscountBps)) / 10_000n);
      if (!rules) continue;
      // With the rules unchanged, a period's invoices never grant more than its usage would get on one invoice, per
      // rule and in all; percentages without a maximum get exactly that, less a nano-USD per rule and invoice.
      const whole = calculateDiscounts(usage, rules, org);
      for (const a of whole.applied) expect(of.get(a.rule.id) ?? 0n).toBeLessThanOrEqual(a.amountNanos);
      expect(total).toBeLessThanOrEqual(whole.totalNanos);
      if (org.maxDiscountBps === 0 && rules.every((r) => r.kind === "promotional")) {
        expect(total).toBeGreaterThanOrEqual(whole.totalNanos - BigInt(issued.size * rules.length));
      }
    }
  }

  test("caps and the org's maximum hold per period, nothing is granted twice, and invoices add up", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(stepArb, { minLength: 3, maxLength: 25 }),
        fc.array(ruleArb, { minLength: 1, maxLength: 3 }),
        fc.boolean(),
        fc.record({
          maxDiscountBps: fc.constantFrom(0, 1500),
          billingDay: fc.constantFrom(1, 15, 28),
          taxRateBps: fc.constantFrom(0, 825),
        }),
        async (allSteps, initialRules, rulesChange, settings) => {
          const org = await newOrg(settings);
          const starts = ["2026-10-20", "2026-11-20", "2026-12-20"].map(
            (day) => billingPeriod(new Date(day), org.billingDay).start,
          );
          const steps: Step[] = rulesChange
            ? allSteps
            : allSteps.filter((s) => s.step !== "add" && s.step !== "delete");
          const rules: DiscountRule[] = [];
          const caps = new Map<string, bigint>();
          const add = async (rule: Rule) => {
            const created = await store.createDiscountRule({ ...rule, orgId: org.id, name: "rule" });
            rules.push(created);
            caps.set(created.id, created.capNanos);
          };
          for (const rule of initialRules) await add(rule);
          const live = async (p: number) =>
            (await store.listInvoices(org.id, allRows)).items.find(
              (i) => i.periodStart.getTime() === starts[p]?.getTime() && i.status !== "void",
            );
          const generate = (p: number) => store.generateInvoice({ orgId: org.id, at: starts[p] as Date, now });
          const set = (invoiceId: string, status: "issued" | "void") =>
            store.updateInvoiceStatus({ invoiceId, status, now });
          for (const step of steps) {
            if (step.step === "spend") {
              const occurredAt = new Date((starts[step.period] as Date).getTime() + step.hour * 3_600_000);
              const costNanos = BigInt(step.cents) * 10_000_000n + BigInt(step.nanos);
              const record = usage(org.id, { occurredAt, costNanos, model: step.model, costBreakdown: null });
              await store.recordUsage([record]);
            } else if (step.step === "generate") {
              const invoice = await live(step.period);
              if (invoice?.status !== "issued") await generate(step.period);
            } else if (step.step === "issue") {
              const invoice = (await live(step.period)) ?? (await generate(step.period));
              if (invoice.status === "draft") await set(invoice.id, "issued");
            } else if (step.step === "void") {
              const invoice = await live(step.period);
              if (invoice) await set(invoice.id, "void");
            } else if (step.step === "reissue") {
              const invoice = await live(step.period);
              if (invoice?.status !== "issued") continue;
              await set(invoice.id, "void");
              await set((await generate(step.period)).id, "issued");
            } else if (step.step === "add") {
              await add(step.rule);
            } else if (rules.length > 0) {
              const [deleted] = rules.splice(step.index % rules.length, 1);
              await store.deleteDiscountRule((deleted as DiscountRule).id);
            }
            await check(org, caps, starts, rulesChange ? undefined : rules);
          }
        },
      ),
      {
        numRuns: 40,
        // October's cap reached, its late usage billed on November's invoice, then October voided and reissued.
        examples: [
          [
            [
              { step: "spend", period: 0, cents: 2000, nanos: 0, model: "a", hour: 1 },
              { step: "issue", period: 0 },
              { step: "spend", period: 0, cents: 500, nanos: 0, model: "a", hour: 1 },
              { step: "issue", period: 1 },
              { step: "reissue", period: 0 },
              { step: "reissue", period: 1 },
            ],
            [{ ...unscopedRule, kind: "promotional", discountBps: 1000, capNanos: usd }],
            false,
            { maxDiscountBps: 0, billingDay: 1, taxRateBps: 0 },
          ],
        ],
      },
    );
  }, 120_000);
});
