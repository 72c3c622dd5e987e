import { afterAll, expect, test } from "bun:test";
import { cp, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import pg from "pg";
import { sha256Hex } from "../../lib/auth.ts";
import { migrate, migrationsDir } from "./migrate.ts";
import { createBillingStore } from "./store.ts";
import { createTestDatabase, type TestDatabase } from "./test-db.ts";

const databases: TestDatabase[] = [];
const emptyDatabase = async () => {
  const db = await createTestDatabase({ migrate: false });
  databases.push(db);
  return db;
};
afterAll(() => Promise.all(databases.map((db) => db.drop())));

const migrations = [
  "0001_init.sql",
  "0002_discounts_invoices.sql",
  "0003_invoiced_usage.sql",
  "0004_key_lineage.sql",
  "0005_usage_bounds.sql",
  "0006_invoice_org_name.sql",
  "0007_lease_recorded_spend.sql",
  "0008_invoice_numbers_at_issue.sql",
  "0009_org_suspension.sql",
  "0010_wrapping_time_windows.sql",
  "0011_token_leases.sql",
  "0012_responses_endpoint.sql",
  "0013_create_request_ids.sql",
  "0014_invoice_discount_grants.sql",
  "0015_org_project_request_ids.sql",
  "0016_list_page_order.sql",
  "0017_key_concurrent_requests.sql",
  "0018_org_daily_spend.sql",
  "0019_rate_usage.sql",
];
const stoppingOlderWriters = ["0007_lease_recorded_spend.sql", "0018_org_daily_spend.sql"];
/** The migrations of billing from before 0018, the latest one older billing must not write past. */
const beforeOrgDays = migrations.slice(0, migrations.indexOf("0018_org_daily_spend.sql"));
const billingTables = [
  "api_keys",
  "budget_leases",
  "discount_rules",
  "discount_tiers",
  "invoice_discount_grants",
  "invoice_line_items",
  "invoices",
  "organizations",
  "projects",
  "rate_usage",
  "schema_migrations",
  "usage_org_days",
  "usage_records",
  "usage_summaries",
];

test("migrates an empty database, then re-running applies nothing", async () => {
  const { pool } = await emptyDatabase();
  expect((await migrate(pool)).applied).toEqual(migrations);
  const tables = await pool.query<{ table_name: string }>(
    "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY table_name",
  );
  expect(tables.rows.map((r) => r.table_name)).toEqual(billingTables);

  expect((await migrate(pool)).applied).toEqual([]);
  const recorded = await pool.query("SELECT name FROM schema_migrations");
  expect(recorded.rows.map((r) => r.name).sort()).toEqual(migrations);
}, 60_000);

test("concurrent migrators apply each file exactly once", async () => {
  const { pool } = await emptyDatabase();
  const results = await Promise.all([migrate(pool), migrate(pool), migrate(pool)]);
  expect(results.map((r) => r.applied).flat()).toEqual(migrations);
}, 60_000);

test("a failing migration rolls back everything of its run", async () => {
  const { pool } = await emptyDatabase();
  const dir = await mkdtemp(join(tmpdir(), "billing-migrations-"));
  try {
    await cp(migrationsDir, dir, { recursive: true });
    await writeFile(join(dir, "0099_broken.sql"), "CREATE TABLE extra (id int);\nSELECT no_such_function();\n");
    await expect(migrate(pool, dir)).rejects.toThrow(/0099_broken.sql failed/);
    const tables = await pool.query("SELECT to_regclass('organizations') AS orgs, to_regclass('extra') AS extra");
    expect(tables.rows[0]).toEqual({ orgs: null, extra: null });
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}, 60_000);

test("refuses to run when an applied migration was edited", async () => {
  const { pool } = await emptyDatabase();
  const dir = await mkdtemp(join(tmpdir(), "billing-migrations-"));
  try {
    await writeFile(join(dir, "0001_a.sql"), "CREATE TABLE a (id int);");
    expect((await migrate(pool, dir)).applied).toEqual(["0001_a.sql"]);
    await writeFile(join(dir, "0001_a.sql"), "CREATE TABLE a (id bigint);");
    await expect(migrate(pool, dir)).rejects.toThrow("migration 0001_a.sql changed after it was applied");
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}, 60_000);

test("upgrades a database that already holds data from the first migration", async () => {
  const { pool } = await emptyDatabase();
  const dir = await mkdtemp(join(tmpdir(), "billing-migrations-"));
  try {
    await cp(join(migrationsDir, "0001_init.sql"), join(dir, "0001_init.sql"));
    expect((await migrate(pool, dir)).applied).toEqual(["0001_init.sql"]);
    await pool.query("INSERT INTO organizations (id, name) VALUES ('org_old', 'old')");
    await pool.query(
      `INSERT INTO usage_records (request_id, org_id, model, provider, endpoint, input_tokens, cached_input_tokens,
         output_tokens, reasoning_tokens, cost_nanos, occurred_at)
       VALUES ('req_old', 'org_old', 'm', 'p', 'chat_completions', 1, 0, 1, 0, 5, now())`,
    );
    await pool.query(
      `INSERT INTO budget_leases (id, scope, org_id, holder, period_start, granted_nanos, spent_nanos, expires_at,
         released_at)
       VALUES ('lease_1', 'organization', 'org_old', 'gw', '2026-06-01', 10, 4, now(), now()),
              ('lease_2', 'organization', 'org_old', 'gw', '2026-06-01', 10, 3, now(), now()),
              ('lease_3', 'organization', 'org_old', 'gw', '2026-06-01', 10, NULL, now(), NULL)`,
    );
    expect(await migrate(pool)).toEqual({ applied: migrations.slice(1), unknown: [] });
    const declared = await pool.query("SELECT name FROM schema_migrations WHERE stops_older_writers ORDER BY name");
    expect(declared.rows.map((row) => row.name)).toEqual(stoppingOlderWriters);
    const { rows } = await pool.query(
      `SELECT o.max_discount_bps, u.input_cost_nanos FROM organizations o JOIN usage_records u ON u.org_id = o.id`,
    );
    expect(rows).toEqual([{ max_discount_bps: 0, input_cost_nanos: null }]);
    // Leases released before their usage named them are taken as recorded, and settle in their own period.
    const leases = await pool.query(
      `SELECT id, recorded_nanos::int AS recorded, settled_period_start AS settled FROM budget_leases ORDER BY id`,
    );
    expect(leases.rows).toEqual([
      { id: "lease_1", recorded: 4, settled: new Date("2026-06-01T00:00:00Z") },
      { id: "lease_2", recorded: 3, settled: new Date("2026-06-01T00:00:00Z") },
      { id: "lease_3", recorded: 0, settled: null },
    ]);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}, 60_000);

test("keys rotated before lineages existed join the lineage of the key their chain started from", async () => {
  const { pool } = await emptyDatabase();
  const dir = await mkdtemp(join(tmpdir(), "billing-migrations-"));
  try {
    for (const name of migrations.slice(0, 3)) await cp(join(migrationsDir, name), join(dir, name));
    await migrate(pool, dir);
    await pool.query("INSERT INTO organizations (id, name) VALUES ('org_old', 'old')");
    const key = (id: string, rotatedFrom: string | null) =>
      pool.query(
        `INSERT INTO api_keys (id, org_id, secret_sha256, prefix, rotated_from) VALUES ($1, 'org_old', $2, 'sk-mesh-x', $3)`,
        [id, sha256Hex(id), rotatedFrom],
      );
    await key("key_a", null);
    await key("key_b", "key_a");
    await key("key_c", "key_b");
    await key("key_other", null);
    expect((await migrate(pool)).applied).toEqual(migrations.slice(3));
    const lineages = await pool.query("SELECT id, lineage_id FROM api_keys ORDER BY id");
    expect(lineages.rows).toEqual([
      { id: "key_a", lineage_id: "key_a" },
      { id: "key_b", lineage_id: "key_a" },
      { id: "key_c", lineage_id: "key_a" },
      { id: "key_other", lineage_id: "key_other" },
    ]);

    // From now on the schema sets a new key's lineage and keeps it.
    await key("key_d", "key_c");
    await key("key_new", null);
    const added = await pool.query("SELECT id, lineage_id FROM api_keys WHERE id IN ('key_d', 'key_new') ORDER BY id");
    expect(added.rows).toEqual([
      { id: "key_d", lineage_id: "key_a" },
      { id: "key_new", lineage_id: "key_new" },
    ]);
    await expect(pool.query("UPDATE api_keys SET lineage_id = 'key_d' WHERE id = 'key_d'")).rejects.toThrow(
      /keeps the lineage/,
    );
    await expect(pool.query("UPDATE api_keys SET rotated_from = NULL WHERE id = 'key_d'")).rejects.toThrow(
      /keeps the lineage/,
    );
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}, 60_000);

test("the table refuses usage past the bounds RecordUsage checks, whoever writes it", async () => {
  const { pool } = await emptyDatabase();
  await migrate(pool);
  await pool.query("INSERT INTO organizations (id, name) VALUES ('org_b', 'bounds')");
  const insert = (id: string, costNanos: string, outputTokens: string) =>
    pool.query(
      `INSERT INTO usage_records (request_id, org_id, model, provider, endpoint, input_tokens, cached_input_tokens,
         output_tokens, reasoning_tokens, cost_nanos, occurred_at)
       VALUES ($1, 'org_b', 'm', 'p', 'chat_completions', 1, 0, $3, 0, $2, now())`,
      [id, costNanos, outputTokens],
    );
  await insert("req_at_bounds", "1000000000000000", "2147483648");
  await expect(insert("req_dear", "1000000000000001", "1")).rejects.toThrow(/usage_records_bounds_check/);
  await expect(insert("req_long", "1", "2147483649")).rejects.toThrow(/usage_records_bounds_check/);
  expect((await pool.query("SELECT count(*)::int AS n FROM usage_records")).rows).toEqual([{ n: 1 }]);
}, 60_000);

test("invoices from before they held the org's name take its current one, and keep it once out of draft", async () => {
  const { pool } = await emptyDatabase();
  const dir = await mkdtemp(join(tmpdir(), "billing-migrations-"));
  try {
    for (const name of migrations.slice(0, 5)) await cp(join(migrationsDir, name), join(dir, name));
    await migrate(pool, dir);
    await pool.query("INSERT INTO organizations (id, name) VALUES ('org_a', 'Acme'), ('org_b', 'Beta')");
    await pool.query(
      `INSERT INTO invoices (id, org_id, number, status, period_start, period_end, subtotal_cents, discount_cents,
         tax_cents, total_cents, tax_rate_bps)
       VALUES ('inv_draft', 'org_a', 'INV-2026-03-0001', 'draft', '2026-03-01', '2026-04-01', 0, 0, 0, 0, 0),
              ('inv_paid', 'org_b', 'INV-2026-02-0001', 'draft', '2026-02-01', '2026-03-01', 0, 0, 0, 0, 0)`,
    );
    await pool.query("UPDATE invoices SET status = 'issued' WHERE id = 'inv_paid'");
    await pool.query("UPDATE invoices SET status = 'paid' WHERE id = 'inv_paid'");
    expect((await migrate(pool)).applied).toEqual(migrations.slice(5));
    const named = await pool.query("SELECT id, org_name FROM invoices ORDER BY id");
    expect(named.rows).toEqual([
      { id: "inv_draft", org_name: "Acme" },
      { id: "inv_paid", org_name: "Beta" },
    ]);
    await pool.query("UPDATE organizations SET name = 'Beta Renamed' WHERE id = 'org_b'");
    await expect(pool.query("UPDATE invoices SET org_name = 'Beta Renamed' WHERE id = 'inv_paid'")).rejects.toThrow(
      /it can no longer change/,
    );
    await expect(pool.query("UPDATE invoices SET org_name = NULL WHERE id = 'inv_draft'")).rejects.toThrow(/org_name/);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}, 60_000);

test("invoices issued before discounts were kept per period count each line for every period they billed", async () => {
  const { pool } = await emptyDatabase();
  const dir = await mkdtemp(join(tmpdir(), "billing-migrations-"));
  const usd = 1_000_000_000;
  try {
    for (const name of migrations.slice(0, 13)) await cp(join(migrationsDir, name), join(dir, name));
    await migrate(pool, dir);
    // Periods start on the 15th. Rule "a" is 10% up to $1 a period, "b" 10%.
    await pool.query("INSERT INTO organizations (id, name, billing_day) VALUES ('org_a', 'Acme', 15)");
    await pool.query(
      `INSERT INTO discount_rules (id, org_id, name, kind, discount_bps, cap_nanos)
       VALUES ('disc_a', 'org_a', 'a', 'promotional', 1000, ${usd}), ('disc_b', 'org_a', 'b', 'promotional', 1000, 0)`,
    );
    type Line = [description: string, amountNanos: number, ruleId?: string];
    const invoice = async (id: string, start: string, end: string, status: string, lines: Line[]) => {
      await pool.query(
        `INSERT INTO invoices (id, org_id, org_name, status, period_start, period_end, subtotal_cents, discount_cents,
           tax_cents, total_cents, tax_rate_bps)
         VALUES ($1, 'org_a', 'Acme', 'draft', $2, $3, 0, 0, 0, 0, 0)`,
        [id, start, end],
      );
      for (const [position, [description, amount, rule]] of lines.entries()) {
        await pool.query(
          `INSERT INTO invoice_line_items (invoice_id, position, description, token_type, quantity, amount_nanos,
             discount_rule_id)
           VALUES ($1, $2, $3, $4, 0, $5, $6)`,
          [id, position, description, rule ? "discount" : "usage", amount, rule ?? null],
        );
      }
      const move = (to: string) => pool.query("UPDATE invoices SET status = $2, number = $1 WHERE id = $1", [id, to]);
      if (status !== "draft") await move("issued");
      if (status === "paid" || status === "void") await move(status);
    };
    const late = (before: string) =>
      `gpt: usage not itemised by token type (used before ${before}, not billed on an earlier invoice)`;
    await invoice("inv_oct", "2026-10-15", "2026-11-15", "issued", [
      ["gpt: usage not itemised by token type", 5 * usd],
      ["Discount: a", -(2 * usd) / 5, "disc_a"],
      ["Discount: b", -(7 * usd) / 20, "disc_b"],
    ]);
    // November's own usage and late usage of October and of September (the 14th is before the 15th).
    await invoice("inv_nov", "2026-11-15", "2026-12-15", "paid", [
      ["gpt: usage not itemised by token type", 5 * usd],
      [late("2026-11-15"), 6 * usd],
      ["Discount: a", -usd / 2, "disc_a"],
      ["Discount: b", -(9 * usd) / 10, "disc_b"],
    ]);
    // December's invoice billed late usage of October alone.
    await invoice("inv_dec", "2026-12-15", "2027-01-15", "issued", [
      [late("2026-12-15"), usd],
      ["Discount: a", -usd / 10, "disc_a"],
    ]);
    await invoice("inv_void", "2026-08-15", "2026-09-15", "void", [["Discount: a", -usd, "disc_a"]]);
    await invoice("inv_jan", "2027-01-15", "2027-02-15", "draft", [["Discount: a", -usd, "disc_a"]]);
    const records: [string, string, number][] = [
      ["inv_oct", "2026-10-20", 5],
      ["inv_nov", "2026-11-20", 5],
      ["inv_nov", "2026-10-15", 5],
      ["inv_nov", "2026-10-14", 1],
      ["inv_dec", "2026-10-17", 1],
    ];
    for (const [i, [invoiceId, at, cost]] of records.entries()) {
      await pool.query(
        `INSERT INTO usage_records (request_id, org_id, model, provider, endpoint, input_tokens, cached_input_tokens,
           output_tokens, reasoning_tokens, cost_nanos, occurred_at, invoice_id)
         VALUES ($1, 'org_a', 'gpt', 'openai', 'chat_completions', 1, 0, 1, 0, $2, $3, $4)`,
        [`req_${i}`, cost * usd, at, invoiceId],
      );
    }

    expect((await migrate(pool)).applied).toEqual(migrations.slice(13));
    const grants = await pool.query(
      `SELECT invoice_id, to_char(period_start AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS period, discount_rule_id AS rule,
         amount_nanos::float8 / ${usd} AS usd
       FROM invoice_discount_grants ORDER BY 1, 2, 3`,
    );
    expect(grants.rows.map((r) => [r.invoice_id, r.period, r.rule, r.usd])).toEqual([
      ["inv_dec", "2026-10-15", "disc_a", 0.1],
      ["inv_nov", "2026-09-15", "disc_a", 0.5],
      ["inv_nov", "2026-09-15", "disc_b", 0.9],
      ["inv_nov", "2026-10-15", "disc_a", 0.5],
      ["inv_nov", "2026-10-15", "disc_b", 0.9],
      ["inv_nov", "2026-11-15", "disc_a", 0.5],
      ["inv_nov", "2026-11-15", "disc_b", 0.9],
      ["inv_oct", "2026-10-15", "disc_a", 0.4],
      ["inv_oct", "2026-10-15", "disc_b", 0.35],
    ]);
    await expect(
      pool.query("INSERT INTO invoice_discount_grants VALUES ('inv_oct', '2026-10-15', 'disc_b', 1)"),
    ).rejects.toThrow(/its lines can no longer change/);

    // $3 more of October, billed late by January's draft. October's invoices are taken to have granted "a" its $1 cap,
    // and "b" $1.25 of the $1.30 that 10% of what "a" leaves of October's $14 comes to: $0.05 more.
    await pool.query(
      `INSERT INTO usage_records (request_id, org_id, model, provider, endpoint, input_tokens, cached_input_tokens,
         output_tokens, reasoning_tokens, cost_nanos, occurred_at)
       VALUES ('req_late', 'org_a', 'gpt', 'openai', 'chat_completions', 1, 0, 1, 0, ${3 * usd}, '2026-10-18')`,
    );
    const store = createBillingStore(pool);
    const draft = await store.generateInvoice({
      orgId: "org_a",
      at: new Date("2027-01-20"),
      now: new Date("2027-02-16"),
    });
    expect(draft.id).toBe("inv_jan");
    expect(draft.subtotalCents).toBe(300n);
    const discounts = draft.lines.filter((l) => l.tokenType === "discount");
    expect(discounts.map((l) => [l.discountRuleId, l.amountNanos])).toEqual([["disc_b", -BigInt(usd / 20)]]);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}, 60_000);

test("a migration waiting for a table's lock gives way to the calls queued behind it, and applies once it is free", async () => {
  const { pool, connectionString } = await emptyDatabase();
  const dir = await mkdtemp(join(tmpdir(), "billing-migrations-"));
  // A long read of budget_leases (a pg_dump, an operator's open transaction) holds a lock the migration must wait for.
  const backup = new pg.Client({ connectionString });
  const replica = new pg.Client({ connectionString });
  try {
    // 0011 alters budget_leases (a later migration may alter other tables).
    const at = migrations.indexOf("0011_token_leases.sql");
    const last = migrations[at] as string;
    for (const name of migrations.slice(0, at)) await cp(join(migrationsDir, name), join(dir, name));
    await migrate(pool, dir);
    await cp(join(migrationsDir, last), join(dir, last));
    await Promise.all([backup.connect(), replica.connect()]);
    await backup.query("BEGIN");
    await backup.query("SELECT count(*) FROM budget_leases");
    const waits: number[] = [];
    const migrating = migrate(pool, dir, { lockTimeoutMs: 300, onLockWait: (attempt) => waits.push(attempt) });
    await Bun.sleep(100);
    // An old replica still serving grants: behind the migration's lock request it would wait as long as the backup.
    const started = Date.now();
    await replica.query({ text: "SELECT count(*) FROM budget_leases", query_timeout: 5_000 } as pg.QueryConfig);
    expect(Date.now() - started).toBeLessThan(2_000);
    await Bun.sleep(500);
    await backup.query("COMMIT");
    expect((await migrating).applied).toEqual([last]);
    expect(waits[0]).toBe(1);
  } finally {
    await Promise.all([backup.end(), replica.end()]);
    await rm(dir, { recursive: true, force: true });
  }
}, 60_000);

/** A migrations folder holding `names` of this code's migrations and the `extra` files given, removed after `use`. */
async function withMigrations(names: string[], extra: Record<string, string>, use: (dir: string) => Promise<void>) {
  const dir = await mkdtemp(join(tmpdir(), "billing-migrations-"));
  try {
    for (const name of names) await cp(join(migrationsDir, name), join(dir, name));
    for (const [name, sql] of Object.entries(extra)) await writeFile(join(dir, name), sql);
    await use(dir);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

const recordedMigrations = async (pool: pg.Pool) =>
  (
    await pool.query<{ name: string; checksum: string; stops_older_writers: boolean }>(
      "SELECT name, checksum, stops_older_writers FROM schema_migrations ORDER BY name",
    )
  ).rows;
const compatible = "-- Old code leaves it to its default.\nALTER TABLE organizations ADD COLUMN extra int NOT NULL DEFAULT 0;\n";
const breaking = "-- older-writers: stop\nCREATE TABLE org_extra (org_id text PRIMARY KEY);\n";

test("a fresh database records which migrations older billing must not write past", async () => {
  const { pool } = await emptyDatabase();
  expect(await migrate(pool)).toEqual({ applied: migrations, unknown: [] });
  const recorded = await recordedMigrations(pool);
  expect(recorded.filter((row) => row.stops_older_writers).map((row) => row.name)).toEqual(stoppingOlderWriters);
}, 60_000);

test("billing without a migration older billing must not write past refuses to start, writing nothing", async () => {
  const { pool } = await emptyDatabase();
  await migrate(pool);
  const before = await recordedMigrations(pool);
  // Billing from before 0018 (a rollback, an old pod restarting mid-rollout) would record usage its org days miss.
  await withMigrations(beforeOrgDays, {}, async (older) => {
    await expect(migrate(pool, older)).rejects.toThrow(
      "the database has migration 0018_org_daily_spend.sql applied, which this billing does not have and after " +
        "which older billing must not write; run billing of a version that has it on every replica " +
        "(see README, Upgrades)",
    );
  });
  // One with a new migration of its own, not yet applied, applies nothing either.
  await withMigrations(beforeOrgDays, { "0020_extra.sql": compatible }, async (other) => {
    await expect(migrate(pool, other)).rejects.toThrow(/migration 0018_org_daily_spend.sql applied/);
  });
  expect(await recordedMigrations(pool)).toEqual(before);
  expect((await pool.query("SELECT to_regclass('usage_org_days') IS NOT NULL AS kept")).rows).toEqual([{ kept: true }]);
  const extra = await pool.query("SELECT attname FROM pg_attribute WHERE attrelid = 'organizations'::regclass");
  expect(extra.rows.map((row) => row.attname)).not.toContain("extra");
}, 60_000);

test("a rollback across migrations older billing may write past starts, and is refused once a later one may not", async () => {
  const { pool } = await emptyDatabase();
  await withMigrations(migrations, { "0020_extra.sql": compatible }, async (newer) => {
    expect((await migrate(pool, newer)).applied).toEqual([...migrations, "0020_extra.sql"]);
  });
  // This code, one version older: it starts, and what it writes is kept.
  expect(await migrate(pool)).toEqual({ applied: [], unknown: ["0020_extra.sql"] });
  const store = createBillingStore(pool);
  const org = await store.createOrganization({
    name: "rolled back",
    taxRateBps: 0,
    billingDay: 1,
    monthlyBudgetNanos: 0n,
    maxDiscountBps: 0,
  });
  const recorded = await store.recordUsage([
    {
      requestId: "req_rolled_back",
      orgId: org.id,
      projectId: null,
      apiKeyId: null,
      model: "mock",
      provider: "mock",
      endpoint: "chat_completions",
      inputTokens: 1n,
      cachedInputTokens: 0n,
      outputTokens: 1n,
      reasoningTokens: 0n,
      costNanos: 7n,
      occurredAt: new Date("2026-03-10T12:00:00Z"),
      costBreakdown: null,
    },
  ]);
  expect(recorded.inserted).toBe(1);
  const days = await pool.query("SELECT cost_nanos::int AS cost FROM usage_org_days WHERE org_id = $1", [org.id]);
  expect(days.rows).toEqual([{ cost: 7 }]);

  // 0021 may not be written past: code without it is refused, whether or not it has 0020; code with it starts.
  await withMigrations(migrations, { "0020_extra.sql": compatible, "0021_org_extra.sql": breaking }, async (newest) => {
    expect((await migrate(pool, newest)).applied).toEqual(["0021_org_extra.sql"]);
    await expect(migrate(pool)).rejects.toThrow(/migration 0021_org_extra.sql applied/);
    await withMigrations(migrations, { "0020_extra.sql": compatible }, async (older) => {
      await expect(migrate(pool, older)).rejects.toThrow(/migration 0021_org_extra.sql applied/);
    });
    expect(await migrate(pool, newest)).toEqual({ applied: [], unknown: [] });
  });
}, 60_000);

test("a database migrated before migrations declared older writers' stop takes the declarations of those it has", async () => {
  const { pool } = await emptyDatabase();
  // 0007 and 0018 as first applied, without their declaration, by billing whose schema_migrations had no flag.
  const undeclared = Object.fromEntries(
    await Promise.all(
      stoppingOlderWriters.map(async (name) => [
        name,
        (await Bun.file(join(migrationsDir, name)).text()).replace("-- older-writers: stop\n", ""),
      ]),
    ),
  );
  await withMigrations(
    migrations.filter((name) => !stoppingOlderWriters.includes(name)),
    undeclared,
    async (dir) => {
      expect((await migrate(pool, dir)).applied).toEqual(migrations);
    },
  );
  await pool.query("ALTER TABLE schema_migrations DROP COLUMN stops_older_writers");
  // Declaring them is no change to what they did: the upgrade applies nothing and refuses nothing.
  expect(await migrate(pool)).toEqual({ applied: [], unknown: [] });
  const recorded = await recordedMigrations(pool);
  expect(recorded.filter((row) => row.stops_older_writers).map((row) => row.name)).toEqual(stoppingOlderWriters);
  await withMigrations(beforeOrgDays, {}, async (older) => {
    await expect(migrate(pool, older)).rejects.toThrow(/migration 0018_org_daily_spend.sql applied/);
  });
}, 60_000);

test("a start with nothing to apply waits for no table a backup holds", async () => {
  const { pool, connectionString } = await emptyDatabase();
  await migrate(pool);
  // pg_dump holds every table it dumps, schema_migrations among them, until it is done.
  const backup = new pg.Client({ connectionString });
  try {
    await backup.connect();
    await backup.query("BEGIN");
    await backup.query("SELECT count(*) FROM schema_migrations");
    const waits: number[] = [];
    expect(await migrate(pool, migrationsDir, { lockTimeoutMs: 300, onLockWait: (attempt) => waits.push(attempt) }))
      .toEqual({ applied: [], unknown: [] });
    expect(waits).toEqual([]);
  } finally {
    await backup.end();
  }
}, 60_000);
