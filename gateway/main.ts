import { hostname } from "node:os";
import { fileURLToPath } from "node:url";
import { z } from "zod";
import { AnalyticsService } from "../gen/analytics/v1/analytics_pb.ts";
import { BillingService } from "../gen/billing/v1/billing_pb.ts";
import { GatewayService } from "../gen/gateway/v1/gateway_pb.ts";
import { ConfigError, commonEnv, env, loadEnvOrExit } from "../lib/config.ts";
import { createServiceClient } from "../lib/rpc-client.ts";
import { createRuntime, stopOnSignals } from "../lib/runtime.ts";
import { startServer } from "../lib/server.ts";
import { createKeyAuthorizer } from "./auth.ts";
import { type GatewayConfig, loadGatewayConfig } from "./config.ts";
import { createGatewayCore } from "./core.ts";
import { createRestApp } from "./http/app.ts";
import { restRoutes } from "./http/node.ts";
import { createMetricsShipper } from "./metrics-pipe.ts";
import { createProviders } from "./providers/index.ts";
import { createReadiness } from "./readiness.ts";
import { createGatewayService } from "./service.ts";
import { createMemorySpool } from "./spool.ts";

const cfg = loadEnvOrExit({
  ...commonEnv,
  GATEWAY_PORT: env.port(8080),
  BILLING_URL: z.url().default("http://127.0.0.1:8081"),
  ANALYTICS_URL: z.url().default("http://127.0.0.1:8082"),
  /** Routes and prices, YAML or JSON. */
  GATEWAY_CONFIG: z.string().min(1).default(fileURLToPath(new URL("./config.default.yaml", import.meta.url))),
  /** Names this replica in metrics; stable per pod in Kubernetes. */
  GATEWAY_INSTANCE_ID: z.string().min(1).max(128).default(`${hostname()}-${process.pid}`),
  GATEWAY_MAX_BODY_BYTES: z.coerce.number().int().min(1024).max(64 * 1024 * 1024).default(4 * 1024 * 1024),
  GATEWAY_KEY_CACHE_TTL_MS: z.coerce.number().int().min(0).max(3_600_000).default(30_000),
  GATEWAY_SPOOL_MAX_ROWS: z.coerce.number().int().min(1000).max(10_000_000).default(100_000),
  GATEWAY_METRICS_BATCH_ROWS: z.coerce.number().int().min(1).max(10_000).default(1000),
  GATEWAY_METRICS_INTERVAL_MS: z.coerce.number().int().min(1).max(60_000).default(100),
  /** How long SIGTERM waits for analytics to ack the last metrics. */
  GATEWAY_FLUSH_TIMEOUT_MS: z.coerce.number().int().min(0).max(600_000).default(5000),
});

let config: GatewayConfig;
try {
  config = loadGatewayConfig(cfg.GATEWAY_CONFIG);
} catch (e) {
  if (!(e instanceof ConfigError)) throw e;
  process.stderr.write(`${e.message}\n`);
  process.exit(2);
}

const runtime = createRuntime("gateway", cfg);
const { log } = runtime;

const providers = createProviders(config.providers, process.env, (provider, variable) =>
  log.warn("provider has no API key; its models fail until it is set", { provider, variable }),
);
const billing = createServiceClient(BillingService, {
  baseUrl: cfg.BILLING_URL,
  bearerToken: cfg.ADMIN_TOKEN,
  interceptors: runtime.clientInterceptors,
  timeoutMs: 2000,
});
const analytics = createServiceClient(AnalyticsService, {
  baseUrl: cfg.ANALYTICS_URL,
  bearerToken: cfg.ADMIN_TOKEN,
  interceptors: runtime.clientInterceptors,
});

const keys = createKeyAuthorizer({ billing, hitTtlMs: cfg.GATEWAY_KEY_CACHE_TTL_MS, log });
const shipper = createMetricsShipper({
  client: analytics,
  spool: createMemorySpool({ maxRows: cfg.GATEWAY_SPOOL_MAX_ROWS }),
  instanceId: cfg.GATEWAY_INSTANCE_ID,
  log: log.child({ component: "metrics-pipe" }),
  batchRows: cfg.GATEWAY_METRICS_BATCH_ROWS,
  intervalMs: cfg.GATEWAY_METRICS_INTERVAL_MS,
  registry: runtime.metrics.registry,
});
shipper.start();

const core = createGatewayCore({
  config,
  providers,
  keys,
  shipper,
  instanceId: cfg.GATEWAY_INSTANCE_ID,
  log,
  registry: runtime.metrics.registry,
});
const service = createGatewayService(core);
const rest = createRestApp({ core, tracer: runtime.telemetry.tracer, maxBodyBytes: cfg.GATEWAY_MAX_BODY_BYTES });

const server = await startServer({
  name: "gateway",
  port: cfg.GATEWAY_PORT,
  routes: (router) => router.service(GatewayService, service),
  interceptors: runtime.serverInterceptors,
  http: restRoutes(rest),
  readiness: createReadiness({ billingUrl: cfg.BILLING_URL, shipper }),
  registry: runtime.metrics.registry,
  log,
  readMaxBytes: cfg.GATEWAY_MAX_BODY_BYTES,
});
log.info("gateway started", { models: config.models.size, instance: cfg.GATEWAY_INSTANCE_ID, url: server.url });

stopOnSignals(log, async () => {
  await server.close(cfg.SHUTDOWN_GRACE_MS);
  if (!(await shipper.flush(cfg.GATEWAY_FLUSH_TIMEOUT_MS))) {
    log.error("request metrics not acked by analytics before exit", { rows: shipper.status().rows });
  }
  await shipper.close();
  await runtime.telemetry.shutdown();
});
