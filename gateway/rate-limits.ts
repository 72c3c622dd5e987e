import { rateLimited } from "./errors.ts";
import { approxInputTokens, type ChatRequest } from "./providers/provider.ts";

/**
 * Per-key requests-per-minute and tokens-per-minute limits over a sliding 60-second window kept in
 * one-second buckets. A request is admitted while the window has room; its tokens count at an
 * estimate (prompt + max output) while it runs and at the actual usage once it ends. A request larger
 * than the whole TPM limit is admitted into an empty window, so it is slow rather than impossible.
 * Limits hold per gateway replica.
 */

export interface KeyRateLimits {
  /** 0 means unlimited. */
  requestsPerMinute: number;
  /** 0 means unlimited. */
  tokensPerMinute: number;
}

/** An admitted request's hold on the window; settle it once with the tokens it really used. */
export interface RateTicket {
  settle(tokens: number): void;
}

export interface RateLimiter {
  /** Admits one request of `estimatedTokens` for `keyId`, or throws a 429 GatewayError with Retry-After. */
  admit(keyId: string, limits: KeyRateLimits, estimatedTokens: number): RateTicket;
  /** Keys currently tracked. */
  size(): number;
}

export interface RateLimiterOptions {
  now?: () => number;
  /** Idle keys are dropped once this many are tracked. */
  maxKeys?: number;
}

const windowSeconds = 60;

interface Window {
  /** Second (epoch s) each slot holds; a slot with an older second is empty. */
  seconds: Float64Array;
  requests: Float64Array;
  tokens: Float64Array;
  lastSecond: number;
}

const noTicket: RateTicket = { settle() {} };

export function createRateLimiter(options: RateLimiterOptions = {}): RateLimiter {
  const now = options.now ?? Date.now;
  const maxKeys = options.maxKeys ?? 50_000;
  const windows = new Map<string, Window>();

  const windowOf = (keyId: string, second: number): Window => {
    let w = windows.get(keyId);
    if (!w) {
      if (windows.size >= maxKeys) prune(second);
      w = {
        seconds: new Float64Array(windowSeconds).fill(-1),
        requests: new Float64Array(windowSeconds),
        tokens: new Float64Array(windowSeconds),
        lastSecond: second,
      };
      windows.set(keyId, w);
    }
    w.lastSecond = second;
    return w;
  };

  const prune = (second: number) => {
    for (const [key, w] of windows) if (second - w.lastSecond >= windowSeconds) windows.delete(key);
  };

  /** Adds to the bucket of `second`, which is at most a minute old. */
  const add = (w: Window, second: number, requests: number, tokens: number) => {
    const slot = second % windowSeconds;
    if (w.seconds[slot] !== second) {
      // A bucket older than the window has expired; one already reused by a newer second can't take old usage.
      if ((w.seconds[slot] as number) > second) return;
      w.seconds[slot] = second;
      w.requests[slot] = 0;
      w.tokens[slot] = 0;
    }
    w.requests[slot] = (w.requests[slot] as number) + requests;
    w.tokens[slot] = Math.max(0, (w.tokens[slot] as number) + tokens);
  };

  /** Sum over the window, and the ms until `excess` of it has expired (oldest buckets first). */
  const usage = (values: Float64Array, w: Window, second: number, excess: number, t: number) => {
    let total = 0;
    for (let i = 0; i < windowSeconds; i++) {
      if ((w.seconds[i] as number) > second - windowSeconds) total += values[i] as number;
    }
    let waitMs = 0;
    if (excess > 0) {
      let freed = 0;
      for (let s = second - windowSeconds + 1; s <= second; s++) {
        const slot = s % windowSeconds;
        if (w.seconds[slot] === s) freed += values[slot] as number;
        if (freed >= excess) {
          waitMs = (s + windowSeconds) * 1000 - t;
          break;
        }
      }
    }
    return { total, waitMs };
  };

  return {
    admit(keyId, limits, estimatedTokens) {
      const rpm = limits.requestsPerMinute;
      const tpm = limits.tokensPerMinute;
      if (rpm <= 0 && tpm <= 0) return noTicket;
      const t = now();
      const second = Math.floor(t / 1000);
      const w = windowOf(keyId, second);
      if (rpm > 0) {
        const { total } = usage(w.requests, w, second, 0, t);
        if (total + 1 > rpm) {
          const { waitMs } = usage(w.requests, w, second, total + 1 - rpm, t);
          throw rateLimited(
            "requests",
            `Rate limit reached for requests per minute (RPM): limit ${rpm}, used ${total}. Retry in ${Math.ceil(waitMs / 1000)}s.`,
            Math.max(1, Math.ceil(waitMs / 1000)),
          );
        }
      }
      const estimate = tpm > 0 ? Math.max(0, Math.ceil(estimatedTokens)) : 0;
      if (tpm > 0) {
        const { total } = usage(w.tokens, w, second, 0, t);
        if (total > 0 && total + estimate > tpm) {
          // Room for this request once enough has expired; all of it when it alone exceeds the limit.
          const { waitMs } = usage(w.tokens, w, second, Math.min(total, total + estimate - tpm), t);
          throw rateLimited(
            "tokens",
            `Rate limit reached for tokens per minute (TPM): limit ${tpm}, used ${total}, requested ${estimate}. Retry in ${Math.ceil(waitMs / 1000)}s.`,
            Math.max(1, Math.ceil(waitMs / 1000)),
          );
        }
      }
      add(w, second, 1, estimate);
      if (tpm <= 0) return noTicket;
      let settled = false;
      return {
        settle(tokens) {
          if (settled) return;
          settled = true;
          // The estimate was booked in the admitting second; actual usage replaces it there.
          add(w, second, 0, Math.max(0, tokens) - estimate);
        },
      };
    },
    size: () => windows.size,
  };
}

/** Tokens a chat request is counted at while it runs: its prompt (about four characters a token) plus the output it asks for. */
export function estimatedChatTokens(request: Pick<ChatRequest, "messages" | "max_completion_tokens" | "max_tokens" | "n">): number {
  const output = (request.max_completion_tokens ?? request.max_tokens ?? 0) * (request.n ?? 1);
  return approxInputTokens(request.messages) + output;
}
