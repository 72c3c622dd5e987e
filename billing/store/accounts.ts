import { randomBytes } from "node:crypto";
import { ulid } from "ulid";
import { keySecretLength, keySecretPrefix, sha256Hex } from "../../lib/auth.ts";
import { BillingError, type Db, pageOf, type Queryable, requestSha256 } from "./db.ts";
import type {
  ApiKey,
  IssuedApiKey,
  KeyLimits,
  NewApiKey,
  NewOrganization,
  Organization,
  OrganizationChanges,
  Page,
  PageQuery,
  Project,
} from "./types.ts";

// A secret is keySecretPrefix and keySecretLength base62 characters from a CSPRNG.
const visiblePrefixLength = keySecretPrefix.length + 4;
const base62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/** Postgres channel on which key revocations and limit changes are announced at commit. */
export const keyChangesChannel = "billing_key_changes";
// Select expression over a changed api_keys row; NOTIFY is transactional, so watchers hear only committed changes.
const announceKeyChange = `pg_notify('${keyChangesChannel}', json_build_object('apiKeyId', id,
  'secretSha256', secret_sha256, 'revoked', revoked_at IS NOT NULL)::text) AS announced`;

const orgFields = [
  "id",
  "name",
  "tax_rate_bps",
  "billing_day",
  "monthly_budget_nanos",
  "max_discount_bps",
  "created_at",
  "suspended_at",
  "suspend_reason",
] as const;
const keyFields = [
  "id",
  "org_id",
  "project_id",
  "name",
  "prefix",
  "secret_sha256",
  "monthly_budget_nanos",
  "monthly_tokens",
  "requests_per_minute",
  "tokens_per_minute",
  "max_concurrent_requests",
  "allowed_models",
  "expires_at",
  "created_at",
  "revoked_at",
  "rotated_from",
] as const;
const orgColumns = orgFields.join(", ");
const keyColumns = keyFields.join(", ");
const projectColumns = "id, org_id, name, created_at";

interface OrgRow {
  id: string;
  name: string;
  tax_rate_bps: number;
  billing_day: number;
  monthly_budget_nanos: string;
  max_discount_bps: number;
  created_at: Date;
  suspended_at: Date | null;
  suspend_reason: string;
}

interface ProjectRow {
  id: string;
  org_id: string;
  name: string;
  created_at: Date;
}

interface KeyRow {
  id: string;
  org_id: string;
  project_id: string | null;
  name: string;
  prefix: string;
  secret_sha256: string;
  monthly_budget_nanos: string;
  monthly_tokens: string;
  requests_per_minute: number;
  tokens_per_minute: string;
  max_concurrent_requests: number;
  allowed_models: string[];
  expires_at: Date | null;
  created_at: Date;
  revoked_at: Date | null;
  rotated_from: string | null;
}

/** What a create that made nothing because its request_id was taken reads back to compare with. */
interface Repeatable {
  id: string;
  request_sha256: string;
}

/**
 * The row a create of `requestId` made earlier (committed by the create that took the request_id first: an insert
 * meeting it waits for that one to end), when it asked for the same content; already_exists naming the row when not.
 */
function sameRequest<R extends Repeatable>(
  earlier: R | undefined,
  requestId: string | null,
  sha256: string | null,
  noun: string,
  other: string,
): R {
  if (!earlier) throw new Error(`${noun} of request_id ${requestId} neither inserted nor found`);
  if (earlier.request_sha256 !== sha256) {
    throw new BillingError("already_exists", `request_id ${requestId} was already used to create ${noun} ${earlier.id}, of ${other}`);
  }
  return earlier;
}

/**
 * The rows of a create's insert, or with a `requestId` none when it found its name taken (the refusal kept): the same
 * create sent twice at once can pass ON CONFLICT's check of the request_id in both before either has inserted, and the
 * later then meets the earlier's row on its name once that commits. Its caller reads the request_id's row back, and
 * rethrows the refusal only when there is none: the name is another create's.
 */
async function insertOrNameTaken<R>(
  insert: Promise<R[]>,
  requestId: string | null,
): Promise<{ rows: R[]; nameTaken?: BillingError }> {
  try {
    return { rows: await insert };
  } catch (e) {
    if (requestId === null || !(e instanceof BillingError) || e.kind !== "already_exists") throw e;
    return { rows: [], nameTaken: e };
  }
}

/** The answer for an org that does not exist, and for another org's to an org's key (BillingAuth.requireOwnRecord). */
export const organizationNotFound = (orgId: string) => new BillingError("not_found", `organization ${orgId} not found`);

export function createAccountStore(db: Db) {
  const requireOrganization = async (orgId: string) => {
    const rows = await db.query<OrgRow>(`SELECT ${orgColumns} FROM organizations WHERE id = $1`, [orgId]);
    if (!rows[0]) throw organizationNotFound(orgId);
    return toOrganization(rows[0]);
  };

  const insertKey = async (
    q: Queryable,
    key: NewApiKey,
    rotatedFrom: string | null,
    requestId: string | null = null,
  ): Promise<IssuedApiKey> => {
    const secret = generateSecret();
    const sha256 = requestId === null ? null : requestSha256(repeatableContent(key));
    const rows = await q.query<KeyRow>(
      `INSERT INTO api_keys (id, org_id, project_id, name, prefix, secret_sha256, monthly_budget_nanos, monthly_tokens,
         requests_per_minute, tokens_per_minute, max_concurrent_requests, allowed_models, expires_at, rotated_from,
         request_id, request_sha256)
       VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)
       ON CONFLICT (org_id, request_id) DO NOTHING
       RETURNING ${keyColumns}`,
      [
        `key_${ulid()}`,
        key.orgId,
        key.projectId,
        key.name,
        secret.slice(0, visiblePrefixLength),
        sha256Hex(secret),
        ...limitParams(key.limits),
        rotatedFrom,
        requestId,
        sha256,
      ],
    );
    if (rows[0]) return { apiKey: toApiKey(rows[0]), secret };
    const [earlier] = await q.query<KeyRow & Repeatable>(
      `SELECT ${keyColumns}, request_sha256 FROM api_keys WHERE org_id = $1 AND request_id = $2`,
      [key.orgId, requestId],
    );
    return { apiKey: toApiKey(sameRequest(earlier, requestId, sha256, "api key", "another project, name or limits")), secret: "" };
  };

  // Why a statement on an active key matched no row: the key is unknown, or revoked (naming the key it was rotated
  // into, which is where a change meant for it belongs); undefined when it exists and is not revoked.
  const inactiveKeyError = async (q: Queryable, apiKeyId: string): Promise<BillingError | undefined> => {
    const [found] = await q.query<{ revoked: boolean; successor: string | null }>(
      `SELECT k.revoked_at IS NOT NULL AS revoked,
         (SELECT s.id FROM api_keys s WHERE s.rotated_from = k.id) AS successor
       FROM api_keys k WHERE k.id = $1`,
      [apiKeyId],
    );
    if (!found) return new BillingError("not_found", `api key ${apiKeyId} not found`);
    if (!found.revoked) return undefined;
    const rotated = found.successor ? ` (rotated into ${found.successor})` : "";
    return new BillingError("failed_precondition", `api key ${apiKeyId} is revoked${rotated}`);
  };

  return {
    /**
     * Creates an org. With a `requestId` used before, creates nothing and answers with the org created then, as it is
     * now, or already_exists when that asked for another; of two at once, one creates and the other waits.
     */
    async createOrganization(org: NewOrganization, requestId: string | null = null): Promise<Organization> {
      const sha256 = requestId === null ? null : requestSha256(org);
      const insert = db.query<OrgRow>(
        `INSERT INTO organizations (id, name, tax_rate_bps, billing_day, monthly_budget_nanos, max_discount_bps,
           request_id, request_sha256)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (request_id) DO NOTHING
         RETURNING ${orgColumns}`,
        [
          `org_${ulid()}`,
          org.name,
          org.taxRateBps,
          org.billingDay,
          org.monthlyBudgetNanos.toString(),
          org.maxDiscountBps,
          requestId,
          sha256,
        ],
      );
      const { rows, nameTaken } = await insertOrNameTaken(insert, requestId);
      if (rows[0]) return toOrganization(rows[0]);
      const [earlier] = await db.query<OrgRow & Repeatable>(
        `SELECT ${orgColumns}, request_sha256 FROM organizations WHERE request_id = $1`,
        [requestId],
      );
      if (!earlier && nameTaken) throw nameTaken;
      return toOrganization(sameRequest(earlier, requestId, sha256, "organization", "another name or settings"));
    },

    /** Oldest first; a page after an org goes on from it by its creation time and id, neither of which changes. */
    async listOrganizations(page: PageQuery): Promise<Page<Organization>> {
      const rows = await db.query<OrgRow>(
        `SELECT ${orgColumns} FROM organizations
         WHERE $1::text IS NULL OR (created_at, id) > (SELECT created_at, id FROM organizations WHERE id = $1)
         ORDER BY created_at, id
         LIMIT $2`,
        [page.after, page.limit + 1],
      );
      return pageOf(rows.map(toOrganization), page);
    },

    getOrganization(orgId: string): Promise<Organization> {
      return requireOrganization(orgId);
    },

    /**
     * Applies the changes given and announces the org to watchers at commit, so gateways re-authorize its keys and
     * pick up the org's new budget.
     */
    async updateOrganization(orgId: string, changes: OrganizationChanges): Promise<Organization> {
      const rows = await db.query<OrgRow>(
        `WITH updated AS (
           UPDATE organizations SET name = coalesce($2, name), tax_rate_bps = coalesce($3, tax_rate_bps),
             monthly_budget_nanos = coalesce($4, monthly_budget_nanos),
             max_discount_bps = coalesce($5, max_discount_bps)
           WHERE id = $1 RETURNING ${orgColumns}
         )
         SELECT updated.*, pg_notify('${keyChangesChannel}', json_build_object('orgId', id)::text) FROM updated`,
        [
          orgId,
          changes.name ?? null,
          changes.taxRateBps ?? null,
          changes.monthlyBudgetNanos?.toString() ?? null,
          changes.maxDiscountBps ?? null,
        ],
      );
      if (!rows[0]) throw organizationNotFound(orgId);
      return toOrganization(rows[0]);
    },

    /**
     * Suspends the org (keeping when it was first suspended, replacing the reason) or, with `reason` null, reinstates
     * it; announces the org to watchers at commit, so gateways re-authorize its keys at once.
     */
    async setOrganizationSuspended(orgId: string, reason: string | null): Promise<Organization> {
      const rows = await db.query<OrgRow>(
        `WITH updated AS (
           UPDATE organizations SET
             suspended_at = CASE WHEN $2::text IS NULL THEN NULL ELSE coalesce(suspended_at, now()) END,
             suspend_reason = coalesce($2, '')
           WHERE id = $1 RETURNING ${orgColumns}
         )
         SELECT updated.*, pg_notify('${keyChangesChannel}', json_build_object('orgId', id)::text) FROM updated`,
        [orgId, reason],
      );
      if (!rows[0]) throw organizationNotFound(orgId);
      return toOrganization(rows[0]);
    },

    /** Creates a project; a `requestId` repeated makes it safe to retry, as createOrganization's. */
    async createProject(project: { orgId: string; name: string }, requestId: string | null = null): Promise<Project> {
      const sha256 = requestId === null ? null : requestSha256(project);
      const insert = db.query<ProjectRow>(
        `INSERT INTO projects (id, org_id, name, request_id, request_sha256) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (org_id, request_id) DO NOTHING
         RETURNING ${projectColumns}`,
        [`proj_${ulid()}`, project.orgId, project.name, requestId, sha256],
      );
      const { rows, nameTaken } = await insertOrNameTaken(insert, requestId);
      if (rows[0]) return toProject(rows[0]);
      const [earlier] = await db.query<ProjectRow & Repeatable>(
        `SELECT ${projectColumns}, request_sha256 FROM projects WHERE org_id = $1 AND request_id = $2`,
        [project.orgId, requestId],
      );
      if (!earlier && nameTaken) throw nameTaken;
      return toProject(sameRequest(earlier, requestId, sha256, "project", "another name"));
    },

    /** Oldest first, paged as listOrganizations; a page after a project of another org is empty, as after none. */
    async listProjects(orgId: string, page: PageQuery): Promise<Page<Project>> {
      const rows = await db.query<ProjectRow>(
        `SELECT ${projectColumns} FROM projects
         WHERE org_id = $1
           AND ($2::text IS NULL OR (created_at, id) > (SELECT created_at, id FROM projects WHERE id = $2 AND org_id = $1))
         ORDER BY created_at, id
         LIMIT $3`,
        [orgId, page.after, page.limit + 1],
      );
      if (rows.length === 0) await requireOrganization(orgId);
      return pageOf(rows.map(toProject), page);
    },

    /**
     * Issues a key. With a `requestId` its org used before, issues nothing and answers with the key issued then, its
     * secret empty, or already_exists when that asked for another key; of two at once, one issues and the other waits.
     */
    createApiKey(key: NewApiKey, requestId: string | null = null): Promise<IssuedApiKey> {
      return insertKey(db, key, null, requestId);
    },

    /**
     * Oldest first, paged as listOrganizations (keys are never deleted, so the key a page ended on is there); a page
     * after a key of another org is empty, as after none.
     */
    async listApiKeys(orgId: string, options: { includeRevoked: boolean }, page: PageQuery): Promise<Page<ApiKey>> {
      const rows = await db.query<KeyRow>(
        `SELECT ${keyColumns} FROM api_keys
         WHERE org_id = $1 AND ($2 OR revoked_at IS NULL)
           AND ($3::text IS NULL OR (created_at, id) > (SELECT created_at, id FROM api_keys WHERE id = $3 AND org_id = $1))
         ORDER BY created_at, id
         LIMIT $4`,
        [orgId, options.includeRevoked, page.after, page.limit + 1],
      );
      if (rows.length === 0) await requireOrganization(orgId);
      return pageOf(rows.map(toApiKey), page);
    },

    /** A key by id, revoked or not, whatever its org. */
    async getApiKey(apiKeyId: string): Promise<ApiKey> {
      const rows = await db.query<KeyRow>(`SELECT ${keyColumns} FROM api_keys WHERE id = $1`, [apiKeyId]);
      if (!rows[0]) throw new BillingError("not_found", `api key ${apiKeyId} not found`);
      return toApiKey(rows[0]);
    },

    /** Revokes a key (a no-op when it already is) and announces it to watchers at commit. */
    async revokeApiKey(apiKeyId: string): Promise<ApiKey> {
      const rows = await db.query<KeyRow>(
        `WITH revoked AS (
           UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1 RETURNING ${keyColumns}
         )
         SELECT revoked.*, ${announceKeyChange} FROM revoked`,
        [apiKeyId],
      );
      if (!rows[0]) throw new BillingError("not_found", `api key ${apiKeyId} not found`);
      return toApiKey(rows[0]);
    },

    /**
     * Revokes an active key and issues a new one with the same owner, name and limits, atomically. The new key joins
     * the old one's lineage (schema trigger), so the period's spend and tokens so far keep counting against its limits.
     */
    rotateApiKey(apiKeyId: string): Promise<IssuedApiKey> {
      return db.transaction(async (tx) => {
        const rows = await tx.query<KeyRow>(
          `WITH revoked AS (
             UPDATE api_keys SET revoked_at = now()
             WHERE id = $1 AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())
             RETURNING ${keyColumns}
           )
           SELECT revoked.*, ${announceKeyChange} FROM revoked`,
          [apiKeyId],
        );
        const old = rows[0];
        if (!old) {
          // An expired key's limits would give its successor the same past expiry: a key born dead.
          throw (
            (await inactiveKeyError(tx, apiKeyId)) ??
            new BillingError(
              "failed_precondition",
              `api key ${apiKeyId} has expired: change its expire_time (UpdateApiKeyLimits) or create a new key`,
            )
          );
        }
        const { orgId, projectId, name, limits } = toApiKey(old);
        return insertKey(tx, { orgId, projectId, name, limits }, apiKeyId);
      });
    },

    /**
     * Sets the limits named in `fields` (all of them by default) from `limits`, leaving the others as they are, in one
     * statement: concurrent updates of different limits both hold. Announces the change to watchers at commit.
     * A revoked key's limits are history: a change that waited on a rotation's lock is refused, not lost on it.
     */
    async updateApiKeyLimits(
      apiKeyId: string,
      limits: KeyLimits,
      fields: readonly (keyof KeyLimits)[] = keyLimitFields,
    ): Promise<ApiKey> {
      const rows = await db.query<KeyRow>(
        `WITH updated AS (
           UPDATE api_keys SET
             monthly_budget_nanos = CASE WHEN 'monthlyBudgetNanos' = ANY($9) THEN $2 ELSE monthly_budget_nanos END,
             monthly_tokens = CASE WHEN 'monthlyTokens' = ANY($9) THEN $3 ELSE monthly_tokens END,
             requests_per_minute = CASE WHEN 'requestsPerMinute' = ANY($9) THEN $4 ELSE requests_per_minute END,
             tokens_per_minute = CASE WHEN 'tokensPerMinute' = ANY($9) THEN $5 ELSE tokens_per_minute END,
             max_concurrent_requests =
               CASE WHEN 'maxConcurrentRequests' = ANY($9) THEN $6 ELSE max_concurrent_requests END,
             allowed_models = CASE WHEN 'allowedModels' = ANY($9) THEN $7 ELSE allowed_models END,
             expires_at = CASE WHEN 'expiresAt' = ANY($9) THEN $8 ELSE expires_at END
           WHERE id = $1 AND revoked_at IS NULL RETURNING ${keyColumns}
         )
         SELECT updated.*, ${announceKeyChange} FROM updated`,
        [apiKeyId, ...limitParams(limits), fields],
      );
      if (!rows[0]) throw (await inactiveKeyError(db, apiKeyId)) ?? new Error(`api key ${apiKeyId} was not updated`);
      return toApiKey(rows[0]);
    },

    /**
     * The key with this secret hash, revoked or not, its organization, and the ids of its lineage (the key and those
     * it was rotated from, or rotated into), whose usage counts against its limits; undefined when unknown.
     */
    async findApiKeyBySecretHash(
      secretSha256: string,
    ): Promise<{ apiKey: ApiKey; organization: Organization; lineageKeyIds: string[] } | undefined> {
      // Organization columns come back prefixed so they cannot shadow the key's own.
      const rows = await db.query<Record<string, never> & { lineage_key_ids: string[] }>(
        `SELECT ${keyFields.map((f) => `k.${f}`).join(", ")},
           ${orgFields.map((f) => `o.${f} AS organization_${f}`).join(", ")},
           array(SELECT l.id FROM api_keys l WHERE l.lineage_id = k.lineage_id ORDER BY l.created_at, l.id)
             AS lineage_key_ids
         FROM api_keys k JOIN organizations o ON o.id = k.org_id
         WHERE k.secret_sha256 = $1`,
        [secretSha256],
      );
      const row = rows[0];
      if (!row) return undefined;
      const org = Object.fromEntries(orgFields.map((f) => [f, row[`organization_${f}`]])) as unknown as OrgRow;
      return {
        apiKey: toApiKey(row as unknown as KeyRow),
        organization: toOrganization(org),
        lineageKeyIds: row.lineage_key_ids,
      };
    },
  };
}

function generateSecret(): string {
  let out = keySecretPrefix;
  while (out.length < keySecretPrefix.length + keySecretLength) {
    for (const byte of randomBytes(64)) {
      // Rejection sampling keeps every character equally likely (248 = 4 * 62).
      if (byte < 248 && out.length < keySecretPrefix.length + keySecretLength) out += base62[byte % 62];
    }
  }
  return out;
}

/** Every limit a key has, in the order of limitParams. */
export const keyLimitFields = [
  "monthlyBudgetNanos",
  "monthlyTokens",
  "requestsPerMinute",
  "tokensPerMinute",
  "maxConcurrentRequests",
  "allowedModels",
  "expiresAt",
] as const satisfies readonly (keyof KeyLimits)[];

function limitParams(limits: KeyLimits): unknown[] {
  return [
    limits.monthlyBudgetNanos.toString(),
    limits.monthlyTokens.toString(),
    limits.requestsPerMinute,
    limits.tokensPerMinute.toString(),
    limits.maxConcurrentRequests,
    limits.allowedModels,
    limits.expiresAt,
  ];
}

/**
 * What a create's request_id is compared on: a key without a concurrency limit as keys were before that limit existed,
 * so a create sent again across that upgrade still finds its key rather than ALREADY_EXISTS.
 */
function repeatableContent(key: NewApiKey): object {
  if (key.limits.maxConcurrentRequests !== 0) return key;
  const { maxConcurrentRequests: _, ...limits } = key.limits;
  return { ...key, limits };
}

function toOrganization(row: OrgRow): Organization {
  return {
    id: row.id,
    name: row.name,
    taxRateBps: row.tax_rate_bps,
    billingDay: row.billing_day,
    monthlyBudgetNanos: BigInt(row.monthly_budget_nanos),
    maxDiscountBps: row.max_discount_bps,
    createdAt: row.created_at,
    suspendedAt: row.suspended_at,
    suspendReason: row.suspend_reason,
  };
}

function toProject(row: ProjectRow): Project {
  return { id: row.id, orgId: row.org_id, name: row.name, createdAt: row.created_at };
}

function toApiKey(row: KeyRow): ApiKey {
  return {
    id: row.id,
    orgId: row.org_id,
    projectId: row.project_id,
    name: row.name,
    prefix: row.prefix,
    secretSha256: row.secret_sha256,
    limits: {
      monthlyBudgetNanos: BigInt(row.monthly_budget_nanos),
      monthlyTokens: BigInt(row.monthly_tokens),
      requestsPerMinute: row.requests_per_minute,
      tokensPerMinute: BigInt(row.tokens_per_minute),
      maxConcurrentRequests: row.max_concurrent_requests,
      allowedModels: row.allowed_models,
      expiresAt: row.expires_at,
    },
    createdAt: row.created_at,
    revokedAt: row.revoked_at,
    rotatedFromId: row.rotated_from,
  };
}
