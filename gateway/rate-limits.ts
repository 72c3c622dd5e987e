import { Gauge, type Registry } from "prom-client";
import { rateLimited } from "./errors.ts";
import {
  chatInputTokens,
  type EmbeddingInput,
  embeddingInputTokens,
  maxOutputTokens,
  type PartTokens,
  responsesInputTokens,
} from "./budget.ts";
import { estimatedImageTokens } from "./image-tokens.ts";
import type { ChatRequest } from "./providers/provider.ts";
import type { ResponsesPrompt } from "./responses-request.ts";
import { estimatedTextTokens, partTokensEstimate } from "./tokenizer.ts";

/**
 * Per-key requests-per-minute and tokens-per-minute limits over a sliding 60-second window kept in
 * one-second buckets. A request is admitted while the window has room; its tokens count at an
 * estimate (prompt + max output) while it runs and at the actual usage for a minute from its end. A
 * request larger than the whole TPM limit is admitted into an empty window, so it is slow rather than impossible.
 * A key's concurrent requests are counted from admission until the ticket is settled or released (the request's end,
 * however it ends), on this replica alone.
 *
 * The per-minute limits hold across gateway replicas: the buckets this replica changed are taken out (takeChanges) for
 * billing at what they count now, and what the other replicas count in a key's window comes back (learnOthers); a
 * request is admitted while this replica's counts plus theirs leave room.
 */

export interface KeyRateLimits {
  /** 0 means unlimited. */
  requestsPerMinute: number;
  /** 0 means unlimited. */
  tokensPerMinute: number;
  /** Requests in flight at once; 0 or unset means unlimited. */
  maxConcurrentRequests?: number;
}

/** Where one limit of a key stands: what OpenAI's x-ratelimit-{limit,remaining,reset}-* headers say. */
export interface LimitState {
  limit: number;
  remaining: number;
  /** Until the oldest usage counted in the window expires, when `remaining` next grows. */
  resetMs: number;
}

/** A key's limits after a request was admitted or refused; a limit the key does not have is absent. */
export interface RateState {
  requests?: LimitState;
  tokens?: LimitState;
}

/**
 * An admitted request's hold on the window and on a slot of its key's concurrent requests; settle it once with the
 * tokens it really used, or release it. Either frees the slot.
 */
export interface RateTicket {
  /** The key's per-minute limits with this request counted; undefined for a key without them. */
  readonly state: RateState | undefined;
  settle(tokens: number): void;
  /**
   * Gives back the request and its tokens, for one refused by another limit before anything was sent (its budget):
   * a key whose budget is spent is told so, rather than rate limited by its own refusals. Returns the key's limits
   * as they stand without it.
   */
  release(): RateState | undefined;
  /**
   * Frees its slot of the key's concurrent requests at once, for a request whose client has gone while the rest of its
   * answer is still read for the usage it bills (see usageGraceMs); settling it later still counts its tokens.
   */
  leave(): void;
}

/** What one replica counts in one second of a key lineage's window. */
export interface RateCount {
  keyId: string;
  /** Unix second. */
  second: number;
  requests: number;
  tokens: number;
}

/** This replica's counts of the seconds of its keys' windows that changed since they were reported, for billing. */
export interface RateChanges {
  /** The first second of the window (the current second less 59): no count is of an earlier one. */
  sinceSecond: number;
  usage: RateCount[];
}

export interface RateLimiter {
  /**
   * Admits one request of `estimatedTokens` for `keyId`, or throws a 429 GatewayError with Retry-After. Of those,
   * `unsetOutputTokens` are an output bound the request did not set (the model's cap, for a request without
   * max_tokens): when the whole estimate does not fit the key's TPM, such a request is admitted into the room left, if
   * that holds its other tokens and some output, and holds all of it while it runs.
   */
  admit(keyId: string, limits: KeyRateLimits, estimatedTokens: number, unsetOutputTokens?: number): RateTicket;
  /** Where the key's limits stand, counting nothing more: for a request refused before it was admitted here. */
  state(keyId: string, limits: KeyRateLimits): RateState | undefined;
  /** Keys currently tracked: admissions, trackedKeys and takeChanges drop those idle for a minute, once a minute. */
  size(): number;
  /**
   * The key lineages tracked, whose windows the other replicas' counts are wanted for: `newKeyIds` those whose whole
   * window no answer has covered yet (learnOthers' `wholeKeyIds`), `keyIds` the others.
   */
  trackedKeys(): { keyIds: string[]; newKeyIds: string[] };
  /**
   * Takes out what this replica counts now in each second of its keys' windows whose bucket changed since it was last
   * taken out, and holds those counts as reported: what waits is at most one count per key and second of the window,
   * however long nothing takes it.
   */
  takeChanges(): RateChanges;
  /**
   * Marks the seconds of counts taken out that billing did not get as not reported, so the next takeChanges has their
   * counts as they are then; those of seconds that have left the window are dropped.
   */
  restoreChanges(usage: readonly RateCount[]): void;
  /**
   * Takes what the other replicas count from `sinceSecond` on in the keys tracked here (a count of another key is left
   * out, not tracked): each of `others` replaces what was known of its key's second; in the windows of `wholeKeyIds`,
   * answered whole, a second `others` leaves out counts nothing.
   */
  learnOthers(sinceSecond: number, others: Iterable<RateCount>, wholeKeyIds: readonly string[]): void;
  /** Requests holding a slot of their key's concurrent requests, over every key. */
  concurrent(): number;
}

export interface RateLimiterOptions {
  /** Unix milliseconds: Date.now by default, as the other replicas' seconds are the wall clock's. */
  now?: () => number;
  /** Idle keys are dropped once a minute, and whenever this many are tracked. */
  maxKeys?: number;
  /** Where the gauge of concurrent requests held goes; none when unset. */
  registry?: Registry;
}

const windowSeconds = 60;

/** Counts of a window, in one-second buckets. */
interface Counts {
  /** Second (of the clock) each slot holds; a slot with an older second is empty. */
  seconds: Float64Array;
  requests: Float64Array;
  tokens: Float64Array;
}

interface Window extends Counts {
  keyId: string;
  /** Of `tokens`, the estimates of requests admitted in that second that are still running. */
  running: Float64Array;
  /** Of `requests` and `tokens`, what takeChanges last took out; NaN for a count billing did not get. */
  reportedRequests: Float64Array;
  reportedTokens: Float64Array;
  /** What the other replicas counted, as billing last answered; undefined until it answers any for the key. */
  others: Counts | undefined;
  /** Whether an answer has covered the whole window since it was made: later ones need only say what changed. */
  othersKnown: boolean;
  lastSecond: number;
  /**
   * Requests running with an estimate, by the second they were admitted in: one still running once that second has
   * left the window counts at its estimate all the same, until it ends.
   */
  flights: Set<Flight>;
}

interface Flight {
  second: number;
  estimate: number;
}

const noTicket: RateTicket = { state: undefined, settle() {}, release: () => undefined, leave() {} };
// What frees the slot of a request whose key has no concurrent request limit: nothing.
const unoccupied = () => {};
// Any positive amount: the ms until it has expired is the ms until the oldest usage leaves the window.
const oldest = Number.MIN_VALUE;
// The Retry-After of a TPM refusal that requests still running might make room for by ending.
const runningRetryS = 3;
// The Retry-After of a refusal over a key's concurrent requests: a slot frees when any of them ends, at no known time.
const concurrentRetryMs = 1000;

export function createRateLimiter(options: RateLimiterOptions = {}): RateLimiter {
  // The wall clock, whose seconds the other replicas count in too; a clock that only moves forward drifts from it. One
  // stepped back leaves the newest buckets ahead of it, and they count until it has passed them again: stricter, for
  // as long as the step.
  const now = options.now ?? Date.now;
  const maxKeys = options.maxKeys ?? 50_000;
  const windows = new Map<string, Window>();
  // Windows whose buckets changed since takeChanges last looked.
  const changed = new Set<Window>();
  // Idle keys' windows (about 4.5 KB each, 6.5 KB once the other replicas' counts are known) go every minute, not only
  // at maxKeys: a replica that served 50,000 keys over weeks otherwise held 225 MB for keys that had counted nothing
  // since. The syncs prune them too, not only admissions: a replica whose keys have all gone idle stops calling billing.
  let prunedAt = Number.NEGATIVE_INFINITY;
  // Requests in flight by key, for keys with a concurrency limit; a key leaves when its last one ends.
  const inFlight = new Map<string, number>();
  let held = 0;
  if (options.registry) {
    new Gauge({
      name: "gateway_key_concurrent_requests",
      help: "Requests in flight holding a slot of their key's max_concurrent_requests, over every key.",
      registers: [options.registry],
      collect() {
        this.set(held);
      },
    });
  }

  /**
   * Takes a slot of the key's `max` concurrent requests, or throws a 429 carrying the headers of `state` (the key's
   * per-minute limits as they stand, when it has any); returns what frees it, once however often it is called.
   */
  const occupy = (keyId: string, max: number, state?: () => RateState): (() => void) => {
    if (max <= 0) return unoccupied;
    const running = inFlight.get(keyId) ?? 0;
    if (running >= max) {
      throw rateLimited(
        "requests",
        `Rate limit reached for concurrent requests: limit ${max}, in flight ${running}. ` +
          "Retry once one of them has ended.",
        concurrentRetryMs,
        state ? rateLimitHeaders(state()) : {},
      );
    }
    inFlight.set(keyId, running + 1);
    held++;
    let freed = false;
    return () => {
      if (freed) return;
      freed = true;
      held--;
      const left = (inFlight.get(keyId) ?? 1) - 1;
      if (left > 0) inFlight.set(keyId, left);
      else inFlight.delete(keyId);
    };
  };

  const windowOf = (keyId: string, second: number): Window => {
    pruneIdle(second);
    let w = windows.get(keyId);
    if (!w) {
      if (windows.size >= maxKeys) prune(second);
      w = {
        keyId,
        seconds: new Float64Array(windowSeconds).fill(-1),
        requests: new Float64Array(windowSeconds),
        tokens: new Float64Array(windowSeconds),
        running: new Float64Array(windowSeconds),
        reportedRequests: new Float64Array(windowSeconds),
        reportedTokens: new Float64Array(windowSeconds),
        others: undefined,
        othersKnown: false,
        lastSecond: second,
        flights: new Set(),
      };
      windows.set(keyId, w);
    }
    w.lastSecond = second;
    return w;
  };

  // A window idle for a minute has no change left to report; the other replicas' counts of its key go with it.
  const prune = (second: number) => {
    for (const [key, w] of windows) {
      if (second - w.lastSecond >= windowSeconds && w.flights.size === 0) {
        windows.delete(key);
        changed.delete(w);
      }
    }
  };

  /** Prunes at most once a window's length. */
  const pruneIdle = (second: number) => {
    if (second - prunedAt < windowSeconds) return;
    prunedAt = second;
    prune(second);
  };

  /**
   * The estimates of requests still running that were admitted in a second the window has left. A set iterates in the
   * order its requests were admitted, oldest first, so the walk stops at the first still in the window: a key with many
   * requests running pays for the few that outlived their minute, not for all of them.
   */
  const overdue = (w: Window, second: number) => {
    let sum = 0;
    for (const flight of w.flights) {
      if (flight.second > second - windowSeconds) break;
      sum += flight.estimate;
    }
    return sum;
  };

  /** Adds to the bucket of the current `second`. */
  const add = (w: Window, second: number, requests: number, tokens: number, running: number) => {
    const slot = second % windowSeconds;
    // A slot holding a newer second (a clock that stepped back) keeps it and takes this usage: it counts a little
    // longer rather than not at all.
    if ((w.seconds[slot] as number) < second) {
      w.seconds[slot] = second;
      w.requests[slot] = 0;
      w.tokens[slot] = 0;
      w.running[slot] = 0;
      // Billing has no count of a second new here from this replica, as if it had been reported at 0.
      w.reportedRequests[slot] = 0;
      w.reportedTokens[slot] = 0;
    }
    w.requests[slot] = (w.requests[slot] as number) + requests;
    w.tokens[slot] = (w.tokens[slot] as number) + tokens;
    w.running[slot] = (w.running[slot] as number) + running;
    changed.add(w);
  };

  /**
   * Takes a request admitted in `second`, or its estimate, out of that second's bucket, unless the window has left it
   * at `current` (it counts for nothing there any more, nor in the other replicas' windows).
   */
  const subtract = (w: Window, second: number, current: number, requests: number, estimate: number) => {
    const slot = second % windowSeconds;
    if (w.seconds[slot] !== second || second <= current - windowSeconds) return;
    w.requests[slot] = Math.max(0, (w.requests[slot] as number) - requests);
    w.tokens[slot] = Math.max(0, (w.tokens[slot] as number) - estimate);
    w.running[slot] = Math.max(0, (w.running[slot] as number) - estimate);
    changed.add(w);
  };

  /** Sum over the window of `values`, in the buckets of `seconds`. */
  const sumOf = (seconds: Float64Array, values: Float64Array, second: number) => {
    let sum = 0;
    for (let i = 0; i < windowSeconds; i++) {
      if ((seconds[i] as number) > second - windowSeconds) sum += values[i] as number;
    }
    return sum;
  };

  /** Requests or tokens counted in the window, by this replica and the others. */
  const total = (w: Window, counted: "requests" | "tokens", second: number) =>
    sumOf(w.seconds, w[counted], second) + (w.others ? sumOf(w.others.seconds, w.others[counted], second) : 0);

  /** The ms until `excess` of the window's requests or tokens, this replica's and the others', has expired (oldest first). */
  const expiryMs = (w: Window, counted: "requests" | "tokens", second: number, excess: number, t: number) => {
    if (excess <= 0) return 0;
    const others = w.others;
    let freed = 0;
    for (let s = second - windowSeconds + 1; s <= second; s++) {
      const slot = s % windowSeconds;
      if (w.seconds[slot] === s) freed += w[counted][slot] as number;
      if (others?.seconds[slot] === s) freed += others[counted][slot] as number;
      if (freed >= excess) return (s + windowSeconds) * 1000 - t;
    }
    // The rest counts in seconds ahead of the clock (stepped back, or another replica's a little fast), which leave the
    // window over a minute from now: said as a minute, the most a retry waits.
    for (let slot = 0; slot < windowSeconds; slot++) {
      if ((w.seconds[slot] as number) > second) freed += w[counted][slot] as number;
      if (others && (others.seconds[slot] as number) > second) freed += others[counted][slot] as number;
    }
    return freed >= excess ? windowSeconds * 1000 : 0;
  };

  const limitState = (max: number, w: Window, counted: "requests" | "tokens", second: number, t: number, held = 0): LimitState => ({
    limit: max,
    remaining: Math.max(0, max - total(w, counted, second) - held),
    resetMs: expiryMs(w, counted, second, oldest, t),
  });

  /** Where a key's limits stand at `t`. */
  const stateOf = (w: Window, rpm: number, tpm: number, t: number): RateState => {
    const second = Math.floor(t / 1000);
    const state: RateState = {};
    if (rpm > 0) state.requests = limitState(rpm, w, "requests", second, t);
    if (tpm > 0) state.tokens = limitState(tpm, w, "tokens", second, t, overdue(w, second));
    return state;
  };

  return {
    admit(keyId, limits, estimatedTokens, unsetOutputTokens = 0) {
      const rpm = limits.requestsPerMinute;
      const tpm = limits.tokensPerMinute;
      const maxConcurrent = limits.maxConcurrentRequests ?? 0;
      if (rpm <= 0 && tpm <= 0) {
        if (maxConcurrent <= 0) return noTicket;
        const free = occupy(keyId, maxConcurrent);
        return { state: undefined, settle: free, release: () => (free(), undefined), leave: free };
      }
      const t = now();
      const second = Math.floor(t / 1000);
      const w = windowOf(keyId, second);
      const requests = rpm > 0 ? total(w, "requests", second) : 0;
      let estimate = tpm > 0 ? Math.max(0, Math.ceil(estimatedTokens)) : 0;
      const overrun = tpm > 0 ? overdue(w, second) : 0;
      const tokens = tpm > 0 ? total(w, "tokens", second) + overrun : 0;
      const running = tpm > 0 ? sumOf(w.seconds, w.running, second) + overrun : 0;
      /** The key's limits as they stand now: after this request was counted, or at its refusal. */
      const state = () => stateOf(w, rpm, tpm, t);
      if (rpm > 0 && requests + 1 > rpm) {
        const waitMs = expiryMs(w, "requests", second, requests + 1 - rpm, t);
        throw rateLimited(
          "requests",
          `Rate limit reached for requests per minute (RPM): limit ${rpm}, used ${requests}. Retry in ${Math.ceil(waitMs / 1000)}s.`,
          waitMs,
          rateLimitHeaders(state()),
        );
      }
      // A request that set no output bound is counted at its model's cap, which may be more than the key's whole TPM
      // (gpt-4.1's 32,768 against 20,000): it takes the room left rather than wait for an empty minute.
      const room = tpm - tokens;
      if (tpm > 0 && tokens > 0 && estimate > room && unsetOutputTokens > 0 && estimate - Math.floor(unsetOutputTokens) < room) {
        estimate = room;
      }
      if (tpm > 0 && tokens > 0 && tokens + estimate > tpm) {
        // Room for this request once enough has expired; all of it when it alone exceeds the limit.
        // What expires from the window cannot help when requests running past their minute hold it all.
        const expiring = Math.min(tokens - overrun, tokens + estimate - tpm);
        let waitMs = expiring > 0 ? expiryMs(w, "tokens", second, expiring, t) : runningRetryS * 1000;
        // Running requests hold their whole estimate and usually use less: when one ends the room may be there.
        const soon = running > 0 && tokens - running + estimate <= tpm;
        if (soon) waitMs = Math.min(waitMs, runningRetryS * 1000);
        const held = soon ? ` (${running} held by requests still running, whose end may free it sooner)` : "";
        throw rateLimited(
          "tokens",
          `Rate limit reached for tokens per minute (TPM): limit ${tpm}, used ${tokens}${held}, requested ${estimate}. Retry in ${Math.ceil(waitMs / 1000)}s.`,
          waitMs,
          rateLimitHeaders(state()),
        );
      }
      // Checked once the per-minute limits have room, so that a refusal's Retry-After is the wait that matters.
      const free = occupy(keyId, maxConcurrent, state);
      add(w, second, 1, estimate, estimate);
      const flight = { second, estimate };
      if (estimate > 0) w.flights.add(flight);
      const admitted = state();
      let settled = false;
      return {
        state: admitted,
        leave: free,
        release() {
          free();
          if (settled) return undefined;
          settled = true;
          w.flights.delete(flight);
          const t = now();
          subtract(w, second, Math.floor(t / 1000), 1, estimate);
          return stateOf(windows.get(keyId) ?? w, rpm, tpm, t);
        },
        settle(used) {
          free();
          if (settled) return;
          settled = true;
          w.flights.delete(flight);
          if (tpm <= 0) return;
          // The estimate leaves its admitting second; the actual usage is known now, so it counts for a minute from now.
          const current = Math.floor(now() / 1000);
          subtract(w, second, current, 0, estimate);
          // The key's window as it is now: an idle one may have been dropped while this request ran.
          add(windowOf(keyId, current), current, 0, Math.max(0, Math.ceil(used)), 0);
        },
      };
    },
    state(keyId, limits) {
      const { requestsPerMinute: rpm, tokensPerMinute: tpm } = limits;
      if (rpm <= 0 && tpm <= 0) return undefined;
      const w = windows.get(keyId);
      if (w) return stateOf(w, rpm, tpm, now());
      return {
        ...(rpm > 0 && { requests: { limit: rpm, remaining: rpm, resetMs: 0 } }),
        ...(tpm > 0 && { tokens: { limit: tpm, remaining: tpm, resetMs: 0 } }),
      };
    },
    size: () => windows.size,
    concurrent: () => held,
    trackedKeys() {
      pruneIdle(Math.floor(now() / 1000));
      const keyIds: string[] = [];
      const newKeyIds: string[] = [];
      for (const w of windows.values()) (w.othersKnown ? keyIds : newKeyIds).push(w.keyId);
      return { keyIds, newKeyIds };
    },
    takeChanges() {
      const current = Math.floor(now() / 1000);
      pruneIdle(current);
      const sinceSecond = current - windowSeconds + 1;
      const usage: RateCount[] = [];
      for (const w of changed) {
        for (let slot = 0; slot < windowSeconds; slot++) {
          const second = w.seconds[slot] as number;
          if (second < sinceSecond) continue;
          const requests = w.requests[slot] as number;
          const tokens = w.tokens[slot] as number;
          if (requests === w.reportedRequests[slot] && tokens === w.reportedTokens[slot]) continue;
          usage.push({ keyId: w.keyId, second, requests, tokens });
          w.reportedRequests[slot] = requests;
          w.reportedTokens[slot] = tokens;
        }
      }
      changed.clear();
      return { sinceSecond, usage };
    },
    restoreChanges(usage) {
      for (const change of usage) {
        const w = windows.get(change.keyId);
        const slot = change.second % windowSeconds;
        // Once its slot holds a later second, this one has left the window, and its count with it.
        if (!w || w.seconds[slot] !== change.second) continue;
        // NaN equals no count, so the next takeChanges takes this second out again, at its count then.
        w.reportedRequests[slot] = Number.NaN;
        changed.add(w);
      }
    },
    learnOthers(sinceSecond, others, wholeKeyIds) {
      for (const keyId of wholeKeyIds) {
        const w = windows.get(keyId);
        if (!w) continue;
        w.othersKnown = true;
        if (!w.others) continue;
        for (let slot = 0; slot < windowSeconds; slot++) {
          if ((w.others.seconds[slot] as number) >= sinceSecond) w.others.seconds[slot] = -1;
        }
      }
      for (const count of others) {
        const w = windows.get(count.keyId);
        if (!w || count.second < sinceSecond) continue;
        w.others ??= {
          seconds: new Float64Array(windowSeconds).fill(-1),
          requests: new Float64Array(windowSeconds),
          tokens: new Float64Array(windowSeconds),
        };
        const slot = count.second % windowSeconds;
        w.others.seconds[slot] = count.second;
        w.others.requests[slot] = count.requests;
        w.others.tokens[slot] = count.tokens;
      }
    },
  };
}

/**
 * OpenAI's rate limit headers for a key's state: x-ratelimit-limit-requests, -remaining-requests, -reset-requests
 * (a duration such as "12s" or "1m0s") and the same for tokens.
 */
export function rateLimitHeaders(state: RateState): Record<string, string> {
  const headers: Record<string, string> = {};
  addLimitHeaders(headers, requestLimitHeaders, state.requests);
  addLimitHeaders(headers, tokenLimitHeaders, state.tokens);
  return headers;
}

// Written for every request a limited key makes: the names are made once.
const requestLimitHeaders = ["x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"] as const;
const tokenLimitHeaders = ["x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"] as const;

function addLimitHeaders(
  headers: Record<string, string>,
  names: readonly [limit: string, remaining: string, reset: string],
  limit: LimitState | undefined,
): void {
  if (!limit) return;
  headers[names[0]] = String(limit.limit);
  headers[names[1]] = String(limit.remaining);
  headers[names[2]] = duration(limit.resetMs);
}

/** A duration as OpenAI writes it: "250ms", "12s", "1m0s". */
function duration(ms: number): string {
  if (ms < 1000) return `${Math.max(0, Math.ceil(ms))}ms`;
  const seconds = Math.ceil(ms / 1000);
  return seconds < 60 ? `${seconds}s` : `${Math.floor(seconds / 60)}m${seconds % 60}s`;
}

/**
 * What a part counts at while its request runs: an image at what the dearest of `models` (the route's targets) bills
 * for it (its size when its data URL tells it, else a 2048x2048 one's), a file or audio part at the tokenizer's
 * estimate. Their budget bounds (tens of thousands of tokens and more) would let a key whose TPM is below one run such
 * a request only into an empty window; the real usage replaces this at the end.
 */
function partTokens(models: readonly string[]): PartTokens {
  return (part) =>
    part.type === "image_url"
      ? estimatedImageTokens(part.image_url ?? {}, models)
      : part.type === "file" || part.type === "input_audio"
        ? partTokensEstimate
        : undefined;
}

/**
 * Tokens a chat request is counted at while it runs: everything it sends (about four characters a token, CJK ones three
 * in four, parts at partTokens) plus the most output it may produce, `cap` when it sets no max_tokens, as its budget reservation
 * counts it.
 */
export function estimatedChatTokens(
  request: Pick<
    ChatRequest,
    "messages" | "tools" | "functions" | "response_format" | "max_completion_tokens" | "max_tokens" | "n"
  >,
  cap: number,
  models: readonly string[] = [],
): number {
  return chatInputTokens(request, estimatedTextTokens, partTokens(models)) + maxOutputTokens(request, cap);
}

/** Of estimatedChatTokens, the output a request did not bound (no max_tokens): the model's `cap` for each choice. */
export function unsetOutputTokens(request: Pick<ChatRequest, "max_completion_tokens" | "max_tokens" | "n">, cap: number): number {
  return request.max_completion_tokens == null && request.max_tokens == null ? maxOutputTokens(request, cap) : 0;
}

/** Tokens a Responses API request is counted at while it runs, as a chat request is: its input and most output. */
export function estimatedResponsesTokens(
  prompt: ResponsesPrompt,
  maxOutput: number | undefined,
  cap: number,
  models: readonly string[] = [],
): number {
  return responsesInputTokens(prompt, estimatedTextTokens, partTokens(models)) + (maxOutput ?? cap);
}

/** Tokens an embeddings request is counted at while it runs: its strings as estimatedTextTokens takes them. */
export function estimatedEmbeddingTokens(input: EmbeddingInput): number {
  return embeddingInputTokens(input, estimatedTextTokens);
}
