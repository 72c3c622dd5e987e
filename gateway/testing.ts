import { writeSync } from "node:fs";
import type { Registry } from "prom-client";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient, createRouterTransport } from "@connectrpc/connect";
import type { RequestMetrics } from "../gen/analytics/v1/analytics_pb.ts";
import { BillingService } from "../gen/billing/v1/billing_pb.ts";
import { createLogger, type Logger } from "../lib/log.ts";
import { createKeyAuthorizer } from "./auth.ts";
import { parseGatewayConfig } from "./config.ts";
import { type CoreOptions, createGatewayCore } from "./core.ts";
import { createProviders } from "./providers/index.ts";
import { UpstreamError } from "./providers/provider.ts";
import type { GatewayError } from "./errors.ts";

/** The gateway config of one model, `mock`, on the mock provider at $1 per million tokens: more models may follow. */
export const mockRoutes = `
providers:
  - { name: mock, kind: mock }
models:
  - name: mock
    targets: [{ provider: mock, model: mock-echo-1 }]
    pricing: { input_per_mtok: "1", output_per_mtok: "1" }
`;

/** A key the billing fake knows. */
export interface FakeKey {
  id: string;
  orgId: string;
  projectId?: string;
  allowedModels?: string[];
  expireMs?: number;
  requestsPerMinute?: number;
}

/**
 * A real BillingService (AuthorizeKey only) behind an in-memory router transport, with the
 * knobs tests need: revoke a key, take billing down, count calls.
 */
export function createBillingFake(keys: Record<string, FakeKey>) {
  const known = new Map(Object.entries(keys));
  let calls = 0;
  let down = false;
  let delayMs = 0;
  const transport = createRouterTransport((router) =>
    router.service(BillingService, {
      async authorizeKey(req) {
        calls++;
        if (delayMs > 0) await Bun.sleep(delayMs);
        if (down) throw new ConnectError("billing is down", Code.Unavailable);
        const key = known.get(req.secret);
        if (!key) throw new ConnectError("unknown or revoked API key", Code.Unauthenticated);
        return {
          apiKey: {
            id: key.id,
            orgId: key.orgId,
            projectId: key.projectId ?? "",
            limits: {
              allowedModels: key.allowedModels ?? [],
              expireTime: key.expireMs === undefined ? undefined : timestampFromMs(key.expireMs),
              requestsPerMinute: key.requestsPerMinute ?? 0,
            },
          },
          organization: { id: key.orgId, name: key.orgId },
        };
      },
    }),
  );
  return {
    client: createClient(BillingService, transport),
    calls: () => calls,
    revoke: (secret: string) => known.delete(secret),
    setDown: (value: boolean) => {
      down = value;
    },
    /** How long each AuthorizeKey takes to answer, as a slow billing does. */
    setDelay: (ms: number) => {
      delayMs = ms;
    },
  };
}

/** A shipper that keeps what it is given. */
export function createRecordingShipper() {
  const rows: RequestMetrics[] = [];
  return { rows, record: (m: RequestMetrics) => void rows.push(m) };
}

/** A logger that keeps its lines instead of printing them. */
export function createTestLogger(): Logger & { lines: string[] } {
  const lines: string[] = [];
  return Object.assign(createLogger({ service: "gateway-test", level: "debug", write: (l) => void lines.push(l) }), { lines });
}

const testRoutes = `
providers:
  - { name: mock, kind: mock }
  - { name: down, kind: openai, base_url: "http://127.0.0.1:9/v1" }
  - { name: slow, kind: mock, latency_ms: 200 }
models:
  - name: mock
    targets: [{ provider: mock, model: mock-echo-1 }]
    pricing: { input_per_mtok: "0.50", output_per_mtok: "1.50" }
  - name: premium
    targets: [{ provider: mock, model: mock-echo-2 }]
    pricing: { input_per_mtok: "2.50", cached_input_per_mtok: "1.25", output_per_mtok: "10" }
  - name: broken
    targets: [{ provider: down, model: gpt-4o }]
    pricing: { input_per_mtok: "1", output_per_mtok: "1" }
    retries: 1
  - name: resilient
    targets: [{ provider: down, model: gpt-4o }, { provider: mock, model: mock-echo-1 }]
    pricing: { input_per_mtok: "1", output_per_mtok: "1" }
  - name: slow
    targets: [{ provider: slow, model: mock-slow }]
    pricing: { input_per_mtok: "1", output_per_mtok: "1" }
    timeout_ms: 30
`;

/**
 * A gateway core on the mock provider and a provider that always fails, with the billing fake's
 * keys: sk-good (any model), sk-limited (only "mock"). Its metrics go to `shipper` when given, else are kept in rows;
 * budgets are reserved through `budget` when given.
 */
export function createTestCore(
  options: { registry?: Registry; shipper?: CoreOptions["shipper"]; budget?: CoreOptions["budget"] } = {},
) {
  const billing = createBillingFake({
    "sk-good": { id: "key_good", orgId: "org_1", projectId: "proj_1" },
    "sk-limited": { id: "key_limited", orgId: "org_2", allowedModels: ["mock"] },
  });
  const shipper = createRecordingShipper();
  const config = parseGatewayConfig(testRoutes, "test-routes.yaml");
  const providers = createProviders(config.providers, {});
  let downCalls = 0;
  const fail = async (): Promise<never> => {
    downCalls++;
    throw new UpstreamError("transient", "down answered 500: boom", 500);
  };
  providers.set("down", {
    name: "down",
    kind: "openai",
    chat: fail,
    streamChat: fail,
    embed: fail,
    responses: fail,
    streamResponses: fail,
    storedResponse: fail,
  });
  const log = createTestLogger();
  const core = createGatewayCore({
    config,
    providers,
    keys: createKeyAuthorizer({ billing: billing.client }),
    shipper: options.shipper ?? shipper,
    instanceId: "gw-test",
    log,
    registry: options.registry,
    budget: options.budget,
  });
  return { core, billing, shipper, log, downCalls: () => downCalls };
}

/**
 * The spool's writes on a disk that fills up: each takes what room is left (a short write when the data does not
 * fit) and, once none is, fails with ENOSPC. Room is unbounded until a test sets it.
 */
export function createFillingDisk() {
  const disk = {
    room: Number.POSITIVE_INFINITY,
    write(fd: number, data: Uint8Array, offset: number, length: number): number {
      if (disk.room <= 0) throw Object.assign(new Error("ENOSPC: no space left on device, write"), { code: "ENOSPC" });
      const n = writeSync(fd, data, offset, Math.min(length, disk.room));
      disk.room -= n;
      return n;
    },
  };
  return disk;
}

/** The error `f` throws (a limiter's 429, say); fails the test when it throws none. */
export function refused(f: () => unknown): GatewayError {
  try {
    f();
  } catch (e) {
    return e as GatewayError;
  }
  throw new Error("expected a 429");
}
