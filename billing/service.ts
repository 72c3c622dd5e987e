import { create } from "@bufbuild/protobuf";
import { timestampDate, timestampFromDate } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, type HandlerContext, type ServiceImpl } from "@connectrpc/connect";
import {
  AcquireBudgetLeaseResponseSchema,
  AuthorizeKeyResponseSchema,
  BillingService,
  BudgetScope,
  CreateApiKeyResponseSchema,
  CreateOrganizationResponseSchema,
  CreateProjectResponseSchema,
  GetUsageSummaryResponseSchema,
  ListApiKeysResponseSchema,
  ListOrganizationsResponseSchema,
  ListProjectsResponseSchema,
  ListUsageRecordsResponseSchema,
  RecordUsageResponseSchema,
  ReleaseBudgetLeaseResponseSchema,
  RevokeApiKeyResponseSchema,
  RotateApiKeyResponseSchema,
  UpdateApiKeyLimitsResponseSchema,
  WatchKeyChangesResponseSchema,
} from "../gen/billing/v1/billing_pb.ts";
import { bearerToken, requireAdmin, safeEqual, sha256Hex } from "../lib/auth.ts";
import type { Logger } from "../lib/log.ts";
import {
  apiKeyMessage,
  keyLimitsFrom,
  organizationMessage,
  projectMessage,
  tokenUsageMessage,
  usageRecordFrom,
  usageRecordMessage,
} from "./messages.ts";
import { billingPeriod } from "./period.ts";
import { keySecretPrefix } from "./store/accounts.ts";
import { BillingError, type BillingErrorKind } from "./store/db.ts";
import type { BillingStore } from "./store/store.ts";
import type { TimeRange } from "./store/types.ts";
import type { UsageCursor } from "./store/usage.ts";
import { id, intInRange, invalid, nonNegative, optionalId, positive, text } from "./validate.ts";

export interface BillingServiceOptions {
  store: BillingStore;
  /** Bearer token of admins and of the other mesh services. */
  adminToken: string;
  clock: () => Date;
  log: Logger;
}

const maxUsageBatch = 10_000;
const defaultPageSize = 100;
const maxPageSize = 1000;

/** The BillingService contract over the store; every RPC authenticates its caller first. */
export function createBillingService({
  store,
  adminToken,
  clock,
  log,
}: BillingServiceOptions): ServiceImpl<typeof BillingService> {
  const admin = (ctx: HandlerContext) => requireAdmin(ctx.requestHeader, adminToken);

  /** The key and org of a presented secret; Unauthenticated when it is unknown, revoked or expired at `now`. */
  const resolveKey = async (secret: string, now: Date) => {
    const found = secret.startsWith(keySecretPrefix)
      ? await store.findApiKeyBySecretHash(sha256Hex(secret))
      : undefined;
    if (!found) throw new ConnectError("unknown api key", Code.Unauthenticated);
    const { revokedAt, limits } = found.apiKey;
    if (revokedAt) throw new ConnectError("api key revoked", Code.Unauthenticated);
    if (limits.expiresAt && limits.expiresAt <= now) throw new ConnectError("api key expired", Code.Unauthenticated);
    return found;
  };

  /** Admins read any org; an org's own valid API key reads only that org. */
  const requireOrgReader = async (ctx: HandlerContext, orgId: string): Promise<void> => {
    const token = bearerToken(ctx.requestHeader);
    if (!token) throw new ConnectError("missing bearer token", Code.Unauthenticated);
    if (safeEqual(token, adminToken)) return;
    if (!token.startsWith(keySecretPrefix)) throw new ConnectError("invalid admin token", Code.PermissionDenied);
    const { apiKey } = await resolveKey(token, clock());
    if (apiKey.orgId !== orgId) {
      throw new ConnectError("an api key may only read its own organization", Code.PermissionDenied);
    }
  };

  const orgIdOf = (req: { orgId: string }) => id(req.orgId, "org_id");

  const impl: ServiceImpl<typeof BillingService> = {
    async createOrganization(req, ctx) {
      admin(ctx);
      const organization = await store.createOrganization({
        name: text(req.name, "name"),
        taxRateBps: intInRange(req.taxRateBps, "tax_rate_bps", 0, 10_000),
        billingDay: req.billingDay === 0 ? 1 : intInRange(req.billingDay, "billing_day", 1, 28),
        monthlyBudgetNanos: nonNegative(req.monthlyBudgetNanos, "monthly_budget_nanos"),
      });
      log.info("organization created", { org_id: organization.id });
      return create(CreateOrganizationResponseSchema, { organization: organizationMessage(organization) });
    },

    async listOrganizations(_req, ctx) {
      admin(ctx);
      const organizations = await store.listOrganizations();
      return create(ListOrganizationsResponseSchema, { organizations: organizations.map(organizationMessage) });
    },

    async createProject(req, ctx) {
      admin(ctx);
      const project = await store.createProject({ orgId: orgIdOf(req), name: text(req.name, "name") });
      return create(CreateProjectResponseSchema, { project: projectMessage(project) });
    },

    async listProjects(req, ctx) {
      admin(ctx);
      const projects = await store.listProjects(orgIdOf(req));
      return create(ListProjectsResponseSchema, { projects: projects.map(projectMessage) });
    },

    async createApiKey(req, ctx) {
      admin(ctx);
      const issued = await store.createApiKey({
        orgId: orgIdOf(req),
        projectId: optionalId(req.projectId, "project_id"),
        name: text(req.name, "name", { min: 0 }),
        limits: keyLimitsFrom(req.limits),
      });
      log.info("api key created", { org_id: issued.apiKey.orgId, api_key_id: issued.apiKey.id });
      return create(CreateApiKeyResponseSchema, { apiKey: apiKeyMessage(issued.apiKey), secret: issued.secret });
    },

    async listApiKeys(req, ctx) {
      admin(ctx);
      const keys = await store.listApiKeys(orgIdOf(req), { includeRevoked: req.includeRevoked });
      return create(ListApiKeysResponseSchema, { apiKeys: keys.map(apiKeyMessage) });
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
      const key = await store.updateApiKeyLimits(id(req.apiKeyId, "api_key_id"), keyLimitsFrom(req.limits));
      return create(UpdateApiKeyLimitsResponseSchema, { apiKey: apiKeyMessage(key) });
    },

    async authorizeKey(req, ctx) {
      admin(ctx);
      const now = clock();
      const { apiKey, organization } = await resolveKey(req.secret, now);
      const spend = await store.periodSpend(
        { orgId: organization.id, apiKeyId: apiKey.id },
        billingPeriod(now, organization.billingDay),
      );
      return create(AuthorizeKeyResponseSchema, {
        apiKey: apiKeyMessage(apiKey),
        organization: organizationMessage(organization),
        keySpentNanos: spend.keySpentNanos,
        orgSpentNanos: spend.orgSpentNanos,
        keyTokens: spend.keyTokens,
      });
    },

    async *watchKeyChanges(_req, ctx) {
      admin(ctx);
      for await (const change of store.watchKeyChanges(ctx.signal)) {
        yield create(WatchKeyChangesResponseSchema, {
          apiKeyId: change.apiKeyId,
          secretHash: change.secretSha256,
          revoked: change.revoked,
        });
      }
    },

    async acquireBudgetLease(req, ctx) {
      admin(ctx);
      const scope =
        req.scope === BudgetScope.ORGANIZATION ? "organization" : req.scope === BudgetScope.API_KEY ? "api_key" : null;
      if (!scope) throw invalid("scope", "must be BUDGET_SCOPE_ORGANIZATION or BUDGET_SCOPE_API_KEY");
      const grant = await store.acquireBudgetLease({
        scope,
        scopeId: id(req.scopeId, "scope_id"),
        holder: text(req.holder, "holder"),
        requestedNanos: positive(req.requestedNanos, "requested_nanos"),
        ttlSeconds: intInRange(req.ttlSeconds, "ttl_seconds", 1, 3600),
        now: clock(),
      });
      return create(AcquireBudgetLeaseResponseSchema, {
        leaseId: grant.leaseId ?? "",
        grantedNanos: grant.grantedNanos,
        expireTime: timestampFromDate(grant.expiresAt),
        remainingNanos: grant.remainingNanos ?? -1n,
      });
    },

    async releaseBudgetLease(req, ctx) {
      admin(ctx);
      await store.releaseBudgetLease({
        leaseId: id(req.leaseId, "lease_id"),
        spentNanos: nonNegative(req.spentNanos, "spent_nanos"),
        now: clock(),
      });
      return create(ReleaseBudgetLeaseResponseSchema);
    },

    async recordUsage(req, ctx) {
      admin(ctx);
      if (req.records.length > maxUsageBatch) throw invalid("records", `at most ${maxUsageBatch} per batch`);
      const records = req.records.map((record, i) => usageRecordFrom(record, `records[${i}]`));
      const result = await store.recordUsage(records);
      log.debug("usage recorded", result);
      return create(RecordUsageResponseSchema, result);
    },

    async getUsageSummary(req, ctx) {
      const orgId = orgIdOf(req);
      await requireOrgReader(ctx, orgId);
      const range = await usageRange(
        orgId,
        req.startTime && timestampDate(req.startTime),
        req.endTime && timestampDate(req.endTime),
      );
      const totals = await store.usageTotals(
        { orgId, projectId: optionalId(req.projectId, "project_id"), apiKeyId: optionalId(req.apiKeyId, "api_key_id") },
        range,
      );
      return create(GetUsageSummaryResponseSchema, {
        requests: totals.requests,
        usage: tokenUsageMessage(totals),
        costNanos: totals.costNanos,
      });
    },

    async listUsageRecords(req, ctx) {
      const orgId = orgIdOf(req);
      await requireOrgReader(ctx, orgId);
      const limit = req.pageSize === 0 ? defaultPageSize : intInRange(req.pageSize, "page_size", 1, maxPageSize);
      const page = await store.listUsageRecords({
        orgId,
        requestId: optionalId(req.requestId, "request_id"),
        start: req.startTime ? timestampDate(req.startTime) : null,
        end: req.endTime ? timestampDate(req.endTime) : null,
        after: req.pageToken ? decodePageToken(req.pageToken) : null,
        limit,
      });
      const last = page.records.at(-1);
      return create(ListUsageRecordsResponseSchema, {
        records: page.records.map(usageRecordMessage),
        nextPageToken: page.more && last ? encodePageToken(last) : "",
      });
    },

    createDiscountRule: unimplemented,
    listDiscountRules: unimplemented,
    deleteDiscountRule: unimplemented,
    generateInvoice: unimplemented,
    listInvoices: unimplemented,
    getInvoice: unimplemented,
    updateInvoiceStatus: unimplemented,
  };

  /** [start, end) of a summary: unset bounds fall back to the billing period at now (or just before `end`). */
  async function usageRange(orgId: string, start: Date | undefined, end: Date | undefined): Promise<TimeRange> {
    if (!start || !end) {
      const org = await store.getOrganization(orgId);
      const period = billingPeriod(end ? new Date(end.getTime() - 1) : clock(), org.billingDay);
      start ??= period.start;
      end ??= period.end;
    }
    if (start >= end) throw invalid("end_time", "must be after start_time");
    return { start, end };
  }

  return withDomainErrors(impl, log);
}

function unimplemented(): never {
  throw new ConnectError("not implemented yet", Code.Unimplemented);
}

function encodePageToken(cursor: UsageCursor): string {
  return Buffer.from(JSON.stringify([cursor.occurredAt.toISOString(), cursor.requestId])).toString("base64url");
}

function decodePageToken(token: string): UsageCursor {
  try {
    const [at, requestId] = JSON.parse(Buffer.from(token, "base64url").toString("utf8")) as [string, string];
    const occurredAt = new Date(at);
    if (typeof requestId !== "string" || Number.isNaN(occurredAt.getTime())) throw new Error("bad cursor");
    return { occurredAt, requestId };
  } catch {
    throw invalid("page_token", "not a token from a previous response");
  }
}

const codes: Record<BillingErrorKind, Code> = {
  not_found: Code.NotFound,
  already_exists: Code.AlreadyExists,
  invalid_argument: Code.InvalidArgument,
  failed_precondition: Code.FailedPrecondition,
  resource_exhausted: Code.ResourceExhausted,
  unavailable: Code.Unavailable,
};

/** The one mapping from domain errors to Connect codes; unexpected errors are logged and reported as Internal. */
function toConnectError(e: unknown, log: Logger): ConnectError {
  if (e instanceof ConnectError) return e;
  if (e instanceof BillingError) return new ConnectError(e.message, codes[e.kind]);
  log.error("billing rpc failed", { err: e });
  return new ConnectError("internal error", Code.Internal);
}

/** Applies toConnectError to every method, unary or streaming. */
function withDomainErrors(
  impl: ServiceImpl<typeof BillingService>,
  log: Logger,
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
              throw toConnectError(e, log);
            }
          }
        : async (...args: unknown[]) => {
            try {
              return await fn(...args);
            } catch (e) {
              throw toConnectError(e, log);
            }
          };
  }
  return wrapped as ServiceImpl<typeof BillingService>;
}
