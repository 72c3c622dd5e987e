/**
 * The mesh of the race tests: billing (on a Postgres of its own), analytics and two gateway replicas sharing one
 * model config, each gateway with billing's key change stream confirmed, so keys it loads are cached for 30 s.
 */
import { writeFile } from "node:fs/promises";
import * as path from "node:path";
import { freePort, type ServiceProcess, spawnService } from "../../lib/processes.ts";
import { eventually } from "../support.ts";
import { type MeshWithDatabase, startMeshWithDatabase } from "./mesh-with-database.ts";

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

export interface Replicas extends MeshWithDatabase {
  /** The second gateway replica; the first is the mesh's. */
  second: ServiceProcess;
  /** Both gateways' base URLs. */
  gateways: string[];
}

/**
 * Starts the mesh with model `race` at `pricing` as the gateways' config, a lease horizon of one second and
 * `gatewayEnv` in both; their instance ids are `<name>-gw-1` and `<name>-gw-2`. Log lines go to stderr while RACE_LOG
 * is set.
 */
export async function startReplicas(options: {
  name: string;
  pricing: { input: string; output: string };
  gatewayEnv?: Record<string, string>;
  billingEnv?: Record<string, string>;
}): Promise<Replicas> {
  const { name } = options;
  const started = await startMeshWithDatabase({
    name: `${name}-race`,
    routes: async (dataDir) => {
      const config = path.join(dataDir, "race.yaml");
      await writeFile(config, raceRoutes(options.pricing));
      return config;
    },
    gatewayEnv: { GATEWAY_BUDGET_LEASE_HORIZON_S: "1", ...options.gatewayEnv, GATEWAY_INSTANCE_ID: `${name}-gw-1` },
    billingEnv: options.billingEnv,
    logVariable: "RACE_LOG",
  });
  const { mesh } = started;
  const port = await freePort();
  const second = spawnService({
    name: "gateway-2",
    cmd: [process.execPath, path.join(root, "gateway", "main.ts")],
    cwd: root,
    env: {
      MESH_DATA_DIR: started.dataDir,
      ADMIN_TOKEN: started.adminToken,
      BILLING_URL: mesh.urls.billing,
      ANALYTICS_URL: mesh.urls.analytics,
      LOG_LEVEL: "warn",
      GATEWAY_PORT: String(port),
      ...started.gatewayEnv,
      GATEWAY_INSTANCE_ID: `${name}-gw-2`,
    },
    readyUrl: `http://127.0.0.1:${port}/readyz`,
    onLine: (line) => {
      if (process.env.RACE_LOG) process.stderr.write(`[gateway-2] ${line}\n`);
    },
  });
  try {
    await second.ready;
  } catch (e) {
    await started.stop();
    throw e;
  }
  const gateways = [mesh.urls.gateway, `http://127.0.0.1:${port}`];
  await streamsConfirmed(gateways);
  return {
    ...started,
    second,
    gateways,
    async stop() {
      await second.stop();
      await started.stop();
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
