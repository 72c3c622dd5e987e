/**
 * The mesh of tests that read billing's tables: billing on a Postgres database of its own, the gateway's model config
 * the test writes, and billing's admin client.
 */
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import * as path from "node:path";
import { BillingService } from "../../gen/billing/v1/billing_pb.ts";
import { createTestDatabase, type TestDatabase } from "../../billing/store/test-db.ts";
import { createServiceClient } from "../../lib/rpc-client.ts";
import { type Mesh, startMesh } from "../../scripts/mesh.ts";

export interface MeshWithDatabase {
  db: TestDatabase;
  dataDir: string;
  adminToken: string;
  mesh: Mesh;
  billing: ReturnType<typeof createServiceClient<typeof BillingService>>;
  /** The gateway's environment: a change to it holds from the gateway's next restart. */
  gatewayEnv: Record<string, string | undefined>;
  /** Stops the mesh and removes its database and data directory. */
  stop(): Promise<void>;
}

/**
 * Starts the mesh in a data directory named after `name`, the gateway's config the file `routes` writes there (its
 * path), the gateway sending its metrics every 50 ms, and `gatewayEnv` and `billingEnv` in those services. Their log
 * lines go to stderr while the environment variable `logVariable` is set.
 */
export async function startMeshWithDatabase(options: {
  name: string;
  routes: (dataDir: string) => Promise<string>;
  gatewayEnv?: Record<string, string>;
  billingEnv?: Record<string, string>;
  logVariable: string;
}): Promise<MeshWithDatabase> {
  const adminToken = `${options.name}-admin-token-0123456789`;
  const db = await createTestDatabase();
  const dataDir = await mkdtemp(path.join(tmpdir(), `${options.name}-`));
  const removeBoth = async () => {
    await db.drop();
    await rm(dataDir, { recursive: true, force: true });
  };
  try {
    const config = await options.routes(dataDir);
    const gatewayEnv: Record<string, string | undefined> = { GATEWAY_CONFIG: config, ...options.gatewayEnv };
    const mesh = await startMesh({
      dataDir,
      adminToken,
      ports: { gateway: 0, billing: 0, analytics: 0 },
      env: { DATABASE_URL: db.connectionString, LOG_LEVEL: "warn", GATEWAY_METRICS_INTERVAL_MS: "50" },
      serviceEnv: { gateway: gatewayEnv, ...(options.billingEnv ? { billing: options.billingEnv } : {}) },
      onLine: (service, line) => {
        if (process.env[options.logVariable]) process.stderr.write(`[${service}] ${line}\n`);
      },
    });
    const billing = createServiceClient(BillingService, { baseUrl: mesh.urls.billing, bearerToken: adminToken, timeoutMs: 10_000 });
    return {
      db,
      dataDir,
      adminToken,
      mesh,
      billing,
      gatewayEnv,
      async stop() {
        await mesh.stop();
        await removeBoth();
      },
    };
  } catch (e) {
    await removeBoth();
    throw e;
  }
}
