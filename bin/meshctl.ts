#!/usr/bin/env bun
/**
 * meshctl: operate billing and analytics from a terminal.
 * Addresses from BILLING_URL / ANALYTICS_URL, admin token from ADMIN_TOKEN.
 * Human tables by default, --json for scripts. Errors print one line and exit non-zero.
 */
import { writeFile } from "node:fs/promises";
import { resolve } from "node:path";
import { parseArgs } from "node:util";
import {
  create,
  createRegistry,
  type DescMessage,
  type MessageInitShape,
  type MessageShape,
  toJson,
} from "@bufbuild/protobuf";
import { type Timestamp, timestampDate, timestampFromDate, timestampFromMs } from "@bufbuild/protobuf/wkt";
import { type Client, Code, ConnectError, type Interceptor } from "@connectrpc/connect";
import { ulid } from "ulid";
import {
  AnalyticsService,
  file_analytics_v1_analytics,
  type LatencyPercentiles,
  ListRequestsResponseSchema,
  type ModelLatency,
  type RequestMetrics,
  RequestStatus,
  UsageGroupBy,
} from "../gen/analytics/v1/analytics_pb.ts";
import {
  type ApiKey,
  BillingService,
  DiscountKind,
  type DiscountRule,
  type DiscountRuleSchema,
  file_billing_v1_billing,
  type GetUsageSummaryResponse,
  GetUsageSummaryResponseSchema,
  type Invoice,
  InvoiceStatus,
  type KeyLimits,
  KeyLimitsSchema,
  type Organization,
  OrganizationState,
} from "../gen/billing/v1/billing_pb.ts";
import { Endpoint } from "../gen/common/v1/common_pb.ts";
import { billingPeriod } from "../lib/billing-period.ts";
import { commonEnv, env, parseEnv, withoutCredentials } from "../lib/config.ts";
import { formatCents, formatNanosUsd, parseUsdNanos } from "../lib/money.ts";
import { allPages, createServiceClient } from "../lib/rpc-client.ts";

export interface CliIo {
  env: Record<string, string | undefined>;
  out: (text: string) => void;
  err: (text: string) => void;
}

/** Wrong command line: exit code 2. */
class UsageError extends Error {}
/** A service answered with an error outside Connect (the HTML invoice page): exit code 1. */
class ServiceError extends Error {}

const usage = `usage: meshctl <command> [flags] [--json]

  orgs create NAME [--tax-bps N] [--billing-day N] [--budget-usd X] [--max-discount-percent P]
  orgs list | orgs show ORG_ID
  orgs update ORG_ID [--name S] [--tax-bps N] [--budget-usd X] [--max-discount-percent P]
  orgs suspend ORG_ID [--reason S] | orgs reinstate ORG_ID
      (a suspended org's keys are refused, 403 organization_suspended, until it is reinstated; nothing is deleted)
  projects create --org ID NAME | projects list --org ID
  keys create --org ID [--project ID] [--name S] [--budget-usd X] [--monthly-tokens N] [--rpm N] [--tpm N]
              [--concurrency N] [--models a,b] [--expires DATE]
  keys list --org ID [--all] | keys revoke KEY_ID | keys rotate KEY_ID
  quota set KEY_ID [--budget-usd X] [--monthly-tokens N] [--rpm N] [--tpm N] [--concurrency N] [--models a,b]
            [--expires DATE]
      (--rpm, --tpm and --concurrency, the requests a key may have in flight at once, hold per gateway replica)
      (changes only the limits given, the others stay; 0, or --models '' and --expires '', removes a limit)
  quota show KEY_ID [--org ID]
      (usage this period, the keys it was rotated from included: what its limits count)
  usage --org ID [--from DATE] [--to DATE] [--source billing|analytics] [--by model,key,...]
      (from --from up to, not including, --to: an invoice's 2026-10-01 to 2026-10-31 is --from 2026-10-01
      --to 2026-11-01; either left out comes from the org's billing period, the current one without --to;
      --by groups analytics' rows by up to 3 of model, key, project, provider, status, day, hour)
  latency --org ID [--from DATE] [--to DATE]
      (per model: total, upstream, time to first token and gateway overhead, p50 / p90 / p99 in ms, from analytics;
      the range as usage --source analytics)
  requests --org ID [--from DATE] [--to DATE] [--model M] [--key KEY_ID] [--status S] [--id REQUEST_ID] [--limit N]
      (each request, newest first, from analytics: its id (the x-request-id header), key, model, outcome, tokens,
      cost and time; --status ok, rate_limited, unauthorized, ...; --limit, 100 by default, up to 100000;
      the range as usage --source analytics, any with --id alone)
  discounts add --org ID --name S --kind volume-graduated|volume-all-units|time-window|promotional
                [--percent P] [--tiers FROM_USD:PERCENT,...] [--hours 0-6] [--days 0,6] [--model M] [--provider P]
                [--priority N] [--exclusive] [--from DATE] [--until DATE] [--cap-usd X]   (a negative N: --priority=-5)
      (--hours START-END in UTC, END excluded: 22-6 wraps past midnight, 0-24 is all day; --days (0 = Sunday .. 6)
      are the days a window starts on, so --hours 22-6 --days 5 is Friday 22:00 to Saturday 06:00; a rule applies
      from --from up to, not including, --until: all of December is --from 2026-12-01 --until 2027-01-01)
  discounts list --org ID | discounts remove RULE_ID
  invoices generate --org ID [--period YYYY-MM] | invoices list --org ID | invoices show ID
      (--period: the billing period that starts in that month; default: the current one)
  invoices issue|pay|void ID | invoices render ID --html [--out FILE]   (HTML only: invoices show --json for JSON)

environment: BILLING_URL (http://127.0.0.1:8081), ANALYTICS_URL (http://127.0.0.1:8082), ADMIN_TOKEN
dates: 2026-11-30 (midnight UTC) or 2026-11-30T14:00 (UTC unless an offset like +01:00 follows)
exit codes: 0 ok, 1 the service refused or failed, 2 bad command line or environment`;

const flags = {
  json: { type: "boolean" },
  org: { type: "string" },
  project: { type: "string" },
  name: { type: "string" },
  "budget-usd": { type: "string" },
  "monthly-tokens": { type: "string" },
  rpm: { type: "string" },
  tpm: { type: "string" },
  concurrency: { type: "string" },
  models: { type: "string" },
  expires: { type: "string" },
  all: { type: "boolean" },
  from: { type: "string" },
  to: { type: "string" },
  until: { type: "string" },
  source: { type: "string" },
  by: { type: "string" },
  kind: { type: "string" },
  percent: { type: "string" },
  tiers: { type: "string" },
  hours: { type: "string" },
  days: { type: "string" },
  model: { type: "string" },
  provider: { type: "string" },
  priority: { type: "string" },
  exclusive: { type: "boolean" },
  "cap-usd": { type: "string" },
  key: { type: "string" },
  status: { type: "string" },
  id: { type: "string" },
  limit: { type: "string" },
  "tax-bps": { type: "string" },
  "billing-day": { type: "string" },
  "max-discount-percent": { type: "string" },
  period: { type: "string" },
  reason: { type: "string" },
  html: { type: "boolean" },
  out: { type: "string" },
  help: { type: "boolean", short: "h" },
} as const;

type FlagName = keyof typeof flags;

/** What each command takes besides --json and --help: its flags, and how many arguments follow its name. */
const commands: Record<string, { flags: readonly FlagName[]; args: number }> = {
  "orgs create": { flags: ["tax-bps", "billing-day", "budget-usd", "max-discount-percent"], args: 1 },
  "orgs update": { flags: ["name", "tax-bps", "budget-usd", "max-discount-percent"], args: 1 },
  "orgs suspend": { flags: ["reason"], args: 1 },
  "orgs reinstate": { flags: [], args: 1 },
  "orgs show": { flags: [], args: 1 },
  "orgs list": { flags: [], args: 0 },
  "projects create": { flags: ["org"], args: 1 },
  "projects list": { flags: ["org"], args: 0 },
  "keys create": {
    flags: ["org", "project", "name", "budget-usd", "monthly-tokens", "rpm", "tpm", "concurrency", "models", "expires"],
    args: 0,
  },
  "keys list": { flags: ["org", "all"], args: 0 },
  "keys revoke": { flags: [], args: 1 },
  "keys rotate": { flags: [], args: 1 },
  "quota set": { flags: ["budget-usd", "monthly-tokens", "rpm", "tpm", "concurrency", "models", "expires"], args: 1 },
  "quota show": { flags: ["org"], args: 1 },
  usage: { flags: ["org", "from", "to", "source", "by"], args: 0 },
  latency: { flags: ["org", "from", "to"], args: 0 },
  requests: { flags: ["org", "from", "to", "model", "key", "status", "id", "limit"], args: 0 },
  "discounts add": {
    flags: [
      ...["org", "name", "kind", "percent", "tiers", "hours", "days", "model", "provider"],
      ...["priority", "exclusive", "from", "until", "cap-usd"],
    ] as FlagName[],
    args: 0,
  },
  "discounts list": { flags: ["org"], args: 0 },
  "discounts remove": { flags: [], args: 1 },
  "invoices generate": { flags: ["org", "period"], args: 0 },
  "invoices list": { flags: ["org"], args: 0 },
  "invoices show": { flags: [], args: 1 },
  "invoices issue": { flags: [], args: 1 },
  "invoices pay": { flags: [], args: 1 },
  "invoices void": { flags: [], args: 1 },
  "invoices render": { flags: ["html", "out"], args: 1 },
};

/** Refuses flags a command does not take and arguments past its own, which it would otherwise ignore silently. */
function checkCommandLine(command: string, values: Record<string, unknown>, args: readonly string[]): void {
  const spec = commands[command];
  if (!spec) return;
  for (const flag of Object.keys(values)) {
    if (flag !== "json" && flag !== "help" && !spec.flags.includes(flag as FlagName)) {
      throw new UsageError(`${command} does not take --${flag}; see meshctl --help`);
    }
  }
  if (args.length > spec.args) throw new UsageError(`${command}: unexpected argument "${args[spec.args]}"`);
}

/**
 * A flag taking a value followed by a negative number: parseArgs refuses it as ambiguous (it might be a flag), which
 * says nothing of what is wrong. Only --priority may be negative, written --priority=-5.
 */
function refuseNegativeValues(argv: readonly string[]): void {
  for (let i = 0; i + 1 < argv.length && argv[i] !== "--"; i++) {
    const name = argv[i]?.startsWith("--") ? argv[i]?.slice(2) : undefined;
    const value = argv[i + 1] as string;
    if (!name || !Object.hasOwn(flags, name) || flags[name as FlagName].type !== "string") continue;
    if (!/^-[\d.]/.test(value)) continue;
    throw new UsageError(
      name === "priority"
        ? `a negative --priority is written --priority=${value}`
        : `--${name} must not be negative, not "${value}"`,
    );
  }
}

export async function runCli(argv: string[], io: CliIo): Promise<number> {
  try {
    refuseNegativeValues(argv);
    const { values, positionals } = parseArgs({ args: argv, options: flags, allowPositionals: true, strict: true });
    const [group, action, ...rest] = positionals;
    if (values.help || !group) {
      (values.help ? io.out : io.err)(`${usage}\n`);
      return values.help ? 0 : 2;
    }
    const cfg = parseEnv(
      {
        ADMIN_TOKEN: commonEnv.ADMIN_TOKEN,
        BILLING_URL: env.httpUrl.default("http://127.0.0.1:8081"),
        ANALYTICS_URL: env.httpUrl.default("http://127.0.0.1:8082"),
      },
      io.env,
    );
    const billing = createServiceClient(BillingService, {
      baseUrl: cfg.BILLING_URL,
      bearerToken: cfg.ADMIN_TOKEN,
      timeoutMs: 30_000,
      interceptors: [nameService("billing", withoutCredentials(cfg.BILLING_URL))],
    });
    const analytics = createServiceClient(AnalyticsService, {
      baseUrl: cfg.ANALYTICS_URL,
      bearerToken: cfg.ADMIN_TOKEN,
      timeoutMs: 30_000,
      interceptors: [nameService("analytics", withoutCredentials(cfg.ANALYTICS_URL))],
    });
    const print = (schema: DescMessage, message: MessageShape<DescMessage>, table: () => string) =>
      io.out(values.json ? `${JSON.stringify(asJson(schema, message), null, 2)}\n` : `${table()}\n`);
    const need = (value: string | undefined, what: string) => {
      if (!value) throw new UsageError(`missing ${what}`);
      return value;
    };
    const arg = (what: string) => need(rest[0], what);

    // usage, latency and requests are commands of one word; the others name a group and an action.
    const oneWord = group === "usage" || group === "latency" || group === "requests";
    const command = `${group} ${oneWord ? "" : (action ?? "")}`.trim();
    checkCommandLine(command, values, oneWord ? positionals.slice(1) : rest);
    switch (command) {
      case "orgs create": {
        const ask = {
          name: need(rest[0], "NAME"),
          taxRateBps: int(values["tax-bps"], "--tax-bps"),
          billingDay: int(values["billing-day"], "--billing-day"),
          monthlyBudgetNanos: usdNanos(values["budget-usd"], "--budget-usd"),
          maxDiscountBps:
            values["max-discount-percent"] === undefined
              ? 0
              : percentBps(values["max-discount-percent"], "--max-discount-percent"),
        };
        const res = await createOnce((requestId) => billing.createOrganization({ ...ask, requestId }));
        print(schemaOf(res), res, () => orgsTable(res.organization ? [res.organization] : []));
        return 0;
      }
      case "orgs update": {
        const orgId = arg("ORG_ID");
        // Every flag it takes is a setting to change.
        const settings = commands[command]?.flags ?? [];
        if (!settings.some((flag) => values[flag] !== undefined)) {
          throw new UsageError(`orgs update needs at least one of ${settings.map((f) => `--${f}`).join(", ")}`);
        }
        const percent = values["max-discount-percent"];
        const res = await billing.updateOrganization({
          orgId,
          name: values.name,
          taxRateBps: values["tax-bps"] === undefined ? undefined : int(values["tax-bps"], "--tax-bps"),
          monthlyBudgetNanos: values["budget-usd"] === undefined ? undefined : usdNanos(values["budget-usd"], "--budget-usd"),
          maxDiscountBps: percent === undefined ? undefined : percentBps(percent, "--max-discount-percent"),
        });
        print(schemaOf(res), res, () => orgsTable(res.organization ? [res.organization] : []));
        return 0;
      }
      case "orgs suspend": {
        const res = await billing.suspendOrganization({ orgId: arg("ORG_ID"), reason: values.reason ?? "" });
        print(schemaOf(res), res, () => orgsTable(res.organization ? [res.organization] : []));
        return 0;
      }
      case "orgs reinstate": {
        const res = await billing.reinstateOrganization({ orgId: arg("ORG_ID") });
        print(schemaOf(res), res, () => orgsTable(res.organization ? [res.organization] : []));
        return 0;
      }
      case "orgs show": {
        const res = await billing.getOrganization({ orgId: arg("ORG_ID") });
        print(schemaOf(res), res, () => orgsTable(res.organization ? [res.organization] : []));
        return 0;
      }
      case "orgs list": {
        const res = await allPages((page) => billing.listOrganizations(page), (r) => r.organizations);
        print(schemaOf(res), res, () => orgsTable(res.organizations));
        return 0;
      }
      case "projects create": {
        const ask = { orgId: need(values.org, "--org"), name: need(rest[0], "NAME") };
        const res = await createOnce((requestId) => billing.createProject({ ...ask, requestId }));
        print(schemaOf(res), res, () => table([["ID", "NAME"], [res.project?.id ?? "", res.project?.name ?? ""]]));
        return 0;
      }
      case "projects list": {
        const orgId = need(values.org, "--org");
        const res = await allPages((page) => billing.listProjects({ orgId, ...page }), (r) => r.projects);
        print(schemaOf(res), res, () =>
          table([["ID", "NAME", "CREATED"], ...res.projects.map((p) => [p.id, p.name, date(p.createTime)])]),
        );
        return 0;
      }
      case "keys create": {
        const ask = {
          orgId: need(values.org, "--org"),
          projectId: values.project ?? "",
          name: values.name ?? "",
          limits: limitsFrom(values),
        };
        const res = await createOnce((requestId) => billing.createApiKey({ ...ask, requestId }));
        if (!res.secret) {
          const keyId = res.apiKey?.id ?? "";
          throw new ServiceError(
            `api key ${keyId} was created, but the answer carrying its secret was lost and it is never shown again: ` +
              `"meshctl keys rotate ${keyId}" gives it a new one`,
          );
        }
        print(schemaOf(res), res, () =>
          [
            table([["ID", "PREFIX", "LIMITS"], [res.apiKey?.id ?? "", res.apiKey?.prefix ?? "", limitsText(res.apiKey?.limits)]]),
            "",
            `secret (shown once, store it now): ${res.secret}`,
          ].join("\n"),
        );
        return 0;
      }
      case "keys list": {
        const ask = { orgId: need(values.org, "--org"), includeRevoked: values.all ?? false };
        const res = await allPages((page) => billing.listApiKeys({ ...ask, ...page }), (r) => r.apiKeys);
        print(schemaOf(res), res, () =>
          table([
            ["ID", "PREFIX", "NAME", "PROJECT", "LIMITS", "STATUS"],
            ...res.apiKeys.map((k) => [
              k.id,
              k.prefix,
              k.name,
              k.projectId || "-",
              limitsText(k.limits),
              keyStatus(k),
            ]),
          ]),
        );
        return 0;
      }
      case "keys revoke": {
        const res = await billing.revokeApiKey({ apiKeyId: arg("KEY_ID") });
        print(schemaOf(res), res, () => `revoked ${res.apiKey?.id}`);
        return 0;
      }
      case "keys rotate": {
        const res = await billing.rotateApiKey({ apiKeyId: arg("KEY_ID") });
        print(schemaOf(res), res, () =>
          `new key ${res.apiKey?.id} (${res.apiKey?.prefix}); the old key is revoked\nsecret (shown once, store it now): ${res.secret}`,
        );
        return 0;
      }
      case "quota set": {
        const keyId = arg("KEY_ID");
        if (!limitFlags.some((flag) => values[flag] !== undefined)) {
          throw new UsageError(`quota set needs at least one of ${limitFlags.map((f) => `--${f}`).join(", ")}`);
        }
        // Only the limits given are named in the mask: billing changes those in one statement and keeps the others.
        const res = await billing.updateApiKeyLimits({
          apiKeyId: keyId,
          limits: limitsFrom(values),
          updateMask: { paths: limitFlags.filter((flag) => values[flag] !== undefined).map((flag) => limitPaths[flag]) },
        });
        print(schemaOf(res), res, () => `${res.apiKey?.id}: ${limitsText(res.apiKey?.limits)}`);
        return 0;
      }
      case "quota show": {
        const key = await findKey(billing, arg("KEY_ID"), values.org);
        // Limits count the usage of the keys this one was rotated from too; each record stays with its own key.
        const rotatedFrom: string[] = [];
        for (let k = key; k.rotatedFromApiKeyId;) {
          k = await findKey(billing, k.rotatedFromApiKeyId, key.orgId);
          rotatedFrom.push(k.id);
        }
        const summaries = await Promise.all(
          [key.id, ...rotatedFrom].map((apiKeyId) => billing.getUsageSummary({ orgId: key.orgId, apiKeyId })),
        );
        const sum = (pick: (s: GetUsageSummaryResponse) => bigint | undefined) =>
          summaries.reduce((total, s) => total + (pick(s) ?? 0n), 0n);
        const spent = create(GetUsageSummaryResponseSchema, {
          requests: sum((s) => s.requests),
          usage: {
            inputTokens: sum((s) => s.usage?.inputTokens),
            cachedInputTokens: sum((s) => s.usage?.cachedInputTokens),
            outputTokens: sum((s) => s.usage?.outputTokens),
            reasoningTokens: sum((s) => s.usage?.reasoningTokens),
          },
          costNanos: sum((s) => s.costNanos),
        });
        io.out(
          values.json
            ? `${JSON.stringify({ limits: asJson(KeyLimitsSchema, key.limits ?? create(KeyLimitsSchema)), usage: asJson(schemaOf(spent), spent), rotatedFrom }, null, 2)}\n`
            : `${table([
                ["KEY", "LIMITS", "REQUESTS", "TOKENS", "SPENT (USD)"],
                [
                  key.id,
                  limitsText(key.limits),
                  String(spent.requests),
                  String((spent.usage?.inputTokens ?? 0n) + (spent.usage?.outputTokens ?? 0n)),
                  formatNanosUsd(spent.costNanos),
                ],
              ])}\n${rotatedFrom.length ? `including the keys it was rotated from: ${rotatedFrom.join(", ")}\n` : ""}`,
        );
        return 0;
      }
      case "usage": {
        const orgId = need(values.org, "--org");
        const from = values.from ? parseDate(values.from, "--from") : undefined;
        const to = values.to ? parseDate(values.to, "--to") : undefined;
        const groupBy = values.by === undefined ? [] : usageGroupBy(values.by);
        const source = values.source ?? (groupBy.length ? "analytics" : "billing");
        if (source === "billing" && groupBy.length) {
          throw new UsageError("--by groups analytics' rows; billing's summary is one total (leave out --source)");
        }
        if (source === "billing") {
          const res = await billing.getUsageSummary({ orgId, startTime: from, endTime: to });
          print(schemaOf(res), res, () =>
            usageTable([
              {
                requests: res.requests,
                input: res.usage?.inputTokens ?? 0n,
                cached: res.usage?.cachedInputTokens ?? 0n,
                output: res.usage?.outputTokens ?? 0n,
                reasoning: res.usage?.reasoningTokens ?? 0n,
                cost: res.costNanos,
              },
            ]),
          );
        } else if (source === "analytics") {
          const range = await analyticsRange(billing, orgId, from, to);
          const res = await analytics.queryUsage({ orgId, range, groupBy });
          print(schemaOf(res), res, () =>
            usageTable(
              res.rows.map((r) => ({
                group: r.group,
                requests: r.requests,
                input: r.usage?.inputTokens ?? 0n,
                cached: r.usage?.cachedInputTokens ?? 0n,
                output: r.usage?.outputTokens ?? 0n,
                reasoning: r.usage?.reasoningTokens ?? 0n,
                cost: r.costNanos,
              })),
              groupBy,
            ),
          );
        } else {
          throw new UsageError(`--source must be billing or analytics, not "${source}"`);
        }
        return 0;
      }
      case "latency": {
        const orgId = need(values.org, "--org");
        const from = values.from ? parseDate(values.from, "--from") : undefined;
        const to = values.to ? parseDate(values.to, "--to") : undefined;
        const res = await analytics.queryLatency({ orgId, range: await analyticsRange(billing, orgId, from, to) });
        print(schemaOf(res), res, () => latencyTable(res.models));
        return 0;
      }
      case "requests": {
        const orgId = need(values.org, "--org");
        const from = values.from ? parseDate(values.from, "--from") : undefined;
        const to = values.to ? parseDate(values.to, "--to") : undefined;
        const limit = values.limit === undefined ? 100 : int(values.limit, "--limit", 100_000, 1);
        const filters = {
          orgId,
          model: values.model ?? "",
          apiKeyId: values.key ?? "",
          status: values.status === undefined ? RequestStatus.UNSPECIFIED : requestStatus(values.status),
          requestId: values.id ?? "",
          // One request by its id is found in any range.
          range: values.id && !from && !to ? undefined : await analyticsRange(billing, orgId, from, to),
        };
        const res = create(ListRequestsResponseSchema);
        do {
          const page = await analytics.listRequests({
            ...filters,
            pageSize: Math.min(limit - res.requests.length, 1000),
            pageToken: res.nextPageToken,
          });
          res.requests.push(...page.requests);
          res.nextPageToken = page.nextPageToken;
        } while (res.nextPageToken && res.requests.length < limit);
        print(schemaOf(res), res, () =>
          [
            requestsTable(res.requests),
            ...(res.nextPageToken ? [`(the newest ${res.requests.length}; more with a larger --limit)`] : []),
          ].join("\n"),
        );
        return 0;
      }
      case "discounts add": {
        const rule = ruleFrom(values);
        const res = await createOnce((requestId) => billing.createDiscountRule({ rule, requestId }));
        print(schemaOf(res), res, () => `created discount rule ${res.rule?.id}`);
        return 0;
      }
      case "discounts list": {
        const orgId = need(values.org, "--org");
        const res = await allPages((page) => billing.listDiscountRules({ orgId, ...page }), (r) => r.rules);
        print(schemaOf(res), res, () =>
          table([
            ["ID", "NAME", "KIND", "DISCOUNT", "PRIORITY", "STACKS", "SCOPE", "WHEN", "CAP"],
            ...res.rules.map((r) => [
              r.id,
              r.name,
              (DiscountKind[r.kind] ?? "unknown").toLowerCase().replaceAll("_", "-"),
              r.tiers.length
                ? r.tiers.map((t) => `$${formatNanosUsd(t.fromNanos)}+: ${t.discountBps / 100}%`).join(", ")
                : `${r.discountBps / 100}%`,
              String(r.priority),
              r.stackable ? "yes" : "no",
              [r.model, r.provider].filter(Boolean).join("/") || "all",
              ruleWhen(r),
              r.capNanos ? `$${formatNanosUsd(r.capNanos)}` : "-",
            ]),
          ]),
        );
        return 0;
      }
      case "discounts remove": {
        const res = await billing.deleteDiscountRule({ ruleId: arg("RULE_ID") });
        print(schemaOf(res), res, () => `removed ${rest[0]}`);
        return 0;
      }
      case "invoices generate": {
        // Day 28 is on or after every billing day (1..28), so it falls in the period that starts in that month.
        if (values.period && !/^\d{4}-(0[1-9]|1[0-2])$/.test(values.period)) {
          throw new UsageError(`--period must be YYYY-MM, not "${values.period}"`);
        }
        // Without --period, billing's own clock names the current period.
        const periodTime = values.period ? parseDate(`${values.period}-28`, "--period") : undefined;
        const res = await billing.generateInvoice({ orgId: need(values.org, "--org"), periodTime });
        print(schemaOf(res), res, () => invoiceText(res.invoice));
        return 0;
      }
      case "invoices list": {
        const orgId = need(values.org, "--org");
        const res = await allPages((page) => billing.listInvoices({ orgId, ...page }), (r) => r.invoices);
        print(schemaOf(res), res, () =>
          table([
            ["ID", "NUMBER", "PERIOD", "STATUS", "TOTAL"],
            ...res.invoices.map((i) => [
              i.id,
              i.number || "-",
              date(i.periodStart),
              statusText(i.status),
              formatCents(i.totalCents),
            ]),
          ]),
        );
        return 0;
      }
      case "invoices show": {
        const res = await billing.getInvoice({ invoiceId: arg("INVOICE_ID") });
        print(schemaOf(res), res, () => invoiceText(res.invoice));
        return 0;
      }
      case "invoices issue":
      case "invoices pay":
      case "invoices void": {
        const status = { issue: InvoiceStatus.ISSUED, pay: InvoiceStatus.PAID, void: InvoiceStatus.VOID }[
          action as "issue" | "pay" | "void"
        ];
        const res = await billing.updateInvoiceStatus({ invoiceId: arg("INVOICE_ID"), status });
        print(schemaOf(res), res, () => `${res.invoice?.number || res.invoice?.id}: ${statusText(res.invoice?.status)}`);
        return 0;
      }
      case "invoices render": {
        if (!values.html) throw new UsageError("invoices render needs --html");
        if (values.json) {
          throw new UsageError("invoices render prints HTML, not JSON: leave out --json (invoices show --json has it)");
        }
        const id = arg("INVOICE_ID");
        const res = await fetch(`${cfg.BILLING_URL}/invoices/${encodeURIComponent(id)}`, {
          headers: { authorization: `Bearer ${cfg.ADMIN_TOKEN}` },
          signal: AbortSignal.timeout(30_000),
        }).catch((e: Error) => {
          // fetch's own message names neither the service nor its address.
          throw new ServiceError(`[unavailable] billing at ${withoutCredentials(cfg.BILLING_URL)}: ${e.message}`);
        });
        if (!res.ok) {
          const reason = (await res.text()).split("\n")[0] || res.statusText;
          throw new ServiceError(`billing answered ${res.status} for invoice ${id}: ${reason}`);
        }
        const html = await res.text();
        if (values.out) {
          // `npm run` starts this in the package's folder: a relative path is the caller's, where npm was run.
          const path = resolve(io.env.INIT_CWD ?? process.cwd(), values.out);
          await writeFile(path, html);
          io.out(`wrote ${path}\n`);
        } else io.out(html);
        return 0;
      }
      default:
        throw new UsageError(`unknown command "${positionals.join(" ")}"; see meshctl --help`);
    }
  } catch (e) {
    io.err(`meshctl: ${errorLine(e)}\n`);
    return isUsageError(e) ? 2 : 1;
  }
}

/** A key by id, revoked or not, in one lookup however many orgs there are; unknown when `orgId` is not its org. */
async function findKey(
  billing: Client<typeof BillingService>,
  keyId: string,
  orgId: string | undefined,
): Promise<ApiKey> {
  const key = await billing.getApiKey({ apiKeyId: keyId }).then(
    (res) => res.apiKey,
    (e: unknown) => {
      if (ConnectError.from(e).code === Code.NotFound) return undefined;
      throw e;
    },
  );
  if (!key || (orgId && key.orgId !== orgId)) {
    throw new ServiceError(`no key ${keyId}${orgId ? ` in org ${orgId}` : ""}`);
  }
  return key;
}

/**
 * An analytics query's range: --from and --to, either left out coming from the org's billing period, as billing's.
 * Only that period asks billing, for the one org (GetOrganization, which an org's own API key may ask of its org).
 */
async function analyticsRange(
  billing: Client<typeof BillingService>,
  orgId: string,
  from: Timestamp | undefined,
  to: Timestamp | undefined,
): Promise<{ start: Timestamp; end: Timestamp }> {
  if (from && to) return { start: from, end: to };
  const { organization: org } = await billing.getOrganization({ orgId });
  if (!org) throw new ServiceError(`billing answered no organization ${orgId}`);
  const period = billingPeriod(new Date(to ? timestampMs(to) - 1 : Date.now()), org.billingDay);
  return { start: from ?? timestampFromDate(period.start), end: to ?? timestampFromDate(period.end) };
}

/**
 * A failure that is not the service's answer (nothing listening, another server at the address, out of time) names
 * the service and its address, as the invoice page's does: "[unimplemented] HTTP 404" alone said neither. The address
 * comes with its `user:password@` masked.
 */
function nameService(name: string, url: string): Interceptor {
  return (next) => async (req) => {
    try {
      return await next(req);
    } catch (e) {
      const err = ConnectError.from(e);
      if (err.isWireError) throw err;
      throw new ConnectError(`${name} at ${url}: ${err.rawMessage}`, err.code, err.metadata, undefined, err.cause);
    }
  };
}

/**
 * A create sent with a fresh request_id and, when its answer was lost (billing unreachable or too slow), sent once more
 * with the same one: billing answers the second with what the first created, if it did, rather than creating twice.
 */
async function createOnce<T>(send: (requestId: string) => Promise<T>): Promise<T> {
  const requestId = ulid();
  try {
    return await send(requestId);
  } catch (e) {
    const code = e instanceof ConnectError ? e.code : undefined;
    if (code !== Code.Unavailable && code !== Code.DeadlineExceeded) throw e;
    return send(requestId);
  }
}

/** Errors of the command line or environment, as opposed to errors of the services. */
function isUsageError(e: unknown): boolean {
  if (e instanceof UsageError) return true;
  if (!(e instanceof Error)) return false;
  const code = (e as { code?: unknown }).code;
  return e.name === "ConfigError" || (typeof code === "string" && code.startsWith("ERR_PARSE_ARGS"));
}

/** One line: Connect errors already read "[code] message". */
function errorLine(e: unknown): string {
  const text = e instanceof ConnectError || e instanceof Error ? e.message : String(e);
  return text.split("\n")[0] ?? text;
}

const registry = createRegistry(file_billing_v1_billing, file_analytics_v1_analytics);

/**
 * A message as --json prints it: every field, zeros, empty lists and the first value of an enum included, so that a
 * script reads the same shape whatever the values (protobuf's JSON leaves those out: no `apiKeys` for an org without
 * keys, no `totalCents` on a $0.00 invoice). Unset messages and times (a key's `revokeTime`) stay out.
 */
function asJson(schema: DescMessage, message: MessageShape<DescMessage>) {
  return toJson(schema, message, { alwaysEmitImplicit: true });
}

function schemaOf(message: { $typeName: string }): DescMessage {
  const schema = registry.getMessage(message.$typeName);
  if (!schema) throw new Error(`no schema for ${message.$typeName}`);
  return schema;
}

/** An integer flag within [min, max] (an int32's non-negative range by default). */
function int(text: string | undefined, flag: string, max = 2 ** 31 - 1, min = 0): number {
  if (text === undefined) return 0;
  const value = /^-?\d{1,16}$/.test(text) ? Number(text) : Number.NaN;
  if (!(value >= min && value <= max)) {
    const range = min === 0 ? `a non-negative integer up to ${max}` : `an integer from ${min} to ${max}`;
    throw new UsageError(`${flag} must be ${range}, not "${text}"`);
  }
  return value;
}

/** Most nano-USD an int64 holds: about $9.2 billion. */
const maxNanos = 2n ** 63n - 1n;

function usdNanos(text: string | undefined, flag: string): bigint {
  if (text === undefined) return 0n;
  if (text.trim().startsWith("-")) throw new UsageError(`${flag} must not be negative, not "${text}"`);
  let nanos: bigint;
  try {
    nanos = parseUsdNanos(text);
  } catch {
    throw new UsageError(`${flag} must be a USD amount like 12.50, with at most 9 decimals, not "${text}"`);
  }
  if (nanos > maxNanos) throw new UsageError(`${flag} must be at most $9,223,372,036.854775807, not "${text}"`);
  return nanos;
}

/**
 * A date (midnight UTC) or a date and time, in UTC unless it names its offset: `2026-11-30`, `2026-11-30T14:00`,
 * `2026-11-30T14:00:00+01:00`. Anything else, and days a month does not have, are refused: never the operator's
 * local time zone, never a date rolled over into the next month.
 */
function parseDate(text: string, flag: string): Timestamp {
  const match = /^(\d{4})-(\d{2})-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.\d{1,9})?)?(Z|[+-]\d{2}:\d{2})?)?$/.exec(text);
  const [year, month, day] = match ? [Number(match[1]), Number(match[2]), Number(match[3])] : [0, 0, 0];
  const calendar = new Date(new Date(0).setUTCFullYear(year, month - 1, day));
  const valid = match && calendar.getUTCMonth() === month - 1 && calendar.getUTCDate() === day;
  const ms = valid ? Date.parse(match[4] === undefined ? `${text.slice(0, 10)}T00:00:00Z` : match[7] ? text : `${text}Z`) : Number.NaN;
  if (Number.isNaN(ms)) {
    throw new UsageError(`${flag} must be a date like 2026-11-30 or a UTC time like 2026-11-30T14:00, not "${text}"`);
  }
  return timestampFromMs(ms);
}

function percentBps(text: string, flag: string): number {
  if (!/^\d{1,3}(\.\d{1,2})?$/.test(text) || Number(text) > 100) {
    throw new UsageError(`${flag} must be a percentage 0..100 with at most 2 decimals, not "${text}"`);
  }
  return Math.round(Number(text) * 100);
}

type Flags = { [K in keyof typeof flags]?: (typeof flags)[K]["type"] extends "boolean" ? boolean : string };

const limitFlags = ["budget-usd", "monthly-tokens", "rpm", "tpm", "concurrency", "models", "expires"] as const;
/** The KeyLimits field each limit flag sets, as an update mask names it. */
const limitPaths: Record<(typeof limitFlags)[number], string> = {
  "budget-usd": "monthly_budget_nanos",
  "monthly-tokens": "monthly_tokens",
  rpm: "requests_per_minute",
  tpm: "tokens_per_minute",
  concurrency: "max_concurrent_requests",
  models: "allowed_models",
  expires: "expire_time",
};

/** Key limits from the flags given, an absent flag leaving its limit unset; 0, or an empty --models or --expires, is no limit. */
function limitsFrom(values: Flags): MessageInitShape<typeof KeyLimitsSchema> {
  const { expires, models } = values;
  return {
    monthlyBudgetNanos: values["budget-usd"] === undefined ? 0n : usdNanos(values["budget-usd"], "--budget-usd"),
    monthlyTokens:
      values["monthly-tokens"] === undefined
        ? 0n
        : BigInt(int(values["monthly-tokens"], "--monthly-tokens", Number.MAX_SAFE_INTEGER)),
    requestsPerMinute: values.rpm === undefined ? 0 : int(values.rpm, "--rpm"),
    tokensPerMinute: values.tpm === undefined ? 0n : BigInt(int(values.tpm, "--tpm", Number.MAX_SAFE_INTEGER)),
    maxConcurrentRequests: values.concurrency === undefined ? 0 : int(values.concurrency, "--concurrency"),
    allowedModels: (models ?? "")
      .split(",")
      .map((m) => m.trim())
      .filter(Boolean),
    expireTime: expires ? parseDate(expires, "--expires") : undefined,
  };
}

function ruleFrom(values: Flags): MessageInitShape<typeof DiscountRuleSchema> {
  const kinds: Record<string, DiscountKind> = {
    "volume-graduated": DiscountKind.VOLUME_GRADUATED,
    "volume-all-units": DiscountKind.VOLUME_ALL_UNITS,
    "time-window": DiscountKind.TIME_WINDOW,
    promotional: DiscountKind.PROMOTIONAL,
  };
  const kind = kinds[values.kind ?? ""];
  if (!kind) throw new UsageError(`--kind must be one of ${Object.keys(kinds).join(", ")}`);
  if (values.hours !== undefined && !/^\d{1,2}-\d{1,2}$/.test(values.hours)) {
    throw new UsageError(`--hours must be START-END in UTC hours, like 9-17 or 22-6, not "${values.hours}"`);
  }
  const [startHour, endHour] = (values.hours ?? "0-24").split("-").map((h) => int(h, "--hours"));
  return {
    orgId: values.org ?? "",
    name: values.name ?? "",
    kind,
    priority: int(values.priority, "--priority", 1_000_000, -1_000_000),
    stackable: !values.exclusive,
    model: values.model ?? "",
    provider: values.provider ?? "",
    discountBps: values.percent ? percentBps(values.percent, "--percent") : 0,
    tiers: (values.tiers ?? "")
      .split(",")
      .filter(Boolean)
      .map((tier) => {
        const [from, percent, ...extra] = tier.split(":");
        if (from === undefined || percent === undefined || extra.length) {
          throw new UsageError(`--tiers must be FROM_USD:PERCENT,..., not "${values.tiers}"`);
        }
        return { fromNanos: usdNanos(from, "--tiers"), discountBps: percentBps(percent, "--tiers") };
      }),
    startHour: startHour ?? 0,
    endHour: endHour ?? 24,
    daysOfWeek: values.days ? values.days.split(",").map((d) => int(d, "--days")) : [],
    validFrom: values.from ? parseDate(values.from, "--from") : undefined,
    validUntil: values.until ? parseDate(values.until, "--until") : undefined,
    capNanos: usdNanos(values["cap-usd"], "--cap-usd"),
  };
}

function limitsText(limits: KeyLimits | undefined): string {
  if (!limits) return "none";
  const parts = [
    limits.monthlyBudgetNanos ? `budget $${formatNanosUsd(limits.monthlyBudgetNanos)}/mo` : "",
    limits.monthlyTokens ? `${limits.monthlyTokens} tok/mo` : "",
    limits.requestsPerMinute ? `${limits.requestsPerMinute} rpm` : "",
    limits.tokensPerMinute ? `${limits.tokensPerMinute} tpm` : "",
    limits.maxConcurrentRequests ? `${limits.maxConcurrentRequests} concurrent` : "",
    limits.allowedModels.length ? `models ${limits.allowedModels.join(",")}` : "",
    limits.expireTime ? `expires ${date(limits.expireTime)}` : "",
  ].filter(Boolean);
  return parts.length ? parts.join(", ") : "none";
}

/** meshctl's names for analytics' usage dimensions, in the order --help lists them. */
const usageDimensions = {
  model: UsageGroupBy.MODEL,
  key: UsageGroupBy.API_KEY,
  project: UsageGroupBy.PROJECT,
  provider: UsageGroupBy.PROVIDER,
  status: UsageGroupBy.STATUS,
  day: UsageGroupBy.DAY,
  hour: UsageGroupBy.HOUR,
} as const;

/** Parses --by: up to 3 distinct dimension names, as QueryUsage takes. */
function usageGroupBy(list: string): UsageGroupBy[] {
  const names = list.split(",").map((name) => name.trim());
  const known = Object.keys(usageDimensions).join(", ");
  const groupBy = names.map((name) => {
    if (!Object.hasOwn(usageDimensions, name)) throw new UsageError(`--by takes ${known}; not "${name}"`);
    return usageDimensions[name as keyof typeof usageDimensions];
  });
  if (new Set(groupBy).size !== groupBy.length) throw new UsageError(`--by names a dimension twice: "${list}"`);
  if (groupBy.length > 3) throw new UsageError(`--by takes at most 3 dimensions, not ${groupBy.length}`);
  return groupBy;
}

interface UsageLine {
  /** Values of the --by dimensions, in their order. */
  group?: readonly string[];
  requests: bigint;
  input: bigint;
  cached: bigint;
  output: bigint;
  reasoning: bigint;
  cost: bigint;
}

function usageTable(lines: UsageLine[], groupBy: readonly UsageGroupBy[] = []): string {
  const dimensions = groupBy.map(
    (g) => Object.entries(usageDimensions).find(([, value]) => value === g)?.[0].toUpperCase() ?? "",
  );
  return table([
    [...dimensions, "REQUESTS", "INPUT", "CACHED INPUT", "OUTPUT", "REASONING", "COST_NANOS", "COST (USD)"],
    ...lines.map((l) => [
      // Requests with no model (GET /v1/models) or no key: an empty first cell read as a row shifted left.
      ...(l.group ?? []).map((value) => value || "-"),
      ...[l.requests, l.input, l.cached, l.output, l.reasoning, l.cost].map(String),
      formatNanosUsd(l.cost),
    ]),
  ]);
}

/** A --status as the --by status column shows it, in any case: rate_limited, RATE_LIMITED. */
function requestStatus(text: string): RequestStatus {
  const names = Object.keys(RequestStatus).filter((n) => Number.isNaN(Number(n)) && n !== "UNSPECIFIED");
  const name = names.find((n) => n === text.toUpperCase());
  if (!name) throw new UsageError(`--status takes ${names.map((n) => n.toLowerCase()).join(", ")}; not "${text}"`);
  return RequestStatus[name as keyof typeof RequestStatus];
}

function requestsTable(requests: RequestMetrics[]): string {
  return table([
    ["TIME", "REQUEST ID", "KEY", "MODEL", "ENDPOINT", "STATUS", "INPUT", "OUTPUT", "COST_NANOS", "MS"],
    ...requests.map((r) => [
      r.startTime ? timestampDate(r.startTime).toISOString().slice(0, 19).replace("T", " ") : "-",
      r.requestId,
      r.apiKeyId || "-",
      r.requestedModel || "-",
      (Endpoint[r.endpoint] ?? "unknown").toLowerCase(),
      `${r.httpStatus} ${RequestStatus[r.status] ?? "unknown"}${r.errorCode ? ` ${r.errorCode}` : ""}`,
      String(r.usage?.inputTokens ?? 0n),
      String(r.usage?.outputTokens ?? 0n),
      String(r.costNanos),
      (Number(r.totalLatencyUs) / 1000).toFixed(1),
    ]),
  ]);
}

function latencyTable(models: ModelLatency[]): string {
  const ms = (p: LatencyPercentiles | undefined) =>
    [p?.p50Us, p?.p90Us, p?.p99Us].map((us) => (Number(us ?? 0n) / 1000).toFixed(1)).join(" / ");
  return table([
    ["MODEL", "REQUESTS", "TOTAL MS", "UPSTREAM MS", "FIRST TOKEN MS", "GATEWAY MS"],
    ...models.map((m) => [
      m.model || "-",
      String(m.requests),
      ms(m.total),
      ms(m.upstream),
      ms(m.timeToFirstToken),
      ms(m.gatewayOverhead),
    ]),
  ]);
}

function invoiceText(invoice: Invoice | undefined): string {
  if (!invoice) return "no invoice";
  const lastDay = invoice.periodEnd ? timestampFromMs(timestampMs(invoice.periodEnd) - 86_400_000) : undefined;
  return [
    `${invoice.number || "Draft"} (${invoice.id}) ${statusText(invoice.status)}, ` +
      `${date(invoice.periodStart)} to ${date(lastDay)}`,
    `billed to ${shown(invoice.orgName)} (${invoice.orgId})`,
    table([
      ["DESCRIPTION", "QUANTITY", "AMOUNT (USD)"],
      ...invoice.lineItems.map((l) => [
        l.description,
        l.tokenType === "discount" ? "" : String(l.quantity),
        formatNanosUsd(l.amountNanos),
      ]),
    ]),
    [
      `subtotal ${formatCents(invoice.subtotalCents)}`,
      `discounts ${formatCents(-invoice.discountCents)}`,
      `tax (${invoice.taxRateBps / 100}%) ${formatCents(invoice.taxCents)}`,
      `total ${formatCents(invoice.totalCents)}`,
    ].join("  "),
    invoice.roundingRule,
  ]
    .filter(Boolean)
    .join("\n");
}

function orgsTable(orgs: Organization[]): string {
  return table([
    ["ID", "NAME", "TAX", "BILLING DAY", "BUDGET", "MAX DISCOUNT", "CREATED", "STATE"],
    ...orgs.map((o) => [
      o.id,
      o.name,
      `${o.taxRateBps / 100}%`,
      String(o.billingDay),
      o.monthlyBudgetNanos ? `$${formatNanosUsd(o.monthlyBudgetNanos)}` : "unlimited",
      // 0 is no cap (beyond the subtotal), not "no discounts".
      o.maxDiscountBps ? `${o.maxDiscountBps / 100}%` : "no limit",
      date(o.createTime),
      orgState(o),
    ]),
  ]);
}

/** When a rule applies: its time window and validity. */
function ruleWhen(rule: DiscountRule): string {
  const days = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
  const onDays = rule.daysOfWeek.length ? ` ${rule.daysOfWeek.map((d) => days[d]).join(",")}` : "";
  const parts = [
    rule.kind === DiscountKind.TIME_WINDOW ? `${rule.startHour}-${rule.endHour}h UTC${onDays}` : "",
    rule.validFrom || rule.validUntil ? `${hourOf(rule.validFrom)}..${hourOf(rule.validUntil)}` : "",
  ].filter(Boolean);
  return parts.join(" ") || "always";
}

/** A validity bound as `--from` and `--until` take it: the day alone at midnight UTC, else the day and hour. */
function hourOf(ts: Timestamp | undefined): string {
  if (!ts) return "-";
  const iso = timestampDate(ts).toISOString();
  return iso.slice(11, 13) === "00" ? iso.slice(0, 10) : iso.slice(0, 13) + ":00";
}

function timestampMs(ts: Timestamp): number {
  return timestampDate(ts).getTime();
}

function statusText(status: InvoiceStatus | undefined): string {
  return (InvoiceStatus[status ?? InvoiceStatus.UNSPECIFIED] ?? "unknown").toLowerCase();
}

/** Whether an org's keys work: a suspended org's are refused, with when and why it was suspended. */
function orgState(org: Organization): string {
  if (org.state !== OrganizationState.SUSPENDED) return "active";
  return `suspended ${date(org.suspendTime)}${org.suspendReason ? `: ${org.suspendReason}` : ""}`;
}

/** What a key can do now: revoked and expired keys are refused by the gateway. */
function keyStatus(key: ApiKey): string {
  if (key.revokeTime) return `revoked ${date(key.revokeTime)}`;
  const expires = key.limits?.expireTime;
  return expires && timestampDate(expires).getTime() <= Date.now() ? `expired ${date(expires)}` : "active";
}

function date(ts: Timestamp | undefined): string {
  return ts ? timestampDate(ts).toISOString().slice(0, 10) : "-";
}

// Bidirectional embeddings, overrides and isolates: one in a name (billing takes them, as RTL text may) that nothing
// closes reverses the rest of its line where the terminal lays out right-to-left text, the columns and ids after it.
// Control characters and line separators, which billing refuses but analytics holds as gateways sent them (a model
// name a client chose): an escape sequence the terminal would run, a line break a line of the table's own.
const unshowable = /[\p{Cc}\u2028\u2029\u202a-\u202e\u2066-\u2069]/gu;

/** Text as a table or line shows it: controls as U+FFFD (`--json` has them as stored). */
function shown(text: string): string {
  return text.replace(unshowable, "\ufffd");
}

/** Left-aligned columns; numbers right-aligned. */
function table(cells: string[][]): string {
  const rows = cells.map((r) => r.map(shown));
  const widths = rows[0]?.map((_, i) => Math.max(...rows.map((r) => (r[i] ?? "").length))) ?? [];
  return rows
    .map((r) =>
      r
        .map((cell, i) => (/^-?[\d,.$]+$/.test(cell) && rows.indexOf(r) > 0 ? cell.padStart(widths[i] ?? 0) : cell.padEnd(widths[i] ?? 0)))
        .join("  ")
        .trimEnd(),
    )
    .join("\n");
}

if (import.meta.main) {
  // process.exit drops what a pipe has not taken yet (a --json list read by a script cut at 64 KiB): exit once the
  // last write is out. One that failed (a full disk, a new key's secret never stored) fails the command, unless its
  // reader left (`| head`).
  const writes: Promise<NodeJS.ErrnoException | null | undefined>[] = [];
  const writeTo = (stream: NodeJS.WriteStream) => (text: string) => {
    writes.push(new Promise((done) => stream.write(text, done)));
  };
  const code = await runCli(process.argv.slice(2), {
    env: process.env,
    out: writeTo(process.stdout),
    err: writeTo(process.stderr),
  });
  const failed = (await Promise.all(writes)).find((e) => e && e.code !== "EPIPE");
  if (failed && code === 0) {
    await new Promise((done) => process.stderr.write(`meshctl: the output was not written: ${failed.message}\n`, done));
    process.exit(1);
  }
  process.exit(code);
}
