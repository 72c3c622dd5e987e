import { create } from "@bufbuild/protobuf";
import { type FieldMask, timestampFromDate } from "@bufbuild/protobuf/wkt";
import {
  type ApiKey as ApiKeyMessage,
  ApiKeySchema,
  DiscountKind as DiscountKindEnum,
  type DiscountRule as DiscountRuleMessage,
  DiscountRuleSchema,
  type Invoice as InvoiceMessage,
  InvoiceLineItemSchema,
  InvoiceSchema,
  InvoiceStatus as InvoiceStatusEnum,
  type KeyLimits as KeyLimitsMessage,
  KeyLimitsSchema,
  type Organization as OrganizationMessage,
  OrganizationSchema,
  OrganizationState,
  type Project as ProjectMessage,
  ProjectSchema,
  type UsageRecord as UsageRecordMessage,
  UsageRecordSchema,
} from "../gen/billing/v1/billing_pb.ts";
import {
  type BudgetCharge as BudgetChargeMessage,
  type CostBreakdown as CostBreakdownMessage,
  CostBreakdownSchema,
  Endpoint as EndpointEnum,
  type TokenUsage,
  TokenUsageSchema,
} from "../gen/common/v1/common_pb.ts";
import { MAX_COST_NANOS_PER_REQUEST, MAX_TOKENS_PER_REQUEST } from "../lib/money.ts";
import { roundingRule } from "./invoices/build.ts";
import { maxUsageClockSkewMs } from "./period.ts";
import type {
  ApiKey,
  BudgetCharge,
  CostBreakdown,
  DiscountKind,
  DiscountRule,
  Endpoint,
  Invoice,
  InvoiceStatus,
  KeyLimits,
  NewDiscountRule,
  Organization,
  Project,
  UsageRecord,
  UsageTotals,
  VolumeTier,
} from "./store/types.ts";
import { atMost, id, instant, intInRange, invalid, nonNegative, optionalId, ordered, text } from "./validate.ts";
import { clipped } from "../lib/text.ts";

/** Conversions between contract messages and store records; inbound ones validate as they go. */

const endpoints: Record<EndpointEnum, Endpoint> = {
  [EndpointEnum.UNSPECIFIED]: "unspecified",
  [EndpointEnum.CHAT_COMPLETIONS]: "chat_completions",
  [EndpointEnum.EMBEDDINGS]: "embeddings",
  [EndpointEnum.MODELS]: "models",
  [EndpointEnum.RESPONSES]: "responses",
};
const endpointEnums = Object.fromEntries(Object.entries(endpoints).map(([k, v]) => [v, Number(k)])) as Record<
  Endpoint,
  EndpointEnum
>;

const maxAllowedModels = 1000;

export function organizationMessage(org: Organization): OrganizationMessage {
  return create(OrganizationSchema, {
    id: org.id,
    name: org.name,
    createTime: timestampFromDate(org.createdAt),
    taxRateBps: org.taxRateBps,
    billingDay: org.billingDay,
    monthlyBudgetNanos: org.monthlyBudgetNanos,
    maxDiscountBps: org.maxDiscountBps,
    state: org.suspendedAt ? OrganizationState.SUSPENDED : OrganizationState.ACTIVE,
    suspendTime: org.suspendedAt ? timestampFromDate(org.suspendedAt) : undefined,
    suspendReason: org.suspendReason,
  });
}

export function projectMessage(project: Project): ProjectMessage {
  return create(ProjectSchema, {
    id: project.id,
    orgId: project.orgId,
    name: project.name,
    createTime: timestampFromDate(project.createdAt),
  });
}

export function apiKeyMessage(key: ApiKey): ApiKeyMessage {
  return create(ApiKeySchema, {
    id: key.id,
    orgId: key.orgId,
    projectId: key.projectId ?? "",
    name: key.name,
    prefix: key.prefix,
    limits: create(KeyLimitsSchema, {
      monthlyBudgetNanos: key.limits.monthlyBudgetNanos,
      monthlyTokens: key.limits.monthlyTokens,
      requestsPerMinute: key.limits.requestsPerMinute,
      tokensPerMinute: key.limits.tokensPerMinute,
      maxConcurrentRequests: key.limits.maxConcurrentRequests,
      allowedModels: key.limits.allowedModels,
      expireTime: key.limits.expiresAt ? timestampFromDate(key.limits.expiresAt) : undefined,
    }),
    createTime: timestampFromDate(key.createdAt),
    revokeTime: key.revokedAt ? timestampFromDate(key.revokedAt) : undefined,
    rotatedFromApiKeyId: key.rotatedFromId ?? "",
  });
}

export function usageRecordMessage(record: UsageRecord): UsageRecordMessage {
  return create(UsageRecordSchema, {
    requestId: record.requestId,
    orgId: record.orgId,
    projectId: record.projectId ?? "",
    apiKeyId: record.apiKeyId ?? "",
    model: record.model,
    provider: record.provider,
    endpoint: endpointEnums[record.endpoint],
    usage: create(TokenUsageSchema, {
      inputTokens: record.inputTokens,
      cachedInputTokens: record.cachedInputTokens,
      outputTokens: record.outputTokens,
      reasoningTokens: record.reasoningTokens,
    }),
    costNanos: record.costNanos,
    occurTime: timestampFromDate(record.occurredAt),
    costBreakdown: record.costBreakdown ? create(CostBreakdownSchema, record.costBreakdown) : undefined,
  });
}

export function tokenUsageMessage(totals: UsageTotals): TokenUsage {
  return create(TokenUsageSchema, {
    inputTokens: totals.inputTokens,
    cachedInputTokens: totals.cachedInputTokens,
    outputTokens: totals.outputTokens,
    reasoningTokens: totals.reasoningTokens,
  });
}

/** Limits from a request; an absent message means no limits. */
export function keyLimitsFrom(limits: KeyLimitsMessage | undefined, field = "limits"): KeyLimits {
  const models = limits?.allowedModels ?? [];
  if (models.length > maxAllowedModels) throw invalid(`${field}.allowed_models`, `at most ${maxAllowedModels} models`);
  return {
    monthlyBudgetNanos: nonNegative(limits?.monthlyBudgetNanos ?? 0n, `${field}.monthly_budget_nanos`),
    monthlyTokens: nonNegative(limits?.monthlyTokens ?? 0n, `${field}.monthly_tokens`),
    requestsPerMinute: intInRange(limits?.requestsPerMinute ?? 0, `${field}.requests_per_minute`, 0, 2 ** 31 - 1),
    tokensPerMinute: nonNegative(limits?.tokensPerMinute ?? 0n, `${field}.tokens_per_minute`),
    maxConcurrentRequests: intInRange(
      limits?.maxConcurrentRequests ?? 0,
      `${field}.max_concurrent_requests`,
      0,
      2 ** 31 - 1,
    ),
    allowedModels: [...new Set(models.map((model, i) => text(model, `${field}.allowed_models[${i}]`)))],
    expiresAt: limits?.expireTime ? instant(limits.expireTime, `${field}.expire_time`) : null,
  };
}

/** KeyLimits' fields by their names in the contract, as field mask paths name them. */
const keyLimitPaths: Record<string, keyof KeyLimits> = {
  monthly_budget_nanos: "monthlyBudgetNanos",
  monthly_tokens: "monthlyTokens",
  requests_per_minute: "requestsPerMinute",
  tokens_per_minute: "tokensPerMinute",
  max_concurrent_requests: "maxConcurrentRequests",
  allowed_models: "allowedModels",
  expire_time: "expiresAt",
};

/** The limits an update mask names; every limit when it names none. */
export function keyLimitFieldsFrom(mask: FieldMask | undefined, field = "update_mask"): (keyof KeyLimits)[] | undefined {
  if (!mask || mask.paths.length === 0) return undefined;
  return [
    ...new Set(
      mask.paths.map((path) => {
        const name = Object.hasOwn(keyLimitPaths, path) ? keyLimitPaths[path] : undefined;
        if (!name) throw invalid(field, `unknown path "${clipped(path, 100)}"; KeyLimits has ${Object.keys(keyLimitPaths).join(", ")}`);
        return name;
      }),
    ),
  ];
}

/** Limits for a new key: one that would be born expired is a mistake, not a key. */
export function unexpired(limits: KeyLimits, now: Date, field = "limits"): KeyLimits {
  if (limits.expiresAt && limits.expiresAt <= now) throw invalid(`${field}.expire_time`, "must be in the future");
  return limits;
}

/**
 * A usage record from RecordUsage, checked field by field against billing's clock `now`; `at` names it in errors. A
 * record dated further ahead than maxUsageClockSkewMs (a gateway whose clock runs fast) is dated `now` instead, and
 * `datedAhead` told: its usage is billed in the current period, not refused (its gateway would never send it again)
 * nor left to a period years away.
 */
export function usageRecordFrom(
  record: UsageRecordMessage,
  at: string,
  now: Date,
  datedAhead?: (requestId: string, occurredAt: Date) => void,
): UsageRecord {
  const requestId = id(record.requestId, `${at}.request_id`);
  if (!record.occurTime) throw invalid(`${at}.occur_time`, "required");
  let occurredAt = instant(record.occurTime, `${at}.occur_time`);
  if (occurredAt.getTime() > now.getTime() + maxUsageClockSkewMs) {
    datedAhead?.(requestId, occurredAt);
    occurredAt = now;
  }
  const endpoint = endpoints[record.endpoint];
  if (!endpoint) throw invalid(`${at}.endpoint`, `unknown value ${record.endpoint}`);
  const usage = record.usage;
  const inputTokens = tokens(usage?.inputTokens, at, "input_tokens");
  const cachedInputTokens = tokens(usage?.cachedInputTokens, at, "cached_input_tokens");
  const outputTokens = tokens(usage?.outputTokens, at, "output_tokens");
  const reasoningTokens = tokens(usage?.reasoningTokens, at, "reasoning_tokens");
  if (cachedInputTokens > inputTokens) throw invalid(`${at}.usage.cached_input_tokens`, "exceeds input_tokens");
  if (reasoningTokens > outputTokens) throw invalid(`${at}.usage.reasoning_tokens`, "exceeds output_tokens");
  const costNanos = atMost(record.costNanos, `${at}.cost_nanos`, MAX_COST_NANOS_PER_REQUEST);
  return {
    requestId,
    orgId: id(record.orgId, `${at}.org_id`),
    projectId: optionalId(record.projectId, `${at}.project_id`),
    apiKeyId: optionalId(record.apiKeyId, `${at}.api_key_id`),
    model: text(record.model, `${at}.model`, { min: 0 }),
    provider: text(record.provider, `${at}.provider`, { min: 0 }),
    endpoint,
    inputTokens,
    cachedInputTokens,
    outputTokens,
    reasoningTokens,
    costNanos,
    occurredAt,
    costBreakdown: record.costBreakdown
      ? costBreakdownFrom(record.costBreakdown, costNanos, `${at}.cost_breakdown`)
      : null,
    budgetCharges:
      record.budgetCharges.length === 0
        ? noBudgetCharges
        : budgetChargesFrom(record.budgetCharges, costNanos, inputTokens + outputTokens, `${at}.budget_charges`),
  };
}

function tokens(value: bigint | undefined, at: string, name: string): bigint {
  return atMost(value ?? 0n, `${at}.usage.${name}`, MAX_TOKENS_PER_REQUEST);
}

/** A request draws on at most its org's and its key's budgets and its key's monthly tokens, each from a few leases. */
const maxBudgetCharges = 12;
const noBudgetCharges: readonly BudgetCharge[] = Object.freeze([]);

/** Charges in their lease's unit: nano-USD, or tokens (a lease of monthly tokens). */
function budgetChargesFrom(
  charges: readonly BudgetChargeMessage[],
  costNanos: bigint,
  tokens: bigint,
  field: string,
): BudgetCharge[] {
  if (charges.length > maxBudgetCharges) throw invalid(field, `at most ${maxBudgetCharges} charges`);
  return charges.map((charge, i) => {
    const at = `${field}[${i}]`;
    const nanos = atMost(charge.nanos, `${at}.nanos`, costNanos);
    const drawn = atMost(charge.tokens, `${at}.tokens`, tokens);
    if (nanos > 0n && drawn > 0n) throw invalid(at, "charges nano-USD or tokens, not both");
    return { leaseId: id(charge.leaseId, `${at}.lease_id`), nanos: nanos + drawn };
  });
}

function costBreakdownFrom(breakdown: CostBreakdownMessage, costNanos: bigint, field: string): CostBreakdown {
  const parts: CostBreakdown = {
    inputNanos: atMost(breakdown.inputNanos, `${field}.input_nanos`, MAX_COST_NANOS_PER_REQUEST),
    cachedInputNanos: atMost(breakdown.cachedInputNanos, `${field}.cached_input_nanos`, MAX_COST_NANOS_PER_REQUEST),
    outputNanos: atMost(breakdown.outputNanos, `${field}.output_nanos`, MAX_COST_NANOS_PER_REQUEST),
    reasoningNanos: atMost(breakdown.reasoningNanos, `${field}.reasoning_nanos`, MAX_COST_NANOS_PER_REQUEST),
  };
  const sum = parts.inputNanos + parts.cachedInputNanos + parts.outputNanos + parts.reasoningNanos;
  if (sum !== costNanos) throw invalid(field, `parts add up to ${sum}, not cost_nanos ${costNanos}`);
  return parts;
}

const discountKinds: Record<DiscountKindEnum, DiscountKind | undefined> = {
  [DiscountKindEnum.UNSPECIFIED]: undefined,
  [DiscountKindEnum.VOLUME_GRADUATED]: "volume_graduated",
  [DiscountKindEnum.VOLUME_ALL_UNITS]: "volume_all_units",
  [DiscountKindEnum.TIME_WINDOW]: "time_window",
  [DiscountKindEnum.PROMOTIONAL]: "promotional",
};
const discountKindEnums = Object.fromEntries(Object.entries(discountKinds).map(([k, v]) => [v, Number(k)])) as Record<
  DiscountKind,
  DiscountKindEnum
>;

const maxTiers = 20;
const hourMs = 3_600_000;

/** A discount rule from CreateDiscountRule, checked against the rules DiscountRule documents. */
export function discountRuleFrom(rule: DiscountRuleMessage | undefined, field = "rule"): NewDiscountRule {
  if (!rule) throw invalid(field, "required");
  const at = (name: string) => `${field}.${name}`;
  const kind = discountKinds[rule.kind];
  if (!kind) {
    // A number the contract does not name is not a missing kind: a newer client's, or a mistake.
    if (rule.kind !== 0) throw invalid(at("kind"), `${rule.kind} is not a discount kind`);
    throw invalid(at("kind"), "required");
  }
  const volume = kind === "volume_graduated" || kind === "volume_all_units";
  const window = kind === "time_window";

  let tiers: VolumeTier[] = [];
  if (volume) {
    if (rule.discountBps !== 0) throw invalid(at("discount_bps"), "must be 0 for volume kinds; rates go in tiers");
    if (rule.tiers.length < 1 || rule.tiers.length > maxTiers) throw invalid(at("tiers"), `1..${maxTiers} tiers`);
    tiers = rule.tiers.map((tier, i) => ({
      fromNanos: nonNegative(tier.fromNanos, at(`tiers[${i}].from_nanos`)),
      discountBps: intInRange(tier.discountBps, at(`tiers[${i}].discount_bps`), 0, 10_000),
    }));
    tiers.forEach((tier, i) => {
      const previous = tiers[i - 1];
      if (!previous) return;
      if (tier.fromNanos <= previous.fromNanos) throw invalid(at(`tiers[${i}].from_nanos`), "must ascend strictly");
      if (tier.discountBps < previous.discountBps) throw invalid(at(`tiers[${i}].discount_bps`), "must not decrease");
    });
  } else {
    if (rule.tiers.length > 0) throw invalid(at("tiers"), "only volume kinds have tiers");
    intInRange(rule.discountBps, at("discount_bps"), 1, 10_000);
  }

  let startHour = 0;
  let endHour = 24;
  if (window) {
    startHour = intInRange(rule.startHour, at("start_hour"), 0, 23);
    endHour = intInRange(rule.endHour, at("end_hour"), 1, 24);
    if (endHour === startHour) {
      throw invalid(at("end_hour"), "must differ from start_hour (a window of all day is 0 to 24)");
    }
    rule.daysOfWeek.forEach((d, i) => intInRange(d, at(`days_of_week[${i}]`), 0, 6));
  } else {
    const defaultWindow = rule.startHour === 0 && (rule.endHour === 0 || rule.endHour === 24);
    if (!defaultWindow || rule.daysOfWeek.length > 0) {
      throw invalid(at("start_hour"), "only time windows have hours and days");
    }
  }

  const wholeHour = (value: Date, name: string) => {
    if (value.getTime() % hourMs !== 0) throw invalid(at(name), "must be a whole UTC hour");
    return value;
  };
  const validFrom = rule.validFrom ? wholeHour(instant(rule.validFrom, at("valid_from")), "valid_from") : null;
  const validUntil = rule.validUntil ? wholeHour(instant(rule.validUntil, at("valid_until")), "valid_until") : null;
  ordered(validFrom, validUntil, "valid_from", at("valid_until"));

  return {
    orgId: id(rule.orgId, at("org_id")),
    name: text(rule.name, at("name")),
    kind,
    priority: intInRange(rule.priority, at("priority"), -1_000_000, 1_000_000),
    stackable: rule.stackable,
    model: text(rule.model, at("model"), { min: 0 }) || null,
    provider: text(rule.provider, at("provider"), { min: 0 }) || null,
    discountBps: volume ? 0 : rule.discountBps,
    tiers,
    startHour,
    endHour,
    daysOfWeek: [...new Set(window ? rule.daysOfWeek : [])].sort((a, b) => a - b),
    validFrom,
    validUntil,
    capNanos: nonNegative(rule.capNanos, at("cap_nanos")),
  };
}

export function discountRuleMessage(rule: DiscountRule): DiscountRuleMessage {
  return create(DiscountRuleSchema, {
    id: rule.id,
    orgId: rule.orgId,
    name: rule.name,
    kind: discountKindEnums[rule.kind],
    priority: rule.priority,
    stackable: rule.stackable,
    model: rule.model ?? "",
    provider: rule.provider ?? "",
    discountBps: rule.discountBps,
    tiers: rule.tiers,
    startHour: rule.startHour,
    endHour: rule.endHour,
    daysOfWeek: rule.daysOfWeek,
    validFrom: rule.validFrom ? timestampFromDate(rule.validFrom) : undefined,
    validUntil: rule.validUntil ? timestampFromDate(rule.validUntil) : undefined,
    capNanos: rule.capNanos,
  });
}

const invoiceStatuses: Record<InvoiceStatus, InvoiceStatusEnum> = {
  draft: InvoiceStatusEnum.DRAFT,
  issued: InvoiceStatusEnum.ISSUED,
  paid: InvoiceStatusEnum.PAID,
  void: InvoiceStatusEnum.VOID,
};

/** The status an UpdateInvoiceStatus asks for. */
export function invoiceStatusFrom(status: InvoiceStatusEnum, field = "status"): InvoiceStatus {
  const found = (Object.keys(invoiceStatuses) as InvoiceStatus[]).find((s) => invoiceStatuses[s] === status);
  if (!found) throw invalid(field, "must be DRAFT, ISSUED, PAID or VOID");
  return found;
}

export function invoiceMessage(invoice: Invoice): InvoiceMessage {
  return create(InvoiceSchema, {
    id: invoice.id,
    orgId: invoice.orgId,
    orgName: invoice.orgName,
    number: invoice.number ?? "",
    status: invoiceStatuses[invoice.status],
    periodStart: timestampFromDate(invoice.periodStart),
    periodEnd: timestampFromDate(invoice.periodEnd),
    lineItems: invoice.lines.map((line) =>
      create(InvoiceLineItemSchema, {
        description: line.description,
        model: line.model,
        tokenType: line.tokenType,
        quantity: line.quantity,
        amountNanos: line.amountNanos,
        discountRuleId: line.discountRuleId ?? "",
      }),
    ),
    subtotalCents: invoice.subtotalCents,
    discountCents: invoice.discountCents,
    taxCents: invoice.taxCents,
    totalCents: invoice.totalCents,
    taxRateBps: invoice.taxRateBps,
    createTime: timestampFromDate(invoice.createdAt),
    issueTime: invoice.issuedAt ? timestampFromDate(invoice.issuedAt) : undefined,
    roundingRule,
  });
}
