/**
 * The mesh of the race tests: billing (on a Postgres of its own), analytics and two gateway replicas sharing one
 * model config, each gateway with billing's key change stream confirmed, so keys it loads are cached for 30 s.
 */
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import * as path from "node:path";
import { BillingService } from "../../gen/billing/v1/billing_pb.ts";
import { createTestDatabase, type TestDatabase } from "../../billing/store/test-db.ts";
import { freePort, type ServiceProcess, spawnService } from "../../lib/processes.ts";
import { createServiceClient } from "../../lib/rpc-client.ts";
import { type Mesh, startMesh } from "../../scripts/mesh.ts";
import { eventually } from "../support.ts";

const root = path.resolve(import.meta.dir, "../..");

// The race's request: the mock counts 4 characters a token, 3 + 4 + 80/4 = 27 input tokens, and cuts its reply at
// max_tokens.
export const raceInputTokens = 27n;
export const raceMaxTokens = 20;

/** The gateways' config: model `race` on the mock, 40 ms a call, at these prices in USD per million tokens. */
function raceRoutes(pricing: { input: string; output: string }): string {
  return `
providers:
  - { name: mock, kind: mock, latency_ms: 40 }
models:
  - name: race
    targets: [{ provider: mock, model: mock-race }]
    pricing: { input_per_mtok: "${pricing.input}", output_per_mtok: "${pricing.output}" }
`;
}

/** One request of the race to model `race` on `gateway`, with `key`. */
export function raceChat(gateway: string, key: string): Promise<Response> {
  return fetch(`${gateway}/v1/chat/completions`, {
    method: "POST",
    headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
    body: JSON.stringify({ model: "race", messages: [{ role: "user", content: "x".repeat(80) }], max_tokens: raceMaxTokens }),
  });
}

/** The race with `key`: 10 * `n` requests at once, the replicas taking turns, then 2 * `n` more. */
export async function raceWaves(gateways: string[], key: string, n: number): Promise<Response[]> {
  const burst = (count: number) => Promise.all(Array.from({ length: count }, (_, i) => raceChat(gateways[i % 2] as string, key)));
  const responses = await burst(10 * n);
  // A second wave once the replicas may ask billing again: leftovers too small for a request go back and are
  // granted again, so leases are released and re-granted while requests race.
  await Bun.sleep(1_100);
  responses.push(...(await burst(2 * n)));
  return responses;
}

export interface Replicas {
  db: TestDatabase;
  dataDir: string;
  mesh: Mesh;
  /** The second gateway replica; the first is the mesh's. */
  second: ServiceProcess;
  /** Both gateways' base URLs. */
  gateways: string[];
  billing: ReturnType<typeof createServiceClient<typeof BillingService>>;
  /** Every service's log lines. */
  logs: string[];
  stop(): Promise<void>;
}

/**
 * Starts the mesh with model `race` at `pricing` as the gateways' config, a lease horizon of one second and
 * `gatewayEnv` in both; their instance ids are `<name>-gw-1` and `<name>-gw-2`.
 */
export async function startReplicas(options: {
  name: string;
  pricing: { input: string; output: string };
  gatewayEnv?: Record<string, string>;
  billingEnv?: Record<string, string>;
}): Promise<Replicas> {
  const { name } = options;
  const logs: string[] = [];
  const adminToken = `${name}-admin-token-0123456789`;
  const db = await createTestDatabase();
  const dataDir = await mkdtemp(path.join(tmpdir(), `${name}-race-`));
  const config = path.join(dataDir, "race.yaml");
  await writeFile(config, raceRoutes(options.pricing));
  const gatewayEnv = { GATEWAY_CONFIG: config, GATEWAY_BUDGET_LEASE_HORIZON_S: "1", ...options.gatewayEnv };
  const mesh = await startMesh({
    dataDir,
    adminToken,
    ports: { gateway: 0, billing: 0, analytics: 0 },
    env: { DATABASE_URL: db.connectionString, LOG_LEVEL: "warn" },
    serviceEnv: {
      gateway: { ...gatewayEnv, GATEWAY_INSTANCE_ID: `${name}-gw-1` },
      ...(options.billingEnv ? { billing: options.billingEnv } : {}),
    },
    onLine: (service, line) => logs.push(`[${service}] ${line}`),
  });
  const port = await freePort();
  const second = spawnService({
    name: "gateway-2",
    cmd: [process.execPath, path.join(root, "gateway", "main.ts")],
    cwd: root,
    env: {
      MESH_DATA_DIR: dataDir,
      ADMIN_TOKEN: adminToken,
      BILLING_URL: mesh.urls.billing,
      ANALYTICS_URL: mesh.urls.analytics,
      LOG_LEVEL: "warn",
      GATEWAY_PORT: String(port),
      ...gatewayEnv,
      GATEWAY_INSTANCE_ID: `${name}-gw-2`,
    },
    readyUrl: `http://127.0.0.1:${port}/readyz`,
    onLine: (line) => logs.push(`[gateway-2] ${line}`),
  });
  await second.ready;
  const gateways = [mesh.urls.gateway, `http://127.0.0.1:${port}`];
  const billing = createServiceClient(BillingService, { baseUrl: mesh.urls.billing, bearerToken: adminToken, timeoutMs: 10_000 });
  await streamsConfirmed(gateways);
  return {
    db,
    dataDir,
    mesh,
    second,
    gateways,
    billing,
    logs,
    async stop() {
      await second.stop();
      await mesh.stop();
      await db.drop();
      await rm(dataDir, { recursive: true, force: true });
    },
  };
}

/** The usage summary of `apiKeyId` once billing has recorded all `requests` of it. */
export function billedUsage(billing: Replicas["billing"], orgId: string, apiKeyId: string, requests: number) {
  return eventually(
    async () => {
      const summary = await billing.getUsageSummary({ orgId, apiKeyId });
      return summary.requests === BigInt(requests) ? summary : undefined;
    },
    { timeoutMs: 20_000, what: "every request billed" },
  );
}

/** Once each gateway has billing's key change stream confirmed: keys it loads from then on are cached for 30 s. */
export function streamsConfirmed(urls: string[]) {
  return eventually(
    async () => {
      const texts = await Promise.all(urls.map(async (url) => (await fetch(`${url}/metrics`)).text()));
      return texts.every((text) => /^gateway_key_changes_stream_up(\{[^}]*\})? 1$/m.test(text));
    },
    { timeoutMs: 20_000, intervalMs: 50, what: "key change streams confirmed" },
  );
}
