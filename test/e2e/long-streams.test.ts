/**
 * A stream that outlives its request's time limit, with real processes: an upstream generating for far longer than the
 * limit, and a client that reads nothing of the answer. Its budget reservation is drawn from a lease that outlives
 * the limit (GATEWAY_BUDGET_LEASE_TTL_S exceeds it by 10 s), and billing grants an expired lease's money again once its
 * grace is over (none here): the request must be settled, and its lease given back with what it spent, before that,
 * however slowly its client reads, or the same money would be granted to another replica while the request still
 * spends it.
 */
import { afterAll, beforeAll, expect, test } from "bun:test";
import * as net from "node:net";
import { BudgetScope } from "../../gen/billing/v1/billing_pb.ts";
import { eventually, writeMockModelConfig } from "../support.ts";
import { type MeshWithDatabase, startMeshWithDatabase } from "./mesh-with-database.ts";

// The shortest lease lifetime the gateway takes, and a request time limit it exceeds by 10 s.
const leaseTtlSeconds = 20;
const requestTimeoutMs = 10_000;
// 64 choices of 4,096 tokens: about 21 MB of events, five times what the sockets' buffers hold for a client that stops
// at the first event (the gateway's send buffer takes up to 4 MB), so the gateway waits on its client's socket long
// before the answer ends. Output is $1 per million tokens: 1,000 nano-USD a token.
const maxTokens = 4_096;
const n = 64;
const budget = 1_000_000_000n;

let started: MeshWithDatabase;

beforeAll(async () => {
  started = await startMeshWithDatabase({
    name: "long-streams",
    routes: (dir) => writeMockModelConfig(dir, "1"),
    gatewayEnv: {
      GATEWAY_BUDGET_LEASE_TTL_S: String(leaseTtlSeconds),
      GATEWAY_REQUEST_TIMEOUT_MS: String(requestTimeoutMs),
    },
    billingEnv: { BUDGET_LEASE_GRACE_SECONDS: "0" },
    logVariable: "LONG_STREAMS_LOG",
  });
}, 120_000);

afterAll(async () => {
  await started?.stop();
}, 60_000);

interface LeaseRow {
  granted: string;
  spent: string | null;
  released_at: Date | null;
  expires_at: Date;
  expired: boolean;
}

const leasesOf = async (orgId: string) =>
  (
    await started.db.pool.query<LeaseRow>(
      `SELECT granted_nanos::text AS granted, spent_nanos::text AS spent, released_at, expires_at,
         expires_at <= now() AS expired
       FROM budget_leases WHERE org_id = $1 ORDER BY created_at`,
      [orgId],
    )
  ).rows;

test("a stream whose client reads nothing is settled at its time limit, before billing could grant its lease again", async () => {
  const { billing, mesh } = started;
  const orgId = (await billing.createOrganization({ name: "Long streams", monthlyBudgetNanos: budget })).organization
    ?.id as string;
  const { secret } = await billing.createApiKey({ orgId, name: "slow reader" });
  const body = JSON.stringify({
    model: "m",
    stream: true,
    max_tokens: maxTokens,
    n,
    messages: [{ role: "user", content: "x".repeat(4 * maxTokens) }],
  });
  const socket = net.connect(Number(new URL(mesh.openaiUrl).port), "127.0.0.1");
  socket.on("error", () => {});
  let received = "";
  // The client stops reading in the handler that sees the stream's first event. Reading on until a poll saw it, it took
  // 6-8 MB more at full speed, and the kernel grew its receive buffer to match (tcp_rmem allows up to 32 MB here):
  // the sockets then held the whole answer in some runs, and it ran to its end with no one reading.
  socket.on("data", (d) => {
    received += d.toString();
    if (received.includes("data: ")) socket.pause();
  });
  socket.write(
    `POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer ${secret}\r\n` +
      `Content-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`,
  );
  try {
    await eventually(() => received.includes("data: "), { what: "the stream's first chunk" });

    // The request is metered at its time limit, at what it streamed, and its lease goes back with that spend while it
    // is still live: billing grants a lease's money again only once it has expired.
    const [record] = await eventually(
      async () => {
        const page = await billing.listUsageRecords({ orgId, pageSize: 10 });
        return page.records.length > 0 ? page.records : undefined;
      },
      { timeoutMs: requestTimeoutMs + 10_000, what: "the stream metered" },
    );
    const cost = record?.costNanos ?? 0n;
    expect(cost).toBeGreaterThan(0n);
    // Far less than its reservation: the client took its first event, the sockets' buffers a few MB more.
    expect(cost).toBeLessThan(BigInt(maxTokens * n) * 1_000n);
    const [lease] = await eventually(async () => {
      const leases = await leasesOf(orgId);
      return leases.every((l) => l.released_at !== null) ? leases : undefined;
    });
    expect(lease?.spent).toBe(cost.toString());
    expect((lease?.released_at as Date).getTime()).toBeLessThan((lease?.expires_at as Date).getTime());

    // Past the lease's lifetime (and a grace of none), another replica asking for the whole budget is granted what
    // the request did not spend, not the request's money again.
    await eventually(async () => (await leasesOf(orgId)).every((l) => l.expired), {
      timeoutMs: leaseTtlSeconds * 1000,
      what: "the lease expired",
    });
    const probe = await billing.acquireBudgetLease({
      scope: BudgetScope.ORGANIZATION,
      scopeId: orgId,
      holder: "another-replica",
      requestedNanos: budget,
      neededNanos: budget,
      ttlSeconds: 60,
    });
    expect(probe.grantedNanos).toBe(budget - cost);
    expect(received).not.toContain("[DONE]");
  } finally {
    socket.destroy();
  }
}, 90_000);
