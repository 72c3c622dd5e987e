import { describe, expect, test } from "bun:test";
import { create } from "@bufbuild/protobuf";
import { RequestMetricsSchema } from "../gen/analytics/v1/analytics_pb.ts";
import { createCircuitBreakers } from "./circuit-breaker.ts";
import type { ModelRoute, Target } from "./config.ts";
import type { Call } from "./core.ts";
import type { GatewayError } from "./errors.ts";
import type { CallOptions, Provider } from "./providers/provider.ts";
import { failureOfStatus, UpstreamError } from "./providers/provider.ts";
import { attemptOrder, createUpstreamRouter } from "./routing.ts";

/** Park-Miller: a repeatable stream of numbers in [0, 1). */
function seeded(seed = 42) {
  let state = seed;
  return () => {
    state = (state * 48271) % 2147483647;
    return (state - 1) / 2147483646;
  };
}

type Script = (provider: string, options: CallOptions) => Promise<string>;

function setup(targets: Target[], extra: Partial<ModelRoute> = {}, script: Script = async (p) => p) {
  const clock = { t: 10_000 };
  const sleeps: number[] = [];
  const attempts: { provider: string; timeoutMs: number }[] = [];
  const called: Provider[] = [];
  const providers = new Map<string, Provider>();
  for (const t of targets) providers.set(t.provider, { name: t.provider } as Provider);
  const breakers = createCircuitBreakers({ failureThreshold: 3, cooldownMs: 5_000, now: () => clock.t });
  const router = createUpstreamRouter({
    providers,
    breakers,
    requestTimeoutMs: 60_000,
    backoffBaseMs: 100,
    backoffMaxMs: 1_000,
    maxRetryAfterMs: 2_000,
    random: () => 0.5,
    tick: () => clock.t,
    sleep: async (ms) => {
      sleeps.push(ms);
      clock.t += ms;
    },
  });
  const route: ModelRoute = {
    name: "m",
    targets,
    price: { inputMicros: 0n, cachedInputMicros: 0n, outputMicros: 0n, reasoningMicros: 0n },
    pricing: { input: "0", cachedInput: "0", output: "0", reasoning: "0" },
    tierPrices: new Map(),
    timeoutMs: 30_000,
    retries: 0,
    ...extra,
  };
  const newCall = (signal?: AbortSignal): Call => ({
    requestId: "req",
    startMs: 0,
    startTick: clock.t,
    secret: undefined,
    signal,
    principal: undefined,
    upstreamMs: 0,
    metrics: create(RequestMetricsSchema),
  });
  const run = (call = newCall(), stream = false) =>
    router.run(
      call,
      route,
      (provider, _model, options) => {
        attempts.push({ provider: provider.name, timeoutMs: options.timeoutMs });
        called.push(provider);
        return script(provider.name, options);
      },
      call.signal,
      stream,
    );
  return { clock, sleeps, attempts, called, breakers, run, newCall, router, providers };
}

const failure = (p: Promise<unknown>) =>
  p.then(
    () => {
      throw new Error("expected a rejection");
    },
    (e: unknown) => e as GatewayError,
  );

const t = (provider: string, weight?: number, more: Partial<Target> = {}): Target => ({ provider, model: `${provider}-model`, weight, ...more });

describe("weighted choice", () => {
  test("first picks follow the weights; the rest keep config order; weight 0 is fallback only", () => {
    const targets = [t("a", 70), t("b", 20), t("c", 10), t("d", 0)];
    const random = seeded();
    const firsts: Record<string, number> = { a: 0, b: 0, c: 0, d: 0 };
    const n = 20_000;
    for (let i = 0; i < n; i++) {
      const order = attemptOrder(targets, random);
      const first = order[0]?.provider as string;
      firsts[first] = (firsts[first] ?? 0) + 1;
      expect(order.map((x) => x.provider).filter((p) => p !== first)).toEqual(["a", "b", "c", "d"].filter((p) => p !== first));
    }
    expect(Math.abs((firsts.a as number) / n - 0.7)).toBeLessThan(0.015);
    expect(Math.abs((firsts.b as number) / n - 0.2)).toBeLessThan(0.015);
    expect(Math.abs((firsts.c as number) / n - 0.1)).toBeLessThan(0.015);
    expect(firsts.d).toBe(0);
  });

  test("without weights the config order stands", () => {
    const targets = [t("a"), t("b"), t("c")];
    expect(attemptOrder(targets, () => 0.99)).toBe(targets);
  });
});

describe("retries and fallback", () => {
  test("transient failures are retried with exponential backoff and jitter, then fall back", async () => {
    const { run, sleeps, attempts, newCall } = setup([t("a"), t("b")], { retries: 2 }, async (p) => {
      if (p === "a") throw new UpstreamError("transient", "a answered 500", 500);
      return "b served";
    });
    const call = newCall();
    expect(await run(call)).toBe("b served");
    expect(attempts.map((a) => a.provider)).toEqual(["a", "a", "a", "b"]);
    // base * 2^retry * (0.5 + random / 2) with random = 0.5
    expect(sleeps).toEqual([75, 150]);
    expect(call.metrics).toMatchObject({ provider: "b", servedModel: "b-model", fallbackUsed: true, retries: 3 });
  });

  test("a reload between attempts: a removed provider is not retried, a replaced one is retried as it now is", async () => {
    // `reload` runs inside the first attempt of "a", as a config reload landing while it is on the wire.
    const reloading = (reload: (providers: Map<string, Provider>) => void) => {
      let reloaded = false;
      const parts = setup([t("a"), t("b")], { retries: 2 }, async (p) => {
        if (p === "a" && !reloaded) {
          reloaded = true;
          reload(parts.providers);
        }
        if (p === "a") throw new UpstreamError("transient", "a answered 500", 500);
        return "b served";
      });
      return parts;
    };

    // Removed: the next target at once, not two more tries of a provider that is gone.
    const removed = reloading((providers) => providers.delete("a"));
    expect(await removed.run()).toBe("b served");
    expect(removed.attempts.map((a) => a.provider)).toEqual(["a", "b"]);

    // Replaced (a new URL or key): the retries call the new one.
    const after = { name: "a" } as Provider;
    const replaced = reloading((providers) => providers.set("a", after));
    const before = replaced.providers.get("a");
    expect(await replaced.run()).toBe("b served");
    expect(replaced.called.map((p) => p === after)).toEqual([false, true, true, false]);
    expect(replaced.called[0]).toBe(before as Provider);
  });

  test("Retry-After is honoured when it is longer than the backoff", async () => {
    let n = 0;
    const { run, sleeps } = setup([t("a")], { retries: 2 }, async () => {
      if (n++ < 2) throw new UpstreamError("transient", "a answered 429", 429, 1_500);
      return "ok";
    });
    expect(await run()).toBe("ok");
    expect(sleeps).toEqual([1_500, 1_500]);
  });

  test("a Retry-After longer than a request should wait falls back at once; a second 429 in a row holds the target", async () => {
    const { run, sleeps, attempts, breakers } = setup([t("a"), t("b")], { retries: 3 }, async (p) => {
      if (p === "a") throw new UpstreamError("transient", "a answered 429", 429, 30_000);
      return "b";
    });
    expect(await run()).toBe("b");
    expect(sleeps).toEqual([]);
    expect(breakers.state("a/a-model")).toBe("closed");
    // One 429 may be about its request alone: the next request tries the target; after two, requests skip it.
    expect(await run()).toBe("b");
    expect(await run()).toBe("b");
    expect(attempts.map((a) => a.provider)).toEqual(["a", "b", "a", "b", "b"]);
  });

  test("a 5xx's long Retry-After holds its target for every request at once", async () => {
    const { run, attempts } = setup([t("a"), t("b")], {}, async (p) => {
      if (p === "a") throw new UpstreamError("transient", "a answered 503", 503, 30_000);
      return "b";
    });
    expect(await run()).toBe("b");
    expect(await run()).toBe("b");
    expect(attempts.map((a) => a.provider)).toEqual(["a", "b", "b"]);
  });

  test("a target held by a 5xx's long Retry-After is unavailable (503), not rate limited, until the hold is over", async () => {
    let down = true;
    const { run, attempts, clock } = setup([t("a")], {}, async () => {
      if (down) throw new UpstreamError("transient", "a answered 503", 503, 30_000);
      return "a";
    });
    expect(await failure(run())).toMatchObject({ status: 502, code: "upstream_error" });
    for (let i = 0; i < 2; i++) {
      clock.t += 1_000;
      const e = await failure(run());
      expect([e.status, e.code, e.type, e.retryAfterS]).toEqual([503, "upstream_unavailable", "api_error", 29 - i]);
    }
    expect(attempts).toHaveLength(1);
    clock.t += 28_000;
    down = false;
    expect(await run()).toBe("a");
  });

  test("per-target retries and timeouts override the model's", async () => {
    const { run, attempts } = setup([t("a", undefined, { retries: 0, timeoutMs: 250 }), t("b")], { retries: 4, timeoutMs: 9_000 }, async (p) => {
      if (p === "a") throw new UpstreamError("timeout", "a timed out");
      return "b";
    });
    expect(await run()).toBe("b");
    expect(attempts).toEqual([
      { provider: "a", timeoutMs: 250 },
      { provider: "b", timeoutMs: 9_000 },
    ]);
  });

  test("misconfigured targets are not retried; rejected requests are 400; cancelled ones 499", async () => {
    const misconfigured = setup([t("a"), t("b")], { retries: 3 }, async (p) => {
      if (p === "a") throw new UpstreamError("misconfigured", "a answered 401", 401);
      return "b";
    });
    expect(await misconfigured.run()).toBe("b");
    expect(misconfigured.attempts.map((a) => a.provider)).toEqual(["a", "b"]);

    const rejected = setup([t("a"), t("b")], { retries: 3 }, async () => {
      throw new UpstreamError("rejected", "a answered 400: bad tool schema", 400);
    });
    const bad = await failure(rejected.run());
    expect([bad.status, bad.code]).toEqual([400, "upstream_rejected"]);
    expect(rejected.attempts).toHaveLength(1);

    const gone = setup([t("a"), t("b")], { retries: 3 }, async () => {
      throw new UpstreamError("cancelled", "client went away");
    });
    expect((await failure(gone.run())).status).toBe(499);
    expect(gone.attempts).toHaveLength(1);
  });

  test("a rejection passes on the upstream's status and OpenAI error, or else the gateway's code; the breaker stays closed", async () => {
    const context = {
      message: "This model's maximum context length is 128000 tokens. However, your messages resulted in 130412 tokens.",
      type: "invalid_request_error",
      param: "messages",
      code: "context_length_exceeded",
    };
    const rejected = setup([t("a"), t("b")], { retries: 3 }, async () => {
      throw new UpstreamError("rejected", `a answered 400: 400 ${context.message}`, 400, undefined, context);
    });
    const e = await failure(rejected.run());
    expect([e.status, e.type, e.code, e.param, e.message]).toEqual([400, context.type, context.code, context.param, context.message]);
    expect(rejected.attempts).toHaveLength(1);

    const unprocessable = setup([t("a")], {}, async () => {
      throw new UpstreamError("rejected", "a answered 422: 422 {\"detail\":[]}", 422);
    });
    const u = await failure(unprocessable.run());
    expect([u.status, u.type, u.code, u.param, u.message]).toEqual([422, "invalid_request_error", "upstream_rejected", null, "The upstream of `m` rejected the request (HTTP 422)."]);

    // Too large for this upstream: the request's fault, however often it happens.
    const tooLarge = setup([t("a"), t("b")], {}, async (p) => {
      throw new UpstreamError("rejected", `${p} answered 413: <html>413 Request Entity Too Large</html>`, 413);
    });
    for (let i = 0; i < 5; i++) {
      const big = await failure(tooLarge.run());
      expect([big.status, big.type, big.code, big.message]).toEqual([413, "invalid_request_error", "request_too_large", "The request is too large for the upstream of `m`."]);
    }
    expect(tooLarge.breakers.state("a/a-model")).toBe("closed");
    expect(tooLarge.attempts.map((a) => a.provider)).toEqual(["a", "a", "a", "a", "a"]);
  });

  test("an input OpenRouter's moderation flagged goes to the next target; refused by every one, it is the client's 403", async () => {
    const flagged = {
      message: 'openai/gpt-4o requires moderation on Azure. Your input was flagged for "violence". No credits were charged.',
      type: null,
      param: null,
      code: null,
    };
    const moderated = (p: string) =>
      new UpstreamError(failureOfStatus(403, flagged), `${p} answered 403: ${flagged.message}`, 403, undefined, flagged);
    // OpenRouter moderates for some providers only: another target may serve the request.
    const fallback = setup([t("a"), t("b")], { retries: 2 }, async (p) => {
      if (p === "a") throw moderated(p);
      return p;
    });
    expect(await fallback.run()).toBe("b");
    expect(fallback.attempts.map((a) => a.provider)).toEqual(["a", "b"]);

    const alone = setup([t("a")], { retries: 2 }, async (p) => {
      throw moderated(p);
    });
    for (let i = 0; i < 5; i++) {
      const e = await failure(alone.run());
      expect([e.status, e.type, e.message]).toEqual([403, "invalid_request_error", flagged.message]);
    }
    expect(alone.attempts).toHaveLength(5);
    expect(alone.breakers.state("a/a-model")).toBe("closed");
  });

  test("an upstream account out of quota is not retried and falls back; alone it is 502 upstream_quota_exceeded, not 429", async () => {
    const quota = {
      message: "You exceeded your current quota, please check your plan and billing details.",
      type: "insufficient_quota",
      param: null,
      code: "insufficient_quota",
    };
    const outOfQuota = (p: string) => new UpstreamError("misconfigured", `${p} answered 429: 429 ${quota.message}`, 429, 20_000, quota);
    const fallback = setup([t("a"), t("b")], { retries: 3 }, async (p) => {
      if (p === "a") throw outOfQuota(p);
      return "b";
    });
    expect(await fallback.run()).toBe("b");
    expect(fallback.attempts.map((a) => a.provider)).toEqual(["a", "b"]);
    expect(fallback.sleeps).toEqual([]);

    const alone = setup([t("a")], { retries: 3 }, async (p) => {
      throw outOfQuota(p);
    });
    const e = await failure(alone.run());
    expect([e.status, e.type, e.code, e.retryAfterS]).toEqual([502, "api_error", "upstream_quota_exceeded", undefined]);
    expect(e.message).toBe("The upstream of `m` is out of quota.");
    expect(alone.attempts).toHaveLength(1);
    // A breaker failure like any misconfigured target: it opens after the threshold.
    await failure(alone.run());
    await failure(alone.run());
    expect(alone.breakers.state("a/a-model")).toBe("open");

    // OpenRouter's (and other resellers') 402 for an account out of credits says the same.
    const credits = { message: "Insufficient credits. Add more using https://openrouter.ai/settings/credits", type: null, param: null, code: "402" };
    const unpaid = setup([t("a")], { retries: 3 }, async (p) => {
      throw new UpstreamError(failureOfStatus(402, credits), `${p} answered 402: 402 ${credits.message}`, 402, undefined, credits);
    });
    const paid = await failure(unpaid.run());
    expect([paid.status, paid.code]).toEqual([502, "upstream_quota_exceeded"]);
    expect(unpaid.attempts).toHaveLength(1);
  });

  test("when every target fails the message says what failed, without the upstream's words or provider details", async () => {
    const keyless = setup([t("a"), t("b")], {}, async (p) => {
      throw new UpstreamError("misconfigured", `provider ${p}: OPENAI_API_KEY is not set`);
    });
    const k = await failure(keyless.run());
    expect([k.status, k.code, k.message]).toEqual([502, "upstream_error", "Every upstream of `m` failed; the last one is not configured."]);

    const refused = setup([t("a")], {}, async () => {
      throw new UpstreamError("misconfigured", "a answered 401: 401 Incorrect API key provided: sk-proj-abc", 401);
    });
    expect((await failure(refused.run())).message).toBe("The upstream of `m` refused the gateway's request (HTTP 401).");

    const failing = setup([t("a")], {}, async () => {
      throw new UpstreamError("transient", "a answered 503: 503 upstream connect error at http://10.0.0.7:8000", 503);
    });
    expect((await failure(failing.run())).message).toBe("The upstream of `m` answered HTTP 503.");

    const limited = setup([t("a")], {}, async () => {
      throw new UpstreamError("transient", "a answered 429: 429 Rate limit reached for org-123", 429);
    });
    expect((await failure(limited.run())).message).toBe("The upstream of `m` is rate limited.");

    const slow = setup([t("a")], {}, async () => {
      throw new UpstreamError("timeout", "a: timed out");
    });
    expect((await failure(slow.run())).message).toBe("The upstream of `m` timed out.");
  });

  test("when every target fails: 504 after timeouts, 429 with Retry-After after rate limits, else 502", async () => {
    const timeouts = setup([t("a"), t("b")], {}, async () => {
      throw new UpstreamError("timeout", "timed out");
    });
    expect((await failure(timeouts.run())).code).toBe("upstream_timeout");

    const limited = setup([t("a")], {}, async () => {
      throw new UpstreamError("transient", "a answered 429", 429, 1_200);
    });
    const e = await failure(limited.run());
    expect([e.status, e.retryAfterS]).toEqual([429, 2]);

    const broken = setup([t("a")], {}, async () => {
      throw new Error("socket hang up");
    });
    const b = await failure(broken.run());
    expect([b.status, b.message]).toEqual([502, "The upstream of `m` gave no usable answer."]);
  });
});

describe("time limits", () => {
  test("attempts get what is left of the request's limit; backoff never sleeps past it", async () => {
    const s = setup([t("a")], { retries: 5, timeoutMs: 3_000, requestTimeoutMs: 4_000 }, async () => {
      s.clock.t += 1_000;
      throw new UpstreamError("transient", "a answered 503", 503);
    });
    const e = await failure(s.run());
    // Out of time for another try, though not yet past the limit: the upstream's failure is the answer.
    expect([e.status, e.code]).toEqual([502, "upstream_error"]);
    // 1000 ms attempt + 75 + 1000 + 150 + 1000 = 3225; a 300 ms backoff and a try would not fit before 4000.
    expect(s.attempts.map((a) => a.timeoutMs)).toEqual([3_000, 2_925, 1_775]);
    expect(s.sleeps).toEqual([75, 150]);
  });

  test("a request that runs out of time is 504 request_timeout", async () => {
    const s = setup([t("a"), t("b")], { retries: 1, timeoutMs: 3_000, requestTimeoutMs: 2_500 }, async (_p, options) => {
      s.clock.t += Math.min(1_000, options.timeoutMs);
      throw new UpstreamError(options.timeoutMs <= 1_000 ? "timeout" : "transient", "slow and failing");
    });
    const e = await failure(s.run());
    expect([e.status, e.code, e.message]).toEqual([504, "request_timeout", "The request did not finish within the gateway's limit of 2500 ms."]);
    expect(s.attempts).toEqual([
      { provider: "a", timeoutMs: 2_500 },
      { provider: "a", timeoutMs: 1_425 },
      { provider: "b", timeoutMs: 425 },
    ]);
  });
});

describe("circuit breaker in routing", () => {
  test("a failing target is skipped while open, probed after the cooldown, and closed by a good probe", async () => {
    let aHealthy = false;
    const s = setup([t("a"), t("b")], {}, async (p) => {
      if (p === "a" && !aHealthy) throw new UpstreamError("transient", "a answered 500", 500);
      return p;
    });
    for (let i = 0; i < 3; i++) expect(await s.run()).toBe("b");
    expect(s.breakers.state("a/a-model")).toBe("open");
    s.attempts.length = 0;
    expect(await s.run()).toBe("b");
    expect(s.attempts.map((a) => a.provider)).toEqual(["b"]);

    s.clock.t += 5_000;
    aHealthy = true;
    expect(await s.run()).toBe("a");
    expect(s.breakers.state("a/a-model")).toBe("closed");
  });

  test("every target open fails fast with 503 and a Retry-After", async () => {
    const s = setup([t("a")], {}, async () => {
      throw new UpstreamError("transient", "a answered 500", 500);
    });
    for (let i = 0; i < 3; i++) expect((await failure(s.run())).status).toBe(502);
    s.attempts.length = 0;
    s.clock.t += 1_000;
    const e = await failure(s.run());
    expect([e.status, e.code, e.retryAfterS]).toEqual([503, "upstream_unavailable", 4]);
    expect(s.attempts).toHaveLength(0);
  });
});

describe("what an attempt's end says about its target", () => {
  test("a client gone before an attempt: no upstream hears of it", async () => {
    const { run, attempts, newCall } = setup([t("a")]);
    const gone = new AbortController();
    gone.abort();
    expect((await failure(run(newCall(gone.signal)))).code).toBe("client_closed_request");
    expect(attempts).toEqual([]);
  });

  test("an attempt cut short by what earlier attempts left of the request's limit is not its target's failure", async () => {
    const { run, attempts, breakers, clock } = setup([t("a")], { retries: 1, requestTimeoutMs: 1_000 }, async (_p, options) => {
      clock.t += Math.min(600, options.timeoutMs);
      throw options.timeoutMs > 600 ? new UpstreamError("transient", "a answered 500", 500) : new UpstreamError("timeout", "a: timed out");
    });
    for (let i = 0; i < 2; i++) expect((await failure(run())).code).toBe("request_timeout");
    // Each request: a 500 after 600 ms, a 75 ms backoff, then a retry with the 325 ms left, cut by the request's limit.
    expect(attempts.map((a) => a.timeoutMs)).toEqual([1_000, 325, 1_000, 325]);
    // Two failures (the 500s) of the three that open it: the cut retries said nothing.
    expect(breakers.state("a/a-model")).toBe("closed");
  });

  test("a target that does not answer within the request's whole limit fails: its breaker opens, later requests fall back", async () => {
    // The request's limit (1 s) is below the target's own timeout (30 s), so its first attempt has the request's all.
    const { run, attempts, breakers, clock } = setup([t("dead"), t("b")], { requestTimeoutMs: 1_000 }, async (p, options) => {
      if (p === "b") return p;
      clock.t += options.timeoutMs;
      throw new UpstreamError("timeout", "dead: timed out");
    });
    for (let i = 0; i < 3; i++) expect((await failure(run())).code).toBe("request_timeout");
    expect(attempts.map((a) => [a.provider, a.timeoutMs])).toEqual([
      ["dead", 1_000],
      ["dead", 1_000],
      ["dead", 1_000],
    ]);
    expect(breakers.state("dead/dead-model")).toBe("open");
    for (let i = 0; i < 3; i++) expect(await run()).toBe("b");
  });

  test("waiting out a Retry-After is the upstream's time, not the gateway's", async () => {
    let n = 0;
    const { run, newCall } = setup([t("a")], { retries: 2 }, async () => {
      if (n++ < 2) throw new UpstreamError("transient", "a answered 429", 429, 1_500);
      return "ok";
    });
    const call = newCall();
    expect(await run(call)).toBe("ok");
    expect(call.upstreamMs).toBe(3_000);
  });

  test("a target held back by its Retry-After is a 429 to retry later, not a failing upstream", async () => {
    const { run } = setup([t("a")], {}, async () => {
      throw new UpstreamError("transient", "a answered 429", 429, 30_000);
    });
    for (let i = 0; i < 3; i++) {
      expect(await failure(run())).toMatchObject({ status: 429, code: "upstream_rate_limited", retryAfterS: 30 });
    }
  });

  test("429s in a row hold their target for longer each time, capped; one request probes it after a hold", async () => {
    let answer: (() => void) | undefined;
    const { run, clock, attempts, breakers } = setup([t("a")], {}, async () => {
      if (answer === undefined) throw new UpstreamError("transient", "a answered 429", 429);
      await new Promise<void>((resolve) => (answer = resolve));
      return "a served";
    });
    const rateLimited = async (retryAfterS: number) =>
      expect(await failure(run())).toMatchObject({ status: 429, code: "upstream_rate_limited", retryAfterS });
    // One 429 holds no one else back; the second in a row holds the target for a second.
    await failure(run());
    await failure(run());
    await rateLimited(1);
    expect(attempts).toHaveLength(2);
    // After each hold one request probes it; each probe's 429 doubles the hold, up to the breaker's cooldown.
    for (const holdMs of [2_000, 4_000, 5_000, 5_000]) {
      clock.t += breakers.waitMs("a/a-model");
      await failure(run());
      expect(breakers.waitMs("a/a-model")).toBe(holdMs);
      await rateLimited(holdMs / 1000);
    }
    expect(attempts).toHaveLength(6);
    expect(breakers.state("a/a-model")).toBe("closed");
    // While the probe is out every other request is held back with a 429; its success ends the hold for all.
    clock.t += breakers.waitMs("a/a-model");
    answer = () => {};
    const probe = run();
    await Bun.sleep(0);
    await rateLimited(1);
    expect(attempts).toHaveLength(7);
    answer();
    expect(await probe).toBe("a served");
    answer = undefined;
    await failure(run());
    expect(breakers.allow("a/a-model")).toBe(true);
  });

  test("a target held back for its 429s is a 429 to retry later whatever its breaker's state", async () => {
    let answer = 500;
    const { run, clock, breakers } = setup([t("a")], {}, async () => {
      throw new UpstreamError("transient", `a answered ${answer}`, answer);
    });
    for (let i = 0; i < 3; i++) await failure(run());
    clock.t += 5_000;
    answer = 429;
    // Probes of the half-open breaker, rate limited twice in a row: held for a second.
    expect((await failure(run())).status).toBe(429);
    expect((await failure(run())).status).toBe(429);
    expect(breakers.state("a/a-model")).toBe("half-open");
    expect(await failure(run())).toMatchObject({ status: 429, code: "upstream_rate_limited", retryAfterS: 1 });
  });

  test("one request's 429s, however often it retries, hold no other request back", async () => {
    let answers = ["429", "429", "ok"];
    const { run, attempts } = setup([t("a")], { retries: 1 }, async () => {
      const answer = answers.shift();
      if (answer !== "ok") throw new UpstreamError("transient", "a answered 429", 429, 500);
      return "a served";
    });
    // Its first 429 and its retry's: one request's evidence, its prompt perhaps the one over the limit.
    expect((await failure(run())).status).toBe(429);
    expect(await run()).toBe("a served");
    expect(attempts).toHaveLength(3);
    // Two requests' 429s in a row do hold the target (the second waits the hold out and probes it, in vain), and a
    // third request is held back without an attempt.
    answers = ["429", "429", "429", "429"];
    await failure(run());
    await failure(run());
    expect(attempts).toHaveLength(7);
    expect(await failure(run())).toMatchObject({ status: 429, code: "upstream_rate_limited", retryAfterS: 2 });
    expect(attempts).toHaveLength(7);
  });

  test("a streamed probe after a hold frees the target once it is answered, not when its stream ends", async () => {
    let answer = "429";
    const { run, newCall, router, clock, attempts, breakers } = setup([t("a")], {}, async () => {
      if (answer === "429") throw new UpstreamError("transient", "a answered 429", 429);
      return "a streams";
    });
    await failure(run());
    await failure(run());
    clock.t += breakers.waitMs("a/a-model");
    answer = "ok";
    const stream = newCall();
    expect(await run(stream, true)).toBe("a streams");
    // The stream runs on; other requests go to the target meanwhile.
    expect(await run()).toBe("a streams");
    expect(await run(newCall(), true)).toBe("a streams");
    expect(attempts).toHaveLength(5);
    router.streamEnded(stream, undefined);
    expect(breakers.state("a/a-model")).toBe("closed");
  });

  test("a streamed probe of a tripped breaker closes it once answered, not when its stream ends", async () => {
    let healthy = false;
    const { run, newCall, router, clock, attempts, breakers } = setup([t("a")], {}, async () => {
      if (!healthy) throw new UpstreamError("transient", "a answered 500", 500);
      return "a streams";
    });
    for (let i = 0; i < 3; i++) await failure(run());
    expect(breakers.state("a/a-model")).toBe("open");
    clock.t += 5_000;
    healthy = true;
    const probe = newCall();
    expect(await run(probe, true)).toBe("a streams");
    // The probe's stream runs on (a long answer); the target serves every other request meanwhile.
    expect(breakers.state("a/a-model")).toBe("closed");
    expect(await run()).toBe("a streams");
    expect(await run(newCall(), true)).toBe("a streams");
    expect(attempts).toHaveLength(6);
    // Broken later on, the stream counts as one failure of a closed breaker.
    router.streamEnded(probe, { status: 502, code: "upstream_error" } as GatewayError);
    expect(breakers.state("a/a-model")).toBe("closed");
    healthy = false;
    for (let i = 0; i < 2; i++) await failure(run());
    expect(breakers.state("a/a-model")).toBe("open");
  });

  test("only a probe's own end frees it: attempts sent before the breaker opened do not let a second probe in", async () => {
    const pending: Array<{ resolve: (v: string) => void; reject: (e: UpstreamError) => void }> = [];
    const s = setup([t("a")], {}, () => new Promise<string>((resolve, reject) => pending.push({ resolve, reject })));
    const next = () => pending.shift() as (typeof pending)[number];
    const failing = new UpstreamError("transient", "a answered 500", 500);
    // Sent while closed: a stream that answered and still runs, and a request still waiting for its answer.
    const stream = s.newCall();
    const streamed = s.run(stream, true);
    await Bun.sleep(0);
    next().resolve("a");
    expect(await streamed).toBe("a");
    const early = failure(s.run());
    await Bun.sleep(0);
    const tripping = [s.run(), s.run(), s.run()].map(failure);
    await Bun.sleep(0);
    for (const p of pending.splice(1)) p.reject(failing);
    await Promise.all(tripping);
    expect(s.breakers.state("a/a-model")).toBe("open");
    s.clock.t += 5_000;
    const probe = failure(s.run());
    await Bun.sleep(0);
    expect(s.attempts).toHaveLength(6);
    // The stream's client leaves, the early request gets a 429: neither was the probe, which is still out.
    const skipped = async () => {
      const answered = failure(s.run());
      await Bun.sleep(0);
      expect(s.attempts).toHaveLength(6);
      expect(await answered).toMatchObject({ status: 503, code: "upstream_unavailable" });
    };
    s.router.streamEnded(stream, { code: "client_closed_request" } as GatewayError);
    await skipped();
    next().reject(new UpstreamError("transient", "a answered 429", 429));
    expect((await early).status).toBe(429);
    // Past any hold a 429 sets.
    s.clock.t += 1_000;
    await skipped();
    next().reject(failing);
    expect((await probe).status).toBe(502);
    expect(s.breakers.state("a/a-model")).toBe("open");
  });

  test("a stream's target is judged when the stream ends: failures mid-stream open its breaker", async () => {
    const { run, newCall, router, breakers } = setup([t("a")]);
    const broken = { status: 502, code: "upstream_error" } as GatewayError;
    for (let i = 0; i < 3; i++) {
      const call = newCall();
      expect(await run(call, true)).toBe("a");
      router.streamEnded(call, broken);
    }
    expect(breakers.state("a/a-model")).toBe("open");

    // A stream its client left, or that ran out of the request's time, says nothing; a completed one closes it.
    const other = setup([t("b")]);
    for (const error of [{ code: "client_closed_request" }, { code: "request_timeout" }, undefined] as GatewayError[]) {
      const call = other.newCall();
      await other.run(call, true);
      other.router.streamEnded(call, error);
      other.router.streamEnded(call, broken); // only the first end counts
    }
    expect(other.breakers.state("b/b-model")).toBe("closed");
  });
});
