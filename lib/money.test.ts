import { describe, expect, test } from "bun:test";
import fc from "fast-check";
import {
  costNanos,
  costParts,
  dearestPrice,
  divRoundHalfUp,
  formatCents,
  formatNanosAmount,
  formatNanosUsd,
  MAX_COST_NANOS_PER_REQUEST,
  MAX_PRICE_MICROS_PER_MTOK,
  nanosToCents,
  parseUsdMicros,
  parseUsdNanos,
  type Price,
} from "./money.ts";

const gpt4o: Price = {
  inputMicros: parseUsdMicros("2.50"),
  cachedInputMicros: parseUsdMicros("1.25"),
  outputMicros: parseUsdMicros("10"),
  reasoningMicros: parseUsdMicros("10"),
};

const tokens = (input: number, output: number, cached = 0, reasoning = 0) => ({
  inputTokens: BigInt(input),
  cachedInputTokens: BigInt(cached),
  outputTokens: BigInt(output),
  reasoningTokens: BigInt(reasoning),
});

describe("parseUsdMicros", () => {
  test("parses decimal strings exactly", () => {
    expect(parseUsdMicros("2.50")).toBe(2_500_000n);
    expect(parseUsdMicros("0.075")).toBe(75_000n);
    expect(parseUsdMicros("0.000001")).toBe(1n);
    expect(parseUsdMicros("15")).toBe(15_000_000n);
  });
  test("rejects what is not a plain non-negative decimal", () => {
    for (const bad of ["", "-1", "1e3", "0.0000001", "abc", "1.2.3", "NaN"]) {
      expect(() => parseUsdMicros(bad)).toThrow(RangeError);
    }
  });
  test("a price is at most $10,000 per million tokens, so only a request past 100M tokens reaches the cost cap", () => {
    expect(parseUsdMicros("10000")).toBe(MAX_PRICE_MICROS_PER_MTOK);
    for (const over of ["10000.000001", "999999999"]) {
      expect(() => parseUsdMicros(over)).toThrow("is over $10,000 per million tokens");
    }
    const dearest = {
      inputMicros: MAX_PRICE_MICROS_PER_MTOK,
      cachedInputMicros: MAX_PRICE_MICROS_PER_MTOK,
      outputMicros: MAX_PRICE_MICROS_PER_MTOK,
      reasoningMicros: MAX_PRICE_MICROS_PER_MTOK,
    };
    // The cap is reached only past 100 million tokens, far beyond any model's context window.
    const tokens = (input: bigint, output: bigint) => ({ inputTokens: input, cachedInputTokens: 0n, outputTokens: output, reasoningTokens: 0n });
    expect(costNanos(tokens(50_000_000n, 49_999_999n), dearest)).toBeLessThan(MAX_COST_NANOS_PER_REQUEST);
    expect(costNanos(tokens(50_000_000n, 50_000_000n), dearest)).toBe(MAX_COST_NANOS_PER_REQUEST);
  });

  test("nanos parse budgets with 9 decimals", () => {
    expect(parseUsdNanos("10")).toBe(10_000_000_000n);
    expect(parseUsdNanos("0.000000001")).toBe(1n);
  });
});

test("dearestPrice takes each kind's dearest price: what a request served at any tier can be billed", () => {
  const flex = { inputMicros: 1n, cachedInputMicros: 1n, outputMicros: 4n, reasoningMicros: 4n };
  const standard = { inputMicros: 2n, cachedInputMicros: 1n, outputMicros: 8n, reasoningMicros: 8n, audioInputMicros: 40n };
  const priority = { inputMicros: 4n, cachedInputMicros: 2n, outputMicros: 16n, reasoningMicros: 16n };
  expect(dearestPrice([flex, standard, priority])).toEqual({
    inputMicros: 4n,
    cachedInputMicros: 2n,
    outputMicros: 16n,
    reasoningMicros: 16n,
    audioInputMicros: 40n,
    audioOutputMicros: 16n,
  });
});

describe("costNanos", () => {
  test("prices each token type at its own rate", () => {
    // 1000 input at $2.50/M = $0.0025 = 2_500_000 nanos; 500 output at $10/M = 5_000_000 nanos.
    expect(costNanos(tokens(1000, 500), gpt4o)).toBe(7_500_000n);
    // 400 of the 1000 input cached: 600*2.5 + 400*1.25 = 2000 micro-token-USD... = 2_000_000 nanos
    expect(costNanos(tokens(1000, 0, 400), gpt4o)).toBe(2_000_000n);
  });
  test("rounds half-up once per request, not per token type", () => {
    const price: Price = { inputMicros: 1n, cachedInputMicros: 1n, outputMicros: 1n, reasoningMicros: 1n };
    // 1 token at 1 micro-USD/M = 0.001 nano each; 499 tokens -> 0.499 -> 0; 500 -> 0.5 -> 1
    expect(costNanos(tokens(499, 0), price)).toBe(0n);
    expect(costNanos(tokens(500, 0), price)).toBe(1n);
    // split across types the parts would round to 0 each, together they make 1
    expect(costNanos(tokens(250, 250), price)).toBe(1n);
  });
  test("stays exact far beyond float precision", () => {
    const big = tokens(2 ** 31 - 1, 2 ** 31 - 1);
    const expensive: Price = {
      inputMicros: parseUsdMicros("999.999999"),
      cachedInputMicros: 0n,
      outputMicros: parseUsdMicros("999.999999"),
      reasoningMicros: 0n,
    };
    expect(costNanos(big, expensive)).toBe(divRoundHalfUp(2n * (2n ** 31n - 1n) * 999_999_999n, 1000n));
  });
  test("cached and reasoning counts larger than their totals are clamped", () => {
    expect(costNanos(tokens(10, 10, 50, 50), gpt4o)).toBe(costNanos(tokens(10, 10, 10, 10), gpt4o));
  });
});

describe("costParts", () => {
  test("parts add up exactly to the total, the rounding going to the largest remainders", () => {
    const price: Price = { inputMicros: 1n, cachedInputMicros: 3n, outputMicros: 7n, reasoningMicros: 11n };
    for (const t of [tokens(250, 250), tokens(1999, 333, 77, 12), tokens(1, 1, 1, 1), tokens(0, 0), tokens(123457, 98765, 4321, 567)]) {
      const parts = costParts(t, price);
      expect(parts.inputNanos + parts.cachedInputNanos + parts.outputNanos + parts.reasoningNanos).toBe(parts.totalNanos);
      expect(parts.totalNanos).toBe(costNanos(t, price));
    }
    // 250 input at 1 micro/M = 0.25 nano, 250 output at 7 = 1.75 nano: total 2, output takes the leftover.
    expect(costParts(tokens(250, 250), price)).toEqual({
      inputNanos: 0n,
      cachedInputNanos: 0n,
      outputNanos: 2n,
      reasoningNanos: 0n,
      totalNanos: 2n,
    });
  });
  test("for any tokens and prices, parts sum to the total and each is within one nano of its exact share", () => {
    const count = fc.bigInt({ min: 0n, max: 2n ** 31n - 1n });
    const micros = fc.bigInt({ min: 0n, max: 1_000_000_000n });
    fc.assert(
      fc.property(count, count, count, count, micros, micros, micros, micros, (i, c, o, r, pi, pc, po, pr) => {
        const t = { inputTokens: i, cachedInputTokens: c, outputTokens: o, reasoningTokens: r };
        const parts = costParts(t, { inputMicros: pi, cachedInputMicros: pc, outputMicros: po, reasoningMicros: pr });
        const sum = parts.inputNanos + parts.cachedInputNanos + parts.outputNanos + parts.reasoningNanos;
        const cached = c < i ? c : i;
        const reasoning = r < o ? r : o;
        const exact = [(i - cached) * pi, cached * pc, (o - reasoning) * po, reasoning * pr];
        const got = [parts.inputNanos, parts.cachedInputNanos, parts.outputNanos, parts.reasoningNanos];
        return sum === parts.totalNanos && got.every((g, k) => g * 1000n >= (exact[k] ?? 0n) - 1000n && g * 1000n <= (exact[k] ?? 0n) + 1000n);
      }),
    );
  });

  test("audio tokens are priced at the audio rates, their cost in the input and output parts", () => {
    const audio = { ...gpt4o, audioInputMicros: parseUsdMicros("40"), audioOutputMicros: parseUsdMicros("80") };
    // 1000 input: 400 cached, 500 audio; 500 output: 100 reasoning, 300 audio. Audio past the uncached input is text.
    const t = { ...tokens(1000, 500, 400, 100), audioInputTokens: 500n, audioOutputTokens: 300n };
    expect(costParts(t, audio)).toEqual({
      inputNanos: 100n * 2_500n + 500n * 40_000n,
      cachedInputNanos: 500_000n,
      outputNanos: 100n * 10_000n + 300n * 80_000n,
      reasoningNanos: 1_000_000n,
      totalNanos: 250_000n + 20_000_000n + 500_000n + 1_000_000n + 24_000_000n + 1_000_000n,
    });
    expect(costParts({ ...t, audioInputTokens: 900n, audioOutputTokens: 900n }, audio)).toMatchObject({
      inputNanos: 600n * 40_000n,
      outputNanos: 400n * 80_000n,
    });
    // Unpriced, audio is text.
    expect(costParts(t, gpt4o)).toEqual(costParts(tokens(1000, 500, 400, 100), gpt4o));
  });

  test("each part is priced at its own rate", () => {
    expect(costParts(tokens(1000, 500, 400, 100), gpt4o)).toEqual({
      inputNanos: 1_500_000n,
      cachedInputNanos: 500_000n,
      outputNanos: 4_000_000n,
      reasoningNanos: 1_000_000n,
      totalNanos: 7_000_000n,
    });
  });
});

describe("rounding and formatting", () => {
  test("half-up to cents at the boundary, symmetric for credits", () => {
    expect(nanosToCents(4_999_999n)).toBe(0n);
    expect(nanosToCents(5_000_000n)).toBe(1n);
    expect(nanosToCents(-5_000_000n)).toBe(-1n);
    expect(nanosToCents(-4_999_999n)).toBe(0n);
    expect(nanosToCents(1_234_567_890n)).toBe(123n);
  });
  test("formats", () => {
    expect(formatCents(123456789n)).toBe("$1,234,567.89");
    expect(formatCents(-5n)).toBe("-$0.05");
    expect(formatNanosUsd(1500n)).toBe("0.0000015");
    expect(formatNanosUsd(2_000_000_000n)).toBe("2");
    expect(formatNanosAmount(2_000_000_000n)).toBe("$2.00");
    expect(formatNanosAmount(1_234_567_891_000_000n)).toBe("$1,234,567.891");
    expect(formatNanosAmount(-1500n)).toBe("-$0.0000015");
    expect(formatNanosAmount(0n)).toBe("$0.00");
  });
});
