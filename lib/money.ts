/**
 * Money is integer nano-USD (1e-9 USD) everywhere. Prices are configured as decimal USD per
 * million tokens and held as integer micro-USD per million tokens. Arithmetic is in bigint so
 * no product of tokens and prices can lose precision.
 */

export const NANOS_PER_USD = 1_000_000_000n;
export const NANOS_PER_CENT = 10_000_000n;

/** Integer micro-USD per million tokens for each token type. */
export interface Price {
  inputMicros: bigint;
  cachedInputMicros: bigint;
  outputMicros: bigint;
  reasoningMicros: bigint;
  /** Audio input and output, when priced apart from text (gpt-4o-audio's); by default the input and output price. */
  audioInputMicros?: bigint;
  audioOutputMicros?: bigint;
}

/** Each kind's dearest price among `prices` (at least one). */
export function dearestPrice(prices: readonly Price[]): Price {
  const most = (pick: (p: Price) => bigint) => prices.map(pick).reduce((a, b) => (b > a ? b : a));
  return {
    inputMicros: most((p) => p.inputMicros),
    cachedInputMicros: most((p) => p.cachedInputMicros),
    outputMicros: most((p) => p.outputMicros),
    reasoningMicros: most((p) => p.reasoningMicros),
    audioInputMicros: most((p) => p.audioInputMicros ?? p.inputMicros),
    audioOutputMicros: most((p) => p.audioOutputMicros ?? p.outputMicros),
  };
}

export interface Tokens {
  inputTokens: bigint;
  cachedInputTokens: bigint;
  outputTokens: bigint;
  reasoningTokens: bigint;
  /** The parts of input and of output tokens that are audio; none unless set. */
  audioInputTokens?: bigint;
  audioOutputTokens?: bigint;
}

/** Most tokens of each kind one request is metered with, as the TokenUsage contract documents (0..2^31). */
export const MAX_TOKENS_PER_REQUEST = 2n ** 31n;
/**
 * Most one request may cost, in nano-USD ($1,000,000): billing refuses more, analytics does not store more. Over 9,000
 * such requests of one org, day, project and key fit in billing's bigint daily total.
 */
export const MAX_COST_NANOS_PER_REQUEST = 10n ** 15n;

/**
 * Dearest price per million tokens a model may have, in micro-USD ($10,000; the dearest models ask hundreds). At it a
 * request reaches MAX_COST_NANOS_PER_REQUEST, whose cap drops the rest of its cost, only past 100 million tokens (input
 * and output together), ten times any model's context window. Billing accepts up to 2^31 tokens of each kind, which
 * here could cost $42.9M: keeping even those under the cap would take a bound of $232.83, below real output prices.
 */
export const MAX_PRICE_MICROS_PER_MTOK = 10_000n * 1_000_000n;

const decimalUsd = /^(\d{1,9})(?:\.(\d{1,6}))?$/;

/**
 * Parses a price, a non-negative decimal USD amount per million tokens with at most 6 decimals ("2.5", "0.075"), into
 * micro-USD; at most MAX_PRICE_MICROS_PER_MTOK.
 */
export function parseUsdMicros(text: string): bigint {
  const match = decimalUsd.exec(text.trim());
  if (!match) throw new RangeError(`"${text}" is not a USD amount with at most 6 decimals`);
  const [, whole = "0", frac = ""] = match;
  const micros = BigInt(whole) * 1_000_000n + BigInt(frac.padEnd(6, "0"));
  if (micros > MAX_PRICE_MICROS_PER_MTOK) throw new RangeError(`"${text}" is over $10,000 per million tokens, more than any model costs`);
  return micros;
}

/** Parses a decimal USD amount with at most 9 decimals into nano-USD (budgets, discounts caps). */
export function parseUsdNanos(text: string): bigint {
  const match = /^(\d{1,12})(?:\.(\d{1,9}))?$/.exec(text.trim());
  if (!match) throw new RangeError(`"${text}" is not a USD amount with at most 9 decimals`);
  const [, whole = "0", frac = ""] = match;
  return BigInt(whole) * NANOS_PER_USD + BigInt(frac.padEnd(9, "0"));
}

/** Integer division of a non-negative or negative numerator, rounding half away from zero. */
export function divRoundHalfUp(numerator: bigint, denominator: bigint): bigint {
  if (denominator <= 0n) throw new RangeError("denominator must be positive");
  const sign = numerator < 0n ? -1n : 1n;
  const abs = numerator * sign;
  return sign * ((abs * 2n + denominator) / (denominator * 2n));
}

/**
 * A request's cost in nano-USD and its parts per token type; the parts add up to the total exactly. Audio is no part of
 * its own: its cost is in the input and output parts, as its tokens are in the input and output tokens.
 */
export interface CostParts {
  inputNanos: bigint;
  cachedInputNanos: bigint;
  outputNanos: bigint;
  reasoningNanos: bigint;
  totalNanos: bigint;
}

/**
 * Exact cost of one request in nano-USD, rounded half-up once, split per token type.
 * Cached input tokens are part of input tokens and reasoning tokens part of output tokens, and so are audio tokens, of
 * the uncached input and of the output besides reasoning; each part is priced at its own rate. The parts are floored
 * and the rounding left over goes to the parts with the largest remainders, so invoices itemise exactly what was charged.
 */
export function costParts(tokens: Tokens, price: Price): CostParts {
  const products = costProducts(tokens, price);
  const totalNanos = divRoundHalfUp(
    products.reduce((a, b) => a + b, 0n),
    1000n,
  );
  const parts = products.map((p) => p / 1000n);
  let leftover = totalNanos - parts.reduce((a, b) => a + b, 0n);
  // Usually none is left over (always so when every product is a whole nano-USD, as most prices make it).
  if (leftover !== 0n) {
    const byRemainder = products
      .map((p, i) => ({ i, r: p % 1000n }))
      .sort((a, b) => (b.r > a.r ? 1 : b.r < a.r ? -1 : a.i - b.i));
    for (const { i, r } of byRemainder) {
      if (leftover === 0n || r === 0n) break;
      parts[i] = (parts[i] ?? 0n) + 1n;
      leftover--;
    }
  }
  const [input = 0n, cachedInputNanos = 0n, output = 0n, reasoningNanos = 0n, audioIn = 0n, audioOut = 0n] = parts;
  return { inputNanos: input + audioIn, cachedInputNanos, outputNanos: output + audioOut, reasoningNanos, totalNanos };
}

/** Exact cost of one request in nano-USD, rounded half-up once (see costParts, whose total this is). */
export function costNanos(tokens: Tokens, price: Price): bigint {
  return divRoundHalfUp(
    costProducts(tokens, price).reduce((a, b) => a + b, 0n),
    1000n,
  );
}

/**
 * Each kind of token times its price, in thousandths of a nano-USD: uncached input, cached input, output besides
 * reasoning, reasoning, audio input, audio output.
 */
function costProducts(tokens: Tokens, price: Price): bigint[] {
  const cached = min(tokens.cachedInputTokens, tokens.inputTokens);
  const reasoning = min(tokens.reasoningTokens, tokens.outputTokens);
  const audioInput = min(tokens.audioInputTokens ?? 0n, tokens.inputTokens - cached);
  const audioOutput = min(tokens.audioOutputTokens ?? 0n, tokens.outputTokens - reasoning);
  // tokens * micro-USD per 1e6 tokens = tokens * micros / 1e6 micro-USD = tokens * micros / 1e3 nano-USD
  return [
    (tokens.inputTokens - cached - audioInput) * price.inputMicros,
    cached * price.cachedInputMicros,
    (tokens.outputTokens - reasoning - audioOutput) * price.outputMicros,
    reasoning * price.reasoningMicros,
    audioInput * (price.audioInputMicros ?? price.inputMicros),
    audioOutput * (price.audioOutputMicros ?? price.outputMicros),
  ];
}

/** Rounds nano-USD to cents, half-up (away from zero), once. */
export function nanosToCents(nanos: bigint): bigint {
  return divRoundHalfUp(nanos, NANOS_PER_CENT);
}

/** "$1,234.56" from cents. */
export function formatCents(cents: bigint): string {
  const sign = cents < 0n ? "-" : "";
  const abs = cents < 0n ? -cents : cents;
  return `${sign}$${groupThousands(abs / 100n)}.${(abs % 100n).toString().padStart(2, "0")}`;
}

/**
 * Exact nano-USD as a printed amount, grouped and with at least the cents: "$1,234.50", "-$0.0000015". The figures of
 * an invoice's lines, next to its totals in formatCents.
 */
export function formatNanosAmount(nanos: bigint): string {
  const sign = nanos < 0n ? "-" : "";
  const abs = nanos < 0n ? -nanos : nanos;
  const frac = (abs % NANOS_PER_USD).toString().padStart(9, "0").replace(/0+$/, "").padEnd(2, "0");
  return `${sign}$${groupThousands(abs / NANOS_PER_USD)}.${frac}`;
}

function groupThousands(whole: bigint): string {
  return whole.toString().replace(/\B(?=(\d{3})+(?!\d))/g, ",");
}

/** Exact decimal USD from nano-USD, e.g. 1500n -> "0.0000015". */
export function formatNanosUsd(nanos: bigint): string {
  const sign = nanos < 0n ? "-" : "";
  const abs = nanos < 0n ? -nanos : nanos;
  const frac = (abs % NANOS_PER_USD).toString().padStart(9, "0").replace(/0+$/, "");
  return `${sign}${abs / NANOS_PER_USD}${frac ? `.${frac}` : ""}`;
}

function min(a: bigint, b: bigint): bigint {
  return a < b ? a : b;
}
