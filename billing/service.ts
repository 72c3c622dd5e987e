import { create } from "@bufbuild/protobuf";
import { timestampFromDate, timestampFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, type HandlerContext, type ServiceImpl } from "@connectrpc/connect";
import {
  AcquireBudgetLeaseResponseSchema,
  ApiKeySchema,
  AuthorizeKeyResponseSchema,
  BillingService,
  BudgetScope,
  CreateApiKeyResponseSchema,
  CreateDiscountRuleResponseSchema,
  CreateOrganizationResponseSchema,
  CreateProjectResponseSchema,
  DeleteDiscountRuleResponseSchema,
  DiscountRuleSchema,
  GenerateInvoiceResponseSchema,
  GetApiKeyResponseSchema,
  GetInvoiceResponseSchema,
  GetOrganizationResponseSchema,
  GetUsageSummaryResponseSchema,
  InvoiceSchema,
  KeyRefusalSchema,
  ListApiKeysResponseSchema,
  ListDiscountRulesResponseSchema,
  ListInvoicesResponseSchema,
  ListOrganizationsResponseSchema,
  ListProjectsResponseSchema,
  ListUsageRecordsResponseSchema,
  OrganizationSchema,
  ProjectSchema,
  RecordUsageResponseSchema,
  ReinstateOrganizationResponseSchema,
  ReleaseBudgetLeaseResponseSchema,
  RevokeApiKeyResponseSchema,
  RotateApiKeyResponseSchema,
  SuspendOrganizationResponseSchema,
  SyncRateUsageResponseSchema,
  UpdateApiKeyLimitsResponseSchema,
  UpdateOrganizationResponseSchema,
  UpdateInvoiceStatusResponseSchema,
  UsageRecordSchema,
  WatchKeyChangesResponseSchema,
} from "../gen/billing/v1/billing_pb.ts";
import { connectionEndingKey } from "../lib/health.ts";
import type { Logger, OutageLog } from "../lib/log.ts";
import type { BillingAuth } from "./auth.ts";
import {
  apiKeyMessage,
  discountRuleFrom,
  discountRuleMessage,
  invoiceMessage,
  invoiceStatusFrom,
  keyLimitFieldsFrom,
  keyLimitsFrom,
  unexpired,
  organizationMessage,
  projectMessage,
  tokenUsageMessage,
  usageRecordFrom,
  usageRecordMessage,
} from "./messages.ts";
import { billingPeriod } from "./period.ts";
import { createDatabaseOutageLog, toConnectError } from "./errors.ts";
import type { BillingMetrics } from "./metrics.ts";
import { idCursor, pageAsked } from "./page-token.ts";
import { organizationNotFound } from "./store/accounts.ts";
import { invoiceNotFound } from "./store/invoices.ts";
import { callSignal } from "./store/db.ts";
import type { BillingStore } from "./store/store.ts";
import type { DiscountRuleCursor, BudgetScope as StoredBudgetScope, TimeRange } from "./store/types.ts";
import type { UsageCursor } from "./store/usage.ts";
import type { UsageTracker } from "./usage-tracker.ts";
import {
  id,
  instant,
  atMost,
  intInRange,
  invalid,
  nonNegative,
  optionalId,
  periodAnchor,
  positive,
  usageBounds,
  requestId,
  text,
} from "./validate.ts";

export interface BillingServiceOptions {
  store: BillingStore;
  auth: BillingAuth;
  /** Spend so far this period, in memory; fed by RecordUsage. */
  usage: UsageTracker;
  clock: () => Date;
  log: Logger;
  /** Aborted when the process is stopping: server streams end then instead of holding shutdown. */
  stopSignal?: AbortSignal;
  metrics?: BillingMetrics;
  /** How often a key change stream with nothing to say sends an empty message (1 s by default). */
  keyChangeHeartbeatMs?: number;
  /** Where calls failing for a Postgres outage are logged; shared with the invoice pages. One of its own by default. */
  databaseOutage?: OutageLog;
}

const maxUsageBatch = 10_000;
/** Most counts, and most new key ids, one SyncRateUsage call carries. */
const maxRateSyncEntries = 10_000;
const maxInt64 = 2n ** 63n - 1n;
const budgetScopes: Partial<Record<BudgetScope, StoredBudgetScope>> = {
  [BudgetScope.ORGANIZATION]: "organization",
  [BudgetScope.API_KEY]: "api_key",
  [BudgetScope.API_KEY_TOKENS]: "api_key_tokens",
};

/** The BillingService contract over the store; every RPC authenticates its caller first. */
export function createBillingService({
  store,
  auth,
  usage,
  clock,
  log,
  stopSignal,
  metrics,
  keyChangeHeartbeatMs: heartbeatMs = 1_000,
  databaseOutage = createDatabaseOutageLog(log),
}: BillingServiceOptions): ServiceImpl<typeof BillingService> {
  const admin = (ctx: HandlerContext) => auth.requireAdmin(ctx.requestHeader);

  /** Admins read any org; an org's own valid API key reads only that org. */
  const requireOrgReader = async (ctx: HandlerContext, orgId: string): Promise<void> => {
    auth.requireOrgReader(await auth.caller(ctx.requestHeader), orgId);
  };

  const orgIdOf = (req: { orgId: string }) => id(req.orgId, "org_id");

  const impl: ServiceImpl<typeof BillingService> = {
    async createOrganization(req, ctx) {
      admin(ctx);
      const organization = await store.createOrganization(
        {
          name: text(req.name, "name"),
          taxRateBps: intInRange(req.taxRateBps, "tax_rate_bps", 0, 10_000),
          billingDay: req.billingDay === 0 ? 1 : intInRange(req.billingDay, "billing_day", 1, 28),
          monthlyBudgetNanos: nonNegative(req.monthlyBudgetNanos, "monthly_budget_nanos"),
          maxDiscountBps: intInRange(req.maxDiscountBps, "max_discount_bps", 0, 10_000),
        },
        requestId(req.requestId),
      );
      log.info("organization created", { org_id: organization.id, request_id: req.requestId || undefined });
      return create(CreateOrganizationResponseSchema, { organization: organizationMessage(organization) });
    },

    async updateOrganization(req, ctx) {
      admin(ctx);
      const orgId = orgIdOf(req);
      const organization = await store.updateOrganization(orgId, {
        name: req.name === undefined ? undefined : text(req.name, "name"),
        taxRateBps: req.taxRateBps === undefined ? undefined : intInRange(req.taxRateBps, "tax_rate_bps", 0, 10_000),
        monthlyBudgetNanos:
          req.monthlyBudgetNanos === undefined ? undefined : nonNegative(req.monthlyBudgetNanos, "monthly_budget_nanos"),
        maxDiscountBps:
          req.maxDiscountBps === undefined ? undefined : intInRange(req.maxDiscountBps, "max_discount_bps", 0, 10_000),
      });
      log.info("organization updated", { org_id: orgId });
      return create(UpdateOrganizationResponseSchema, { organization: organizationMessage(organization) });
    },

    async suspendOrganization(req, ctx) {
      admin(ctx);
      const orgId = orgIdOf(req);
      const organization = await store.setOrganizationSuspended(orgId, text(req.reason, "reason", { min: 0, max: 500 }));
      log.info("organization suspended", { org_id: orgId });
      return create(SuspendOrganizationResponseSchema, { organization: organizationMessage(organization) });
    },

    async reinstateOrganization(req, ctx) {
      admin(ctx);
      const orgId = orgIdOf(req);
      const organization = await store.setOrganizationSuspended(orgId, null);
      log.info("organization reinstated", { org_id: orgId });
      return create(ReinstateOrganizationResponseSchema, { organization: organizationMessage(organization) });
    },

    async listOrganizations(req, ctx) {
      admin(ctx);
      const page = pageAsked(req, ["ListOrganizations"], idCursor);
      const orgs = await store.listOrganizations(page);
      const { messages, nextPageToken } = page.answer(orgs, OrganizationSchema, organizationMessage, (org) => org.id);
      return create(ListOrganizationsResponseSchema, { organizations: messages, nextPageToken });
    },

    async getOrganization(req, ctx) {
      const caller = await auth.caller(ctx.requestHeader);
      const orgId = orgIdOf(req);
      auth.requireOwnRecord(caller, orgId, () => organizationNotFound(orgId));
      const organization = await store.getOrganization(orgId);
      return create(GetOrganizationResponseSchema, { organization: organizationMessage(organization) });
    },

    async createProject(req, ctx) {
      admin(ctx);
      const project = await store.createProject(
        { orgId: orgIdOf(req), name: text(req.name, "name") },
        requestId(req.requestId),
      );
      return create(CreateProjectResponseSchema, { project: projectMessage(project) });
    },

    async listProjects(req, ctx) {
      admin(ctx);
      const orgId = orgIdOf(req);
      const page = pageAsked(req, ["ListProjects", orgId], idCursor);
      const projects = await store.listProjects(orgId, page);
      const { messages, nextPageToken } = page.answer(projects, ProjectSchema, projectMessage, (project) => project.id);
      return create(ListProjectsResponseSchema, { projects: messages, nextPageToken });
    },

    async createApiKey(req, ctx) {
      admin(ctx);
      const issued = await store.createApiKey(
        {
          orgId: orgIdOf(req),
          projectId: optionalId(req.projectId, "project_id"),
          name: text(req.name, "name", { min: 0 }),
          limits: unexpired(keyLimitsFrom(req.limits), clock()),
        },
        requestId(req.requestId),
      );
      const { orgId, id: apiKeyId } = issued.apiKey;
      const fields = { org_id: orgId, api_key_id: apiKeyId, request_id: req.requestId || undefined };
      log.info(issued.secret ? "api key created" : "api key create repeated", fields);
      return create(CreateApiKeyResponseSchema, { apiKey: apiKeyMessage(issued.apiKey), secret: issued.secret });
    },

    async listApiKeys(req, ctx) {
      admin(ctx);
      const orgId = orgIdOf(req);
      const page = pageAsked(req, ["ListApiKeys", orgId, req.includeRevoked], idCursor);
      const keys = await store.listApiKeys(orgId, { includeRevoked: req.includeRevoked }, page);
      const { messages, nextPageToken } = page.answer(keys, ApiKeySchema, apiKeyMessage, (key) => key.id);
      return create(ListApiKeysResponseSchema, { apiKeys: messages, nextPageToken });
    },

    async getApiKey(req, ctx) {
      admin(ctx);
      const key = await store.getApiKey(id(req.apiKeyId, "api_key_id"));
      return create(GetApiKeyResponseSchema, { apiKey: apiKeyMessage(key) });
    },

    async revokeApiKey(req, ctx) {
      admin(ctx);
      const key = await store.revokeApiKey(id(req.apiKeyId, "api_key_id"));
      log.info("api key revoked", { org_id: key.orgId, api_key_id: key.id });
      return create(RevokeApiKeyResponseSchema, { apiKey: apiKeyMessage(key) });
    },

    async rotateApiKey(req, ctx) {
      admin(ctx);
      const issued = await store.rotateApiKey(id(req.apiKeyId, "api_key_id"));
      log.info("api key rotated", {
        org_id: issued.apiKey.orgId,
        api_key_id: issued.apiKey.id,
        previous_api_key_id: req.apiKeyId,
      });
      return create(RotateApiKeyResponseSchema, { apiKey: apiKeyMessage(issued.apiKey), secret: issued.secret });
    },

    async updateApiKeyLimits(req, ctx) {
      admin(ctx);
      const key = await store.updateApiKeyLimits(
        id(req.apiKeyId, "api_key_id"),
        keyLimitsFrom(req.limits),
        keyLimitFieldsFrom(req.updateMask),
      );
      return create(UpdateApiKeyLimitsResponseSchema, { apiKey: apiKeyMessage(key) });
    },

    async authorizeKey(req, ctx) {
      admin(ctx);
      const { apiKey, organization, lineageKeyIds } = await auth.resolveKey(req.secret, clock()).catch((e: unknown) => {
        // A key refused, not a lookup Postgres failed (Unavailable, counted with the RPC's code).
        const refused = ConnectError.from(e).findDetails(KeyRefusalSchema).length > 0;
        if (refused) metrics?.authorizations.inc({ result: "rejected" });
        throw e;
      });
      const spend = await usage.spend(organization, lineageKeyIds, ctx.signal);
      metrics?.authorizations.inc({ result: "ok" });
      // Saturated: the gateway compares these with limits, which are int64 too, so a larger total is simply over.
      const int64 = (total: bigint) => (total > maxInt64 ? maxInt64 : total);
      return create(AuthorizeKeyResponseSchema, {
        apiKey: apiKeyMessage(apiKey),
        organization: organizationMessage(organization),
        keySpentNanos: int64(spend.keySpentNanos),
        orgSpentNanos: int64(spend.orgSpentNanos),
        keyTokens: int64(spend.keyTokens),
        lineageId: lineageKeyIds[0] ?? apiKey.id,
      });
    },

    async *watchKeyChanges(_req, ctx) {
      admin(ctx);
      // It also ends as its connection goes away past its age: the gateway watches again on a new one.
      const ending = ctx.values.get(connectionEndingKey);
      const signal = AbortSignal.any(stopSignal ? [ctx.signal, stopSignal, ending] : [ctx.signal, ending]);
      // null: the watch is live (sent once billing listens, so the gateway can trust the stream from then on), or a
      // heartbeat: a gateway hearing nothing knows this stream, or this replica, has stopped, and stops trusting it.
      for await (const change of withHeartbeats(store.watchKeyChanges(signal), heartbeatMs)) {
        yield create(
          WatchKeyChangesResponseSchema,
          !change
            ? {}
            : "orgId" in change
              ? { orgId: change.orgId }
              : { apiKeyId: change.apiKeyId, secretHash: change.secretSha256, revoked: change.revoked },
        );
      }
    },

    async acquireBudgetLease(req, ctx) {
      admin(ctx);
      const scope = budgetScopes[req.scope];
      if (!scope) {
        const names = "BUDGET_SCOPE_ORGANIZATION, BUDGET_SCOPE_API_KEY or BUDGET_SCOPE_API_KEY_TOKENS";
        throw invalid("scope", `must be ${names}`);
      }
      const requestedNanos = positive(req.requestedNanos, "requested_nanos");
      const grant = await store.acquireBudgetLease({
        scope,
        scopeId: id(req.scopeId, "scope_id"),
        holder: text(req.holder, "holder"),
        requestedNanos,
        neededNanos: atMost(req.neededNanos, "needed_nanos", requestedNanos),
        ttlSeconds: intInRange(req.ttlSeconds, "ttl_seconds", 1, 3600),
        now: clock(),
        leaseId: leaseIdAsked(req.leaseId),
      });
      const result = grant.repeated
        ? "repeated"
        : grant.grantedNanos > 0n
          ? "granted"
          : grant.remainingNanos === 0n
            ? "exhausted"
            : "holder_share";
      metrics?.leases.inc({ result });
      if (!grant.repeated && scope !== "api_key_tokens") metrics?.leasedUsd.inc(Number(grant.grantedNanos) / 1e9);
      return create(AcquireBudgetLeaseResponseSchema, {
        leaseId: grant.leaseId ?? "",
        grantedNanos: grant.grantedNanos,
        expireTime: timestampFromDate(grant.expiresAt),
        remainingNanos: grant.remainingNanos ?? -1n,
        leasedNanos: grant.leasedNanos,
      });
    },

    async releaseBudgetLease(req, ctx) {
      admin(ctx);
      await store.releaseBudgetLease({
        leaseId: id(req.leaseId, "lease_id"),
        spentNanos: nonNegative(req.spentNanos, "spent_nanos"),
      });
      return create(ReleaseBudgetLeaseResponseSchema);
    },

    async syncRateUsage(req, ctx) {
      admin(ctx);
      if (req.usage.length > maxRateSyncEntries) throw invalid("usage", `at most ${maxRateSyncEntries} per call`);
      if (req.newKeyIds.length > maxRateSyncEntries) throw invalid("new_key_ids", `at most ${maxRateSyncEntries} per call`);
      const { others, watermark } = await store.syncRateUsage({
        holder: text(req.holder, "holder"),
        usage: req.usage.map((count, i) => ({
          keyId: id(count.keyId, `usage[${i}].key_id`),
          second: positive(count.second, `usage[${i}].second`),
          requests: nonNegative(count.requests, `usage[${i}].requests`),
          tokens: nonNegative(count.tokens, `usage[${i}].tokens`),
        })),
        sinceSecond: positive(req.sinceSecond, "since_second"),
        changesSince: nonNegative(req.changesSince, "changes_since"),
        newKeyIds: req.newKeyIds.map((keyId, i) => id(keyId, `new_key_ids[${i}]`)),
        sequence: positive(req.sequence, "sequence"),
      });
      return create(SyncRateUsageResponseSchema, { others, watermark });
    },

    async recordUsage(req, ctx) {
      admin(ctx);
      if (req.records.length > maxUsageBatch) throw invalid("records", `at most ${maxUsageBatch} per batch`);
      const now = clock();
      const ahead: { request_id: string; occurred_at: string }[] = [];
      const datedAhead = (requestId: string, occurredAt: Date) =>
        ahead.push({ request_id: requestId, occurred_at: occurredAt.toISOString() });
      const records = req.records.map((record, i) => usageRecordFrom(record, `records[${i}]`, now, datedAhead));
      if (ahead.length > 0) {
        log.warn("usage dated ahead of billing's clock is recorded at billing's clock: is a gateway's clock fast?", {
          records: ahead.length,
          first: ahead.slice(0, 5),
          now: now.toISOString(),
        });
      }
      const recorded = await store.recordUsage(records);
      usage.record(recorded);
      metrics?.usageRows.inc({ result: "inserted" }, recorded.inserted);
      metrics?.usageRows.inc({ result: "duplicate" }, recorded.duplicates);
      log.debug("usage recorded", { inserted: recorded.inserted, duplicates: recorded.duplicates });
      return create(RecordUsageResponseSchema, { inserted: recorded.inserted, duplicates: recorded.duplicates });
    },

    async getUsageSummary(req, ctx) {
      const orgId = orgIdOf(req);
      await requireOrgReader(ctx, orgId);
      const bounds = usageBounds(req.startTime, req.endTime);
      const range = await usageRange(orgId, bounds.start, bounds.end);
      const totals = await store.usageTotals(
        { orgId, projectId: optionalId(req.projectId, "project_id"), apiKeyId: optionalId(req.apiKeyId, "api_key_id") },
        range,
      );
      if (totals.requests === 0n) await store.getOrganization(orgId);
      // Each daily summary row fits in int64 (the schema's bigint); their sum over a range need not.
      if (Object.values(totals).some((total) => total > maxInt64)) {
        throw new ConnectError(
          "usage over this range exceeds what int64 fields can carry: ask for a shorter range",
          Code.FailedPrecondition,
        );
      }
      return create(GetUsageSummaryResponseSchema, {
        requests: totals.requests,
        usage: tokenUsageMessage(totals),
        costNanos: totals.costNanos,
      });
    },

    async listUsageRecords(req, ctx) {
      const orgId = orgIdOf(req);
      await requireOrgReader(ctx, orgId);
      const lookup = optionalId(req.requestId, "request_id");
      // The range may change from page to page, as ListRequests' may: the order and the cursor do not depend on it.
      const asked = pageAsked(req, ["ListUsageRecords", orgId, lookup], usageCursor);
      const bounds = usageBounds(req.startTime, req.endTime);
      const [start, end] = [bounds.start ?? null, bounds.end ?? null];
      const { after, limit } = asked;
      const page = await store.listUsageRecords({ orgId, requestId: lookup, start, end, after, limit });
      // An org nobody created is not_found, as in the other lists; asked only when there is nothing to list.
      if (page.items.length === 0) await store.getOrganization(orgId);
      const { messages, nextPageToken } = asked.answer(page, UsageRecordSchema, usageRecordMessage, (last) => ({
        occurredAt: last.occurredAt,
        requestId: last.requestId,
      }));
      return create(ListUsageRecordsResponseSchema, { records: messages, nextPageToken });
    },

    async createDiscountRule(req, ctx) {
      admin(ctx);
      const rule = await store.createDiscountRule(discountRuleFrom(req.rule), requestId(req.requestId));
      const fields = { org_id: rule.orgId, discount_rule_id: rule.id, request_id: req.requestId || undefined };
      log.info("discount rule created", fields);
      return create(CreateDiscountRuleResponseSchema, { rule: discountRuleMessage(rule) });
    },

    async listDiscountRules(req, ctx) {
      admin(ctx);
      const orgId = orgIdOf(req);
      const page = pageAsked(req, ["ListDiscountRules", orgId], discountRuleCursor);
      const rules = await store.listDiscountRules(orgId, page);
      const { messages, nextPageToken } = page.answer(rules, DiscountRuleSchema, discountRuleMessage, (rule) => ({
        priority: rule.priority,
        id: rule.id,
      }));
      return create(ListDiscountRulesResponseSchema, { rules: messages, nextPageToken });
    },

    async deleteDiscountRule(req, ctx) {
      admin(ctx);
      await store.deleteDiscountRule(id(req.ruleId, "rule_id"));
      log.info("discount rule deleted", { discount_rule_id: req.ruleId });
      return create(DeleteDiscountRuleResponseSchema);
    },

    async generateInvoice(req, ctx) {
      admin(ctx);
      const now = clock();
      const invoice = await store.generateInvoice({
        orgId: orgIdOf(req),
        at: req.periodTime ? periodAnchor(instant(req.periodTime, "period_time"), "period_time") : now,
        now,
      });
      metrics?.invoices.inc();
      log.info("invoice generated", { org_id: invoice.orgId, invoice_id: invoice.id, number: invoice.number });
      return create(GenerateInvoiceResponseSchema, { invoice: invoiceMessage(invoice) });
    },

    async listInvoices(req, ctx) {
      const orgId = orgIdOf(req);
      await requireOrgReader(ctx, orgId);
      const page = pageAsked(req, ["ListInvoices", orgId], idCursor);
      const invoices = await store.listInvoices(orgId, page);
      const { messages, nextPageToken } = page.answer(invoices, InvoiceSchema, invoiceMessage, (invoice) => invoice.id);
      return create(ListInvoicesResponseSchema, { invoices: messages, nextPageToken });
    },

    async getInvoice(req, ctx) {
      const caller = await auth.caller(ctx.requestHeader);
      const invoice = await store.getInvoice(id(req.invoiceId, "invoice_id"));
      auth.requireOwnRecord(caller, invoice.orgId, () => invoiceNotFound(invoice.id));
      return create(GetInvoiceResponseSchema, { invoice: invoiceMessage(invoice) });
    },

    async updateInvoiceStatus(req, ctx) {
      admin(ctx);
      const invoice = await store.updateInvoiceStatus({
        invoiceId: id(req.invoiceId, "invoice_id"),
        status: invoiceStatusFrom(req.status),
        now: clock(),
      });
      log.info("invoice status set", { invoice_id: invoice.id, status: invoice.status });
      return create(UpdateInvoiceStatusResponseSchema, { invoice: invoiceMessage(invoice) });
    },
  };

  /** [start, end) of a summary: unset bounds fall back to the billing period at now (or just before `end`). */
  async function usageRange(orgId: string, start: Date | undefined, end: Date | undefined): Promise<TimeRange> {
    if (!start || !end) {
      const org = await store.getOrganization(orgId);
      const anchor = end ? periodAnchor(new Date(end.getTime() - 1), "end_time") : clock();
      const period = billingPeriod(anchor, org.billingDay);
      if (start && start >= period.end) {
        throw invalid("start_time", `must be before the end of the current billing period, ${period.end.toISOString()}`);
      }
      // The bound derived is past the one given (start before the period's end, end after its start).
      start ??= period.start;
      end ??= period.end;
    }
    return { start, end };
  }

  return withDomainErrors(impl, log, databaseOutage);
}

/** A discount rule cursor as a token carries it: the priority and id of the rule a page ended on. */
function discountRuleCursor(value: unknown): DiscountRuleCursor | undefined {
  const { priority, id } = (typeof value === "object" && value !== null ? value : {}) as Record<string, unknown>;
  const ruleId = idCursor(id);
  return typeof priority === "number" && Number.isInteger(priority) && Math.abs(priority) < 2 ** 31 && ruleId
    ? { priority, id: ruleId }
    : undefined;
}

/** A usage records cursor as a token carries it: the time and request id of the record a page ended on. */
function usageCursor(value: unknown): UsageCursor | undefined {
  const { occurredAt, requestId } = (typeof value === "object" && value !== null ? value : {}) as Record<string, unknown>;
  if (typeof occurredAt !== "string" || typeof requestId !== "string") return undefined;
  try {
    // The same checks as the fields it stands for.
    const at = instant(timestampFromMs(Date.parse(occurredAt)), "page_token");
    return { occurredAt: at, requestId: id(requestId, "page_token") };
  } catch {
    return undefined;
  }
}

/** Applies toConnectError to every method, unary or streaming; a unary call that succeeds ends an outage. */
function withDomainErrors(
  impl: ServiceImpl<typeof BillingService>,
  log: Logger,
  outage: OutageLog,
): ServiceImpl<typeof BillingService> {
  const wrapped: Record<string, unknown> = {};
  for (const method of BillingService.methods) {
    const fn = impl[method.localName as keyof typeof impl] as (...args: unknown[]) => unknown;
    wrapped[method.localName] =
      method.methodKind === "server_streaming"
        ? async function* (...args: unknown[]) {
            try {
              yield* fn(...args) as AsyncIterable<unknown>;
            } catch (e) {
              throw toConnectError(e, log, outage);
            }
          }
        : async (...args: unknown[]) => {
            const { signal } = args[1] as HandlerContext;
            try {
              // The call's statements are cancelled once its caller leaves or its deadline passes.
              const result = await callSignal.run(signal, () => fn(...args));
              outage.recovered();
              return result;
            } catch (e) {
              // Its statement cancelled for that: the call ends as its caller did, which is no outage to log.
              if (signal.aborted) throw ConnectError.from(signal.reason);
              throw toConnectError(e, log, outage);
            }
          };
  }
  return wrapped as ServiceImpl<typeof BillingService>;
}

/** `source`'s items and, once it has yielded one, null whenever it stays silent for `everyMs`. */
async function* withHeartbeats<T>(source: AsyncIterable<T>, everyMs: number): AsyncGenerator<T | null> {
  const items = source[Symbol.asyncIterator]();
  let next = items.next();
  let started = false;
  try {
    for (;;) {
      let timer: ReturnType<typeof setTimeout> | undefined;
      const beat = new Promise<"beat">((resolve) => {
        if (started) timer = setTimeout(resolve, everyMs, "beat");
      });
      const step = await Promise.race([next, beat]);
      clearTimeout(timer);
      if (step === "beat") {
        yield null;
        continue;
      }
      if (step.done) return;
      started = true;
      next = items.next();
      yield step.value;
    }
  } finally {
    void items.return?.();
  }
}

/** A lease id chosen by the asker: "lease_" and letters and digits, 128 characters at most; empty for none. */
function leaseIdAsked(value: string): string | undefined {
  if (value === "") return undefined;
  if (!/^lease_[0-9A-Za-z]{1,122}$/.test(value)) throw invalid("lease_id", "must be lease_ and letters or digits");
  return value;
}
