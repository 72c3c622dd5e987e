import { mkdirSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { ulid } from "ulid";
import { type RequestMetrics, RequestMetricsSchema, RequestStatus } from "../../gen/analytics/v1/analytics_pb.ts";
import { Endpoint, TokenUsageSchema } from "../../gen/common/v1/common_pb.ts";
import { createChdbDriver } from "./chdb-driver.ts";
import type { ClickHouseDriver } from "./driver.ts";
import { type AnalyticsStore, createAnalyticsStore } from "./store.ts";

const dataDirPrefix = "analytics-chdb-";
let dataDir: string | undefined;

/**
 * The one chdb data directory of this test process (libchdb allows one per process), named by pid.
 * `bun test` fires no exit event, so directories of test processes that are gone are removed here instead.
 */
export function testDataDir(): string {
  if (!dataDir) {
    for (const name of readdirSync(tmpdir())) {
      const pid = Number(name.slice(dataDirPrefix.length));
      if (name.startsWith(dataDirPrefix) && pid > 0 && !isAlive(pid)) {
        rmSync(join(tmpdir(), name), { recursive: true, force: true });
      }
    }
    dataDir = join(tmpdir(), `${dataDirPrefix}${process.pid}`);
    rmSync(dataDir, { recursive: true, force: true });
    mkdirSync(dataDir);
  }
  return dataDir;
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === "EPERM";
  }
}

/** A database name no other test uses. */
export function testDatabase(prefix = "test"): string {
  return `${prefix}_${Date.now().toString(36)}_${Math.random().toString(36).slice(2, 10)}`;
}

export interface TestStore extends AnalyticsStore {
  database: string;
}

/** A migrated store in a fresh database of the shared chdb directory (or on `driver`); close() drops the database. */
export async function createTestStore(
  options: {
    driver?: ClickHouseDriver;
    database?: string;
    migrate?: boolean;
    rollupChunkRows?: number;
    ttlDays?: number;
  } = {},
): Promise<TestStore> {
  const database = options.database ?? testDatabase();
  const driver = options.driver ?? createChdbDriver(testDataDir());
  const { rollupChunkRows, ttlDays = 400 } = options;
  const store = createAnalyticsStore(driver, { database, ttlDays, rollupChunkRows });
  if (options.migrate ?? true) await store.migrate();
  return {
    ...store,
    database,
    async close() {
      await driver.exec(`DROP DATABASE IF EXISTS ${database}`);
      await store.close();
    },
  };
}

/** A finished chat request of `org` at `at`, with distinct ids; override any field. */
export function sampleMetrics(at: Date, init: MessageInitShape<typeof RequestMetricsSchema> = {}): RequestMetrics {
  const end = new Date(at.getTime() + 1200);
  return create(RequestMetricsSchema, {
    requestId: ulid(at.getTime()),
    traceId: "4bf92f3577b34da6a3ce929d0e0e4736",
    spanId: "00f067aa0ba902b7",
    startTime: timestampFromDate(at),
    endTime: timestampFromDate(end),
    orgId: "org_a",
    projectId: "proj_a",
    apiKeyId: "key_a",
    endUserId: "user-1",
    provider: "mock",
    requestedModel: "gpt-4o-mini",
    servedModel: "mock-gpt-4o-mini",
    endpoint: Endpoint.CHAT_COMPLETIONS,
    streamed: false,
    status: RequestStatus.OK,
    httpStatus: 200,
    usage: create(TokenUsageSchema, {
      inputTokens: 100n,
      cachedInputTokens: 20n,
      outputTokens: 50n,
      reasoningTokens: 5n,
    }),
    costNanos: 12_345n,
    totalLatencyUs: 1_200_000n,
    upstreamLatencyUs: 1_150_000n,
    gatewayOverheadUs: 50_000n,
    gatewayInstanceId: "gw-1",
    tags: { team: "search" },
    ...init,
  });
}
