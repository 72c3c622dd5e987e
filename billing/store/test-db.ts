import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll } from "bun:test";
import pg from "pg";
import { createLogger } from "../../lib/log.ts";
import { createPool } from "./db.ts";
import { startEmbeddedPostgres } from "./embedded.ts";
import { migrate } from "./migrate.ts";
import { type BillingStore, createBillingStore } from "./store.ts";
import type { KeyLimits } from "./types.ts";

export interface TestDatabase {
  pool: pg.Pool;
  connectionString: string;
  /** Closes the pool and drops the database. */
  drop(): Promise<void>;
}

let server: Promise<string> | undefined;

// Backgrounded so that it is nobody's child: bun kills the children of a test process that times out.
const watchdogScript = `(
while kill -0 "$1" 2>/dev/null; do sleep 0.2; done
kill -QUIT "$2" 2>/dev/null
for _ in $(seq 100); do kill -0 "$2" 2>/dev/null || break; sleep 0.05; done
rm -rf "$3"
) >/dev/null 2>&1 &`;

/**
 * Connection string of the server tests create their databases on: `DATABASE_URL` when set, else one embedded
 * Postgres under a temporary directory, started on first use and shared by every test file of the process.
 */
function testServerUrl(): Promise<string> {
  server ??= (async () => {
    if (process.env.DATABASE_URL) return process.env.DATABASE_URL;
    const dir = mkdtempSync(join(tmpdir(), "billing-test-"));
    const log = createLogger({ service: "billing-test", level: "warn" });
    const embedded = await startEmbeddedPostgres({ dataDir: join(dir, "postgres"), database: "postgres", log });
    // `bun test` exits without an "exit" event, so a watchdog in its own session stops the server and removes
    // the directory once this process is gone, however it ends.
    spawn("sh", ["-c", watchdogScript, "watchdog", String(process.pid), String(embedded.pid), dir], {
      detached: true,
      stdio: "ignore",
    }).unref();
    return embedded.connectionString;
  })();
  return server;
}

/** A fresh database (migrated unless asked otherwise) on the shared test server. */
export async function createTestDatabase(options: { migrate?: boolean } = {}): Promise<TestDatabase> {
  const serverUrl = await testServerUrl();
  const name = `billing_test_${randomBytes(6).toString("hex")}`;
  const admin = async <R extends pg.QueryResultRow>(sql: string, params: unknown[] = []) => {
    const client = new pg.Client({ connectionString: serverUrl });
    await client.connect();
    try {
      return (await client.query<R>(sql, params)).rows;
    } finally {
      await client.end();
    }
  };
  await admin(`CREATE DATABASE ${name}`);
  const url = new URL(serverUrl);
  url.pathname = `/${name}`;
  const connectionString = url.toString();
  const pool = createPool({ connectionString, max: 10 });
  if (options.migrate ?? true) await migrate(pool);
  return {
    pool,
    connectionString,
    async drop() {
      await pool.end();
      // pool.end() resolves before its connections have closed; forcing the drop on them would fail them loudly.
      for (let i = 0; i < 200; i++) {
        const [row] = await admin<{ n: number }>(
          "SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = $1",
          [name],
        );
        if (row?.n === 0) break;
        await Bun.sleep(10);
      }
      await admin(`DROP DATABASE ${name} WITH (FORCE)`);
    },
  };
}

/** Key limits with every limit off. */
export const noLimits: KeyLimits = {
  monthlyBudgetNanos: 0n,
  monthlyTokens: 0n,
  requestsPerMinute: 0,
  tokensPerMinute: 0n,
  maxConcurrentRequests: 0,
  allowedModels: [],
  expiresAt: null,
};

/**
 * A store on a fresh database for the calling test file (or describe block): registers the hooks that
 * create and drop it. Read `db` and `store` inside tests, after the hooks ran.
 */
export function useTestStore(): { readonly db: TestDatabase; readonly store: BillingStore } {
  let db: TestDatabase | undefined;
  let store: BillingStore | undefined;
  beforeAll(async () => {
    db = await createTestDatabase();
    store = createBillingStore(db.pool);
  }, 60_000);
  afterAll(() => db?.drop());
  return {
    get db() {
      if (!db) throw new Error("the test database is created in beforeAll");
      return db;
    },
    get store() {
      if (!store) throw new Error("the test store is created in beforeAll");
      return store;
    },
  };
}

/** An org with no tax, budget or discount cap, for tests that need one to hang keys and usage on. */
export function newOrg(store: BillingStore, name: string) {
  return store.createOrganization({ name, taxRateBps: 0, billingDay: 1, monthlyBudgetNanos: 0n, maxDiscountBps: 0 });
}

/** A first page large enough for any test's rows. */
export const allRows = { after: null, limit: 10_000 };
