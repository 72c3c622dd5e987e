#!/usr/bin/env bun
/**
 * meshctl: operate billing and analytics from a terminal.
 * Addresses from BILLING_URL / ANALYTICS_URL, admin token from ADMIN_TOKEN.
 * Human tables by default, --json for scripts. Errors print one line and exit non-zero.
 */
import { writeFile } from "node:fs/promises";
import { resolve } from "node:path";
import { parseArgs } from "node:util";
import { create, type DescMessage, type MessageShape } from "@bufbuild/protobuf";
import { ConnectError } from "@connectrpc/connect";
import { AnalyticsService, ListRequestsResponseSchema, RequestStatus } from "../gen/analytics/v1/analytics_pb.ts";
import {
  BillingService,
  type GetUsageSummaryResponse,
  GetUsageSummaryResponseSchema,
  InvoiceStatus,
  KeyLimitsSchema,
} from "../gen/billing/v1/billing_pb.ts";
import { commonEnv, env, parseEnv, withoutCredentials } from "../lib/config.ts";
import { allPages, createServiceClient } from "../lib/rpc-client.ts";
import {
  checkCommandLine,
  commands,
  flags,
  int,
  limitFlags,
  limitPaths,
  limitsFrom,
  parseDate,
  percentBps,
  refuseNegativeValues,
  requestStatus,
  ruleFrom,
  UsageError,
  usage,
  usageGroupBy,
  usdNanos,
} from "./meshctl/args.ts";
import {
  asJson,
  date,
  invoicesTable,
  invoiceText,
  keysTable,
  latencyTable,
  limitsText,
  orgsTable,
  quotaText,
  requestsTable,
  rulesTable,
  schemaOf,
  statusText,
  table,
  usageRowsTable,
  usageSummaryTable,
} from "./meshctl/format.ts";
import { analyticsRange, createOnce, findKey, nameService, ServiceError } from "./meshctl/services.ts";

export interface CliIo {
  env: Record<string, string | undefined>;
  out: (text: string) => void;
  err: (text: string) => void;
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
        print(schemaOf(res), res, () => keysTable(res.apiKeys));
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
            : `${quotaText(key, spent, rotatedFrom)}\n`,
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
          print(schemaOf(res), res, () => usageSummaryTable(res));
        } else if (source === "analytics") {
          const range = await analyticsRange(billing, orgId, from, to);
          const res = await analytics.queryUsage({ orgId, range, groupBy });
          print(schemaOf(res), res, () => usageRowsTable(res.rows, groupBy));
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
        print(schemaOf(res), res, () => rulesTable(res.rules));
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
        print(schemaOf(res), res, () => invoicesTable(res.invoices));
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
