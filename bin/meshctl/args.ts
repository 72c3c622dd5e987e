/** meshctl's command line: its help, its flags, what each command takes, and the values flags are read as. */
import type { MessageInitShape } from "@bufbuild/protobuf";
import { type Timestamp, timestampFromMs } from "@bufbuild/protobuf/wkt";
import { RequestStatus, UsageGroupBy } from "../../gen/analytics/v1/analytics_pb.ts";
import { DiscountKind, type DiscountRuleSchema, type KeyLimitsSchema } from "../../gen/billing/v1/billing_pb.ts";
import { parseUsdNanos } from "../../lib/money.ts";

/** Wrong command line: exit code 2. */
export class UsageError extends Error {}

export const usage = `usage: meshctl <command> [flags] [--json]

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
      (--rpm and --tpm hold over every gateway replica; --concurrency, the requests a key may have in flight at once,
      on each replica)
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

export const flags = {
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
export const commands: Record<string, { flags: readonly FlagName[]; args: number }> = {
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
export function checkCommandLine(command: string, values: Record<string, unknown>, args: readonly string[]): void {
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
export function refuseNegativeValues(argv: readonly string[]): void {
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

/** An integer flag within [min, max] (an int32's non-negative range by default). */
export function int(text: string | undefined, flag: string, max = 2 ** 31 - 1, min = 0): number {
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

export function usdNanos(text: string | undefined, flag: string): bigint {
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
export function parseDate(text: string, flag: string): Timestamp {
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

export function percentBps(text: string, flag: string): number {
  if (!/^\d{1,3}(\.\d{1,2})?$/.test(text) || Number(text) > 100) {
    throw new UsageError(`${flag} must be a percentage 0..100 with at most 2 decimals, not "${text}"`);
  }
  return Math.round(Number(text) * 100);
}

type Flags = { [K in keyof typeof flags]?: (typeof flags)[K]["type"] extends "boolean" ? boolean : string };

export const limitFlags = ["budget-usd", "monthly-tokens", "rpm", "tpm", "concurrency", "models", "expires"] as const;
/** The KeyLimits field each limit flag sets, as an update mask names it. */
export const limitPaths: Record<(typeof limitFlags)[number], string> = {
  "budget-usd": "monthly_budget_nanos",
  "monthly-tokens": "monthly_tokens",
  rpm: "requests_per_minute",
  tpm: "tokens_per_minute",
  concurrency: "max_concurrent_requests",
  models: "allowed_models",
  expires: "expire_time",
};

/** Key limits from the flags given, an absent flag leaving its limit unset; 0, or an empty --models or --expires, is no limit. */
export function limitsFrom(values: Flags): MessageInitShape<typeof KeyLimitsSchema> {
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

export function ruleFrom(values: Flags): MessageInitShape<typeof DiscountRuleSchema> {
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

/** meshctl's names for analytics' usage dimensions, in the order --help lists them. */
export const usageDimensions = {
  model: UsageGroupBy.MODEL,
  key: UsageGroupBy.API_KEY,
  project: UsageGroupBy.PROJECT,
  provider: UsageGroupBy.PROVIDER,
  status: UsageGroupBy.STATUS,
  day: UsageGroupBy.DAY,
  hour: UsageGroupBy.HOUR,
} as const;

/** Parses --by: up to 3 distinct dimension names, as QueryUsage takes. */
export function usageGroupBy(list: string): UsageGroupBy[] {
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

/** A --status as the --by status column shows it, in any case: rate_limited, RATE_LIMITED. */
export function requestStatus(text: string): RequestStatus {
  const names = Object.keys(RequestStatus).filter((n) => Number.isNaN(Number(n)) && n !== "UNSPECIFIED");
  const name = names.find((n) => n === text.toUpperCase());
  if (!name) throw new UsageError(`--status takes ${names.map((n) => n.toLowerCase()).join(", ")}; not "${text}"`);
  return RequestStatus[name as keyof typeof RequestStatus];
}
