import { join } from "node:path";
import { commonEnv, env, exitOnArguments, loadEnvOrExit } from "../lib/config.ts";
import { createCorsPolicy } from "../lib/cors.ts";
import { createRuntime, listenOrExit, stopOnSignals } from "../lib/runtime.ts";
import { startServer } from "../lib/server.ts";
import { createBillingApp } from "./app.ts";
import { minLeaseRetentionDays } from "./store/budget-leases.ts";
import { createPool } from "./store/db.ts";
import { startEmbeddedPostgres } from "./store/embedded.ts";
import { migrate } from "./store/migrate.ts";

exitOnArguments({
  command: "npm run billing",
  script: "billing/main.ts",
  about: "orgs, API keys, budgets, usage and invoices in Postgres, served over Connect, gRPC and gRPC-Web",
});
const cfg = loadEnvOrExit({
  ...commonEnv,
  BILLING_PORT: env.port(8081),
  /** Postgres to use; unset starts an embedded server under <MESH_DATA_DIR>/postgres. */
  DATABASE_URL: env.setOrUnset(env.postgresUrl.optional()),
  /** How long a lease that expired unreleased (its gateway died) still reserves its grant; see budget-leases.ts. */
  BUDGET_LEASE_GRACE_SECONDS: env.int(0, 86_400).default(600),
  /** What one gateway may hold beyond half of what is left of a budget; see budget-leases.ts. */
  BUDGET_LEASE_HOLDER_FLOOR_NANOS: env.bigint(0n).default(100_000_000n),
  /** The same for a key's monthly tokens, in tokens. */
  BUDGET_LEASE_HOLDER_FLOOR_TOKENS: env.bigint(0n).default(10_000n),
  /** Days leases are kept after their period and expiry; see pruneBudgetLeases in budget-leases.ts. */
  BUDGET_LEASE_RETENTION_DAYS: env.int(minLeaseRetentionDays, 36_500).default(400),
});
const runtime = createRuntime("billing", cfg);
const { log } = runtime;

// A stop signal while the embedded server starts or migrations run ends the start (the server stopped once started).
const signals = stopOnSignals(log);
const starting = cfg.DATABASE_URL
  ? undefined
  : startEmbeddedPostgres({ dataDir: join(cfg.MESH_DATA_DIR, "postgres"), log });
signals.undoOnStop(async () => (await starting?.catch(() => undefined))?.stop());
// A start-up failure is one JSON error line and exit 1, as every line of the process is JSON, not an uncaught stack.
const embedded = await signals.unlessStopped(Promise.resolve(starting)).catch((e: unknown) => {
  log.error("embedded postgres failed to start", { err: e });
  process.exit(1);
});
const pool = createPool({
  connectionString: cfg.DATABASE_URL ?? embedded?.connectionString,
  max: 20,
  connectionTimeoutMillis: 5_000,
});
// Idle connections that break (a restarted server) are dropped by the pool; without a listener they crash the process.
// Once the pool is ending, its connections close while the embedded server stops: nothing failed.
pool.on("error", (e) => pool.ending || log.warn("idle postgres connection failed", { err: e }));

try {
  const migrating = migrate(pool, undefined, {
    onLockWait: (attempt, err) =>
      log.warn("migrations waited too long for a table another session holds; running them again shortly", {
        attempt,
        err,
      }),
  });
  const { applied, unknown } = await signals.unlessStopped(migrating);
  log.info("migrations applied", { applied });
  // A rollback across migrations that let older billing write; one that does not stops the start above.
  if (unknown.length > 0) log.warn("the database has migrations this billing does not have", { unknown });
} catch (e) {
  // pg's errors name the host, never the password.
  log.error("postgres migration failed", { err: e });
  await embedded?.stop();
  process.exit(1);
}
const stopping = new AbortController();
signals.undoOnStop(() => stopping.abort());
// Billing cannot serve without its database and nothing here restarts it: exit so a supervisor restarts both.
void embedded?.exited.then(() => {
  if (stopping.signal.aborted) return;
  log.error("embedded postgres exited; exiting", { pid: embedded.pid });
  process.exit(1);
});
const { routes, http, readiness } = createBillingApp({
  pool,
  adminToken: cfg.ADMIN_TOKEN,
  clock: () => new Date(),
  log,
  stopSignal: stopping.signal,
  registry: runtime.metrics.registry,
  abandonedLeaseGraceMs: cfg.BUDGET_LEASE_GRACE_SECONDS * 1000,
  holderFloorNanos: cfg.BUDGET_LEASE_HOLDER_FLOOR_NANOS,
  holderFloorTokens: cfg.BUDGET_LEASE_HOLDER_FLOOR_TOKENS,
  leaseRetentionDays: cfg.BUDGET_LEASE_RETENTION_DAYS,
});

const server = await listenOrExit(
  log,
  "BILLING_PORT",
  cfg.BILLING_PORT,
  () =>
    startServer({
      name: "billing",
      port: cfg.BILLING_PORT,
      routes,
      http,
      interceptors: runtime.serverInterceptors,
      registry: runtime.metrics.registry,
      log,
      cors: createCorsPolicy(cfg.CORS_ALLOWED_ORIGINS),
      readiness,
      connectionMaxAgeMs: cfg.CONNECTION_MAX_AGE_MS,
      connectionMaxAgeGraceMs: cfg.CONNECTION_MAX_AGE_GRACE_MS,
    }),
  // The embedded server would outlive this process, holding its data directory.
  async () => {
    stopping.abort();
    await pool.end();
    await embedded?.stop();
  },
);

signals.serving(async () => {
  // Key change streams would otherwise hold shutdown for the whole grace period; gateways reconnect elsewhere.
  stopping.abort();
  await server.close(cfg.SHUTDOWN_GRACE_MS, cfg.SHUTDOWN_DRAIN_MS);
  await pool.end();
  await embedded?.stop();
  await runtime.telemetry.shutdown();
});
