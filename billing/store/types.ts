/** Domain records of the billing store. Money is nano-USD in bigint; absent optional values are null. */

export interface Organization {
  id: string;
  name: string;
  taxRateBps: number;
  /** Day of month (1..28, UTC) on which billing periods start. */
  billingDay: number;
  /** 0 means unlimited. */
  monthlyBudgetNanos: bigint;
  /** Most all discounts together may take off an invoice, in basis points of its subtotal; 0 = no limit. */
  maxDiscountBps: number;
  createdAt: Date;
  /** Set while the org is suspended: its keys are refused and its budgets grant nothing. */
  suspendedAt: Date | null;
  /** The operator's reason for the suspension; empty while active. */
  suspendReason: string;
}

export interface NewOrganization {
  name: string;
  taxRateBps: number;
  billingDay: number;
  monthlyBudgetNanos: bigint;
  maxDiscountBps: number;
}

/** Settings of an org that may change; undefined fields keep their value. */
export type OrganizationChanges = Partial<Pick<NewOrganization, "name" | "taxRateBps" | "monthlyBudgetNanos" | "maxDiscountBps">>;

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
  /** Requests in flight at once, counted by each gateway replica. */
  maxConcurrentRequests: number;
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
  /** The key this one replaced, when RotateApiKey created it. */
  rotatedFromId: string | null;
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
  /** Empty when a create repeated the request_id of the one that issued the key, whose answer carried it. */
  secret: string;
}

/**
 * A change gateways must apply to their caches: of one key, or (`orgId`) of org settings every key of the org carries,
 * announced once however many keys the org has.
 */
export type KeyChange = { apiKeyId: string; secretSha256: string; revoked: boolean } | { orgId: string };

export type Endpoint = "unspecified" | "chat_completions" | "embeddings" | "models" | "responses";

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
  /** Null when the sender did not split the cost by token type. */
  costBreakdown: CostBreakdown | null;
  /** The budget leases the cost was drawn from, and how much from each; none when no budget applied. */
  budgetCharges?: readonly BudgetCharge[];
}

/** What one request drew from one budget lease, in the lease's unit: nano-USD, or tokens for monthly tokens. */
export interface BudgetCharge {
  leaseId: string;
  nanos: bigint;
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

/** A key's monthly tokens ("api_key_tokens") are leased as budgets are, in tokens. */
export type BudgetScope = "organization" | "api_key" | "api_key_tokens";

export interface BudgetLeaseRequest {
  scope: BudgetScope;
  /** Org id or api key id, per scope. */
  scopeId: string;
  holder: string;
  requestedNanos: bigint;
  /** Of requestedNanos, what the request at hand needs: granted if the budget has it, whatever the holder's share. */
  neededNanos: bigint;
  ttlSeconds: number;
  /** Billing's clock: judges the key's expiry alone (the lease's period and lifetime are Postgres's). */
  now: Date;
  /** Id for the lease, chosen by the asker so a lost answer can be asked for again; billing picks one when absent. */
  leaseId?: string;
}

export interface BudgetLeaseGrant {
  /** Null when nothing could be granted. */
  leaseId: string | null;
  grantedNanos: bigint;
  expiresAt: Date;
  /** Budget left unleased after this grant; null when the scope is unlimited. */
  remainingNanos: bigint | null;
  /** Budget the live leases of other holders hold; 0 when the scope is unlimited. */
  leasedNanos: bigint;
  /** Granted to an earlier ask of the same lease id: this answer grants nothing more. */
  repeated?: boolean;
}

/** What one gateway replica counts in one second of a key lineage's per-minute windows. */
export interface RateUsage {
  /** The key's lineage id. */
  keyId: string;
  /** Unix second, by the counting gateway's clock. */
  second: bigint;
  requests: bigint;
  tokens: bigint;
}

export interface RateUsageSync {
  /** The gateway replica reporting. */
  holder: string;
  /** Its counts in the seconds that changed since it reported them; those of seconds before sinceSecond are dropped. */
  usage: readonly RateUsage[];
  /** The first second of the holder's window. */
  sinceSecond: bigint;
  /** The watermark of the holder's last answer; 0n answers no key's changes, only newKeyIds. */
  changesSince: bigint;
  /** Key lineages whose other holders' counts to answer in every second of the window. */
  newKeyIds: readonly string[];
  /** The holder's call: a row is replaced only by a later one's count. */
  sequence: bigint;
}

/** What the other holders count in the seconds answered, and the watermark the changes answered end at. */
export interface RateUsageAnswer {
  others: RateUsage[];
  watermark: bigint;
}

/** Cost of a request per token type, adding up to its cost. */
export interface CostBreakdown {
  inputNanos: bigint;
  cachedInputNanos: bigint;
  outputNanos: bigint;
  reasoningNanos: bigint;
}

/** What a stored batch added, per org, key and UTC day, and the transaction that added it. */
export interface RecordedUsage {
  inserted: number;
  duplicates: number;
  /** Id of the inserting transaction (Postgres xid8, decimal); empty when nothing was inserted. */
  xid: string;
  added: UsageDelta[];
}

export interface UsageDelta {
  orgId: string;
  apiKeyId: string | null;
  /** UTC day, "YYYY-MM-DD". */
  day: string;
  costNanos: bigint;
  /** Input + output tokens. */
  tokens: bigint;
}

export type DiscountKind = "volume_graduated" | "volume_all_units" | "time_window" | "promotional";

export interface VolumeTier {
  /** Matching spend of the period, before discounts, at which the tier starts. */
  fromNanos: bigint;
  discountBps: number;
}

export interface NewDiscountRule {
  orgId: string;
  name: string;
  kind: DiscountKind;
  /** Higher applies first. */
  priority: number;
  /** False: usage this rule matched gets no discount from rules of lower priority. */
  stackable: boolean;
  /** Null matches every model / provider. */
  model: string | null;
  provider: string | null;
  /** Flat kinds only; 0 for volume kinds. */
  discountBps: number;
  /** Volume kinds only, ascending. */
  tiers: VolumeTier[];
  /**
   * UTC hours [startHour, endHour), or past midnight when startHour > endHour: hours >= startHour or < endHour, the
   * ones after midnight counted to the day before. 0 and 24 outside time windows.
   */
  startHour: number;
  endHour: number;
  /** Days a window starts on, 0 = Sunday; empty means every day. */
  daysOfWeek: number[];
  /** Whole UTC hours; null is open. */
  validFrom: Date | null;
  validUntil: Date | null;
  /** Most this rule may discount per period; 0 = no cap. */
  capNanos: bigint;
}

export interface DiscountRule extends NewDiscountRule {
  id: string;
  createdAt: Date;
}

export type InvoiceStatus = "draft" | "issued" | "paid" | "void";

export type LineTokenType = "input" | "cached_input" | "output" | "reasoning" | "usage" | "discount";

export interface InvoiceLine {
  description: string;
  /** Empty for discounts. */
  model: string;
  tokenType: LineTokenType;
  quantity: bigint;
  /** Exact nano-USD; negative for discounts. */
  amountNanos: bigint;
  /** Set on discount lines only. */
  discountRuleId: string | null;
}

export interface Invoice {
  id: string;
  orgId: string;
  /** The org's name as of the draft's last build; an invoice that left draft keeps it when the org is renamed. */
  orgName: string;
  /** Given when the invoice is issued (see nextInvoiceNumber); null on a draft. */
  number: string | null;
  status: InvoiceStatus;
  periodStart: Date;
  periodEnd: Date;
  /** Empty when listed; filled when read one by one. */
  lines: InvoiceLine[];
  subtotalCents: bigint;
  discountCents: bigint;
  taxCents: bigint;
  totalCents: bigint;
  taxRateBps: number;
  createdAt: Date;
  issuedAt: Date | null;
}

/** Which page of a list: up to `limit` rows after the row `after` names (null: from the first). */
export interface PageQuery<C = string> {
  after: C | null;
  limit: number;
}

/** A page of a list, and whether rows follow it. */
export interface Page<T> {
  items: T[];
  more: boolean;
}

/** Where a page of discount rules ended: rules are deleted, so the cursor carries the sort key itself. */
export interface DiscountRuleCursor {
  priority: number;
  id: string;
}
