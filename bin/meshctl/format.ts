/** What meshctl prints: --json as the services answer, tables and lines for people. */
import { createRegistry, type DescMessage, type MessageShape, toJson } from "@bufbuild/protobuf";
import { type Timestamp, timestampDate, timestampFromMs } from "@bufbuild/protobuf/wkt";
import {
  file_analytics_v1_analytics,
  type LatencyPercentiles,
  type ModelLatency,
  type RequestMetrics,
  RequestStatus,
  type UsageGroupBy,
  type UsageRow,
} from "../../gen/analytics/v1/analytics_pb.ts";
import {
  type ApiKey,
  DiscountKind,
  type DiscountRule,
  file_billing_v1_billing,
  type GetUsageSummaryResponse,
  type Invoice,
  InvoiceStatus,
  type KeyLimits,
  type Organization,
  OrganizationState,
} from "../../gen/billing/v1/billing_pb.ts";
import { Endpoint, type TokenUsage } from "../../gen/common/v1/common_pb.ts";
import { formatCents, formatNanosUsd } from "../../lib/money.ts";
import { usageDimensions } from "./args.ts";

const registry = createRegistry(file_billing_v1_billing, file_analytics_v1_analytics);

/**
 * A message as --json prints it: every field, zeros, empty lists and the first value of an enum included, so that a
 * script reads the same shape whatever the values (protobuf's JSON leaves those out: no `apiKeys` for an org without
 * keys, no `totalCents` on a $0.00 invoice). Unset messages and times (a key's `revokeTime`) stay out.
 */
export function asJson(schema: DescMessage, message: MessageShape<DescMessage>) {
  return toJson(schema, message, { alwaysEmitImplicit: true });
}

export function schemaOf(message: { $typeName: string }): DescMessage {
  const schema = registry.getMessage(message.$typeName);
  if (!schema) throw new Error(`no schema for ${message.$typeName}`);
  return schema;
}

export function orgsTable(orgs: Organization[]): string {
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

/** Whether an org's keys work: a suspended org's are refused, with when and why it was suspended. */
function orgState(org: Organization): string {
  if (org.state !== OrganizationState.SUSPENDED) return "active";
  return `suspended ${date(org.suspendTime)}${org.suspendReason ? `: ${org.suspendReason}` : ""}`;
}

export function keysTable(keys: ApiKey[]): string {
  return table([
    ["ID", "PREFIX", "NAME", "PROJECT", "LIMITS", "STATUS"],
    ...keys.map((k) => [
      k.id,
      k.prefix,
      k.name,
      k.projectId || "-",
      limitsText(k.limits),
      keyStatus(k),
    ]),
  ]);
}

/** What a key can do now: revoked and expired keys are refused by the gateway. */
function keyStatus(key: ApiKey): string {
  if (key.revokeTime) return `revoked ${date(key.revokeTime)}`;
  const expires = key.limits?.expireTime;
  return expires && timestampDate(expires).getTime() <= Date.now() ? `expired ${date(expires)}` : "active";
}

export function limitsText(limits: KeyLimits | undefined): string {
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

/** A key's limits and what they count this period: its usage and that of the keys it was rotated from. */
export function quotaText(key: ApiKey, spent: GetUsageSummaryResponse, rotatedFrom: readonly string[]): string {
  return [
    table([
      ["KEY", "LIMITS", "REQUESTS", "TOKENS", "SPENT (USD)"],
      [
        key.id,
        limitsText(key.limits),
        String(spent.requests),
        String((spent.usage?.inputTokens ?? 0n) + (spent.usage?.outputTokens ?? 0n)),
        formatNanosUsd(spent.costNanos),
      ],
    ]),
    ...(rotatedFrom.length ? [`including the keys it was rotated from: ${rotatedFrom.join(", ")}`] : []),
  ].join("\n");
}

const usageColumns = ["INPUT", "CACHED INPUT", "OUTPUT", "REASONING", "COST_NANOS", "COST (USD)"];

function usageCells(usage: TokenUsage | undefined, costNanos: bigint): string[] {
  const tokens = [usage?.inputTokens, usage?.cachedInputTokens, usage?.outputTokens, usage?.reasoningTokens];
  return [...tokens.map((n) => String(n ?? 0n)), String(costNanos), formatNanosUsd(costNanos)];
}

/** Billing's usage of an org: one total. */
export function usageSummaryTable(summary: GetUsageSummaryResponse): string {
  return table([
    ["REQUESTS", ...usageColumns],
    [String(summary.requests), ...usageCells(summary.usage, summary.costNanos)],
  ]);
}

/** Analytics' usage rows: a column per --by dimension, in their order, and the requests that failed, as --json has. */
export function usageRowsTable(rows: UsageRow[], groupBy: readonly UsageGroupBy[]): string {
  const dimensions = groupBy.map(
    (g) => Object.entries(usageDimensions).find(([, value]) => value === g)?.[0].toUpperCase() ?? "",
  );
  return table([
    [...dimensions, "REQUESTS", "ERRORS", ...usageColumns],
    ...rows.map((r) => [
      // Requests with no model (GET /v1/models) or no key: an empty first cell read as a row shifted left.
      ...r.group.map((value) => value || "-"),
      String(r.requests),
      String(r.errors),
      ...usageCells(r.usage, r.costNanos),
    ]),
  ]);
}

export function latencyTable(models: ModelLatency[]): string {
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

export function requestsTable(requests: RequestMetrics[]): string {
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

export function rulesTable(rules: DiscountRule[]): string {
  return table([
    ["ID", "NAME", "KIND", "DISCOUNT", "PRIORITY", "STACKS", "SCOPE", "WHEN", "CAP"],
    ...rules.map((r) => [
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

export function invoicesTable(invoices: Invoice[]): string {
  return table([
    ["ID", "NUMBER", "PERIOD", "STATUS", "TOTAL"],
    ...invoices.map((i) => [
      i.id,
      i.number || "-",
      date(i.periodStart),
      statusText(i.status),
      formatCents(i.totalCents),
    ]),
  ]);
}

export function invoiceText(invoice: Invoice | undefined): string {
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

export function statusText(status: InvoiceStatus | undefined): string {
  return (InvoiceStatus[status ?? InvoiceStatus.UNSPECIFIED] ?? "unknown").toLowerCase();
}

export function date(ts: Timestamp | undefined): string {
  return ts ? timestampDate(ts).toISOString().slice(0, 10) : "-";
}

export function timestampMs(ts: Timestamp): number {
  return timestampDate(ts).getTime();
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

/**
 * Left-aligned columns; numbers right-aligned. Widths are the terminal's cells, not UTF-16 units: a CJK character
 * takes two and a combining mark none, so a name of either kept every column after it out of line.
 */
export function table(cells: string[][]): string {
  const rows = cells.map((r) => r.map(shown));
  const widths = rows[0]?.map((_, i) => Math.max(...rows.map((r) => Bun.stringWidth(r[i] ?? "")))) ?? [];
  return rows
    .map((r, n) =>
      r
        .map((cell, i) => {
          const fill = " ".repeat((widths[i] ?? 0) - Bun.stringWidth(cell));
          return /^-?[\d,.$]+$/.test(cell) && n > 0 ? fill + cell : cell + fill;
        })
        .join("  ")
        .trimEnd(),
    )
    .join("\n");
}
