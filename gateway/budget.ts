import type { Client } from "@connectrpc/connect";
import { Code, ConnectError } from "@connectrpc/connect";
import type { ChatCompletionMessageParam } from "openai/resources/chat/completions";
import { Counter, type Registry } from "prom-client";
import { ulid } from "ulid";
import { type BillingService, BudgetScope } from "../gen/billing/v1/billing_pb.ts";
import { billingPeriod } from "../lib/billing-period.ts";
import { createOutageLog, type Logger } from "../lib/log.ts";
import { costNanos, type Price } from "../lib/money.ts";
import { unlessAborted } from "../lib/waiters.ts";
import type { Principal } from "./auth.ts";
import {
  clientGone,
  insufficientQuota,
  internal,
  organizationSuspended,
  serviceUnavailable,
  unauthorized,
} from "./errors.ts";
import type { ChatRequest } from "./providers/provider.ts";
import { maxImageTokens } from "./image-tokens.ts";
import type { PromptPart, ResponsesPrompt } from "./responses-request.ts";

/**
 * Budget enforcement through billing's leases (DESIGN.md section 5), with no billing round trip on
 * the request path while a lease has room.
 *
 * For every budget a request draws on (its org's and its key's, whichever are set) the gateway holds
 * leases: slices of the remaining monthly budget that billing granted atomically, so all replicas
 * together never hold more than the budget. Before calling upstream, a request reserves the most it
 * can cost (`maxChatSpend`) against every such budget; when it ends it settles at its actual cost
 * and the difference returns to the lease. A scope whose leases run low is topped up in the
 * background, sized by its recent spend rate; drained, idle or soon-expiring leases are released to
 * billing with what was spent from them (so are a refused request's idle leases of its other budgets, giveBackOthers),
 * and every lease is released on shutdown. Each grant is asked for under a lease
 * id chosen here, so one whose answer was lost is asked for again, or released, by that id, never granted twice.
 * A reservation is drawn from at most four leases of each budget, so a request's usage record names at most the 12
 * budget charges billing takes; room spread
 * over more leases than that is not spent by one request: it gets a lease of its own, granted by billing like any other.
 *
 * A key's monthly tokens are a budget too, in tokens: leases of BUDGET_SCOPE_API_KEY_TOKENS hold tokens of the key's
 * monthly_tokens, a request reserves its most input + output tokens against them (the bounds its cost is reserved at)
 * and settles at the tokens it used, so the limit holds across replicas as money does, with the same bound.
 *
 * Overshoot bound: a budget's settled spend can exceed it only by the sum over requests of
 * max(0, actual cost - reserved maximum). Concurrency adds nothing: a reservation is taken from
 * granted lease money before the upstream is called, and grants never exceed the budget. The
 * reserved maximum is input tokens bounded by the prompt's UTF-8 bytes (byte-level BPE never
 * yields more tokens than bytes) plus framing, a fixed bound per file or audio part
 * (`partTokensBound`), each image at the most the route's upstream models bill for it (maxImageTokens),
 * and output of max_completion_tokens / max_tokens, the larger of both (or the model's configured
 * cap) times n, each at the dearest price of its kind. So overshoot happens only when an upstream
 * bills more output than the cap it was given (ignores max_tokens, or the client set none and the
 * reply outgrew the configured cap), an image, file or audio part costs more than its bound, or a
 * retry or fallback follows an attempt that lost a prompt its upstream had: each such prompt is
 * metered (core.ts callUpstream) on top of the one reserved.
 */

/** What budgets count of a request: its cost, and its input + output tokens (a key's monthly tokens). */
export interface Spend {
  nanos: bigint;
  tokens: bigint;
}

export interface Reservation {
  /**
   * Charges what the request used and returns the rest to the leases; only the first call counts. Returns what was
   * drawn from each lease (each budget pays the whole cost, or all the tokens), for the request's usage record: billing
   * counts a released lease's spend only as far as the usage recorded against it does not.
   */
  settle(used: Spend): LeaseCharge[];
}

/** What a request drew from one lease: nano-USD from a budget's, tokens from a key's monthly tokens' (the other 0). */
export interface LeaseCharge {
  leaseId: string;
  nanos: bigint;
  tokens: bigint;
}

export interface BudgetKeeper {
  /**
   * Reserves the most a request may use (`most`: its cost, and its tokens where its key has monthly tokens) against
   * every budget of the principal for at most `holdMs`; throws a 429 (insufficient_quota) when a budget cannot cover
   * it, or 503 when billing cannot be asked. Stops waiting on billing once `signal` aborts (the client left, the
   * gateway cut the request), reserving nothing, and throws why.
   */
  reserve(principal: Principal, most: Spend, holdMs: number, signal?: AbortSignal): Promise<Reservation>;
  /**
   * Gives a revoked key's leases back to billing: those no request is using at once, the others as their last
   * request settles. A rotated key's successor shares its budget, and billing counts these leases against it until
   * they are released. A key billing refused in a check begun at `refusedAt` (by the key authorizer's clock; expired,
   * or its org suspended) may work again: a principal of it authorized after that keeps leases as before.
   */
  releaseKey(apiKeyId: string, refusedAt?: number): void;
  /** Stops background work and releases every lease to billing, reporting what was spent. */
  close(): Promise<void>;
  /** Local accounting per scope ("organization:<id>", "api_key:<id>", "api_key_tokens:<id>"), for tests. */
  snapshot(): Map<string, ScopeSnapshot>;
}

/** In the scope's unit: nano-USD, or tokens. */
export interface ScopeSnapshot {
  leases: number;
  grantedNanos: bigint;
  spentNanos: bigint;
  reservedNanos: bigint;
}

export interface BudgetKeeperOptions {
  billing: Pick<Client<typeof BillingService>, "acquireBudgetLease" | "releaseBudgetLease">;
  /**
   * This replica's name in billing's lease table, where each keeper adds its own suffix: a replica restarted under
   * the same name (a pod's container after a crash) is another holder, whose share of a budget the leases stranded
   * by its past life do not use up.
   */
  holder: string;
  /** Lifetime asked for each lease; must exceed the longest request plus `settleMarginMs`. */
  leaseTtlSeconds: number;
  /** A new lease covers about this many seconds of the scope's recent spend. */
  leaseHorizonSeconds?: number;
  /** Smallest lease asked for. */
  minLeaseNanos?: bigint;
  /** Largest lease asked for (unless one request needs more). */
  maxLeaseNanos?: bigint;
  /** Smallest and largest lease of a key's monthly tokens asked for, in tokens. */
  minLeaseTokens?: bigint;
  maxLeaseTokens?: bigint;
  /** A scope billing reported exhausted is not asked again for this long. */
  exhaustedBackoffMs?: number;
  /**
   * The longest a request waits for billing's grants in all, however many asks it waits on (2 s by default: the billing
   * client's call timeout); it is then refused 503 budget_unavailable, and its ask goes on for the requests after it.
   */
  billingWaitMs?: number;
  /** Leases untouched this long go back to billing. */
  idleReleaseMs?: number;
  /** Time a reservation needs after its request's deadline to be settled. */
  settleMarginMs?: number;
  /** Longest wait between tries of a release billing failed. */
  releaseRetryMaxMs?: number;
  /**
   * How long after its lease expired a failed release is still sent again (an hour by default): billing reserves an
   * expired lease's grant for its grace period unless the release lands, and takes a late one.
   */
  releaseRetryAfterExpiryMs?: number;
  /** How often leases are checked for renewal and release. */
  maintenanceIntervalMs?: number;
  /**
   * Notes every lease id before it is asked for and crosses it out once billing has settled it, so leases a crash
   * leaves unreleased are known to the next process (lease-journal.ts).
   */
  journal?: {
    held(leaseId: string): void;
    /** What leases have spent in all, noted as requests settle on them. */
    spent?(leases: readonly { leaseId: string; spent: bigint }[]): void;
    settled(leaseId: string): void;
  };
  /**
   * Leases an earlier process of this replica left unreleased (killed, out of memory), or one whose spool this replica
   * adopted. They are released once `recorded()` says that the usage served under them, which waited in the spool, is
   * all recorded in billing: each is released at what the journal says it spent (`spent`, 0 when absent), which
   * billing counts only beyond that usage (so the spend of rows a full spool dropped still counts), and its unspent
   * grant is free again within seconds of the restart rather than its TTL plus grace.
   */
  inherited?: { leaseIds: readonly string[]; spent?: ReadonlyMap<string, bigint>; recorded: () => boolean };
  /**
   * Where this replica's spend reaches billing: the rows of finished requests it has spooled, and how many of the first
   * of them analytics has acked, which it does once billing has recorded them (metrics-pipe.ts). Spend a request made
   * on a scope that had no budget here, and so drew on no lease of it, is counted by billing only once recorded: the
   * scope's first grant waits for that, so that a budget set over spend still on its way to billing holds.
   */
  ingest?: { recordedRows(): number; ackedRows(): number };
  /**
   * True while billing is known not to answer (a key check found so, or its key change stream is silent): leases held
   * are kept for what they cover, idle ones too, and go back once billing answers again.
   */
  billingDown?: () => boolean;
  /** Milliseconds, for intervals only (a monotonic clock by default). */
  now?: () => number;
  /** Epoch milliseconds by the wall clock, for when a billing period ends (Date.now by default). */
  wallClock?: () => number;
  log?: Logger;
  registry?: Registry;
}

interface Lease {
  id: string;
  granted: bigint;
  spent: bigint;
  reserved: bigint;
  /** Epoch ms, from our own clock when we asked, so clock skew can only shorten it. */
  expiresAt: number;
  lastUsed: number;
  /** Granted under a budget since changed: serves no new request, and goes back once its last one settles. */
  withdrawn: boolean;
  /** The API key whose request last drew on it, or asked for it: of an org's lease, whether another key uses it. */
  lastKey?: string;
}

interface Scope {
  key: string;
  kind: BudgetScope;
  id: string;
  /** Counts tokens (a key's monthly tokens) rather than nano-USD. */
  tokens: boolean;
  leases: Lease[];
  acquiring: Promise<void> | undefined;
  exhaustedUntil: number;
  /** Exponentially decayed sum of settled spend, for the spend rate. */
  decayedSpend: number;
  decayedAt: number;
  /** First settled spend, so a young scope's rate is not diluted by time before it existed. */
  firstSpendAt: number | undefined;
  /** Unleased budget billing reported with its last grant; null when unknown or unlimited. */
  remaining: bigint | null;
  /** Of the budget live leases held at billing's last answer, about what other replicas hold. */
  leasedElsewhere: bigint;
  lastUsed: number;
  /** Longest hold asked for lately: leases that can no longer serve one go back to billing. */
  maxHoldMs: number;
  /** Requests waiting for this scope's next grant. */
  waiters: number;
  /** Its key was revoked: leases go back to billing as soon as nothing is reserved on them. */
  retired: boolean;
  /** Of a retired key refused rather than revoked: principals authorized after this take it back; undefined never. */
  revivableAfter: number | undefined;
  /** The monthly budget its leases were granted under (in its unit), as of the key authorization at `budgetAt`. */
  budgetNanos: bigint;
  budgetAt: number;
  /** Counts budget changes: a grant asked for before one is given back as it arrives. */
  generation: number;
  /** A grant asked for whose answer was lost: asked for again under its lease id before anything else. */
  unanswered: Ask | undefined;
}

/** One grant asked for, under a lease id of our choosing, so asking again cannot be granted twice. */
interface Ask {
  leaseId: string;
  requestedNanos: bigint;
  neededNanos: bigint;
  /** Epoch ms of the first try: billing's expiry of the lease counts from no earlier. */
  asked: number;
  generation: number;
  failures: number;
  /** Epoch ms. */
  retryAt: number;
}

/** A lease given up whose release billing has not taken yet, with what was spent from it. */
interface UnreleasedLease {
  scopeKey: string;
  lease: Lease;
  spentNanos: bigint;
  failures: number;
  /** Epoch ms. */
  retryAt: number;
}

interface Part {
  lease: Lease;
  amount: bigint;
}

const budgetUnavailable = () =>
  serviceUnavailable("Budgets cannot be checked right now; retry shortly.", "budget_unavailable");
const rateTimeConstantMs = 30_000;
// A budget refused this close to its billing period's end says when the period ends; further out, no wait is a retry.
const periodEndRetryS = 3600;
// Billing takes at most 12 budget charges in a request's usage record, for its org's and its key's budgets and its
// key's monthly tokens together: a reservation is drawn from at most this many leases of each budget.
const maxPartsPerScope = 4;
const settled: Reservation = { settle: () => [] };
const allScopes = [BudgetScope.ORGANIZATION, BudgetScope.API_KEY, BudgetScope.API_KEY_TOKENS];
/** How often a grant waiting for spend to reach billing looks again. */
const ingestPollMs = 20;
const spendUnrecorded = () =>
  serviceUnavailable(
    "Budgets cannot be checked right now: spend served before the budget was set is still on its way to billing; retry shortly.",
    "budget_unavailable",
  );
const scopeNames: Record<BudgetScope, string> = {
  [BudgetScope.UNSPECIFIED]: "unspecified",
  [BudgetScope.ORGANIZATION]: "organization",
  [BudgetScope.API_KEY]: "api_key",
  [BudgetScope.API_KEY_TOKENS]: "api_key_tokens",
};

export function createBudgetKeeper(options: BudgetKeeperOptions): BudgetKeeper {
  const { billing, log } = options;
  const holder = `${options.holder}/${ulid()}`;
  const grantOutage = createOutageLog(log, {
    failed: "budget lease request failed",
    recovered: "budget lease requests answer again",
  });
  const ttlMs = options.leaseTtlSeconds * 1000;
  const horizonS = options.leaseHorizonSeconds ?? 60;
  const minLease = { nanos: options.minLeaseNanos ?? 1_000_000n, tokens: options.minLeaseTokens ?? 1_000n };
  const maxLease = { nanos: options.maxLeaseNanos ?? 10_000_000_000n, tokens: options.maxLeaseTokens ?? 10_000_000n };
  const exhaustedBackoffMs = options.exhaustedBackoffMs ?? 1_000;
  const billingWaitMs = options.billingWaitMs ?? 2_000;
  const idleReleaseMs = options.idleReleaseMs ?? 30_000;
  const marginMs = options.settleMarginMs ?? 5_000;
  // Monotonic: a wall clock stepped back would keep leases in use past the lifetime billing granted them (and idle ones
  // held, a spent budget refused without asking) for as long as the step; one stepped forward would drop them early.
  const now = options.now ?? (() => performance.timeOrigin + performance.now());
  const wallClock = options.wallClock ?? Date.now;
  const scopes = new Map<string, Scope>();
  const scopesOfPrincipal = new WeakMap<Principal, Scope[]>();
  /** Releases on their way to billing, with the key of their scope. */
  const releasing = new Map<Promise<void>, string>();
  const unreleased = new Map<string, UnreleasedLease>();
  const releaseRetryMaxMs = options.releaseRetryMaxMs ?? 30_000;
  const releaseRetryAfterExpiryMs = options.releaseRetryAfterExpiryMs ?? 3_600_000;
  let closed = false;
  let inherited = options.inherited?.leaseIds.length ? options.inherited : undefined;
  const startedAt = now();
  /** Billing's last answer to a grant or release was a failure to answer: an outage, as far as this replica knows. */
  let billingFailing = false;
  const instruments = options.registry ? createInstruments(options.registry) : undefined;
  const ingest = options.ingest;
  /**
   * Per scope key, the spooled rows (a count from ingest.recordedRows) that must be acked before billing's usage holds
   * all the spend this replica made on the scope without a lease of it.
   */
  const unrecorded = new Map<string, number>();
  /** The keys of every scope a principal has, budget or not, made once per principal (requests reuse principals). */
  const scopeKeysOf = new WeakMap<Principal, string[]>();

  /** Notes spend that drew on no lease of some of the principal's scopes (those not in `leased`). */
  const noteUnleased = (principal: Principal, used: Spend, leased: readonly Scope[]) => {
    if (!ingest || (used.nanos <= 0n && used.tokens <= 0n)) return;
    // Settled as its row is spooled, in the same turn: its row is the next one.
    const row = ingest.recordedRows() + 1;
    let keys = scopeKeysOf.get(principal);
    if (!keys) {
      keys = allScopes.map((kind) => `${scopeNames[kind]}:${kind === BudgetScope.ORGANIZATION ? principal.orgId : principal.apiKeyId}`);
      scopeKeysOf.set(principal, keys);
    }
    allScopes.forEach((kind, i) => {
      const key = keys[i] as string;
      if ((kind === BudgetScope.API_KEY_TOKENS ? used.tokens : used.nanos) <= 0n) return;
      if (!leased.some((scope) => scope.key === key)) unrecorded.set(key, row);
    });
    // Scopes whose rows are all recorded need no note: dropped in bulk, so the map holds the scopes of recent spend.
    if (unrecorded.size > 10_000) {
      const acked = ingest.ackedRows();
      for (const [key, mark] of unrecorded) if (mark <= acked) unrecorded.delete(key);
    }
  };

  /**
   * Waits, up to `stop`, until billing has recorded the spend this replica made on the scope without a lease of it;
   * false when it has not by then.
   */
  const spendRecorded = async (scope: Scope, stop: AbortSignal): Promise<boolean> => {
    const mark = unrecorded.get(scope.key);
    if (mark === undefined || !ingest) return true;
    while (ingest.ackedRows() < mark) {
      if (stop.aborted) return false;
      await new Promise((resolve) => setTimeout(resolve, ingestPollMs));
    }
    if (unrecorded.get(scope.key) === mark) unrecorded.delete(scope.key);
    return true;
  };

  const budgetOf = (principal: Principal, kind: BudgetScope) =>
    (kind === BudgetScope.ORGANIZATION
      ? principal.grant.organization?.monthlyBudgetNanos
      : kind === BudgetScope.API_KEY
        ? principal.grant.apiKey?.limits?.monthlyBudgetNanos
        : principal.grant.apiKey?.limits?.monthlyTokens) ?? 0n;

  const scopeFor = (kind: BudgetScope, principal: Principal): Scope => {
    const id = kind === BudgetScope.ORGANIZATION ? principal.orgId : principal.apiKeyId;
    const key = `${scopeNames[kind]}:${id}`;
    const budgetNanos = budgetOf(principal, kind);
    let scope = scopes.get(key);
    if (scope) {
      // Refused by billing, then authorized again (its expiry moved, its org reinstated): its leases serve it again,
      // rather than each go back as its request settles, a grant and a release for every request.
      if (scope.revivableAfter !== undefined && principal.authorizedAt > scope.revivableAfter) {
        scope.retired = false;
        scope.revivableAfter = undefined;
      }
      // Billing announced a change, the key was authorized again: leases granted under another budget go back.
      if (principal.authorizedAt >= scope.budgetAt) {
        if (budgetNanos !== scope.budgetNanos) withdraw(scope);
        scope.budgetNanos = budgetNanos;
        scope.budgetAt = principal.authorizedAt;
      }
    } else {
      const t = now();
      scope = {
        key,
        kind,
        id,
        tokens: kind === BudgetScope.API_KEY_TOKENS,
        leases: [],
        acquiring: undefined,
        exhaustedUntil: 0,
        decayedSpend: 0,
        decayedAt: t,
        firstSpendAt: undefined,
        remaining: null,
        leasedElsewhere: 0n,
        lastUsed: t,
        maxHoldMs: 0,
        waiters: 0,
        retired: false,
        revivableAfter: undefined,
        budgetNanos,
        budgetAt: principal.authorizedAt,
        generation: 0,
        unanswered: undefined,
      };
      scopes.set(key, scope);
    }
    return scope;
  };

  const scopesOf = (principal: Principal): Scope[] => {
    let list = scopesOfPrincipal.get(principal);
    if (!list) {
      list = [];
      for (const kind of [BudgetScope.ORGANIZATION, BudgetScope.API_KEY, BudgetScope.API_KEY_TOKENS]) {
        const id = kind === BudgetScope.ORGANIZATION ? principal.orgId : principal.apiKeyId;
        if (budgetOf(principal, kind) > 0n) list.push(scopeFor(kind, principal));
        // A budget removed is a budget changed: the leases granted under it go back, or set again they would serve
        // what was spent while it was unset.
        else if (scopes.has(`${scopeNames[kind]}:${id}`)) scopeFor(kind, principal);
      }
      scopesOfPrincipal.set(principal, list);
    }
    // Scopes dropped by the maintenance sweep come back on use.
    for (let i = 0; i < list.length; i++) {
      const s = list[i] as Scope;
      if (scopes.get(s.key) !== s) list[i] = scopeFor(s.kind, principal);
    }
    return list;
  };

  const free = (lease: Lease) => {
    if (lease.withdrawn) return 0n;
    const left = lease.granted - lease.spent - lease.reserved;
    return left > 0n ? left : 0n;
  };

  /**
   * What a reservation that must settle before `until` may draw from a lease: a lease with any is one `take` draws on.
   * Each bigint worked out is a new number on the heap: a lease's room is worked out once where it is used.
   */
  const roomUntil = (lease: Lease, until: number) => (lease.expiresAt >= until ? free(lease) : 0n);

  /** Unreserved lease money usable by a reservation that must settle before `until`. */
  const available = (scope: Scope, until: number) => {
    let sum = 0n;
    for (const lease of scope.leases) sum += roomUntil(lease, until);
    return sum;
  };

  /** Leases usable by a reservation that must settle before `until`, with room, roomiest first (oldest of equals). */
  const roomiest = (scope: Scope, until: number) =>
    scope.leases
      .filter((lease) => roomUntil(lease, until) > 0n)
      .sort((a, b) => (free(a) > free(b) ? -1 : free(a) < free(b) ? 1 : 0));

  /** The most one reservation can take from at most `count` of the scope's leases usable until `until`. */
  const takeable = (scope: Scope, until: number, count: number) => {
    // Usually a scope holds a lease or two: all of them count, and nothing need be sorted.
    let usableLeases = 0;
    let sum = 0n;
    for (const lease of scope.leases) {
      const room = roomUntil(lease, until);
      if (room === 0n) continue;
      usableLeases++;
      sum += room;
    }
    if (usableLeases <= count) return sum;
    return roomiest(scope, until)
      .slice(0, count)
      .reduce((sum, lease) => sum + free(lease), 0n);
  };

  /** Nano-USD per second: an exponentially weighted average over about half a minute. */
  const spendRate = (scope: Scope, t: number) => {
    if (scope.firstSpendAt === undefined) return 0;
    const decayed = scope.decayedSpend * Math.exp(-(t - scope.decayedAt) / rateTimeConstantMs);
    // Weight of the time observed so far, at least a second so one early request is not a huge rate.
    const observedMs = Math.max(1_000, t - scope.firstSpendAt);
    return decayed / ((rateTimeConstantMs / 1000) * (1 - Math.exp(-observedMs / rateTimeConstantMs)));
  };

  const leaseSize = (scope: Scope, shortfall: bigint): bigint => {
    const unit = scope.tokens ? "tokens" : "nanos";
    let size = BigInt(Math.ceil(spendRate(scope, now()) * horizonS));
    if (size < minLease[unit]) size = minLease[unit];
    // A burst of waiters is served by one grant rather than one round trip each.
    const burst = shortfall * BigInt(Math.max(1, scope.waiters));
    if (size < burst) size = burst;
    if (size > maxLease[unit]) size = maxLease[unit];
    const cap = shareLeft(scope);
    if (cap !== null && size > cap) size = cap > 0n ? cap : 0n;
    return size > shortfall ? size : shortfall;
  };

  /**
   * How much more this replica may hold: with it, its unreserved room is at most half of that room plus what billing
   * last said was left, so grants cannot pile up (1/2 + 1/4 + ...) into the whole budget, stranded if it dies. Null
   * when billing's figure is unknown or the budget unlimited.
   */
  const shareLeft = (scope: Scope): bigint | null => {
    if (scope.remaining === null) return null;
    const room = available(scope, 0);
    return (room + scope.remaining) / 2n - room;
  };

  /** Sends one release; a failed one waits in `unreleased` for `maintain` to send again, later each time. */
  const sendRelease = (pending: UnreleasedLease): Promise<void> => {
    unreleased.delete(pending.lease.id);
    const done = (async () => {
      try {
        // Billing settles a lease once: a resent release that already landed changes nothing.
        await billing.releaseBudgetLease({ leaseId: pending.lease.id, spentNanos: pending.spentNanos });
        options.journal?.settled(pending.lease.id);
        billingFailing = false;
        instruments?.leases.inc({ outcome: "released" });
      } catch (e) {
        const err = ConnectError.from(e);
        // Unknown to billing: nothing to give back.
        if (err.code === Code.NotFound) {
          options.journal?.settled(pending.lease.id);
          return;
        }
        billingFailing = true;
        pending.failures++;
        if (closed || now() >= pending.lease.expiresAt + releaseRetryAfterExpiryMs) {
          // Billing frees it at expiry plus its grace; the spend still reaches it as usage records. One given up at
          // shutdown stays in the journal, for the next start to release once this life's usage is recorded.
          log?.warn("budget lease release failed", { lease_id: pending.lease.id, err: err.rawMessage });
          if (!closed) options.journal?.settled(pending.lease.id);
          return;
        }
        if (pending.failures === 1)
          log?.warn("budget lease release failed; retrying", { lease_id: pending.lease.id, err: err.rawMessage });
        pending.retryAt = now() + Math.min(releaseRetryMaxMs, 1_000 * 2 ** (pending.failures - 1));
        unreleased.set(pending.lease.id, pending);
      }
    })();
    releasing.set(done, pending.scopeKey);
    void done.finally(() => releasing.delete(done));
    return done;
  };

  const release = (scope: Scope, lease: Lease, spentNanos = lease.spent): Promise<void> => {
    const i = scope.leases.indexOf(lease);
    if (i >= 0) scope.leases.splice(i, 1);
    // What goes back is billing's to grant again, to this replica as to others.
    if (scope.remaining !== null && lease.granted > spentNanos) scope.remaining += lease.granted - spentNanos;
    return sendRelease({ scopeKey: scope.key, lease, spentNanos, failures: 0, retryAt: 0 });
  };

  /**
   * Keeps an ask whose answer was lost (billing may have granted it) for asking again under its id, later each time;
   * once it is older than an idle lease is kept, or at shutdown, it is released instead, which frees the lease if
   * billing granted it and is nothing to billing otherwise.
   */
  const unanswered = (scope: Scope, ask: Ask) => {
    ask.failures++;
    const t = now();
    if (closed || t - ask.asked >= idleReleaseMs) {
      const expiresAt = ask.asked + ttlMs;
      const lease = { id: ask.leaseId, granted: 0n, spent: 0n, reserved: 0n, expiresAt, lastUsed: t, withdrawn: true };
      void sendRelease({ scopeKey: scope.key, lease, spentNanos: 0n, failures: 0, retryAt: 0 });
      return;
    }
    ask.retryAt = t + Math.min(releaseRetryMaxMs, 1_000 * 2 ** (ask.failures - 1));
    scope.unanswered = ask;
  };

  /**
   * Gives back the leases of a scope whose budget changed, so its next request is granted under the new one: at once
   * those no request is using, the others as their last request settles (requests running keep their reservations).
   */
  const withdraw = (scope: Scope) => {
    scope.generation++;
    scope.remaining = null;
    scope.exhaustedUntil = 0;
    for (const lease of [...scope.leases]) {
      if (lease.reserved === 0n) void release(scope, lease);
      else lease.withdrawn = true;
    }
  };

  /**
   * Asks billing for `size()` more, of which the request at hand needs `neededNanos` (billing grants that whatever
   * this replica's share); resolves once the grant (or nothing) is in `scope.leases`. With `returnIdle`, leases no
   * request is using go back first, so billing can grant their rest in one piece.
   */
  const acquire = (
    scope: Scope,
    size: () => { requestedNanos: bigint; neededNanos: bigint },
    returnIdle = false,
    apiKeyId?: string,
  ): Promise<void> => {
    if (scope.acquiring) return scope.acquiring;
    const acquiring = (async () => {
      // While billing does not answer, idle leases are kept for the requests they can cover: given back, they would
      // wait for billing with the rest of the budget out of this replica's reach.
      if (returnIdle && !billingFailing && !options.billingDown?.()) {
        // Releases billing missed go again too, so it does not refuse money this replica already gave back.
        const resent = [...unreleased.values()].filter((p) => p.scopeKey === scope.key).map(sendRelease);
        const idle = scope.leases.filter((lease) => lease.reserved === 0n).map((lease) => release(scope, lease));
        await Promise.all([...resent, ...idle]);
      }
      // Releases on their way land first, so billing counts what they give back (a request's remnants, given back as
      // it was refused) rather than refuse it as still held.
      const landing = [...releasing].filter(([, key]) => key === scope.key).map(([done]) => done);
      if (landing.length > 0) await Promise.all(landing);
      // A grant billing may have made without our hearing goes first, as it was asked: billing answers with it if
      // it made it, and grants it now otherwise; asking afresh instead could hold the budget twice.
      let ask = scope.unanswered;
      scope.unanswered = undefined;
      if (!ask) {
        const { requestedNanos, neededNanos } = size();
        // Nothing to ask for (a renewal whose share of billing's last figure is 0): billing is not asked, and only its
        // own answer says the budget is spent (another replica may have given back since).
        if (requestedNanos <= 0n) return;
        const [leaseId, generation] = [`lease_${ulid()}`, scope.generation];
        ask = { leaseId, requestedNanos, neededNanos, asked: now(), generation, failures: 0, retryAt: 0 };
        // Before billing can grant it: a process killed with the answer on its way still has it released.
        options.journal?.held(leaseId);
      }
      const { requestedNanos, generation, asked } = ask;
      const request = {
        scope: scope.kind,
        scopeId: scope.id,
        holder,
        requestedNanos,
        neededNanos: ask.neededNanos,
        ttlSeconds: options.leaseTtlSeconds,
        leaseId: ask.leaseId,
      };
      try {
        // An answer lost with its connection is asked for again at once; one out of time is left to `maintain`, or the
        // request would wait a second deadline.
        const res = await billing.acquireBudgetLease(request).catch((e: unknown) => {
          if (answered(e) || ConnectError.from(e).code === Code.DeadlineExceeded) throw e;
          return billing.acquireBudgetLease(request);
        });
        grantOutage.recovered();
        billingFailing = false;
        const lease: Lease | undefined =
          res.grantedNanos > 0n && res.leaseId
            ? {
                id: res.leaseId,
                granted: res.grantedNanos,
                spent: 0n,
                reserved: 0n,
                expiresAt: asked + ttlMs,
                lastUsed: now(),
                withdrawn: scope.generation !== generation,
                lastKey: apiKeyId,
              }
            : undefined;
        if (scope.generation !== generation) {
          // The budget changed while billing was asked: this grant may be the old budget's.
          if (lease) void sendRelease({ scopeKey: scope.key, lease, spentNanos: 0n, failures: 0, retryAt: 0 });
          return;
        }
        scope.remaining = res.remainingNanos >= 0n ? res.remainingNanos : null;
        if (lease) {
          scope.leases.push(lease);
          // Its key was revoked while billing was asked: it goes back at once, unless a request waits for it.
          if (scope.retired && scope.waiters === 0) void release(scope, lease);
          instruments?.leases.inc({ outcome: res.grantedNanos < requestedNanos ? "partial" : "granted" });
          if (!scope.tokens) instruments?.granted.inc(Number(res.grantedNanos) / 1e9);
        } else {
          instruments?.leases.inc({ outcome: "exhausted" });
          options.journal?.settled(ask.leaseId);
        }
        scope.leasedElsewhere = res.leasedNanos;
        if (res.grantedNanos < requestedNanos && res.remainingNanos === 0n)
          scope.exhaustedUntil = now() + exhaustedBackoffMs;
      } catch (e) {
        instruments?.leases.inc({ outcome: "error" });
        const err = ConnectError.from(e);
        // A refusal granted nothing under this id.
        if (answered(e)) options.journal?.settled(ask.leaseId);
        if (err.code === Code.FailedPrecondition || err.code === Code.NotFound) {
          throw unauthorized("This API key has been revoked or has expired.", "invalid_api_key");
        }
        // Billing's one refusal of a lease to a gateway whose token AuthorizeKey has accepted.
        if (err.code === Code.PermissionDenied) throw organizationSuspended();
        // Billing answered, refusing what this replica asked: its own fault, not billing's outage.
        if (err.code === Code.InvalidArgument) {
          log?.error("billing refused a budget lease request as invalid", { scope: scope.key, err: err.rawMessage });
          throw internal();
        }
        if (!answered(e)) unanswered(scope, ask);
        grantOutage.failed({ scope: scope.key, code: Code[err.code], err: err.rawMessage });
        billingFailing = true;
        throw budgetUnavailable();
      }
    })().finally(() => {
      if (scope.acquiring === acquiring) scope.acquiring = undefined;
    });
    scope.acquiring = acquiring;
    return acquiring;
  };

  /**
   * After a request was refused for `short`, gives back to billing the idle leases held here of its other budgets that
   * no other key's request would draw on: its key's (its money, its monthly tokens), and its org's when none of the
   * org's requests is running here and no other key drew on them since this one did. Near a budget's end one replica
   * may hold the rest of one budget and others the rest of another: kept idle until their idle release, each would be
   * refused the budget the others hold. Only unreserved leases go, released with what was spent from them, as an idle
   * one is; while billing does not answer they stay, for the requests they cover.
   */
  const giveBackOthers = (apiKeyId: string, list: readonly Scope[], short: Scope) => {
    if (billingFailing || options.billingDown?.()) return;
    const giveBack = (scope: Scope) => {
      const org = scope.kind === BudgetScope.ORGANIZATION;
      if (closed || (org && scope.leases.some((lease) => lease.reserved > 0n))) return;
      for (const lease of [...scope.leases]) {
        if (lease.reserved === 0n && (!org || lease.lastKey === apiKeyId)) void release(scope, lease);
      }
    };
    for (const scope of list) {
      if (scope === short) continue;
      giveBack(scope);
      // A grant asked for meanwhile (a renewal) would sit idle here too: it goes back as it lands, unless a request
      // waits for it, or has drawn on it, by then.
      scope.acquiring?.then(
        () => scope.waiters === 0 && giveBack(scope),
        () => {},
      );
    }
  };

  /** Tops a scope up in the background when its room falls under about a few seconds of spend. */
  const renewIfLow = (scope: Scope, until: number, lastCost: bigint, apiKeyId: string) => {
    if (closed || scope.acquiring || now() < scope.exhaustedUntil) return;
    const room = available(scope, until);
    let low = BigInt(Math.ceil(spendRate(scope, now()) * Math.min(10, horizonS / 4)));
    const twice = lastCost * 2n;
    if (low < twice) low = twice;
    if (room >= low) return;
    // Within a request of its share of what is left: the rest is for other replicas, and for this one's requests
    // that find too little room (they ask for what they need).
    const cap = shareLeft(scope);
    if (cap !== null && (cap <= 0n || cap < lastCost)) return;
    acquire(scope, () => ({ requestedNanos: leaseSize(scope, 0n), neededNanos: 0n }), false, apiKeyId).catch(() => {});
  };

  /** Reserves `amount` from at most `maxPartsPerScope` leases, which the caller made sure can cover it. */
  const take = (scope: Scope, amount: bigint, until: number, t: number, apiKeyId: string): Part[] => {
    // Oldest first, so older leases drain and go back to billing; roomiest first when that would take too many.
    let oldestFirst = 0n;
    let drawn = 0;
    for (const lease of scope.leases) {
      if (oldestFirst >= amount) break;
      const room = roomUntil(lease, until);
      if (room === 0n) continue;
      oldestFirst += room;
      drawn++;
    }
    const order = drawn > maxPartsPerScope ? roomiest(scope, until) : scope.leases;
    const parts: Part[] = [];
    let left = amount;
    for (const lease of order) {
      if (left === 0n) break;
      const room = roomUntil(lease, until);
      if (room === 0n) continue;
      const part = room < left ? room : left;
      lease.reserved += part;
      lease.lastUsed = t;
      lease.lastKey = apiKeyId;
      parts.push({ lease, amount: part });
      left -= part;
    }
    scope.lastUsed = t;
    return parts;
  };

  const settleScope = (scope: Scope, reserved: Part[], cost: bigint, charges: LeaseCharge[], charged: Lease[]) => {
    let parts = reserved;
    const t = now();
    let left = cost;
    if (parts.length === 0 && cost > 0n) {
      // Reserved nothing (a free model that turned out not to be): charge the newest lease.
      const newest = scope.leases.at(-1);
      if (newest) parts = [{ lease: newest, amount: 0n }];
    }
    for (let i = 0; i < parts.length; i++) {
      const { lease, amount } = parts[i] as Part;
      // Actual cost fills the parts in order; anything beyond the reservation lands on the last.
      const charge = i === parts.length - 1 ? left : left < amount ? left : amount;
      lease.reserved -= amount;
      lease.spent += charge;
      if (charge > 0n) {
        charges.push({ leaseId: lease.id, nanos: scope.tokens ? 0n : charge, tokens: scope.tokens ? charge : 0n });
        charged.push(lease);
      }
      lease.lastUsed = t;
      left -= charge;
      if (lease.reserved === 0n && (scope.retired || free(lease) === 0n) && scope.leases.includes(lease)) {
        void release(scope, lease);
      }
    }
    const c = Number(cost);
    scope.firstSpendAt ??= t;
    scope.decayedSpend = scope.decayedSpend * Math.exp(-(t - scope.decayedAt) / rateTimeConstantMs) + c;
    scope.decayedAt = t;
  };

  /** Releases the leases an earlier process left, once their usage is all recorded; each at what it noted spent. */
  const releaseInherited = () => {
    if (!inherited?.recorded()) return;
    const { leaseIds, spent } = inherited;
    inherited = undefined;
    // Granted before this process started, so expired by one TTL after it at the latest.
    const expiresAt = startedAt + ttlMs;
    for (const id of leaseIds) {
      const lease = { id, granted: 0n, spent: 0n, reserved: 0n, expiresAt, lastUsed: now(), withdrawn: true };
      void sendRelease({ scopeKey: "", lease, spentNanos: spent?.get(id) ?? 0n, failures: 0, retryAt: 0 });
    }
    log?.info("releasing the budget leases an earlier process left, their usage recorded", { leases: leaseIds.length });
  };

  const maintain = () => {
    const t = now();
    const down = options.billingDown?.() ?? false;
    releaseInherited();
    for (const pending of [...unreleased.values()]) if (pending.retryAt <= t) void sendRelease(pending);
    for (const scope of scopes.values()) {
      if (scope.unanswered && scope.unanswered.retryAt <= t && !scope.acquiring) {
        acquire(scope, () => ({ requestedNanos: 0n, neededNanos: 0n })).catch(() => {});
      }
      for (const lease of [...scope.leases]) {
        if (lease.reserved !== 0n) continue;
        // Too close to expiry for the next request, or idle: let other replicas have it. While billing does not answer,
        // an idle lease stays for the requests it covers: given back, it would wait for billing with them refused.
        if (lease.expiresAt < t + scope.maxHoldMs + marginMs * 2 || (t - lease.lastUsed >= idleReleaseMs && !down))
          void release(scope, lease);
      }
      if (scope.leases.length === 0 && !scope.acquiring && !scope.unanswered && t - scope.lastUsed >= idleReleaseMs)
        scopes.delete(scope.key);
    }
  };
  const timer = setInterval(maintain, options.maintenanceIntervalMs ?? 1_000);
  timer.unref?.();
  releaseInherited();

  return {
    async reserve(principal, most, holdMs, signal) {
      const list = scopesOf(principal);
      if (list.length === 0) {
        if (!ingest) return settled;
        let done = false;
        return {
          settle(used) {
            if (!done) noteUnleased(principal, used, list);
            done = true;
            return [];
          },
        };
      }
      if (closed) throw serviceUnavailable("The gateway is shutting down.", "budget_unavailable");
      /** What a request of this size takes from the scope, in its unit. */
      const amountOf = (scope: Scope, spend: Spend) => {
        const amount = scope.tokens ? spend.tokens : spend.nanos;
        return amount > 0n ? amount : 0n;
      };
      for (const scope of list) if (holdMs > scope.maxHoldMs) scope.maxHoldMs = holdMs;
      /** Aborts once the request has waited billingWaitMs for billing, from its first wait. */
      let waitLimit: AbortSignal | undefined;
      for (let round = 0; ; round++) {
        const t = now();
        const until = t + holdMs + marginMs;
        let short: Scope | undefined;
        for (const scope of list) {
          // Room spread over more leases than one reservation may draw on needs a lease of its own.
          if (takeable(scope, until, maxPartsPerScope) < amountOf(scope, most)) {
            short = scope;
            break;
          }
        }
        if (!short) {
          const key = principal.apiKeyId;
          const taken = list.map((scope) => ({ scope, parts: take(scope, amountOf(scope, most), until, t, key) }));
          for (const scope of list) renewIfLow(scope, until, amountOf(scope, most), key);
          let done = false;
          return {
            settle(used) {
              if (done) return [];
              done = true;
              const charges: LeaseCharge[] = [];
              const charged: Lease[] = [];
              for (const { scope, parts } of taken) settleScope(scope, parts, amountOf(scope, used), charges, charged);
              // Noted for a crash: the next process releases these leases at it, whatever usage reaches billing.
              if (charged.length > 0) options.journal?.spent?.(charged.map((l) => ({ leaseId: l.id, spent: l.spent })));
              if (list.length < allScopes.length) noteUnleased(principal, used, list);
              return charges;
            },
          };
        }
        const amount = amountOf(short, most);
        // Billing said it has less than was asked: the budget is spent, unless what it had left (what this replica gave
        // back since included) covers this smaller request. (The round cap only stops pathological loops.)
        const left = short.remaining ?? 0n;
        if ((t < short.exhaustedUntil && left + takeable(short, until, maxPartsPerScope - 1) < amount) || round >= 10) {
          instruments?.rejected.inc();
          // Room can appear only where leases still hold some: requests running here settle under their reservation,
          // other replicas give idle leases back. Otherwise nothing comes back before the billing period ends, nor
          // when all they hold with what billing has left could not cover this request (a budget's remnants).
          let unspent = short.leasedElsewhere + (short.remaining ?? 0n);
          for (const lease of short.leases) if (lease.granted > lease.spent) unspent += lease.granted - lease.spent;
          const held =
            (short.leasedElsewhere > 0n || short.leases.some((lease) => lease.reserved > 0n)) &&
            (short.remaining === null || unspent >= amount);
          // Asked just now, billing had too little: what it granted is a remnant too small for this request, as are the
          // leases returned before asking. Kept idle here, such remnants on two replicas would be swapped at each ask
          // and refuse the request on both; given back, the next ask elsewhere gets them in one piece.
          if (round > 0 && !billingFailing) {
            for (const lease of [...short.leases]) if (lease.reserved === 0n) void release(short, lease);
          }
          giveBackOthers(principal.apiKeyId, list, short);
          const owner = short.kind === BudgetScope.ORGANIZATION ? "organization's" : "API key's";
          const message = short.tokens
            ? `This request may use up to ${amount} tokens and the API key's monthly limit of ${short.budgetNanos} ` +
              "tokens has less than that left this billing period."
            : `This request may cost up to ${formatUsd(amount)} and the ${owner} monthly budget has less than ` +
              "that left.";
          // The budget is whole again once its billing period ends: close to that, the client is told when.
          const wall = wallClock();
          const periodEnd = billingPeriod(new Date(wall), principal.grant.organization?.billingDay || 1).end.getTime();
          const untilPeriodEndS = Math.max(1, Math.ceil((periodEnd - wall) / 1000));
          const retryAfterS = Math.min(
            held ? Math.ceil(idleReleaseMs / 1000) : Number.POSITIVE_INFINITY,
            untilPeriodEndS <= periodEndRetryS ? untilPeriodEndS : Number.POSITIVE_INFINITY,
          );
          throw insufficientQuota(message, Number.isFinite(retryAfterS) ? retryAfterS : undefined);
        }
        // One billing call's time in all: a request that went round again after each ask billing did not answer waited
        // for one ask after another while billing was down (a burst's requests 2, 4, 6 ... s, then refused 429).
        waitLimit ??= AbortSignal.timeout(billingWaitMs);
        if (waitLimit.aborted) throw budgetUnavailable();
        const stop = signal ? AbortSignal.any([signal, waitLimit]) : waitLimit;
        // A grant counts the spend billing has recorded: this replica's on the scope before it had a budget here is
        // waited for, or the budget would not hold it (all of it while analytics is down).
        if (!(await spendRecorded(short, stop))) {
          if (signal?.aborted) throw clientGone(signal);
          throw spendUnrecorded();
        }
        short.waiters++;
        try {
          const pending = short.acquiring;
          // Leftovers too small for this request are returned before asking, or they would sit idle here.
          // A request that ends meanwhile stops waiting; what billing grants stays for the others.
          const gone = () => (signal?.aborted ? clientGone(signal) : budgetUnavailable());
          if (pending) await unlessAborted(pending.catch(() => {}), stop, gone);
          else {
            const asking = acquire(
              short,
              () => {
                // Enough to cover the request together with the roomiest leases it may still draw on.
                const shortfall = amount - takeable(short, until, maxPartsPerScope - 1);
                return { requestedNanos: leaseSize(short, shortfall), neededNanos: shortfall > 0n ? shortfall : 0n };
              },
              true,
              principal.apiKeyId,
            );
            await unlessAborted(asking, stop, gone);
          }
        } finally {
          short.waiters--;
        }
      }
    },

    releaseKey(apiKeyId, refusedAt) {
      for (const kind of [BudgetScope.API_KEY, BudgetScope.API_KEY_TOKENS]) {
        const scope = scopes.get(`${scopeNames[kind]}:${apiKeyId}`);
        if (!scope) continue;
        // A revocation is for good, whatever refusals came before or after it.
        const revivable = refusedAt !== undefined && (!scope.retired || scope.revivableAfter !== undefined);
        scope.revivableAfter = revivable ? Math.max(scope.revivableAfter ?? refusedAt, refusedAt) : undefined;
        scope.retired = true;
        for (const lease of [...scope.leases]) if (lease.reserved === 0n) void release(scope, lease);
      }
    },

    async close() {
      closed = true;
      clearInterval(timer);
      await Promise.all([...scopes.values()].map((s) => s.acquiring?.catch(() => {})));
      for (const scope of scopes.values()) {
        const ask = scope.unanswered;
        scope.unanswered = undefined;
        if (ask) unanswered(scope, ask);
        // Reservations still open at shutdown are reported as spent: over-reporting only lowers later grants.
        for (const lease of [...scope.leases]) void release(scope, lease, lease.spent + lease.reserved);
      }
      // One more try for releases billing missed; those that fail again are left to billing's expiry.
      for (const pending of [...unreleased.values()]) void sendRelease(pending);
      await Promise.all([...releasing.keys()]);
    },

    snapshot() {
      const out = new Map<string, ScopeSnapshot>();
      for (const scope of scopes.values()) {
        const snap: ScopeSnapshot = {
          leases: scope.leases.length,
          grantedNanos: 0n,
          spentNanos: 0n,
          reservedNanos: 0n,
        };
        for (const lease of scope.leases) {
          snap.grantedNanos += lease.granted;
          snap.spentNanos += lease.spent;
          snap.reservedNanos += lease.reserved;
        }
        out.set(scope.key, snap);
      }
      return out;
    },
  };
}

// Per-message framing tokens (OpenAI adds 3-4, plus one for a name) and the reply priming.
const framingPerMessage = 8;
const replyPriming = 3;
/**
 * Tokens reserved for a content part whose few bytes do not bound what the model reads: a file (a PDF by file_id, text
 * and an image of every page) can fill at most a whole context window, 1,047,576 tokens for gpt-4.1, the largest of
 * OpenAI's models that read files; audio at most the 128,000-token context of OpenAI's audio models. An image is
 * priced by its model and size (maxImageTokens).
 */
const partTokensBound = new Map([
  ["file", 1_047_576],
  ["input_audio", 128_000],
]);

/** Tokens a content part counts at, by its kind (an image by its size and model too); none for any other kind. */
export type PartTokens = (part: PromptPart) => number | undefined;

/** The bounds of parts on whichever of `models` (a route's targets) serves them: an image at its dearest. */
export function partBounds(models: readonly string[]): PartTokens {
  return (part) =>
    part.type === "image_url" ? maxImageTokens(part.image_url ?? {}, models) : partTokensBound.get(part.type);
}

// Tool definitions are rendered to the model in a form at most this much longer than their JSON.
const framingPerTool = 32;

/**
 * A chat request's input tokens, everything the model reads, with each text counted by `textTokens` and each image,
 * file or audio part by `partTokens`: UTF-8 bytes and the parts' bounds make the upper bound budgets reserve
 * (maxInputTokens); about four characters a token and typical parts, the estimate rate limits hold.
 */
export function chatInputTokens(
  request: Pick<ChatRequest, "messages" | "tools" | "functions" | "response_format">,
  textTokens: (text: string) => number,
  partTokens: PartTokens = partBounds([]),
): number {
  let tokens = replyPriming;
  for (const m of request.messages as readonly ChatCompletionMessageParam[]) {
    tokens += framingPerMessage + textTokens(m.role);
    if ("name" in m && typeof m.name === "string") tokens += textTokens(m.name);
    const content = m.content;
    if (typeof content === "string") tokens += textTokens(content);
    else if (Array.isArray(content)) {
      for (const part of content as readonly (PromptPart & { text?: unknown })[]) {
        if (part.type === "text" && typeof part.text === "string") tokens += textTokens(part.text);
        else tokens += partTokens(part) ?? textTokens(JSON.stringify(part));
      }
    }
    if ("refusal" in m && typeof m.refusal === "string") tokens += textTokens(m.refusal);
    // An assistant's earlier audio answer, referred to by id: the model hears it again, bounded as an audio part.
    if ("audio" in m && m.audio) tokens += partTokens({ type: "input_audio" }) as number;
    if ("tool_calls" in m && m.tool_calls) tokens += textTokens(JSON.stringify(m.tool_calls));
    // The legacy form of a tool call, still sent back by clients of the deprecated `functions`.
    if ("function_call" in m && m.function_call) tokens += textTokens(JSON.stringify(m.function_call));
    if ("tool_call_id" in m && typeof m.tool_call_id === "string") tokens += textTokens(m.tool_call_id);
  }
  // Deprecated `functions` are tool definitions the model reads as it reads `tools`.
  for (const definitions of [request.tools, request.functions]) {
    if (definitions && definitions.length > 0) {
      tokens += textTokens(JSON.stringify(definitions)) + framingPerTool * definitions.length;
    }
  }
  if (request.response_format) tokens += textTokens(JSON.stringify(request.response_format));
  return tokens;
}

/**
 * An upper bound on a chat request's input tokens on any of `models`: UTF-8 bytes of everything the model reads, and
 * the bounds of its parts.
 */
export function maxInputTokens(
  request: Pick<ChatRequest, "messages" | "tools" | "functions" | "response_format">,
  models: readonly string[] = [],
): number {
  return chatInputTokens(request, (text) => Buffer.byteLength(text), partBounds(models));
}

/**
 * The most output a chat request may produce: its max_completion_tokens or max_tokens, the larger when it sets both
 * (both go upstream, and one that reads only max_tokens, as OpenAI-compatible servers older than
 * max_completion_tokens do, is bound by that alone), else `cap`; times n.
 */
export function maxOutputTokens(
  request: Pick<ChatRequest, "max_completion_tokens" | "max_tokens" | "n">,
  cap: number,
): number {
  const { max_completion_tokens: completion, max_tokens: tokens } = request;
  const limit = completion != null && tokens != null ? Math.max(completion, tokens) : (completion ?? tokens ?? cap);
  return limit * (request.n ?? 1);
}

/** The most a request of these token bounds can use: all its tokens, each at the dearest price of its kind. */
export function maxSpend(inputTokens: number, outputTokens: number, price: Price): Spend {
  const dearest = (...micros: bigint[]) => micros.reduce((a, b) => (a > b ? a : b));
  const input = dearest(price.inputMicros, price.cachedInputMicros, price.audioInputMicros ?? 0n);
  const output = dearest(price.outputMicros, price.reasoningMicros, price.audioOutputMicros ?? 0n);
  const nanos = costNanos(
    {
      inputTokens: BigInt(inputTokens),
      cachedInputTokens: 0n,
      outputTokens: BigInt(outputTokens),
      reasoningTokens: 0n,
    },
    { inputMicros: input, cachedInputMicros: input, outputMicros: output, reasoningMicros: output },
  );
  return { nanos, tokens: BigInt(inputTokens + outputTokens) };
}

/**
 * The most a chat request can use; `cap` is the output budgeted when it sets no max_tokens, `contextWindow` the most
 * its model reads (a prompt's bytes and a file's bound are taken no higher), `models` its route's upstream models.
 */
export function maxChatSpend(
  request: Pick<
    ChatRequest,
    "messages" | "tools" | "functions" | "response_format" | "max_completion_tokens" | "max_tokens" | "n"
  >,
  price: Price,
  cap: number,
  contextWindow?: number,
  models: readonly string[] = [],
): Spend {
  const input = maxInputTokens(request, models);
  return maxSpend(contextWindow === undefined ? input : Math.min(input, contextWindow), maxOutputTokens(request, cap), price);
}

/**
 * A Responses API request's input tokens, as chatInputTokens counts a chat request's: its texts by `textTokens`, each
 * image, file or audio part by `partTokens`, and each item framed as a message is.
 */
export function responsesInputTokens(
  prompt: ResponsesPrompt,
  textTokens: (text: string) => number,
  partTokens: PartTokens = partBounds([]),
): number {
  let tokens = replyPriming + framingPerMessage * prompt.items;
  for (const text of prompt.texts) tokens += textTokens(text);
  for (const part of prompt.parts) tokens += partTokens(part) ?? 0;
  return tokens;
}

/**
 * The most a Responses API request can use: its input's UTF-8 bytes and parts' bounds (the whole `contextWindow`, when
 * the model sets one, for a request into which the upstream reads what the gateway does not see: the earlier turns of
 * one chained to state it holds, an MCP server's tools and their outputs), and its `max_output_tokens`, else `cap`.
 */
export function maxResponsesSpend(
  prompt: ResponsesPrompt,
  maxOutput: number | undefined,
  readsUnseen: boolean,
  price: Price,
  cap: number,
  contextWindow?: number,
  models: readonly string[] = [],
): Spend {
  const input = responsesInputTokens(prompt, (text) => Buffer.byteLength(text), partBounds(models));
  const read = contextWindow === undefined ? input : readsUnseen ? contextWindow : Math.min(input, contextWindow);
  return maxSpend(read, maxOutput ?? cap, price);
}

export type EmbeddingInput = string | readonly string[] | readonly number[] | readonly number[][];

/** An embeddings request's input tokens: strings counted by `textTokens` (as chatInputTokens), token arrays exactly. */
export function embeddingInputTokens(input: EmbeddingInput, textTokens: (text: string) => number): number {
  if (typeof input === "string") return textTokens(input);
  let tokens = 0;
  for (const item of input) {
    if (typeof item === "string") tokens += textTokens(item);
    else if (typeof item === "number") tokens += 1;
    else tokens += item.length;
  }
  return tokens;
}

/** An upper bound on an embeddings request's input tokens: UTF-8 bytes of strings, lengths of token arrays. */
export function maxEmbeddingInputTokens(input: EmbeddingInput): number {
  return embeddingInputTokens(input, (text) => Buffer.byteLength(text));
}

/**
 * Whether billing answered an ask with a refusal, so it granted nothing. Any other failure (unreachable, out of time, a
 * connection lost on the way back) may follow a grant billing made.
 */
function answered(e: unknown): boolean {
  return refusals.has(ConnectError.from(e).code);
}
const refusals = new Set([
  Code.InvalidArgument,
  Code.NotFound,
  Code.FailedPrecondition,
  Code.PermissionDenied,
  Code.Unauthenticated,
]);

function formatUsd(nanos: bigint): string {
  return `$${(Number(nanos) / 1e9).toFixed(6)}`;
}

function createInstruments(registry: Registry) {
  return {
    leases: new Counter({
      name: "gateway_budget_lease_requests_total",
      help: "Budget lease requests to billing and releases, by outcome.",
      labelNames: ["outcome"] as const,
      registers: [registry],
    }),
    granted: new Counter({
      name: "gateway_budget_leased_usd_total",
      help: "Budget granted to this replica by billing, in USD.",
      registers: [registry],
    }),
    rejected: new Counter({
      name: "gateway_budget_rejections_total",
      help: "Requests refused because a budget (or a key's monthly tokens) could not cover their most.",
      registers: [registry],
    }),
  };
}
