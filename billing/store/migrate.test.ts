import { afterAll, expect, test } from "bun:test";
import { cp, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { migrate, migrationsDir } from "./migrate.ts";
import { createTestDatabase, type TestDatabase } from "./test-db.ts";

const databases: TestDatabase[] = [];
const emptyDatabase = async () => {
  const db = await createTestDatabase({ migrate: false });
  databases.push(db);
  return db;
};
afterAll(() => Promise.all(databases.map((db) => db.drop())));

const billingTables = [
  "api_keys",
  "budget_leases",
  "discount_rules",
  "discount_tiers",
  "invoice_line_items",
  "invoices",
  "organizations",
  "projects",
  "schema_migrations",
  "usage_records",
  "usage_summaries",
];

test("migrates an empty database, then re-running applies nothing", async () => {
  const { pool } = await emptyDatabase();
  expect((await migrate(pool)).applied).toEqual(["0001_init.sql"]);
  const tables = await pool.query<{ table_name: string }>(
    "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY table_name",
  );
  expect(tables.rows.map((r) => r.table_name)).toEqual(billingTables);

  expect((await migrate(pool)).applied).toEqual([]);
  const recorded = await pool.query("SELECT name FROM schema_migrations");
  expect(recorded.rows).toEqual([{ name: "0001_init.sql" }]);
});

test("concurrent migrators apply each file exactly once", async () => {
  const { pool } = await emptyDatabase();
  const results = await Promise.all([migrate(pool), migrate(pool), migrate(pool)]);
  expect(results.map((r) => r.applied).flat()).toEqual(["0001_init.sql"]);
});

test("a failing migration rolls back everything of its run", async () => {
  const { pool } = await emptyDatabase();
  const dir = await mkdtemp(join(tmpdir(), "billing-migrations-"));
  try {
    await cp(migrationsDir, dir, { recursive: true });
    await writeFile(join(dir, "0002_broken.sql"), "CREATE TABLE extra (id int);\nSELECT no_such_function();\n");
    await expect(migrate(pool, dir)).rejects.toThrow(/0002_broken.sql failed/);
    const tables = await pool.query("SELECT to_regclass('organizations') AS orgs, to_regclass('extra') AS extra");
    expect(tables.rows[0]).toEqual({ orgs: null, extra: null });
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

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
});
