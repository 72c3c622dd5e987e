import { join } from "node:path";
import { createClient } from "@clickhouse/client";
import { z } from "zod";
import { BillingService } from "../gen/billing/v1/billing_pb.ts";
import { commonEnv, env, loadEnvOrExit } from "../lib/config.ts";
import { createServiceClient } from "../lib/rpc-client.ts";
import { createRuntime, stopOnSignals } from "../lib/runtime.ts";
import { startServer } from "../lib/server.ts";
import { analyticsRoutes } from "./routes.ts";
import { createAnalyticsService } from "./service.ts";
import { createChdbDriver } from "./store/chdb-driver.ts";
import { createClientDriver } from "./store/client-driver.ts";
import { createAnalyticsStore } from "./store/store.ts";

const cfg = loadEnvOrExit({
  ...commonEnv,
  ANALYTICS_PORT: env.port(8082),
  BILLING_URL: z.url().default("http://127.0.0.1:8081"),
  /** A ClickHouse server's HTTP URL; unset runs the engine in-process (chdb) under MESH_DATA_DIR/clickhouse. */
  CLICKHOUSE_URL: z.url().optional(),
  CLICKHOUSE_USER: z.string().default("default"),
  CLICKHOUSE_PASSWORD: z.string().default(""),
  CLICKHOUSE_DATABASE: z
    .string()
    .regex(/^[A-Za-z_][A-Za-z0-9_]*$/, "must be a plain identifier")
    .default("mesh"),
  /** Request rows are dropped this many days after they started. */
  CLICKHOUSE_TTL_DAYS: z.coerce.number().int().min(1).max(36_500).default(400),
});

const runtime = createRuntime("analytics", cfg);
const { log } = runtime;

const driver = cfg.CLICKHOUSE_URL
  ? createClientDriver(
      createClient({
        url: cfg.CLICKHOUSE_URL,
        username: cfg.CLICKHOUSE_USER,
        password: cfg.CLICKHOUSE_PASSWORD,
        application: "mesh-analytics",
      }),
    )
  : createChdbDriver(join(cfg.MESH_DATA_DIR, "clickhouse"));
const store = createAnalyticsStore(driver, { database: cfg.CLICKHOUSE_DATABASE, ttlDays: cfg.CLICKHOUSE_TTL_DAYS });
try {
  const applied = await store.migrate();
  log.info("clickhouse ready", {
    backend: cfg.CLICKHOUSE_URL ? "server" : "chdb",
    database: cfg.CLICKHOUSE_DATABASE,
    migrations_applied: applied,
  });
} catch (e) {
  log.error("clickhouse migration failed", { err: e });
  process.exit(1);
}

const billing = createServiceClient(BillingService, {
  baseUrl: cfg.BILLING_URL,
  bearerToken: cfg.ADMIN_TOKEN,
  interceptors: runtime.clientInterceptors,
  timeoutMs: 30_000,
});

const stopping = new AbortController();
const service = createAnalyticsService({
  store,
  billing,
  log,
  adminToken: cfg.ADMIN_TOKEN,
  registry: runtime.metrics.registry,
  tracer: runtime.telemetry.tracer,
  stopSignal: stopping.signal,
});

const server = await startServer({
  name: "analytics",
  port: cfg.ANALYTICS_PORT,
  routes: analyticsRoutes(service),
  interceptors: runtime.serverInterceptors,
  readiness: async () => {
    try {
      await store.ping();
      return { ready: true, checks: { clickhouse: "ok" } };
    } catch (e) {
      return { ready: false, checks: { clickhouse: e instanceof Error ? e.message : String(e) } };
    }
  },
  registry: runtime.metrics.registry,
  log,
});

stopOnSignals(log, async () => {
  stopping.abort();
  await server.close(cfg.SHUTDOWN_GRACE_MS);
  await store.close();
  await runtime.telemetry.shutdown();
});
