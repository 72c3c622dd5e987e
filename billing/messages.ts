import { create } from "@bufbuild/protobuf";
import { timestampDate, timestampFromDate } from "@bufbuild/protobuf/wkt";
import {
  type ApiKey as ApiKeyMessage,
  ApiKeySchema,
  type KeyLimits as KeyLimitsMessage,
  KeyLimitsSchema,
  type Organization as OrganizationMessage,
  OrganizationSchema,
  type Project as ProjectMessage,
  ProjectSchema,
  type UsageRecord as UsageRecordMessage,
  UsageRecordSchema,
} from "../gen/billing/v1/billing_pb.ts";
import { Endpoint as EndpointEnum, type TokenUsage, TokenUsageSchema } from "../gen/common/v1/common_pb.ts";
import type {
  ApiKey,
  Endpoint,
  KeyLimits,
  Organization,
  Project,
  UsageRecord,
  UsageTotals,
} from "./store/types.ts";
import { id, intInRange, invalid, nonNegative, optionalId, text } from "./validate.ts";

/** Conversions between contract messages and store records; inbound ones validate as they go. */

const endpoints: Record<EndpointEnum, Endpoint> = {
  [EndpointEnum.UNSPECIFIED]: "unspecified",
  [EndpointEnum.CHAT_COMPLETIONS]: "chat_completions",
  [EndpointEnum.EMBEDDINGS]: "embeddings",
  [EndpointEnum.MODELS]: "models",
};
const endpointEnums = Object.fromEntries(Object.entries(endpoints).map(([k, v]) => [v, Number(k)])) as Record<
  Endpoint,
  EndpointEnum
>;

const maxAllowedModels = 1000;
// TokenUsage documents 0..2^31 per request.
const maxTokensPerRequest = 2n ** 31n;

export function organizationMessage(org: Organization): OrganizationMessage {
  return create(OrganizationSchema, {
    id: org.id,
    name: org.name,
    createTime: timestampFromDate(org.createdAt),
    taxRateBps: org.taxRateBps,
    billingDay: org.billingDay,
    monthlyBudgetNanos: org.monthlyBudgetNanos,
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
      allowedModels: key.limits.allowedModels,
      expireTime: key.limits.expiresAt ? timestampFromDate(key.limits.expiresAt) : undefined,
    }),
    createTime: timestampFromDate(key.createdAt),
    revokeTime: key.revokedAt ? timestampFromDate(key.revokedAt) : undefined,
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
    allowedModels: [...new Set(models.map((model, i) => text(model, `${field}.allowed_models[${i}]`)))],
    expiresAt: limits?.expireTime ? timestampDate(limits.expireTime) : null,
  };
}

/** A usage record from RecordUsage, checked field by field; `at` names it in errors. */
export function usageRecordFrom(record: UsageRecordMessage, at: string): UsageRecord {
  const field = (name: string) => `${at}.${name}`;
  if (!record.occurTime) throw invalid(field("occur_time"), "required");
  const endpoint = endpoints[record.endpoint];
  if (!endpoint) throw invalid(field("endpoint"), `unknown value ${record.endpoint}`);
  const tokens = (value: bigint | undefined, name: string) => {
    const count = nonNegative(value ?? 0n, field(`usage.${name}`));
    if (count > maxTokensPerRequest) throw invalid(field(`usage.${name}`), `at most ${maxTokensPerRequest}`);
    return count;
  };
  const inputTokens = tokens(record.usage?.inputTokens, "input_tokens");
  const cachedInputTokens = tokens(record.usage?.cachedInputTokens, "cached_input_tokens");
  const outputTokens = tokens(record.usage?.outputTokens, "output_tokens");
  const reasoningTokens = tokens(record.usage?.reasoningTokens, "reasoning_tokens");
  if (cachedInputTokens > inputTokens) throw invalid(field("usage.cached_input_tokens"), "exceeds input_tokens");
  if (reasoningTokens > outputTokens) throw invalid(field("usage.reasoning_tokens"), "exceeds output_tokens");
  return {
    requestId: id(record.requestId, field("request_id")),
    orgId: id(record.orgId, field("org_id")),
    projectId: optionalId(record.projectId, field("project_id")),
    apiKeyId: optionalId(record.apiKeyId, field("api_key_id")),
    model: text(record.model, field("model"), { min: 0 }),
    provider: text(record.provider, field("provider"), { min: 0 }),
    endpoint,
    inputTokens,
    cachedInputTokens,
    outputTokens,
    reasoningTokens,
    costNanos: nonNegative(record.costNanos, field("cost_nanos")),
    occurredAt: timestampDate(record.occurTime),
  };
}
