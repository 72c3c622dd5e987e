/** Domain records of the billing store. Money is nano-USD in bigint; absent optional values are null. */

export interface Organization {
  id: string;
  name: string;
  taxRateBps: number;
  /** Day of month (1..28, UTC) on which billing periods start. */
  billingDay: number;
  /** 0 means unlimited. */
  monthlyBudgetNanos: bigint;
  createdAt: Date;
}

export interface NewOrganization {
  name: string;
  taxRateBps: number;
  billingDay: number;
  monthlyBudgetNanos: bigint;
}

export interface Project {
  id: string;
  orgId: string;
  name: string;
  createdAt: Date;
}

/** Zero means unlimited for every numeric limit; an empty model list allows every model. */
export interface KeyLimits {
  monthlyBudgetNanos: bigint;
  monthlyTokens: bigint;
  requestsPerMinute: number;
  tokensPerMinute: bigint;
  allowedModels: string[];
  expiresAt: Date | null;
}

export interface ApiKey {
  id: string;
  orgId: string;
  projectId: string | null;
  name: string;
  /** Visible start of the secret, e.g. "sk-mesh-AbCd". */
  prefix: string;
  /** SHA-256 hex of the secret; not a secret itself. */
  secretSha256: string;
  limits: KeyLimits;
  createdAt: Date;
  revokedAt: Date | null;
}

export interface NewApiKey {
  orgId: string;
  projectId: string | null;
  name: string;
  limits: KeyLimits;
}

/** A key with its full secret, which exists only in this value, once. */
export interface IssuedApiKey {
  apiKey: ApiKey;
  secret: string;
}

/** A key change gateways must apply to their caches. */
export interface KeyChange {
  apiKeyId: string;
  secretSha256: string;
  revoked: boolean;
}

export type Endpoint = "unspecified" | "chat_completions" | "embeddings" | "models";

export interface UsageRecord {
  requestId: string;
  orgId: string;
  projectId: string | null;
  apiKeyId: string | null;
  model: string;
  provider: string;
  endpoint: Endpoint;
  inputTokens: bigint;
  cachedInputTokens: bigint;
  outputTokens: bigint;
  reasoningTokens: bigint;
  costNanos: bigint;
  occurredAt: Date;
}

export interface UsageTotals {
  requests: bigint;
  inputTokens: bigint;
  cachedInputTokens: bigint;
  outputTokens: bigint;
  reasoningTokens: bigint;
  costNanos: bigint;
}

/** Half-open time range [start, end). */
export interface TimeRange {
  start: Date;
  end: Date;
}

export type BudgetScope = "organization" | "api_key";

export interface BudgetLeaseRequest {
  scope: BudgetScope;
  /** Org id or api key id, per scope. */
  scopeId: string;
  holder: string;
  requestedNanos: bigint;
  ttlSeconds: number;
  now: Date;
}

export interface BudgetLeaseGrant {
  /** Null when nothing could be granted. */
  leaseId: string | null;
  grantedNanos: bigint;
  expiresAt: Date;
  /** Budget left unleased after this grant; null when the scope is unlimited. */
  remainingNanos: bigint | null;
}
