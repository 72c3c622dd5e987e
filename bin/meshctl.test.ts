import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type Timestamp, timestampDate, timestampFromDate } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, type ConnectRouter } from "@connectrpc/connect";
import { AnalyticsService, type QueryUsageRequest, UsageGroupBy } from "../gen/analytics/v1/analytics_pb.ts";
import { BillingService } from "../gen/billing/v1/billing_pb.ts";
import { Endpoint } from "../gen/common/v1/common_pb.ts";
import { createBillingApp } from "../billing/app.ts";
import { createTestDatabase, type TestDatabase } from "../billing/store/test-db.ts";
import { createLogger } from "../lib/log.ts";
import { createServiceClient } from "../lib/rpc-client.ts";
import { type RunningServer, startServer } from "../lib/server.ts";
import { runCli } from "./meshctl.ts";

const adminToken = "test-admin-token-0123456789";
const log = createLogger({ service: "meshctl-test", level: "error" });

let db: TestDatabase;
let billingServer: RunningServer;
let analyticsServer: RunningServer;
let dir: string;
const analyticsQueries: QueryUsageRequest[] = [];
// The methods billing was called with, in order.
const billingCalls: string[] = [];
// Billing's own clock, which a test may set apart from this machine's.
let billingNow = () => new Date();
// What the fake analytics answers as a row's group value, and as a model's name in QueryLatency.
let analyticsGroupValue = (dimension: UsageGroupBy) => `value-of-${UsageGroupBy[dimension]}`;
let latencyModels: string[] = [];

beforeAll(async () => {
  db = await createTestDatabase();
  dir = await mkdtemp(join(tmpdir(), "meshctl-test-"));
  const app = createBillingApp({ pool: db.pool, adminToken, clock: () => billingNow(), log });
  billingServer = await startServer({
    name: "billing",
    port: 0,
    host: "127.0.0.1",
    routes: app.routes,
    http: app.http,
    interceptors: [
      (next) => (req) => {
        billingCalls.push(req.method.name);
        return next(req);
      },
    ],
    log,
  });
  // Analytics answers QueryUsage with one fixed row; the real service is driven in test/e2e/meshctl.test.ts.
  analyticsServer = await startServer({
    name: "analytics",
    port: 0,
    host: "127.0.0.1",
    routes: (router: ConnectRouter) =>
      router.service(AnalyticsService, {
        async queryUsage(req) {
          analyticsQueries.push(req);
          return {
            rows: [
              {
                group: req.groupBy.map((dimension) => analyticsGroupValue(dimension)),
                requests: 3n,
                usage: { inputTokens: 30n, cachedInputTokens: 3n, outputTokens: 12n, reasoningTokens: 1n },
                costNanos: 4_200n,
                errors: 1n,
              },
            ],
          };
        },
        async queryLatency() {
          return { models: latencyModels.map((model) => ({ model, requests: 1n })) };
        },
      }),
    log,
  });
}, 60_000);
afterAll(async () => {
  await billingServer.close(1_000);
  await analyticsServer.close(1_000);
  await db.drop();
  await rm(dir, { recursive: true, force: true });
});

interface Run {
  code: number;
  out: string;
  err: string;
}

async function cli(args: string, env: Record<string, string> = {}): Promise<Run> {
  const argv = args.match(/"[^"]*"|\S+/g)?.map((a) => a.replace(/^"|"$/g, "")) ?? [];
  let out = "";
  let err = "";
  const code = await runCli(argv, {
    env: { BILLING_URL: billingServer.url, ANALYTICS_URL: analyticsServer.url, ADMIN_TOKEN: adminToken, ...env },
    out: (t) => (out += t),
    err: (t) => (err += t),
  });
  return { code, out, err };
}

/** Runs a command that must succeed and returns its stdout. */
async function ok(args: string, env: Record<string, string> = {}): Promise<string> {
  const run = await cli(args, env);
  if (run.code !== 0) throw new Error(`meshctl ${args} exited ${run.code}: ${run.err}`);
  expect(run.err).toBe("");
  return run.out;
}

const json = async <T = Record<string, unknown>>(args: string) => JSON.parse(await ok(`${args} --json`)) as T;

/** A failure prints exactly one line on stderr. */
function failsWith(run: Run, code: number, pattern: RegExp): void {
  expect(run.code).toBe(code);
  expect(run.out).toBe("");
  expect(run.err).toMatch(/^meshctl: [^\n]+\n$/);
  expect(run.err).toMatch(pattern);
}

describe("meshctl against a real billing", () => {
  let orgId: string;
  let keyId: string;
  let secret: string;

  test("orgs create and list", async () => {
    const created = await json<{ organization: { id: string; name: string; maxDiscountBps: number } }>(
      `orgs create "Acme Corp" --tax-bps 1000 --billing-day 1 --budget-usd 50 --max-discount-percent 30`,
    );
    orgId = created.organization.id;
    expect(created.organization).toMatchObject({ name: "Acme Corp", maxDiscountBps: 3000 });
    const table = await ok("orgs list");
    expect(table.split("\n")[0]).toMatch(/^ID\s+NAME\s+TAX\s+BILLING DAY\s+BUDGET\s+MAX DISCOUNT\s+CREATED\s+STATE$/);
    expect(table).toContain(orgId);
    expect(table).toMatch(/Acme Corp\s+10%\s+1\s+\$50\s+30%/);
    const updated = await ok(`orgs update ${orgId} --tax-bps 2000 --max-discount-percent 25`);
    expect(updated).toMatch(/Acme Corp\s+20%\s+1\s+\$50\s+25%/);
    failsWith(await cli(`orgs update ${orgId} --tax-bps 20000`), 1, /tax_rate_bps/);
    // Nothing to change is the command line's mistake, as quota set's is, not an update sent empty.
    billingCalls.length = 0;
    const nothing = /^meshctl: orgs update needs at least one of --name, --tax-bps, --budget-usd, --max-discount-percent\n$/;
    failsWith(await cli(`orgs update ${orgId}`), 2, nothing);
    expect(billingCalls).toEqual([]);
    expect(await ok(`orgs update ${orgId} --tax-bps 1000 --max-discount-percent 30`)).toMatch(/10%\s+1\s+\$50\s+30%/);
    // An empty percentage is refused alike by both, not read by one as no limit.
    const emptyPercent = /--max-discount-percent must be a percentage 0\.\.100 with at most 2 decimals, not ""/;
    failsWith(await cli(`orgs create "Empty Cap" --max-discount-percent ""`), 2, emptyPercent);
    failsWith(await cli(`orgs update ${orgId} --max-discount-percent ""`), 2, emptyPercent);
    expect(await ok("orgs list")).not.toContain("Empty Cap");
    const uncapped = await json<{ organization: { id: string } }>(`orgs create "No Cap" --tax-bps 0`);
    expect(await ok("orgs list")).toMatch(new RegExp(`${uncapped.organization.id}\\s+No Cap\\s+0%\\s+1\\s+unlimited\\s+no limit\\s`));
    expect(await ok("projects create --org " + orgId + " web")).toContain("web");
    expect(await ok(`projects list --org ${orgId}`)).toContain("web");
  });

  test("--json has every field, zeros and empty lists included, so a script reads the same shape every time", async () => {
    const created = await json<{ organization: { id: string } }>(`orgs create "Empty Co"`);
    const id = created.organization.id;
    expect(created.organization).toMatchObject({ taxRateBps: 0, monthlyBudgetNanos: "0", maxDiscountBps: 0 });
    expect(await json(`keys list --org ${id}`)).toEqual({ apiKeys: [], nextPageToken: "" });
    expect(await json(`projects list --org ${id}`)).toEqual({ projects: [], nextPageToken: "" });
    expect(await json(`discounts list --org ${id}`)).toEqual({ rules: [], nextPageToken: "" });
    expect(await json(`invoices list --org ${id}`)).toEqual({ invoices: [], nextPageToken: "" });
    expect(await json(`usage --org ${id}`)).toMatchObject({ requests: "0", costNanos: "0" });
    const { apiKey } = await json<{ apiKey: { id: string } }>(`keys create --org ${id}`);
    expect(await json(`quota show ${apiKey.id} --org ${id}`)).toMatchObject({
      limits: { monthlyBudgetNanos: "0", requestsPerMinute: 0, allowedModels: [] },
      usage: { requests: "0", costNanos: "0" },
      rotatedFrom: [],
    });
    const { invoice } = await json<{ invoice: Record<string, unknown> }>(`invoices generate --org ${id}`);
    expect(invoice).toMatchObject({ subtotalCents: "0", taxCents: "0", totalCents: "0", lineItems: [] });
  });

  test("orgs suspend and reinstate; orgs list shows the state", async () => {
    const org = await json<{ organization: { id: string } }>(`orgs create "Suspended Co"`);
    const id = org.organization.id;
    const { apiKey } = await json<{ apiKey: { id: string } }>(`keys create --org ${id}`);
    expect(await ok("orgs list")).toMatch(new RegExp(`${id}\\s+Suspended Co\\s.*\\sactive\\n`));
    const today = new Date().toISOString().slice(0, 10);
    const suspended = await ok(`orgs suspend ${id} --reason "unpaid invoices"`);
    expect(suspended).toMatch(new RegExp(`${id}\\s+Suspended Co\\s.*\\ssuspended ${today}: unpaid invoices\\n`));
    expect(await ok("orgs list")).toContain(`suspended ${today}: unpaid invoices`);
    const listed = await json<{ organizations: { id: string; state: string; suspendReason: string }[] }>("orgs list");
    expect(listed.organizations.find((o) => o.id === id)).toMatchObject({
      state: "ORGANIZATION_STATE_SUSPENDED",
      suspendReason: "unpaid invoices",
    });
    // Its keys are kept as they were.
    expect(await ok(`keys list --org ${id}`)).toMatch(new RegExp(`${apiKey.id}\\s.*\\sactive`));
    const reinstated = await json<{ organization: { state: string } }>(`orgs reinstate ${id}`);
    expect(reinstated.organization.state).toBe("ORGANIZATION_STATE_ACTIVE");
    expect(await ok("orgs list")).toMatch(new RegExp(`${id}\\s+Suspended Co\\s.*\\sactive\\n`));
    failsWith(await cli("orgs suspend"), 2, /missing ORG_ID/);
    failsWith(await cli(`orgs reinstate ${id} --reason x`), 2, /orgs reinstate does not take --reason/);
    failsWith(await cli("orgs suspend org_missing"), 1, /not_found/);
  });

  test("a name's bidirectional controls, which would reverse the rest of its line, are shown as U+FFFD", async () => {
    // A right-to-left override (U+202E) and an isolate (U+2067) that nothing closes, as Trojan Source uses them.
    const org = await json<{ organization: { id: string; name: string } }>(`orgs create "Rtl\u202e Co\u2067"`);
    const id = org.organization.id;
    expect(org.organization.name).toBe("Rtl\u202e Co\u2067");
    const controls = /[\u202a-\u202e\u2066-\u2069]/;
    const listed = await ok("orgs list");
    expect(listed).not.toMatch(controls);
    expect(listed).toMatch(new RegExp(`${id}\\s+Rtl\ufffd Co\ufffd\\s+0%\\s+1\\s+unlimited\\s`));
    const suspended = await ok(`orgs suspend ${id} --reason "abuse\u202d"`);
    expect(suspended).not.toMatch(controls);
    expect(suspended).toContain(": abuse\ufffd");
    const invoice = await ok(`invoices generate --org ${id}`);
    expect(invoice).not.toMatch(controls);
    expect(invoice.split("\n")[1]).toBe(`billed to Rtl\ufffd Co\ufffd (${id})`);
    // Scripts read the name as it is stored.
    const [stored] = (await json<{ organizations: { id: string; name: string }[] }>("orgs list")).organizations.filter(
      (o) => o.id === id,
    );
    expect(stored?.name).toBe("Rtl\u202e Co\u2067");
  });

  test("names wider or narrower than their characters keep the columns after them in line", async () => {
    // Two cells a CJK character, none a Thai vowel mark (which NFC leaves apart): counted in UTF-16 units, rows shifted.
    const names = ["日本商事株式会社", "บริษัท ไทย", "Plain Name"];
    for (const name of names) await ok(`orgs create "${name}"`);
    const lines = (await ok("orgs list")).split("\n");
    const rows = [lines[0] ?? "", ...names.map((name) => lines.find((line) => line.includes(name)) ?? "")];
    const [header = 0, ...named] = rows.map((line) => Bun.stringWidth(line.slice(0, line.search(/ (TAX|0%) /) + 1)));
    expect(named).toEqual([header, header, header]);
  });

  test("keys create prints the secret once; list, rotate and revoke", async () => {
    const out = await ok(
      `keys create --org ${orgId} --name ci --budget-usd 5 --rpm 60 --models gpt-4o,mini --expires 2030-01-01`,
    );
    expect(out).toMatch(/budget \$5\/mo, 60 rpm, models gpt-4o,mini, expires 2030-01-01/);
    secret = /secret \(shown once, store it now\): (sk-mesh-\w+)/.exec(out)?.[1] as string;
    expect(secret).toHaveLength(51);
    keyId = /^(key_\w+)/m.exec(out)?.[1] as string;
    const listed = await ok(`keys list --org ${orgId}`);
    expect(listed).toContain(keyId);
    expect(listed).not.toContain(secret);

    const rotated = await json<{ apiKey: { id: string }; secret: string }>(`keys rotate ${keyId}`);
    expect(rotated.secret).toStartWith("sk-mesh-");
    expect(rotated.apiKey.id).not.toBe(keyId);
    expect(await ok(`keys revoke ${rotated.apiKey.id}`)).toBe(`revoked ${rotated.apiKey.id}\n`);
    const all = await ok(`keys list --org ${orgId} --all`);
    expect(all.match(/revoked \d{4}-\d{2}-\d{2}/g)).toHaveLength(2);
    expect(await ok(`keys list --org ${orgId}`)).not.toContain("revoked");

    // A key born expired is refused; one that expired since is listed as such.
    failsWith(await cli(`keys create --org ${orgId} --expires 2020-01-01`), 1, /limits\.expire_time: must be in the future/);
    const lapsing = await json<{ apiKey: { id: string } }>(`keys create --org ${orgId} --expires 2030-01-01`);
    await ok(`quota set ${lapsing.apiKey.id} --expires 2020-01-01`);
    expect(await ok(`keys list --org ${orgId}`)).toMatch(new RegExp(`${lapsing.apiKey.id}.*expired 2020-01-01`));

    const fresh = await json<{ apiKey: { id: string }; secret: string }>(`keys create --org ${orgId}`);
    keyId = fresh.apiKey.id;
    secret = fresh.secret;
  });

  test("quota set and show", async () => {
    expect(await ok(`quota set ${keyId} --monthly-tokens 1000 --tpm 500 --budget-usd 2.5`)).toBe(
      `${keyId}: budget $2.5/mo, 1000 tok/mo, 500 tpm\n`,
    );
    const shown = await ok(`quota show ${keyId}`);
    expect(shown).toMatch(/budget \$2\.5\/mo, 1000 tok\/mo, 500 tpm\s+0\s+0\s+0$/m);
    const asJson = await json<{ limits: { monthlyTokens: string } }>(`quota show ${keyId} --org ${orgId}`);
    expect(asJson.limits.monthlyTokens).toBe("1000");
  });

  test("a time without an offset is UTC, whatever the operator's zone; one with an offset is that instant", async () => {
    const utc = await json<{ apiKey: { limits: { expireTime: string } } }>(
      `keys create --org ${orgId} --expires 2031-01-15T10:00`,
    );
    expect(utc.apiKey.limits.expireTime).toBe("2031-01-15T10:00:00Z");
    const offset = await json<{ apiKey: { limits: { expireTime: string } } }>(
      `keys create --org ${orgId} --expires 2031-01-15T10:00:00+01:00`,
    );
    expect(offset.apiKey.limits.expireTime).toBe("2031-01-15T09:00:00Z");
  });

  test("quota set changes only the limits given; 0 or an empty list or date removes one", async () => {
    const created = await json<{ apiKey: { id: string } }>(
      `keys create --org ${orgId} --budget-usd 50 --rpm 60 --models gpt-4o,mock --expires 2030-01-01`,
    );
    const id = created.apiKey.id;
    expect(await ok(`quota set ${id} --monthly-tokens 1000000`)).toBe(
      `${id}: budget $50/mo, 1000000 tok/mo, 60 rpm, models gpt-4o,mock, expires 2030-01-01\n`,
    );
    expect(await ok(`keys list --org ${orgId}`)).toMatch(
      new RegExp(`^${id} .*budget \\$50/mo, 1000000 tok/mo, 60 rpm, models gpt-4o,mock, expires 2030-01-01`, "m"),
    );
    expect(await ok(`quota set ${id} --rpm 0 --models "" --tpm 100 --concurrency 8`)).toBe(
      `${id}: budget $50/mo, 1000000 tok/mo, 100 tpm, 8 concurrent, expires 2030-01-01\n`,
    );
    expect(await ok(`quota set ${id} --budget-usd 0 --expires "" --concurrency 0`)).toBe(
      `${id}: 1000000 tok/mo, 100 tpm\n`,
    );
    failsWith(await cli(`quota set ${id} --concurrency -1`), 2, /--concurrency must not be negative/);
    failsWith(await cli(`quota set ${id}`), 2, /quota set needs at least one of --budget-usd/);
    failsWith(await cli(`quota set key_missing --rpm 1`), 1, /api key key_missing not found/);
  });

  test("usage from billing and from analytics", async () => {
    const billing = createServiceClient(BillingService, { baseUrl: billingServer.url, bearerToken: adminToken });
    const now = new Date();
    await billing.recordUsage({
      records: [1n, 2n].map((n) => ({
        requestId: `req_cli_${n}`,
        orgId,
        apiKeyId: keyId,
        model: "gpt-4o",
        provider: "openai",
        endpoint: Endpoint.CHAT_COMPLETIONS,
        usage: { inputTokens: 100n * n, cachedInputTokens: n, outputTokens: 10n * n, reasoningTokens: n },
        costNanos: 1_000_000_000n * n + 1n,
        occurTime: timestampFromDate(now),
      })),
    });
    const table = await ok(`usage --org ${orgId}`);
    expect(table.split("\n")[0]).toMatch(/^REQUESTS\s+INPUT\s+CACHED INPUT\s+OUTPUT\s+REASONING\s+COST_NANOS\s+COST \(USD\)$/);
    expect(table.split("\n")[1]).toMatch(/^\s*2\s+300\s+3\s+30\s+3\s+3000000002\s+3\.000000002$/);
    const summary = await json<{ requests: string; costNanos: string }>(`usage --org ${orgId} --source billing`);
    expect(summary).toMatchObject({ requests: "2", costNanos: "3000000002" });
    const ranged = await json<{ requests: string }>(`usage --org ${orgId} --from 2020-01-01 --to 2020-02-01`);
    expect(ranged.requests).toBe("0");

    const fromAnalytics = await ok(`usage --org ${orgId} --source analytics`);
    // Analytics counts the requests that failed, as --json has them; billing's summary does not.
    expect(fromAnalytics.split("\n")[0]).toMatch(/^REQUESTS\s+ERRORS\s+INPUT\s/);
    expect(fromAnalytics.split("\n")[1]).toMatch(/^\s*3\s+1\s+30\s+3\s+12\s+1\s+4200\s+0\.0000042$/);
    const query = analyticsQueries.at(-1);
    expect(query?.orgId).toBe(orgId);
    // The org's billing period, as billing uses by default.
    const start = timestampDate(query?.range?.start ?? timestampFromDate(new Date(0)));
    expect(start.toISOString()).toBe(new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), 1)).toISOString());
    failsWith(await cli(`usage --org ${orgId} --source clickhouse`), 2, /--source must be billing or analytics/);

    // --by groups analytics' rows (and so asks analytics), a column per dimension in the order given.
    const grouped = (await ok(`usage --org ${orgId} --by key,model`)).split("\n");
    expect(analyticsQueries.at(-1)?.groupBy).toEqual([UsageGroupBy.API_KEY, UsageGroupBy.MODEL]);
    expect(grouped[0]).toMatch(/^KEY\s+MODEL\s+REQUESTS\s+ERRORS\s+INPUT\s/);
    expect(grouped[1]).toMatch(/^value-of-API_KEY\s+value-of-MODEL\s+3\s+1\s+30\s+3\s+12\s+1\s+4200\s+0\.0000042$/);
    const byJson = await json<{ rows: { group: string[] }[] }>(`usage --org ${orgId} --by hour`);
    expect(byJson.rows[0]?.group).toEqual(["value-of-HOUR"]);
    failsWith(await cli(`usage --org ${orgId} --by key --source billing`), 2, /--by groups analytics' rows/);
    failsWith(await cli(`usage --org ${orgId} --by team`), 2, /--by takes model, key, project, .*; not "team"/);
    failsWith(await cli(`usage --org ${orgId} --by model,model`), 2, /names a dimension twice/);
    failsWith(await cli(`usage --org ${orgId} --by model,key,day,status`), 2, /at most 3 dimensions, not 4/);
  });

  test("names analytics holds as gateways sent them show no control characters: no escape sequence, no line of their own", async () => {
    // Rows from gateways that metered a client's model name as it came, or from any caller of IngestMetrics.
    const forged = "gpt-4o\u001b[2J\u001b]0;pwned\u0007\nFORGED   999\r\u0085\u2028x";
    analyticsGroupValue = () => forged;
    latencyModels = [forged];
    try {
      const usage = await ok(`usage --org ${orgId} --by model`);
      const latency = await ok(`latency --org ${orgId}`);
      for (const table of [usage, latency]) {
        expect(table.split("\n")).toHaveLength(3);
        expect(table).not.toMatch(/[\p{Cc}\u2028\u2029](?<!\n)/u);
        expect(table.split("\n")[1]).toStartWith("gpt-4o\ufffd[2J\ufffd]0;pwned\ufffd\ufffdFORGED   999\ufffd\ufffd\ufffdx ");
      }
      // --json keeps the value as analytics holds it.
      expect((await json<{ rows: { group: string[] }[] }>(`usage --org ${orgId} --by model`)).rows[0]?.group).toEqual([forged]);
    } finally {
      analyticsGroupValue = (dimension) => `value-of-${UsageGroupBy[dimension]}`;
      latencyModels = [];
    }
  });

  test("requests without a model (GET /v1/models) show one as -, not as an empty cell the row shifts into", async () => {
    analyticsGroupValue = () => "";
    latencyModels = [""];
    try {
      expect((await ok(`usage --org ${orgId} --by model`)).split("\n")[1]).toMatch(/^-\s+3\s+1\s+30\s/);
      expect((await ok(`latency --org ${orgId}`)).split("\n")[1]).toMatch(/^-\s+1\s+0\.0 \//);
      expect((await json<{ rows: { group: string[] }[] }>(`usage --org ${orgId} --by model`)).rows[0]?.group).toEqual([""]);
    } finally {
      analyticsGroupValue = (dimension) => `value-of-${UsageGroupBy[dimension]}`;
      latencyModels = [];
    }
  });

  test("an org's own API key reads its analytics, a left-out bound from its org's billing period", async () => {
    const billing = createServiceClient(BillingService, { baseUrl: billingServer.url, bearerToken: adminToken });
    const orgKey = (await billing.createApiKey({ orgId, name: "reader" })).secret;
    const asOrg = { ADMIN_TOKEN: orgKey };
    const range = `--from 2026-10-01 --to 2026-11-01`;
    expect((await ok(`usage --org ${orgId} --source analytics ${range}`, asOrg)).split("\n")[1]).toMatch(/^\s*3\s+1\s+30\s/);
    expect(timestampDate(analyticsQueries.at(-1)?.range?.start ?? timestampFromDate(new Date(0))).toISOString()).toBe(
      "2026-10-01T00:00:00.000Z",
    );
    expect(timestampDate(analyticsQueries.at(-1)?.range?.end ?? timestampFromDate(new Date(0))).toISOString()).toBe(
      "2026-11-01T00:00:00.000Z",
    );
    // The billing period a left-out bound comes from is the key's own org's, which it may look up.
    billingCalls.length = 0;
    await ok(`usage --org ${orgId} --source analytics --from 2026-10-01`, asOrg);
    expect(billingCalls).toEqual(["GetOrganization"]);
    expect(timestampDate(analyticsQueries.at(-1)?.range?.start ?? timestampFromDate(new Date(0))).toISOString()).toBe(
      "2026-10-01T00:00:00.000Z",
    );
    expect(await ok(`orgs show ${orgId}`, asOrg)).toContain(orgId);
    // Another org is as unknown to it as one nobody created.
    const otherOrgId = (await billing.createOrganization({ name: "someone else" })).organization?.id ?? "";
    failsWith(await cli(`latency --org ${otherOrgId}`, asOrg), 1, /not_found.*organization \S+ not found/);
    failsWith(await cli(`orgs show ${otherOrgId}`, asOrg), 1, /not_found/);
  });

  test("quota show counts the usage of the keys a key was rotated from, as its limits do", async () => {
    const billing = createServiceClient(BillingService, { baseUrl: billingServer.url, bearerToken: adminToken });
    const first = await json<{ apiKey: { id: string } }>(`keys create --org ${orgId} --budget-usd 1`);
    const spend = (apiKeyId: string, n: number) =>
      billing.recordUsage({
        records: [
          {
            requestId: `req_rotated_${n}`,
            orgId,
            apiKeyId,
            model: "mock",
            provider: "mock",
            endpoint: Endpoint.CHAT_COMPLETIONS,
            usage: { inputTokens: 10n, outputTokens: 5n },
            costNanos: 100_000_000n,
            occurTime: timestampFromDate(new Date()),
          },
        ],
      });
    await spend(first.apiKey.id, 1);
    const second = await json<{ apiKey: { id: string } }>(`keys rotate ${first.apiKey.id}`);
    await spend(second.apiKey.id, 2);
    const third = await json<{ apiKey: { id: string } }>(`keys rotate ${second.apiKey.id}`);
    await spend(third.apiKey.id, 3);

    const shown = await ok(`quota show ${third.apiKey.id}`);
    expect(shown).toMatch(/budget \$1\/mo\s+3\s+45\s+0\.3$/m);
    expect(shown).toEndWith(`including the keys it was rotated from: ${second.apiKey.id}, ${first.apiKey.id}\n`);
    const asJson = await json<{ usage: { requests: string; costNanos: string }; rotatedFrom: string[] }>(
      `quota show ${second.apiKey.id} --org ${orgId}`,
    );
    expect(asJson).toMatchObject({ usage: { requests: "2", costNanos: "200000000" }, rotatedFrom: [first.apiKey.id] });
    expect(await ok(`quota show ${first.apiKey.id}`)).not.toContain("rotated from");
  });

  test("discounts add, list and remove", async () => {
    const promo = await json<{ rule: { id: string } }>(
      `discounts add --org ${orgId} --name "Spring promo" --kind promotional --percent 10 --from 2026-01-01 ` +
        "--until 2027-01-01 --cap-usd 1 --model gpt-4o --priority 5",
    );
    expect(promo.rule.id).toStartWith("disc_");
    expect(
      await ok(`discounts add --org ${orgId} --name volume --kind volume-graduated --tiers 0:0,1:5,10:7.5`),
    ).toMatch(/^created discount rule disc_\w+\n$/);
    const night = await json<{ rule: { id: string; stackable: boolean } }>(
      `discounts add --org ${orgId} --name nights --kind time-window --percent 20 --hours 22-24 --days 0,6 --exclusive`,
    );
    expect(night.rule.stackable).toBe(false);
    const listed = await ok(`discounts list --org ${orgId}`);
    expect(listed).toMatch(/Spring promo\s+promotional\s+10%\s+5\s+yes\s+gpt-4o\s+2026-01-01\.\.2027-01-01\s+\$1/);
    expect(listed).toMatch(/volume\s+volume-graduated\s+\$0\+: 0%, \$1\+: 5%, \$10\+: 7\.5%\s+0\s+yes\s+all\s+always\s+-/);
    expect(listed).toMatch(/nights\s+time-window\s+20%\s+0\s+no\s+all\s+22-24h UTC Sun,Sat/);
    const fridayNight = await json<{ rule: { id: string; startHour: number; endHour: number } }>(
      `discounts add --org ${orgId} --name "Friday night" --kind time-window --percent 20 --hours 22-6 --days 5`,
    );
    expect(fridayNight.rule).toMatchObject({ startHour: 22, endHour: 6 });
    expect(await ok(`discounts list --org ${orgId}`)).toMatch(
      /Friday night\s+time-window\s+20%\s+0\s+yes\s+all\s+22-6h UTC Fri/,
    );
    await ok(`discounts remove ${fridayNight.rule.id}`);
    // A validity of hours within one day shows its hours, not that day twice.
    const flash = await json<{ rule: { id: string } }>(
      `discounts add --org ${orgId} --name flash --kind promotional --percent 50 --from 2026-12-01T14:00 ` +
        "--until 2026-12-01T18:00",
    );
    expect(await ok(`discounts list --org ${orgId}`)).toMatch(/flash\s+promotional\s+50%.*2026-12-01T14:00\.\.2026-12-01T18:00/);
    await ok(`discounts remove ${flash.rule.id}`);
    failsWith(
      await cli(`discounts add --org ${orgId} --name x --kind time-window --percent 5 --hours 6-6`),
      1,
      /invalid_argument.*end_hour: must differ from start_hour \(a window of all day is 0 to 24\)/,
    );
    expect(await ok(`discounts remove ${night.rule.id}`)).toBe(`removed ${night.rule.id}\n`);
    expect(await ok(`discounts list --org ${orgId}`)).not.toContain("nights");
    // Priorities may be negative (applied after the default 0).
    const late = await json<{ rule: { id: string; priority: number } }>(
      `discounts add --org ${orgId} --name late --kind promotional --percent 1 --priority=-5`,
    );
    expect(late.rule.priority).toBe(-5);
    await ok(`discounts remove ${late.rule.id}`);
    failsWith(await cli(`discounts add --org ${orgId} --name x --kind bogus`), 2, /--kind must be one of/);
    failsWith(await cli(`discounts add --org ${orgId} --name x --kind promotional`), 1, /invalid_argument.*discount_bps/);
    const hours = /^meshctl: --hours must be START-END in UTC hours, like 9-17 or 22-6, not "(9|)"\n$/;
    failsWith(await cli(`discounts add --org ${orgId} --name x --kind time-window --percent 5 --hours 9`), 2, hours);
    failsWith(await cli(`discounts add --org ${orgId} --name x --kind time-window --percent 5 --hours ""`), 2, hours);
    // A tier of three parts is refused whole, not read as its first two.
    const tiers = `discounts add --org ${orgId} --name x --kind volume-graduated --tiers 0:0,100:5:3`;
    failsWith(await cli(tiers), 2, /^meshctl: --tiers must be FROM_USD:PERCENT,\.\.\., not "0:0,100:5:3"\n$/);
    failsWith(await cli(`discounts remove ${night.rule.id}`), 1, /not_found/);
  });

  test("invoices generate without --period invoices billing's current period, not the one of meshctl's clock", async () => {
    const { organization } = await createServiceClient(BillingService, {
      baseUrl: billingServer.url,
      bearerToken: adminToken,
    }).createOrganization({ name: "clock skew" });
    billingNow = () => new Date("2026-03-15T12:00:00Z");
    try {
      const generated = await ok(`invoices generate --org ${organization?.id}`);
      expect(generated.split("\n")[0]).toMatch(/draft, 2026-03-01 to 2026-03-31$/);
    } finally {
      billingNow = () => new Date();
    }
  });

  test("invoices generate, list, show, move through their states and render as HTML", async () => {
    const billing = createServiceClient(BillingService, { baseUrl: billingServer.url, bearerToken: adminToken });
    await billing.recordUsage({
      records: [
        {
          requestId: "req_cli_march",
          orgId,
          model: "gpt-4o",
          provider: "openai",
          endpoint: Endpoint.CHAT_COMPLETIONS,
          usage: { inputTokens: 1000n, outputTokens: 100n },
          costNanos: 12_345_678_901n,
          occurTime: timestampFromDate(new Date("2026-03-10T12:00:00Z")),
          costBreakdown: { inputNanos: 10_000_000_000n, outputNanos: 2_345_678_901n },
        },
      ],
    });
    const generated = await ok(`invoices generate --org ${orgId} --period 2026-03`);
    const [heading] = generated.split("\n");
    expect(heading).toMatch(/^Draft \(inv_\w+\) draft, 2026-03-01 to 2026-03-31$/);
    const invoiceId = /\((inv_\w+)\)/.exec(generated)?.[1] as string;
    expect(generated).toMatch(/gpt-4o: input tokens\s+1000\s+10$/m);
    expect(generated).toMatch(/gpt-4o: output tokens\s+100\s+2\.345678901$/m);
    // 10% promo on gpt-4o, capped at $1; then the graduated tiers' rate on what is left.
    expect(generated).toMatch(/Discount: Spring promo .*capped at \$1\)\s+-1$/m);
    expect(generated).toMatch(/Discount: volume \(graduated volume tiers .*\)\s+-0\.575225917$/m);
    expect(generated).toContain("subtotal $12.35  discounts -$1.58  tax (10%) $1.08  total $11.85");
    expect(generated).toContain("rounded once to the cent, half-up");

    expect(await ok(`invoices list --org ${orgId}`)).toMatch(/inv_\w+\s+-\s+2026-03-01\s+draft\s+\$11\.85/);
    expect((await ok(`invoices show ${invoiceId}`)).split("\n").slice(0, 2)).toEqual([
      heading as string,
      `billed to Acme Corp (${orgId})`,
    ]);
    expect(await ok(`invoices issue ${invoiceId}`)).toBe("INV-2026-03-0001: issued\n");
    expect((await ok(`invoices show ${invoiceId}`)).split("\n")[0]).toMatch(/^INV-2026-03-0001 \(inv_\w+\) issued,/);
    failsWith(await cli(`invoices generate --org ${orgId} --period 2026-03`), 1, /failed_precondition.*already issued/);
    expect(await ok(`invoices pay ${invoiceId}`)).toBe("INV-2026-03-0001: paid\n");
    failsWith(await cli(`invoices void ${invoiceId}`), 1, /failed_precondition/);

    // The paid invoice keeps the name it was issued with.
    await ok(`orgs update ${orgId} --name "Acme Renamed Ltd"`);
    expect((await ok(`invoices show ${invoiceId}`)).split("\n")[1]).toBe(`billed to Acme Corp (${orgId})`);
    // A relative path is where npm was run (npm runs scripts in the package's folder and says where in INIT_CWD).
    const out = join(dir, "invoice.html");
    expect(await ok(`invoices render ${invoiceId} --html --out invoice.html`, { INIT_CWD: dir })).toBe(`wrote ${out}\n`);
    const html = await readFile(out, "utf8");
    expect(html).toStartWith("<!doctype html>");
    expect(html).toContain("<dt>Billed to</dt><dd>Acme Corp</dd>");
    expect(html).not.toContain("Renamed");
    expect(await ok(`invoices render ${invoiceId} --html`)).toBe(html);
    failsWith(await cli(`invoices render ${invoiceId}`), 2, /needs --html/);
    // HTML is all it renders: --json, which scripts read as JSON, is refused rather than answered with HTML.
    failsWith(await cli(`invoices render ${invoiceId} --html --json`), 2, /render prints HTML.*invoices show --json/);
    failsWith(await cli("invoices render inv_missing --html"), 1, /billing answered 404 for invoice inv_missing/);
    failsWith(await cli(`invoices generate --org ${orgId} --period 2026-3`), 2, /--period must be YYYY-MM/);
  }, 60_000);

  test("errors print one line and exit non-zero", async () => {
    failsWith(await cli("orgs create"), 2, /missing NAME/);
    failsWith(await cli("keys revoke key_missing"), 1, /^meshctl: \[not_found\] api key key_missing not found\n$/);
    failsWith(await cli("frobnicate"), 2, /unknown command "frobnicate"/);
    failsWith(await cli("orgs list --frobnicate"), 2, /--frobnicate/);
    failsWith(await cli("keys create --org x --rpm lots"), 2, /--rpm must be a non-negative integer/);
    // Numbers past what the contract holds are the command line's fault, not the service's.
    failsWith(await cli("quota set key_x --rpm 99999999999"), 2, /--rpm must be a non-negative integer up to 2147483647/);
    failsWith(
      await cli("quota set key_x --budget-usd 999999999999.999999999"),
      2,
      /^meshctl: --budget-usd must be at most \$9,223,372,036\.854775807, not "999999999999\.999999999"\n$/,
    );
    // An amount meshctl cannot read names its flag: a discount takes three.
    const amount = "discounts add --org x --name n --kind volume-graduated --tiers 0:0,100:5 --cap-usd";
    failsWith(await cli(`${amount} 1,000`), 2, /^meshctl: --cap-usd must be a USD amount like 12\.50, .*not "1,000"\n$/);
    failsWith(await cli(`keys create --org x --budget-usd 0.0000000001`), 2, /^meshctl: --budget-usd must be a USD amount/);
    // A negative amount is named as such, written either way, rather than as an ambiguous option.
    const negative = /^meshctl: --budget-usd must not be negative, not "-1"\n$/;
    failsWith(await cli("quota set key_x --budget-usd -1"), 2, negative);
    failsWith(await cli("quota set key_x --budget-usd=-1"), 2, negative);
    failsWith(await cli("quota set key_x --rpm -1"), 2, /--rpm must not be negative, not "-1"/);
    const discount = "discounts add --org x --name n --kind promotional --percent 1";
    failsWith(await cli(`${discount} --cap-usd -0.5`), 2, /--cap-usd must not be negative, not "-0.5"/);
    failsWith(await cli(`${discount} --priority -5`), 2, /a negative --priority is written --priority=-5/);
    // A flag the command does not take, or an extra argument, is refused rather than ignored.
    failsWith(await cli("orgs update org_x --billing-day 15"), 2, /orgs update does not take --billing-day/);
    failsWith(await cli("usage --org org_x extra"), 2, /unexpected argument "extra"/);
    // Dates are UTC, and only dates there are.
    failsWith(await cli("keys create --org x --expires 2027-02-30"), 2, /--expires must be a date like 2026-11-30/);
    failsWith(await cli("keys create --org x --expires 01/15/2027"), 2, /--expires must be a date/);
    failsWith(await cli("orgs list", { ADMIN_TOKEN: "wrong-token-0123456789" }), 1, /permission_denied/);
    failsWith(await cli("orgs list", { ADMIN_TOKEN: "short" }), 2, /ADMIN_TOKEN/);
    failsWith(await cli("orgs list", { BILLING_URL: "not a url" }), 2, /BILLING_URL/);
    // A failure that is not the service's answer names the service and the address it was looked for at.
    failsWith(
      await cli("orgs list", { BILLING_URL: "http://127.0.0.1:1" }),
      1,
      /^meshctl: \[unavailable\] billing at http:\/\/127\.0\.0\.1:1: connect ECONNREFUSED/,
    );
    // BILLING_URL set to analytics' address, say: the server says which method it does not have.
    failsWith(
      await cli("orgs list", { BILLING_URL: analyticsServer.url }),
      1,
      /^meshctl: \[unimplemented\] no procedure or route at POST \/billing\.v1\.BillingService\/ListOrganizations\n$/,
    );
    // The HTML page is fetched outside the RPCs: its failure names the service and address all the same.
    failsWith(
      await cli("invoices render inv_x --html", { BILLING_URL: "http://127.0.0.1:1" }),
      1,
      /^meshctl: \[unavailable\] billing at http:\/\/127\.0\.0\.1:1: /,
    );
    // A URL's user:password, a proxy's say, is no part of what stderr (a terminal, a CI log) shows.
    for (const command of ["orgs list", "orgs create Creds", "invoices render inv_x --html"]) {
      const run = await cli(command, { BILLING_URL: "http://ops:s3cret-pw@127.0.0.1:1" });
      failsWith(run, 1, /^meshctl: \[unavailable\] billing at http:\/\/\*\*\*@127\.0\.0\.1:1: /);
      expect(run.err).not.toContain("s3cret-pw");
    }
    const none = await cli("");
    expect(none.code).toBe(2);
    expect(none.err).toContain("usage: meshctl");
    const help = await cli("--help");
    expect(help.code).toBe(0);
    expect(help.out).toContain("invoices generate --org ID");
    // An invoice names its last day; usage ranges end before --to, which the help says.
    expect(help.out).toContain("up to, not including, --to");
    // So does a discount's validity, whose --until 2026-12-31 would leave out December's last day.
    expect(help.out).toContain("up to, not including, --until: all of December is --from 2026-12-01 --until 2027-01-01");
  });
});

describe("creates whose answer was lost", () => {
  // Billing behind a link that loses the first answer of each create (the create done), or drops a call before billing
  // sees it with DeadlineExceeded: what meshctl sends, and what billing then holds.
  let lossy: RunningServer;
  let billing: ReturnType<typeof createServiceClient<typeof BillingService>>;
  let fault: "lose answer" | "drop call" | "refuse" = "lose answer";
  const sent: string[] = [];
  const faulty = async <T>(requestId: string, call: () => Promise<T>): Promise<T> => {
    sent.push(requestId);
    if (sent.length > 1) return call();
    if (fault === "drop call") throw new ConnectError("deadline passed", Code.DeadlineExceeded);
    if (fault === "refuse") throw new ConnectError("refused here", Code.InvalidArgument);
    await call();
    throw new ConnectError("connection reset", Code.Unavailable);
  };
  beforeAll(async () => {
    billing = createServiceClient(BillingService, { baseUrl: billingServer.url, bearerToken: adminToken });
    lossy = await startServer({
      name: "lossy-billing",
      port: 0,
      host: "127.0.0.1",
      routes: (router: ConnectRouter) =>
        router.service(BillingService, {
          createApiKey: (req) => faulty(req.requestId, () => billing.createApiKey(req)),
          createDiscountRule: (req) => faulty(req.requestId, () => billing.createDiscountRule(req)),
          createOrganization: (req) => faulty(req.requestId, () => billing.createOrganization(req)),
          createProject: (req) => faulty(req.requestId, () => billing.createProject(req)),
        }),
      log,
    });
  });
  afterAll(() => lossy.close(1_000));
  const lossyCli = (args: string, kind: typeof fault) => {
    fault = kind;
    sent.length = 0;
    return cli(args, { BILLING_URL: lossy.url });
  };

  test("discounts add sends the rule again with its request_id: one rule", async () => {
    const orgId = (await billing.createOrganization({ name: "retries" })).organization?.id as string;
    const add = (name: string) => `discounts add --org ${orgId} --name ${name} --kind promotional --percent 10`;
    const run = await lossyCli(add("promo"), "lose answer");
    expect(run).toMatchObject({ code: 0, err: "" });
    expect(sent).toHaveLength(2);
    expect(sent[0]).toMatch(/^[0-9A-Z]{26}$/);
    expect(sent[1]).toBe(sent[0] as string);
    const { rules } = await billing.listDiscountRules({ orgId });
    expect(rules.map((r) => r.id)).toEqual([run.out.match(/disc_\w+/)?.[0] as string]);
    // Each command is a create of its own, with a request_id of its own.
    const first = sent[0];
    expect((await lossyCli(add("p2"), "drop call")).code).toBe(0);
    expect(sent[0]).not.toBe(first);
    expect((await billing.listDiscountRules({ orgId })).rules).toHaveLength(2);
    // Other errors are the answer: not sent again.
    failsWith(await lossyCli(add("p3"), "refuse"), 1, /refused here/);
    expect(sent).toHaveLength(1);
  });

  test("orgs create and projects create sent again: one org and one project, not ALREADY_EXISTS", async () => {
    const made = await lossyCli("orgs create lost-answer-org --tax-bps 700", "lose answer");
    expect(made).toMatchObject({ code: 0, err: "" });
    expect(sent).toEqual([sent[0] as string, sent[0] as string]);
    const orgId = made.out.match(/org_\w+/)?.[0] as string;
    const orgs = (await billing.listOrganizations({})).organizations.filter((o) => o.name === "lost-answer-org");
    expect(orgs.map((o) => o.id)).toEqual([orgId]);

    const project = await lossyCli(`projects create --org ${orgId} web`, "lose answer");
    expect(project).toMatchObject({ code: 0, err: "" });
    expect(sent).toHaveLength(2);
    const { projects } = await billing.listProjects({ orgId });
    expect(projects.map((p) => p.id)).toEqual([project.out.match(/proj_\w+/)?.[0] as string]);
    // A name taken by another create is still refused.
    failsWith(await lossyCli("orgs create lost-answer-org", "drop call"), 1, /an organization with this name already exists/);
  });

  test("keys create sent again: one key, and a secret lost with its answer is said to be so", async () => {
    const orgId = (await billing.createOrganization({ name: "key retries" })).organization?.id as string;
    const dropped = await lossyCli(`keys create --org ${orgId} --name ci`, "drop call");
    expect(dropped.code).toBe(0);
    expect(dropped.out).toMatch(/secret \(shown once, store it now\): sk-mesh-\w+/);
    expect(sent).toEqual([sent[0] as string, sent[0] as string]);

    const lost = await lossyCli(`keys create --org ${orgId} --name cd`, "lose answer");
    const keys = (await billing.listApiKeys({ orgId })).apiKeys;
    expect(keys.map((k) => k.name)).toEqual(["ci", "cd"]);
    const lostId = keys[1]?.id as string;
    failsWith(lost, 1, new RegExp(`^meshctl: api key ${lostId} was created, but the answer carrying its secret was lost`));
    expect(lost.err).toContain(`"meshctl keys rotate ${lostId}" gives it a new one`);
  });
});

describe("listings longer than billing's largest page", () => {
  test("orgs list, keys list and quota show follow every page", async () => {
    // More rows than one page of 1000 holds, made in bulk: one statement each rather than a thousand calls.
    await db.pool.query(
      `INSERT INTO organizations (id, name) SELECT 'org_bulk' || lpad(i::text, 5, '0'), 'bulk org ' || i
       FROM generate_series(1, 1005) AS i`,
    );
    const { rows } = await db.pool.query<{ n: number }>("SELECT count(*)::int AS n FROM organizations");
    const orgs = await json<{ organizations: { id: string }[]; nextPageToken: string }>("orgs list");
    expect(orgs.organizations).toHaveLength(rows[0]?.n as number);
    expect(new Set(orgs.organizations.map((o) => o.id)).size).toBe(rows[0]?.n as number);
    expect(orgs.nextPageToken).toBe("");
    expect(await ok("orgs list")).toContain("bulk org 1005");

    const orgId = "org_bulk01005";
    await db.pool.query(
      `INSERT INTO api_keys (id, org_id, name, secret_sha256, prefix)
       SELECT 'key_bulk' || lpad(i::text, 5, '0'), $1, 'bulk key ' || i, encode(sha256(('bulk' || i)::bytea), 'hex'),
         'sk-mesh-bulk'
       FROM generate_series(1, 1010) AS i`,
      [orgId],
    );
    const keys = await json<{ apiKeys: { id: string }[] }>(`keys list --org ${orgId}`);
    const bulkIds = Array.from({ length: 1010 }, (_, i) => `key_bulk${String(i + 1).padStart(5, "0")}`);
    expect(keys.apiKeys.map((k) => k.id)).toEqual(bulkIds);
    expect(await ok(`keys list --org ${orgId}`)).toContain("key_bulk01010");
    // The key looked up among its org's keys is on their second page.
    expect(await ok(`quota show key_bulk01010 --org ${orgId}`)).toContain("key_bulk01010");
  }, 60_000);

  test("a list longer than a pipe holds reaches a reader that takes its time whole, as valid JSON", async () => {
    // `meshctl orgs list --json | jq` on a busy host: a shell's pipe, whose reader starts late.
    const script = `{ "$0" "$1" orgs list --json; echo "meshctl exited $?" >&2; } | { sleep 0.5; cat; }`;
    const proc = Bun.spawn(["sh", "-c", script, process.execPath, join(import.meta.dir, "meshctl.ts")], {
      env: { PATH: process.env.PATH, BILLING_URL: billingServer.url, ADMIN_TOKEN: adminToken },
      stdout: "pipe",
      stderr: "pipe",
    });
    const [out, err] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text()]);
    expect(err).toBe("meshctl exited 0\n");
    expect(out.length).toBeGreaterThan(256 * 1024);
    const { rows } = await db.pool.query<{ n: number }>("SELECT count(*)::int AS n FROM organizations");
    expect((JSON.parse(out) as { organizations: unknown[] }).organizations).toHaveLength(rows[0]?.n as number);
  }, 60_000);

  test("output that could not be written fails the command: a new key's secret sent to a full disk", async () => {
    const orgId = "org_bulk00003";
    const script = `"$0" "$1" keys create --org ${orgId} --name full > /dev/full`;
    const proc = Bun.spawn(["sh", "-c", script, process.execPath, join(import.meta.dir, "meshctl.ts")], {
      env: { PATH: process.env.PATH, BILLING_URL: billingServer.url, ADMIN_TOKEN: adminToken },
      stderr: "pipe",
    });
    const [err, code] = await Promise.all([new Response(proc.stderr).text(), proc.exited]);
    expect(code).toBe(1);
    expect(err).toBe("meshctl: the output was not written: ENOSPC: no space left on device, write\n");
    // The key was made: its secret is what was lost.
    const keys = await json<{ apiKeys: { name: string }[] }>(`keys list --org ${orgId}`);
    expect(keys.apiKeys.map((k) => k.name)).toEqual(["full"]);
  }, 60_000);

  test("quota show looks a key up by its id alone, in one call however many orgs there are", async () => {
    const { rows } = await db.pool.query<{ n: number }>("SELECT count(*)::int AS n FROM organizations");
    expect(rows[0]?.n).toBeGreaterThan(1000);
    const calls = async (args: string) => {
      billingCalls.length = 0;
      const run = await cli(args);
      return { ...run, calls: [...billingCalls] };
    };
    const shown = await calls("quota show key_bulk01010");
    expect(shown.out).toContain("key_bulk01010");
    expect(shown.calls).toEqual(["GetApiKey", "GetUsageSummary"]);

    // A rotated key's predecessors, one lookup each.
    const orgId = "org_bulk00001";
    const first = await json<{ apiKey: { id: string } }>(`keys create --org ${orgId}`);
    const second = await json<{ apiKey: { id: string } }>(`keys rotate ${first.apiKey.id}`);
    const rotated = await calls(`quota show ${second.apiKey.id}`);
    expect(rotated.out).toEndWith(`including the keys it was rotated from: ${first.apiKey.id}\n`);
    expect(rotated.calls).toEqual(["GetApiKey", "GetApiKey", "GetUsageSummary", "GetUsageSummary"]);

    const unknown = await calls("quota show key_missing");
    failsWith(unknown, 1, /^meshctl: no key key_missing\n$/);
    expect(unknown.calls).toEqual(["GetApiKey"]);
    failsWith(await cli(`quota show ${first.apiKey.id} --org org_bulk00002`), 1, /no key \S+ in org org_bulk00002\n$/);
  }, 60_000);

  test("usage, latency and orgs show look the org up by its id alone, in one call however many orgs there are", async () => {
    const calls = async (args: string) => {
      billingCalls.length = 0;
      const run = await cli(args);
      return { ...run, calls: [...billingCalls] };
    };
    const orgId = "org_bulk01003";
    await db.pool.query("UPDATE organizations SET billing_day = 7 WHERE id = $1", [orgId]);
    const usage = await calls(`usage --org ${orgId} --source analytics --to 2026-10-20`);
    expect(usage.code).toBe(0);
    expect(usage.calls).toEqual(["GetOrganization"]);
    const range = analyticsQueries.at(-1)?.range;
    const iso = (t: Timestamp | undefined) => (t ? timestampDate(t).toISOString() : "");
    expect([iso(range?.start), iso(range?.end)]).toEqual(["2026-10-07T00:00:00.000Z", "2026-10-20T00:00:00.000Z"]);
    const latency = await calls(`latency --org ${orgId}`);
    expect(latency.code).toBe(0);
    expect(latency.calls).toEqual(["GetOrganization"]);
    const shown = await calls(`orgs show ${orgId}`);
    expect(shown.out).toMatch(/^ID\s+NAME\s+TAX\s+BILLING DAY\s/);
    expect(shown.out).toMatch(/org_bulk01003\s+bulk org 1003\s+0%\s+7\s/);
    expect(shown.calls).toEqual(["GetOrganization"]);

    const unknown = await calls("latency --org org_missing");
    failsWith(unknown, 1, /not_found.*organization org_missing not found/);
    expect(unknown.calls).toEqual(["GetOrganization"]);
  }, 60_000);
});
