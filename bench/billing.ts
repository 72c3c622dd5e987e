/**
 * Billing throughput on this machine, each figure against a baseline measured in the same run:
 * RecordUsage through the real RPC (billing/main.ts in its own process on a port, gRPC client here, batches) against
 * a raw batched insert of the same rows into the same table from here, and budget lease grants per second from two
 * gateway holders. Uses DATABASE_URL's server when set, else an embedded Postgres in a temporary directory; either
 * way in a fresh database. Prints a table and exits.
 *
 *   ./node_modules/.bin/bun bench/billing.ts      (BENCH_ROWS=200000 per side, BENCH_BATCH=5000, BENCH_LEASES=2000)
 */
import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { ulid } from "ulid";
import { BillingService, BudgetScope, type UsageRecord, UsageRecordSchema } from "../gen/billing/v1/billing_pb.ts";
import { Endpoint } from "../gen/common/v1/common_pb.ts";
import * as path from "node:path";
import { createTestDatabase } from "../billing/store/test-db.ts";
import { arrayLiteral } from "../billing/store/usage.ts";
import { freePort, spawnService } from "../lib/processes.ts";
import { createServiceClient } from "../lib/rpc-client.ts";

const rowsPerSide = Number(process.env.BENCH_ROWS ?? 200_000);
const batchSize = Number(process.env.BENCH_BATCH ?? 5_000);
const leaseCount = Number(process.env.BENCH_LEASES ?? 2_000);
// Batches in flight at once, like a few analytics replicas (or one with overlapping acks).
const concurrency = Number(process.env.BENCH_IN_FLIGHT ?? 2);
const adminToken = "bench-admin-token-0123456789";

const db = await createTestDatabase();
const port = await freePort();
const billing = spawnService({
  name: "billing",
  cmd: [process.execPath, path.resolve(import.meta.dir, "../billing/main.ts")],
  env: {
    DATABASE_URL: db.connectionString,
    BILLING_PORT: String(port),
    ADMIN_TOKEN: adminToken,
    LOG_LEVEL: "warn",
    OTEL_EXPORTER_OTLP_ENDPOINT: undefined,
  },
  readyUrl: `http://127.0.0.1:${port}/readyz`,
  onLine: (line) => process.stderr.write(`[billing] ${line}\n`),
});
await billing.ready;
const baseUrl = `http://127.0.0.1:${port}`;
const rpc = createServiceClient(BillingService, { baseUrl, bearerToken: adminToken, timeoutMs: 120_000 });

const org = (await rpc.createOrganization({ name: "bench" })).organization?.id as string;
const key = (await rpc.createApiKey({ orgId: org })).apiKey?.id as string;
const models = ["gpt-4o", "gpt-4o-mini", "claude-sonnet", "mock"];

function batch(size: number): UsageRecord[] {
  const start = Date.now() - 86_400_000;
  return Array.from({ length: size }, (_, i) =>
    create(UsageRecordSchema, {
      requestId: ulid(),
      orgId: org,
      apiKeyId: key,
      model: models[i % models.length],
      provider: "openai",
      endpoint: Endpoint.CHAT_COMPLETIONS,
      usage: { inputTokens: 1200n, cachedInputTokens: 200n, outputTokens: 350n, reasoningTokens: 0n },
      costNanos: 4_567_891n + BigInt(i),
      occurTime: timestampFromDate(new Date(start + (i % 3600) * 1000)),
    }),
  );
}

/**
 * The plainest batched insert of the same rows into the same table: no RPC, no validation, no summaries; parameters
 * encoded the way billing's store encodes them, so only what billing adds on top is measured.
 */
async function rawInsert(records: UsageRecord[]): Promise<void> {
  const col = (pick: (r: UsageRecord) => string | null) => arrayLiteral(records.map(pick));
  await db.pool.query(
    `INSERT INTO usage_records (request_id, org_id, project_id, api_key_id, model, provider, endpoint, input_tokens,
       cached_input_tokens, output_tokens, reasoning_tokens, cost_nanos, occurred_at)
     SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
       $8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[], $12::bigint[], $13::timestamptz[])
     ON CONFLICT (request_id) DO NOTHING`,
    [
      col((r) => r.requestId),
      col((r) => r.orgId),
      col(() => null),
      col((r) => r.apiKeyId),
      col((r) => r.model),
      col((r) => r.provider),
      col(() => "chat_completions"),
      col((r) => String(r.usage?.inputTokens ?? 0n)),
      col((r) => String(r.usage?.cachedInputTokens ?? 0n)),
      col((r) => String(r.usage?.outputTokens ?? 0n)),
      col((r) => String(r.usage?.reasoningTokens ?? 0n)),
      col((r) => String(r.costNanos)),
      col((r) => new Date(Number(r.occurTime?.seconds ?? 0n) * 1000).toISOString()),
    ],
  );
}

async function viaRpc(records: UsageRecord[]): Promise<void> {
  const res = await rpc.recordUsage({ records });
  if (res.inserted !== records.length) throw new Error(`inserted ${res.inserted} of ${records.length}`);
}

/** Rows per second of `write` over `rows` rows in batches, `concurrency` batches at a time; batches are built first. */
async function rowsPerSecond(write: (records: UsageRecord[]) => Promise<void>, rows: number): Promise<number> {
  const batches = Array.from({ length: Math.ceil(rows / batchSize) }, () => batch(batchSize));
  const started = performance.now();
  let next = 0;
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (next < batches.length) await write(batches[next++] as UsageRecord[]);
    }),
  );
  return (batches.length * batchSize) / ((performance.now() - started) / 1000);
}

// Warm up both paths (connections, JIT, plans), then alternate halves so neither side gets the warmer table.
await rowsPerSecond(rawInsert, batchSize * 2);
await rowsPerSecond(viaRpc, batchSize * 2);
const rounds = 4;
const raw: number[] = [];
const viaService: number[] = [];
for (let round = 0; round < rounds; round++) {
  raw.push(await rowsPerSecond(rawInsert, rowsPerSide / rounds));
  viaService.push(await rowsPerSecond(viaRpc, rowsPerSide / rounds));
}
// Medians: other work on a shared machine shows up as outlier rounds on either side.
const median = (xs: number[]) => {
  const sorted = [...xs].sort((a, b) => a - b);
  return ((sorted[(sorted.length - 1) >> 1] as number) + (sorted[sorted.length >> 1] as number)) / 2;
};
const rawRate = median(raw);
const rpcRate = median(viaService);

// Lease cycles as gateways run them: grant, spend part of it, release; two holders, 8 cycles in flight each, on one
// budget that never runs out (every grant of one budget is serialised on its row lock and a durable commit).
const leaseOrg = (await rpc.createOrganization({ name: "bench-leases", monthlyBudgetNanos: 10n ** 15n })).organization
  ?.id as string;
const holders = ["gw-a", "gw-b"].map((holder) => ({
  holder,
  client: createServiceClient(BillingService, { baseUrl, bearerToken: adminToken, timeoutMs: 60_000 }),
}));
let granted = 0;
const leaseStart = performance.now();
await Promise.all(
  holders.flatMap(({ holder, client }) =>
    Array.from({ length: 8 }, async () => {
      while (granted < leaseCount) {
        granted++;
        const lease = await client.acquireBudgetLease({
          scope: BudgetScope.ORGANIZATION,
          scopeId: leaseOrg,
          holder,
          requestedNanos: 1_000_000n,
          ttlSeconds: 60,
        });
        if (lease.grantedNanos !== 1_000_000n) throw new Error("a lease was not granted in full");
        await client.releaseBudgetLease({ leaseId: lease.leaseId, spentNanos: 400_000n });
      }
    }),
  ),
);
const leasesPerSecond = granted / ((performance.now() - leaseStart) / 1000);

const fmt = (n: number) => Math.round(n).toLocaleString("en-US");
const rows = [
  ["measure", "value", "baseline", "ratio", "target"],
  [
    `RecordUsage via gRPC, batches of ${batchSize}, ${concurrency} in flight (rows/s)`,
    fmt(rpcRate),
    `${fmt(rawRate)} raw insert`,
    `${((rpcRate / rawRate) * 100).toFixed(0)}%`,
    ">= 70% and >= 30,000",
  ],
  ["Lease grant + release via gRPC, one budget, 2 holders x 8 (grants/s)", fmt(leasesPerSecond), "-", "-", "-"],
];
const widths = rows[0]?.map((_, i) => Math.max(...rows.map((r) => (r[i] ?? "").length))) ?? [];
for (const r of rows) console.log(r.map((cell, i) => cell.padEnd(widths[i] ?? 0)).join("  "));
console.log(
  `(${rowsPerSide.toLocaleString("en-US")} rows per side; raw rounds ${raw.map(fmt).join(", ")}; ` +
    `RPC rounds ${viaService.map(fmt).join(", ")})`,
);

await billing.stop();
await db.drop();
process.exit(0);
