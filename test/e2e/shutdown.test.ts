/**
 * SIGTERM of each service of a real mesh while it works (DESIGN.md section 8): the service stops accepting, finishes
 * the requests and streams it holds (for up to SHUTDOWN_GRACE_MS), flushes its buffers and spools and exits 0; once
 * it is back, every request the gateway served is one row in ClickHouse and one usage row in billing, at the cost the
 * client was told, to the nano-USD.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readdirSync, readFileSync } from "node:fs";
import { mkdtemp, readFile, writeFile } from "node:fs/promises";
import * as net from "node:net";
import { tmpdir } from "node:os";
import * as path from "node:path";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import type { Client } from "@connectrpc/connect";
import pg from "pg";
import { AnalyticsService, type RequestMetrics, RequestStatus } from "../../gen/analytics/v1/analytics_pb.ts";
import { BillingService } from "../../gen/billing/v1/billing_pb.ts";
import { postmasterPid } from "../../billing/store/embedded.ts";
import { isAlive } from "../../lib/processes.ts";
import { createServiceClient } from "../../lib/rpc-client.ts";
import { type Mesh, startMesh } from "../../scripts/mesh.ts";
import { eventually, stopMesh } from "../support.ts";

const adminToken = "shutdown-admin-token-0123456789";
const graceMs = 4000;
// Every model costs $0.50 input and $1.50 output per million tokens: 500 and 1,500 nano-USD a token.
const inputNanos = 500n;
const outputNanos = 1500n;
// The mock streams one 4-character token per chunk: "mock reply: " plus a 108-character prompt is 30 chunks, 1.5 s
// at 50 ms a chunk (well inside the grace period); the 588-character prompt below streams for 7.5 s (well past it).
const routes = `
providers:
  - { name: instant, kind: mock, latency_ms: 0 }
  - { name: paced, kind: mock, latency_ms: 0, chunk_latency_ms: 50 }
  - { name: slow, kind: mock, latency_ms: 1000 }
models:
  - name: instant
    targets: [{ provider: instant, model: mock-instant }]
    pricing: { input_per_mtok: "0.50", output_per_mtok: "1.50" }
  - name: paced
    targets: [{ provider: paced, model: mock-paced }]
    pricing: { input_per_mtok: "0.50", output_per_mtok: "1.50" }
  - name: slow
    targets: [{ provider: slow, model: mock-slow }]
    pricing: { input_per_mtok: "0.50", output_per_mtok: "1.50" }
`;
const shortPrompt = "a stream that finishes within the grace period ".repeat(3).slice(0, 108);
const longPrompt = "a stream that outlives the grace period ".repeat(15).slice(0, 588);

let dataDir: string;
let mesh: Mesh;
const logs: string[] = [];
const since = Date.now() - 3_600_000;
const range = () => ({ start: timestampFromMs(since), end: timestampFromMs(Date.now() + 3_600_000) });
// Clients of the services' fixed ports: they reconnect to a restarted service.
let analytics: Client<typeof AnalyticsService>;
let billing: Client<typeof BillingService>;
let restUrl: string;

beforeAll(async () => {
  dataDir = await mkdtemp(path.join(tmpdir(), "mesh-shutdown-"));
  const config = path.join(dataDir, "routes.yaml");
  await writeFile(config, routes);
  mesh = await startMesh({
    dataDir,
    adminToken,
    ports: { gateway: 0, billing: 0, analytics: 0 },
    // Quick flushes, so the mesh settles in well under a second. SHUTDOWN_LOG=1 prints the services' logs.
    env: { LOG_LEVEL: "warn", ANALYTICS_FLUSH_INTERVAL_MS: "100", GATEWAY_METRICS_INTERVAL_MS: "50", SHUTDOWN_GRACE_MS: String(graceMs) },
    serviceEnv: { gateway: { GATEWAY_CONFIG: config } },
    onLine: (service, line) => {
      logs.push(`[${service}] ${line}`);
      if (process.env.SHUTDOWN_LOG) process.stderr.write(`[${service}] ${line}\n`);
    },
  });
  // The REST API's Bun fast path too, which has its own server to drain.
  restUrl = mesh.openaiUrl;
  analytics = createServiceClient(AnalyticsService, { baseUrl: mesh.urls.analytics, bearerToken: adminToken, timeoutMs: 30_000 });
  billing = createServiceClient(BillingService, { baseUrl: mesh.urls.billing, bearerToken: adminToken, timeoutMs: 30_000 });
}, 120_000);

afterAll(() => stopMesh(mesh, dataDir), 60_000);

interface Org {
  id: string;
  apiKey: string;
}

async function createOrg(name: string): Promise<Org> {
  const { organization } = await billing.createOrganization({ name });
  const key = await billing.createApiKey({ orgId: organization?.id ?? "", name });
  return { id: organization?.id ?? "", apiKey: key.secret };
}

/** One answered chat completion as the client saw it. */
interface Answer {
  requestId: string;
  status: number;
  /** From x-gateway-cost-nanos, or for a stream from its usage chunk at the models' prices. */
  costNanos: bigint;
  content: string;
  /** A stream ended with `data: [DONE]`. */
  done: boolean;
  /** The code of the error event a stream ended with. */
  error?: string;
  /** Date.now() when the last byte arrived. */
  endedAt: number;
}

function post(org: Org, model: string, prompt: string, stream: boolean, base = mesh.urls.gateway) {
  return fetch(`${base}/v1/chat/completions`, {
    method: "POST",
    headers: { authorization: `Bearer ${org.apiKey}`, "content-type": "application/json" },
    body: JSON.stringify({
      model,
      messages: [{ role: "user", content: prompt }],
      ...(stream ? { stream: true, stream_options: { include_usage: true } } : {}),
    }),
  });
}

async function complete(org: Org, model: string, prompt: string): Promise<Answer> {
  const res = await post(org, model, prompt, false);
  const body = (await res.json()) as { choices?: { message: { content: string } }[]; error?: { message: string } };
  return {
    requestId: res.headers.get("x-request-id") ?? "",
    status: res.status,
    costNanos: BigInt(res.headers.get("x-gateway-cost-nanos") ?? "0"),
    content: body.choices?.[0]?.message.content ?? body.error?.message ?? "",
    done: true,
    endedAt: Date.now(),
  };
}

/**
 * A streamed completion: `started` resolves once the first content arrived, `answer` once the stream ended, also
 * when the gateway cut it (`done` false).
 */
function openStream(org: Org, model: string, prompt: string, base?: string) {
  let firstContent: () => void = () => {};
  const started = new Promise<void>((resolve) => (firstContent = resolve));
  const answer = (async (): Promise<Answer> => {
    const res = await post(org, model, prompt, true, base);
    const requestId = res.headers.get("x-request-id") ?? "";
    const events: string[] = [];
    let buffered = "";
    const decoder = new TextDecoder();
    try {
      for await (const bytes of res.body ?? []) {
        buffered += decoder.decode(bytes, { stream: true });
        for (let end = buffered.indexOf("\n\n"); end >= 0; end = buffered.indexOf("\n\n")) {
          events.push(buffered.slice(0, end).replace(/^data: /, ""));
          buffered = buffered.slice(end + 2);
          if (events.length === 2) firstContent();
        }
      }
    } catch {
      // Cut by the gateway: what arrived is in `events`.
    }
    let content = "";
    let costNanos = 0n;
    let error: string | undefined;
    for (const event of events) {
      if (event === "[DONE]") continue;
      const chunk = JSON.parse(event) as {
        choices?: { delta: { content?: string } }[];
        usage?: { prompt_tokens: number; completion_tokens: number } | null;
        error?: { code: string };
      };
      error = chunk.error?.code;
      content += chunk.choices?.[0]?.delta.content ?? "";
      if (chunk.usage) costNanos = BigInt(chunk.usage.prompt_tokens) * inputNanos + BigInt(chunk.usage.completion_tokens) * outputNanos;
    }
    firstContent();
    return { requestId, status: res.status, costNanos, content, done: events.at(-1) === "[DONE]", error, endedAt: Date.now() };
  })();
  return { started, answer };
}

/** Whether a new TCP connection to the URL's port is refused. */
function refusesConnections(url: string): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect(Number(new URL(url).port), "127.0.0.1");
    socket.once("connect", () => {
      socket.destroy();
      resolve(false);
    });
    socket.once("error", (e: NodeJS.ErrnoException) => resolve(e.code === "ECONNREFUSED"));
  });
}

/** The org's requests in ClickHouse and in billing, by request id; a request id twice in ClickHouse fails the test. */
async function recorded(orgId: string) {
  const clickhouse = new Map<string, RequestMetrics>();
  let pageToken = "";
  do {
    const page = await analytics.listRequests({ orgId, range: range(), pageSize: 1000, pageToken });
    for (const r of page.requests) {
      expect(clickhouse.has(r.requestId)).toBe(false);
      clickhouse.set(r.requestId, r);
    }
    pageToken = page.nextPageToken;
  } while (pageToken);
  const billed = new Map<string, bigint>();
  pageToken = "";
  do {
    const page = await billing.listUsageRecords({ orgId, pageSize: 1000, pageToken });
    for (const r of page.records) billed.set(r.requestId, r.costNanos);
    pageToken = page.nextPageToken;
  } while (pageToken);
  return { clickhouse, billed };
}

/**
 * Every answer is in ClickHouse and billing at the cost the client was told, nothing else is, and the totals of
 * both (QueryUsage, GetUsageSummary) agree to the nano-USD.
 */
async function expectRecorded(orgId: string, answers: Answer[]) {
  const ids = answers.map((a) => a.requestId).sort();
  const { clickhouse, billed } = await recorded(orgId);
  expect([...clickhouse.keys()].sort()).toEqual(ids);
  expect([...billed.keys()].sort()).toEqual(ids);
  for (const a of answers) {
    expect(clickhouse.get(a.requestId)?.status).toBe(RequestStatus.OK);
    expect(clickhouse.get(a.requestId)?.costNanos).toBe(a.costNanos);
    expect(billed.get(a.requestId)).toBe(a.costNanos);
  }
  const costNanos = answers.reduce((sum, a) => sum + a.costNanos, 0n);
  const [usage] = (await analytics.queryUsage({ orgId, range: range() })).rows;
  const summary = await billing.getUsageSummary({ orgId, startTime: range().start, endTime: range().end });
  expect({ requests: usage?.requests, costNanos: usage?.costNanos }).toEqual({ requests: BigInt(answers.length), costNanos });
  expect({ requests: summary.requests, costNanos: summary.costNanos }).toEqual({ requests: BigInt(answers.length), costNanos });
}

async function gatewaySpoolRows(): Promise<number> {
  const text = await fetch(`${mesh.urls.gateway}/metrics`).then((r) => r.text());
  return Number(/^gateway_spool_rows(?:\{[^}]*\})? (\d+)/m.exec(text)?.[1] ?? Number.NaN);
}


const reply = (prompt: string) => `mock reply: ${prompt}`;

describe("SIGTERM", () => {
  test("gateway: in-flight streams and requests finish, new connections are refused, the spool is flushed, exit 0", async () => {
    const org = await createOrg("shutdown-gateway");
    const streams = Array.from({ length: 6 }, (_, i) => openStream(org, "paced", `${i} ${shortPrompt}`.slice(0, 108)));
    const unary = Array.from({ length: 4 }, (_, i) => complete(org, "slow", `unary ${i}`));
    await Promise.all(streams.map((s) => s.started));
    // The unary calls wait a second upstream: still in flight when the signal arrives.
    await Bun.sleep(200);
    const { proc } = mesh.processes.gateway;
    const signalled = Date.now();
    proc.kill("SIGTERM");

    await eventually(() => refusesConnections(mesh.urls.gateway), { timeoutMs: 1000, what: "new connections refused" });
    const stillStreaming = Date.now();
    const code = await proc.exited;
    const exitedAfterMs = Date.now() - signalled;
    const streamed = await Promise.all(streams.map((s) => s.answer));
    const answered = await Promise.all(unary);

    expect(code).toBe(0);
    expect(exitedAfterMs).toBeLessThan(graceMs);
    for (const [i, s] of streamed.entries()) {
      expect(s.status).toBe(200);
      expect(s.done).toBe(true);
      expect(s.content).toBe(reply(`${i} ${shortPrompt}`.slice(0, 108)));
      expect(s.costNanos).toBeGreaterThan(0n);
      // New connections were already refused while this stream was still being served.
      expect(s.endedAt).toBeGreaterThan(stillStreaming);
    }
    for (const [i, u] of answered.entries()) {
      expect(u.status).toBe(200);
      expect(u.content).toBe(reply(`unary ${i}`));
      expect(u.endedAt).toBeGreaterThan(signalled);
    }
    // The gateway is gone, so only its flush before exit can have delivered these.
    await expectRecorded(org.id, [...streamed, ...answered]);

    await mesh.restart("gateway");
  }, 60_000);

  test("gateway: streams outliving the grace period are cut on both ports, the exit is still 0 and prompt, and each cut request is metered", async () => {
    const org = await createOrg("shutdown-grace");
    // One on the port shared with the RPCs (node:http), one on the REST fast path (Bun.serve).
    const streams = [openStream(org, "paced", longPrompt), openStream(org, "paced", longPrompt, restUrl)];
    await Promise.all(streams.map((s) => s.started));
    const { proc } = mesh.processes.gateway;
    const signalled = Date.now();
    proc.kill("SIGTERM");
    const code = await proc.exited;
    const exitedAfterMs = Date.now() - signalled;
    const cuts = await Promise.all(streams.map((s) => s.answer));

    expect(code).toBe(0);
    expect(exitedAfterMs).toBeGreaterThanOrEqual(graceMs - 100);
    expect(exitedAfterMs).toBeLessThan(graceMs + 3000);
    for (const cut of cuts) {
      expect(cut.status).toBe(200);
      expect(cut.done).toBe(false);
      // Told so: the stream's last event is the gateway's going away.
      expect(cut.error).toBe("gateway_shutting_down");
      expect(cut.content.length).toBeGreaterThan(0);
      expect(reply(longPrompt).startsWith(cut.content)).toBe(true);
      expect(cut.content.length).toBeLessThan(reply(longPrompt).length);
    }

    await mesh.restart("gateway");
    await eventually(
      async () => {
        const { clickhouse, billed } = await recorded(org.id);
        return cuts.every((cut) => clickhouse.has(cut.requestId) && billed.has(cut.requestId));
      },
      { timeoutMs: 20_000, what: "the cut streams recorded" },
    );
    const { clickhouse, billed } = await recorded(org.id);
    for (const cut of cuts) {
      const row = clickhouse.get(cut.requestId);
      // Cut by the gateway, not a client that left.
      expect([row?.status, row?.httpStatus, row?.errorCode]).toEqual([RequestStatus.CANCELLED, 503, "gateway_shutting_down"]);
      // The input and the tokens streamed before the cut are charged (counted by the tokenizer), nothing past them.
      const input = row?.usage?.inputTokens ?? 0n;
      const output = row?.usage?.outputTokens ?? 0n;
      expect(row?.usageEstimated).toBe(true);
      expect(input).toBeGreaterThan(0n);
      expect(output).toBeGreaterThan(0n);
      expect(output).toBeLessThan(BigInt(reply(longPrompt).length / 4));
      expect(row?.costNanos).toBe(input * inputNanos + output * outputNanos);
      expect(billed.get(cut.requestId)).toBe(row?.costNanos);
    }
    expect(clickhouse.size).toBe(2);
    expect(billed.size).toBe(2);
  }, 60_000);

  test("analytics: exits 0 under load; once back, ClickHouse == billing == served requests", async () => {
    const org = await createOrg("shutdown-analytics");
    const answers: Answer[] = [];
    const failures: string[] = [];
    let stopped = false;
    const worker = async (w: number) => {
      for (let i = 0; !stopped; i++) {
        try {
          const prompt = `load ${w}.${i}`;
          answers.push(i % 4 === 0 ? await openStream(org, "instant", prompt).answer : await complete(org, "instant", prompt));
        } catch (e) {
          failures.push(String(e));
        }
      }
    };
    const until = async (count: number) => {
      while (answers.length < count) await Bun.sleep(10);
    };
    const load = Promise.all(Array.from({ length: 8 }, (_, w) => worker(w)));

    await until(300);
    const signalled = Date.now();
    const code = await mesh.processes.analytics.stop();
    expect(code).toBe(0);
    expect(Date.now() - signalled).toBeLessThan(graceMs);
    // The gateway keeps serving while analytics is gone; those requests wait in its spool.
    const whileDown = answers.length;
    await until(whileDown + 200);
    expect(await gatewaySpoolRows()).toBeGreaterThan(0);
    await mesh.restart("analytics");
    await until(answers.length + 100);
    stopped = true;
    await load;

    expect(failures).toEqual([]);
    expect(answers.filter((a) => a.status !== 200 || !a.done)).toEqual([]);
    await eventually(
      async () => (await gatewaySpoolRows()) === 0 && (await recorded(org.id)).billed.size >= answers.length,
      { timeoutMs: 30_000, what: "the gateway's spool resent" },
    );
    await expectRecorded(org.id, answers);
  }, 60_000);

  test("billing: in-flight calls complete, the key change stream ends cleanly, Postgres stops, exit 0", async () => {
    const postgresDir = path.join(dataDir, "postgres");
    const postmaster = await postmasterPid(postgresDir);
    if (postmaster === undefined) throw new Error("billing's embedded postgres is not running");
    // Straight into billing's database, to hold a lock that keeps billing's calls waiting in flight.
    const pidFile = (await readFile(path.join(postgresDir, "postmaster.pid"), "utf8")).split("\n");
    const password = (await readFile(`${postgresDir}.password`, "utf8")).trim();
    const db = new pg.Client({ host: "127.0.0.1", port: Number(pidFile[3]), user: "mesh", password, database: "billing" });
    db.on("error", () => {});
    await db.connect();
    try {
      const watch = billing.watchKeyChanges({})[Symbol.asyncIterator]();
      expect((await watch.next()).value?.apiKeyId).toBe("");
      const watchEnded = watch.next().then(
        (step) => ({ done: step.done === true, error: undefined }),
        (e: unknown) => ({ done: false, error: String(e) }),
      );

      await db.query("BEGIN");
      await db.query("LOCK TABLE organizations IN EXCLUSIVE MODE");
      const names = Array.from({ length: 5 }, (_, i) => `shutdown-billing-${i}`);
      const creating = Promise.all(
        names.map((name) => billing.createOrganization({ name }).then((r) => ({ name: r.organization?.name, at: Date.now() }))),
      );
      // pg_locks, not pg_stat_activity: the latter is a snapshot for the rest of this transaction.
      const waiting = "SELECT count(*)::int AS n FROM pg_locks WHERE NOT granted AND relation = 'organizations'::regclass";
      await eventually(async () => (await db.query(waiting)).rows[0].n >= names.length, { timeoutMs: 10_000, what: "billing's calls waiting on the lock" });

      const { proc } = mesh.processes.billing;
      const signalled = Date.now();
      proc.kill("SIGTERM");
      // The watch ends with the stream's normal end (status OK), not an error, while the calls still wait.
      expect(await watchEnded).toEqual({ done: true, error: undefined });
      expect(await refusesConnections(mesh.urls.billing)).toBe(true);
      expect(proc.exitCode).toBeNull();
      const released = Date.now();
      await db.query("COMMIT");
      await db.end();

      const created = await creating;
      expect(created.map((c) => c.name)).toEqual(names);
      for (const c of created) expect(c.at).toBeGreaterThanOrEqual(released);
      expect(await proc.exited).toBe(0);
      expect(Date.now() - signalled).toBeLessThan(graceMs);

      // Postgres went down with billing: neither the postmaster nor any other process on that directory is left.
      expect(isAlive(postmaster)).toBe(false);
      expect(await postmasterPid(postgresDir)).toBeUndefined();
      const onDir = readdirSync("/proc")
        .filter((entry) => /^\d+$/.test(entry))
        .filter((pid) => {
          try {
            return readFileSync(`/proc/${pid}/cmdline`, "utf8").includes(postgresDir);
          } catch {
            return false;
          }
        });
      expect(onDir).toEqual([]);

      await mesh.restart("billing");
      const { organizations } = await billing.listOrganizations({});
      for (const name of names) expect(organizations.map((o) => o.name)).toContain(name);
    } finally {
      // Ending the session drops the lock, so a failing test cannot leave billing waiting on it (a no-op once ended).
      await db.end();
    }
  }, 60_000);

  test("no secret appears in any service log", () => {
    for (const line of logs) expect(line).not.toContain(adminToken);
  });
});
