/**
 * Crashes and restarts of real processes under load, each ending with the invariant of DESIGN.md section 4:
 * once the mesh is quiet, every request the gateway answered is one row in ClickHouse and one usage row in
 * billing, and the cost sums agree to the nano-USD.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import * as path from "node:path";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import type { Subprocess } from "bun";
import { AnalyticsService } from "../../gen/analytics/v1/analytics_pb.ts";
import { BillingService } from "../../gen/billing/v1/billing_pb.ts";
import { freePort } from "../../lib/processes.ts";
import { createServiceClient } from "../../lib/rpc-client.ts";
import { type Mesh, type ServiceName, startMesh } from "../../scripts/mesh.ts";
import { eventually } from "../support.ts";

const adminToken = "faults-admin-token-0123456789";
const root = path.resolve(import.meta.dir, "../..");
const since = Date.now() - 3_600_000;

// Quick flushes, so a test waits seconds for the mesh to settle. FAULTS_LOG=1 prints the services' logs.
const pipelineEnv = {
  LOG_LEVEL: "warn",
  ANALYTICS_FLUSH_INTERVAL_MS: "200",
  GATEWAY_METRICS_INTERVAL_MS: "50",
  SHUTDOWN_GRACE_MS: "5000",
};

interface Org {
  id: string;
  apiKey: string;
}

interface LoadResult {
  /** Responses the client received: request id -> HTTP status and cost header. */
  answered: Map<string, { status: number; costNanos: bigint }>;
  /** Attempts that failed before a connection was made: they never reached a gateway. */
  refused: number;
  /** Attempts that failed after connecting (the gateway died under them): they may have been recorded. */
  broken: number;
  /** Failed attempts by error code, for diagnosis. */
  errors: Record<string, number>;
}

/** Sends chat completions with `concurrency` callers until `total` were answered or stop() is called. */
function startLoad(baseUrl: () => string, org: Org, options: { total: number; concurrency: number }) {
  const result: LoadResult = { answered: new Map(), refused: 0, broken: 0, errors: {} };
  let stopped = false;
  let inFlight = 0;
  const body = JSON.stringify({ model: "mock", messages: [{ role: "user", content: "fault tolerance" }] });
  const worker = async () => {
    while (!stopped && result.answered.size + inFlight < options.total) {
      inFlight++;
      try {
        const res = await fetch(`${baseUrl()}/v1/chat/completions`, {
          method: "POST",
          headers: { authorization: `Bearer ${org.apiKey}`, "content-type": "application/json" },
          body,
        });
        await res.arrayBuffer();
        const id = res.headers.get("x-request-id");
        if (id) result.answered.set(id, { status: res.status, costNanos: BigInt(res.headers.get("x-gateway-cost-nanos") ?? "0") });
      } catch (e) {
        const code = (e as { code?: string }).code ?? String(e);
        result.errors[code] = (result.errors[code] ?? 0) + 1;
        if (code === "ECONNREFUSED") result.refused++;
        else result.broken++;
        await Bun.sleep(20);
      } finally {
        inFlight--;
      }
    }
  };
  const done = Promise.all(Array.from({ length: options.concurrency }, worker));
  return {
    result,
    answered: () => result.answered.size,
    async until(count: number) {
      while (result.answered.size < count) await Bun.sleep(10);
    },
    async stop() {
      stopped = true;
      await done;
      return result;
    },
    done: done.then(() => result),
  };
}


function createChecker(mesh: () => Mesh) {
  const analytics = () => createServiceClient(AnalyticsService, { baseUrl: mesh().urls.analytics, bearerToken: adminToken, timeoutMs: 30_000 });
  const billing = () => createServiceClient(BillingService, { baseUrl: mesh().urls.billing, bearerToken: adminToken, timeoutMs: 30_000 });
  const range = () => ({ start: timestampFromMs(since), end: timestampFromMs(Date.now() + 3_600_000) });

  const gatewaySpoolRows = async () => {
    const text = await fetch(`${mesh().urls.gateway}/metrics`).then((r) => r.text());
    return Number(/^gateway_spool_rows(?:\{[^}]*\})? (\d+)/m.exec(text)?.[1] ?? Number.NaN);
  };

  /** Request ids and costs in ClickHouse and in billing for the org. */
  const stored = async (orgId: string) => {
    const clickhouse = new Map<string, bigint>();
    let pageToken = "";
    do {
      const page = await analytics().listRequests({ orgId, range: range(), pageSize: 1000, pageToken });
      for (const r of page.requests) {
        expect(clickhouse.has(r.requestId)).toBe(false);
        clickhouse.set(r.requestId, r.costNanos);
      }
      pageToken = page.nextPageToken;
    } while (pageToken);
    const billed = new Map<string, bigint>();
    pageToken = "";
    do {
      const page = await billing().listUsageRecords({ orgId, pageSize: 1000, pageToken });
      for (const r of page.records) billed.set(r.requestId, r.costNanos);
      pageToken = page.nextPageToken;
    } while (pageToken);
    return { clickhouse, billed };
  };

  return {
    /**
     * Waits until the gateway's spool is empty and ClickHouse and billing agree, then checks the invariant:
     * ClickHouse and billing hold the same requests at the same costs, every request answered 200 among them
     * at the cost the client was told, and nothing else but requests answered with an error after the key was
     * known, or at most `mayHaveReached` requests no client saw answered (the gateway died with them in flight).
     */
    async expectInvariant(org: Org, load: LoadResult, mayHaveReached = 0) {
      const served = [...load.answered].filter(([, a]) => a.status === 200);
      await eventually(
        async () => {
          try {
            if ((await gatewaySpoolRows()) !== 0) return false;
            const { clickhouse, billed } = await stored(org.id);
            return clickhouse.size === billed.size && served.every(([id]) => clickhouse.has(id));
          } catch {
            return false;
          }
        },
        { timeoutMs: 60_000, what: "the mesh settling" },
      );
      const { clickhouse, billed } = await stored(org.id);
      expect([...billed.keys()].sort()).toEqual([...clickhouse.keys()].sort());
      for (const [id, cost] of billed) expect(clickhouse.get(id)).toBe(cost);
      for (const [id, answer] of served) expect(clickhouse.get(id)).toBe(answer.costNanos);
      const others = [...clickhouse.keys()].filter((id) => load.answered.get(id)?.status !== 200);
      const unanswered = others.filter((id) => !load.answered.has(id));
      expect(unanswered.length).toBeLessThanOrEqual(mayHaveReached);

      const [usage] = (await analytics().queryUsage({ orgId: org.id, range: range() })).rows;
      const summary = await billing().getUsageSummary({ orgId: org.id, startTime: range().start, endTime: range().end });
      const costs = [...clickhouse.values()].reduce((a, b) => a + b, 0n);
      expect(usage?.requests).toBe(BigInt(clickhouse.size));
      expect(summary.requests).toBe(BigInt(clickhouse.size));
      expect(usage?.costNanos).toBe(costs);
      expect(summary.costNanos).toBe(costs);
      expect(costs).toBe(
        served.reduce((sum, [, a]) => sum + a.costNanos, 0n) + others.reduce((sum, id) => sum + (clickhouse.get(id) ?? 0n), 0n),
      );
      return { served: served.length, stored: clickhouse.size, unanswered: unanswered.length };
    },
  };
}

async function createOrg(mesh: Mesh, name: string): Promise<Org> {
  const billing = createServiceClient(BillingService, { baseUrl: mesh.urls.billing, bearerToken: adminToken, timeoutMs: 10_000 });
  const { organization } = await billing.createOrganization({ name });
  const key = await billing.createApiKey({ orgId: organization?.id ?? "", name: "faults" });
  return { id: organization?.id ?? "", apiKey: key.secret };
}

const kill9 = async (mesh: Mesh, name: ServiceName) => {
  const { proc } = mesh.processes[name];
  proc.kill("SIGKILL");
  await proc.exited;
};

describe("faults with ClickHouse in process (chdb)", () => {
  let dataDir: string;
  let mesh: Mesh;
  const logs: string[] = [];
  const checker = createChecker(() => mesh);
  const gateway = () => mesh.urls.gateway;

  beforeAll(async () => {
    dataDir = await mkdtemp(path.join(tmpdir(), "mesh-faults-"));
    mesh = await startMesh({
      dataDir,
      adminToken,
      ports: { gateway: 0, billing: 0, analytics: 0 },
      env: pipelineEnv,
      onLine: (service, line) => {
        logs.push(`[${service}] ${line}`);
        if (process.env.FAULTS_LOG) process.stderr.write(`[${service}] ${line}\n`);
      },
    });
  }, 120_000);

  afterAll(async () => {
    await mesh?.stop();
    await rm(dataDir, { recursive: true, force: true });
  }, 60_000);

  test("kill -9 analytics in the middle of 5,000 requests, then restart it", async () => {
    const org = await createOrg(mesh, "faults-kill-analytics");
    const load = startLoad(gateway, org, { total: 5000, concurrency: 32 });
    await load.until(1500);
    await kill9(mesh, "analytics");
    // Requests keep being served while analytics is gone: their metrics wait in the gateway's spool.
    const whileDown = load.answered();
    await load.until(whileDown + 500);
    await mesh.restart("analytics");
    const result = await load.done;
    expect(result.answered.size).toBe(5000);
    expect([...result.answered.values()].every((a) => a.status === 200)).toBe(true);
    expect(await checker.expectInvariant(org, result)).toEqual({ served: 5000, stored: 5000, unanswered: 0 });
  }, 180_000);

  test("a budget set while analytics is down, over spend still in the gateway's spool, holds it", async () => {
    const billing = createServiceClient(BillingService, { baseUrl: mesh.urls.billing, bearerToken: adminToken, timeoutMs: 10_000 });
    const org = await createOrg(mesh, "faults-budget-over-unrecorded");
    const keyId = (await billing.authorizeKey({ secret: org.apiKey })).apiKey?.id as string;
    let answered = 0;
    const chat = async () => {
      const res = await fetch(`${gateway()}/v1/chat/completions`, {
        method: "POST",
        headers: { authorization: `Bearer ${org.apiKey}`, "content-type": "application/json" },
        body: JSON.stringify({ model: "mock", messages: [{ role: "user", content: "spend before the budget" }], max_tokens: 20 }),
      });
      const body = (await res.json()) as { error?: { code: string } };
      answered++;
      return { status: res.status, code: body.error?.code, cost: BigInt(res.headers.get("x-gateway-cost-nanos") ?? "0") };
    };
    expect(await mesh.processes.analytics.stop()).toBe(0);
    // Served with no budget while analytics is down: the spend waits in the gateway's spool, unknown to billing.
    const before = await Promise.all(Array.from({ length: 20 }, chat));
    expect(before.every((r) => r.status === 200)).toBe(true);
    let spent = before.reduce((sum, r) => sum + r.cost, 0n);
    // A budget of half that: already spent, though billing has no usage to show for it yet.
    await billing.updateApiKeyLimits({ apiKeyId: keyId, limits: { monthlyBudgetNanos: spent / 2n }, updateMask: { paths: ["monthly_budget_nanos"] } });
    // Once the gateway hears of the budget, nothing more is served: it waits for its spool, then asks to retry.
    const waiting = await eventually(async () => {
      const r = await chat();
      if (r.status === 200) {
        // Served before the gateway heard of the budget: spend like the 20 before it.
        spent += r.cost;
        throw new Error("served: the gateway has not heard of the budget yet");
      }
      return r;
    }, { what: "the budget heard of" });
    expect([waiting.status, waiting.code]).toEqual([503, "budget_unavailable"]);
    await mesh.restart("analytics");
    // Its rows recorded, the budget is seen spent.
    const refused = await eventually(async () => {
      const r = await chat();
      if (r.status !== 429) throw new Error(`answered ${r.status} ${r.code}`);
      return r;
    }, { timeoutMs: 30_000, what: "the budget seen spent once analytics is back" });
    expect(refused.code).toBe("insufficient_quota");
    // Every request is recorded once, the refused ones at no cost: the spend is what was served before the budget was heard of.
    const usage = await eventually(async () => {
      const summary = await billing.getUsageSummary({ orgId: org.id, apiKeyId: keyId });
      return summary.requests === BigInt(answered) && summary;
    });
    expect(usage.costNanos).toBe(spent);
  }, 120_000);

  test("kill -9 the gateway in the middle, then restart it", async () => {
    const org = await createOrg(mesh, "faults-kill-gateway");
    const load = startLoad(gateway, org, { total: 1500, concurrency: 16 });
    await load.until(500);
    await kill9(mesh, "gateway");
    await Bun.sleep(300);
    // The restarted gateway (a new instance id) adopts the dead one's spool and sends what it left.
    await mesh.restart("gateway");
    const result = await load.done;
    // Requests the gateway was handling when it died got no answer: each admitted one is recorded (as it finished, or as
    // interrupted by the restarted gateway), one cut before admission is not.
    const { unanswered } = await checker.expectInvariant(org, result, result.broken);
    expect(unanswered).toBeLessThanOrEqual(result.broken);
    expect(result.answered.size).toBe(1500);
  }, 180_000);

  test("billing unavailable for a while, then back", async () => {
    const org = await createOrg(mesh, "faults-billing-down");
    const load = startLoad(gateway, org, { total: 3000, concurrency: 16 });
    await load.until(500);
    expect(await mesh.processes.billing.stop()).toBe(0);
    const whileDown = load.answered();
    await load.until(whileDown + 300);
    await mesh.restart("billing");
    const result = await load.done;
    // The gateway admits the key billing vouched for before it went down (GATEWAY_KEY_STALE_SECONDS).
    expect(result.answered.size).toBe(3000);
    expect([...result.answered.values()].filter((a) => a.status !== 200)).toEqual([]);
    await checker.expectInvariant(org, result);
  }, 180_000);

  test("SIGTERM of each service under load: clean exits, nothing lost", async () => {
    const org = await createOrg(mesh, "faults-sigterm");
    const load = startLoad(gateway, org, { total: Number.POSITIVE_INFINITY, concurrency: 16 });
    for (const name of ["gateway", "analytics", "billing"] as const) {
      await load.until(load.answered() + 300);
      expect(await mesh.processes[name].stop()).toBe(0);
      await mesh.restart(name);
    }
    await load.until(load.answered() + 300);
    const result = await load.stop();
    // Stopping services finish what they accepted: no request is recorded without its answer.
    expect((await checker.expectInvariant(org, result)).unanswered).toBe(0);
  }, 180_000);

  test("no secret appears in any service log", () => {
    for (const line of logs) expect(line).not.toContain(adminToken);
  });
});

describe("faults with ClickHouse as a server", () => {
  let dataDir: string;
  let mesh: Mesh;
  let clickhouse: Subprocess<"ignore", "pipe", "inherit">;
  let clickhousePort: number;
  const checker = createChecker(() => mesh);

  /** The test ClickHouse HTTP server in its own process, so it can be stopped like a real server. */
  const startClickHouse = async () => {
    clickhouse = Bun.spawn(
      [process.execPath, path.join(root, "analytics/store/testing/clickhouse-http-server.ts"), "--path", path.join(dataDir, "ch-server"), "--port", String(clickhousePort)],
      { stdin: "ignore", stdout: "pipe", stderr: "inherit" },
    );
    const reader = clickhouse.stdout.getReader();
    const { value } = await reader.read();
    reader.releaseLock();
    expect(new TextDecoder().decode(value)).toContain('"listening"');
  };

  beforeAll(async () => {
    dataDir = await mkdtemp(path.join(tmpdir(), "mesh-faults-ch-"));
    clickhousePort = await freePort();
    await startClickHouse();
    mesh = await startMesh({
      dataDir,
      adminToken,
      ports: { gateway: 0, billing: 0, analytics: 0 },
      env: { ...pipelineEnv, CLICKHOUSE_URL: `http://127.0.0.1:${clickhousePort}` },
      onLine: (service, line) => {
        if (process.env.FAULTS_LOG) process.stderr.write(`[${service}] ${line}\n`);
      },
    });
  }, 120_000);

  afterAll(async () => {
    await mesh?.stop();
    clickhouse?.kill("SIGKILL");
    await rm(dataDir, { recursive: true, force: true });
  }, 60_000);

  test("analytics on a server leaves the in-process engine unloaded", async () => {
    const maps = await readFile(`/proc/${mesh.processes.analytics.proc.pid}/maps`, "utf8");
    expect(maps).toContain("/bun");
    expect(maps).not.toContain("libchdb");
  });

  test("ClickHouse unreachable (connections refused), then reachable again", async () => {
    const org = await createOrg(mesh, "faults-clickhouse-down");
    const load = startLoad(() => mesh.urls.gateway, org, { total: 3000, concurrency: 16 });
    await load.until(500);
    clickhouse.kill("SIGKILL");
    await clickhouse.exited;
    const whileDown = load.answered();
    await load.until(whileDown + 500);
    // Readiness is polled once a second for every probe: it turns within about that, however fast the load runs.
    const ready = await eventually(
      async () => {
        const res = await fetch(`${mesh.urls.analytics}/readyz`);
        return res.status === 503 && res;
      },
      { timeoutMs: 10_000, what: "analytics unready while ClickHouse is down" },
    );
    expect(ready.status).toBe(503);
    await startClickHouse();
    const result = await load.done;
    expect(result.answered.size).toBe(3000);
    await checker.expectInvariant(org, result);
  }, 180_000);
});
