import { readFileSync } from "node:fs";
import { LineCounter, parse as parseYaml, YAMLError } from "yaml";
import { z } from "zod";
import { ConfigError } from "../lib/config.ts";
import { parseUsdMicros, type Price } from "../lib/money.ts";

/**
 * The gateway's routes and prices (GATEWAY_CONFIG, YAML or JSON), parsed once at start into a
 * typed object. Prices are decimal strings in USD per million tokens, held as integer micro-USD.
 */

const name = z
  .string()
  .regex(/^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$/, "must be 1..128 letters, digits or . _ : / -");

// A provider's name is the part of a target's breaker key ("provider/model") before the first "/": it holds none, so
// provider "a/b" with model "c" is not the breaker of provider "a" with model "b/c".
const providerName = z
  .string()
  .regex(/^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$/, "must be 1..128 letters, digits or . _ : -");

const envName = z.string().regex(/^[A-Za-z_][A-Za-z0-9_]*$/, "must be an environment variable name");

// Strings only: a YAML number such as 0.1 would reach us as a binary float.
const usdPerMtok = z
  .string({ error: 'must be a decimal USD string such as "2.50" (quote it in YAML)' })
  // Listed as configured (ListModels), so as it is charged: " 2.50" is 2.50.
  .trim()
  .transform((text, ctx) => {
    try {
      return { text, micros: parseUsdMicros(text) };
    } catch (e) {
      ctx.addIssue({ code: "custom", message: (e as Error).message });
      return z.NEVER;
    }
  });

/**
 * An upstream's base URL: http or https (any other scheme fails every call), without credentials in it, which fetch
 * would drop without a word (the upstream then gets no Basic auth).
 */
const baseUrl = z
  .url({ protocol: /^https?$/, error: "must be an http:// or https:// URL", abort: true })
  .refine((url) => {
    const { username, password } = new URL(url);
    return username === "" && password === "";
  }, "must not hold credentials (user:password@): give the key in api_key_env, or an Authorization header in headers");

/**
 * The SDK appends each call's path to the base URL as written: an endpoint's URL, a version twice or a fragment (which
 * fetch never sends) would have every call answered 404. `example` is a base URL of the provider's kind.
 */
const callableBase = (example: string) => (url: string, ctx: z.RefinementCtx) => {
  const { hostname, pathname, hash } = new URL(url);
  const endpoint = /\/(chat\/completions|completions|embeddings|responses)\/*$/i.exec(pathname);
  const twice = /\/(v\d+)\/+\1(\/|$)/i.exec(pathname);
  // The OpenAI API answers only under /v1: its host without it (https://api.openai.com) is a 404 for every call.
  const openaiApi = /(^|\.)api\.openai\.com\.?$/i.test(hostname) && !/^\/v1\/*$/i.test(pathname);
  const problem = endpoint
    ? `give the base the gateway adds /chat/completions, /embeddings and /responses to, without /${endpoint[1]} (such as ${example})`
    : twice
      ? `/${twice[1]} is in it twice: the gateway adds none, so give it once`
      : hash
        ? "must not hold a #fragment, which is never sent: the gateway adds each call's path after it"
        : openaiApi
          ? "the OpenAI API's base is https://api.openai.com/v1 (its calls are all under /v1), or leave base_url out"
          : undefined;
  if (problem) ctx.addIssue({ code: "custom", message: problem });
};

/** Extra request headers, refused at start if fetch would refuse them on every call. */
const headers = z.record(z.string(), z.string()).superRefine((all, ctx) => {
  for (const [header, value] of Object.entries(all)) {
    try {
      new Headers([[header, value]]);
    } catch (e) {
      ctx.addIssue({ code: "custom", path: [header], message: (e as Error).message });
    }
  }
});

const openaiProvider = z.strictObject({
  name: providerName,
  kind: z.literal("openai"),
  /** Any OpenAI-compatible base URL; the OpenAI API by default. */
  base_url: baseUrl.superRefine(callableBase("http://localhost:8000/v1")).optional(),
  /** Variable holding the upstream key; unset for upstreams that need none. */
  api_key_env: envName.optional(),
  headers: headers.optional(),
  /** false: streams are sent without stream_options (for servers that refuse it); usage is then counted. */
  stream_usage: z.boolean().optional(),
  /**
   * How long a connection to the upstream may have been idle and still carry its next call: 4,000 for an http://
   * base_url, Bun's pool (minutes) for https://. Below the upstream's own idle close (5 s for uvicorn and Node).
   */
  keep_alive_ms: z.number().int().min(0).max(300_000).optional(),
});

/** The path of Azure's v1 API (https://example.openai.azure.com/openai/v1), which takes OpenAI's own paths. */
export const azureV1Path = /\/openai\/v1\/*$/i;

const azureProvider = z.strictObject({
  name: providerName,
  kind: z.literal("azure"),
  /**
   * The resource endpoint, e.g. https://example.openai.azure.com/ (the provider adds /openai/deployments/... to it, so
   * it holds no /openai), or its v1 API, https://example.openai.azure.com/openai/v1.
   */
  base_url: baseUrl
    .refine(
      (url) => {
        const path = new URL(url).pathname;
        return azureV1Path.test(path) || !/\/openai(\/|$)/i.test(path);
      },
      {
        error: "give the resource endpoint without /openai (e.g. https://example.openai.azure.com/): the gateway adds /openai/deployments/...; or its v1 API, https://example.openai.azure.com/openai/v1",
        abort: true,
      },
    )
    .superRefine(callableBase("https://example.openai.azure.com/")),
  /** Variable holding the resource's key; not with `auth: entra_id`. */
  api_key_env: envName.optional(),
  /** The api-version of deployment URLs (2024-10-21 unless set); the v1 API is sent one only when it is set. */
  api_version: z.string().min(1).optional(),
  /** As for openai: older api versions (2024-02-01) refuse stream_options. */
  stream_usage: z.boolean().optional(),
  /** As for openai: an API gateway in front of the resource (Azure API Management's Ocp-Apim-Subscription-Key)... */
  headers: headers.optional(),
  /** ...and the idle bound of its connections. */
  keep_alive_ms: z.number().int().min(0).max(300_000).optional(),
  /**
   * `entra_id`: each call carries a Microsoft Entra ID token for `scope` rather than a key, from the service principal
   * of tenant_id, client_id and client_secret_env when they are given, else from DefaultAzureCredential (workload
   * identity, managed identity, AZURE_CLIENT_SECRET...). `api_key` (the default) sends api_key_env's key.
   */
  auth: z.enum(["api_key", "entra_id"]).optional(),
  tenant_id: z.string().regex(/^[A-Za-z0-9.-]{1,128}$/, "must be a tenant id or domain").optional(),
  client_id: z.string().regex(/^[A-Za-z0-9-]{1,128}$/, "must be an application (client) id").optional(),
  client_secret_env: envName.optional(),
  /** Where Entra ID tokens come from: https://login.microsoftonline.com unless set (a national cloud's, say). */
  authority_host: z.url({ protocol: /^https$/, error: "must be an https:// URL" }).optional(),
  /** What tokens are asked for: https://cognitiveservices.azure.com/.default unless set. */
  scope: z.url({ protocol: /^https$/, error: "must be an https:// URL such as https://cognitiveservices.azure.com/.default" }).optional(),
});

const mockProvider = z.strictObject({
  name: providerName,
  kind: z.literal("mock"),
  /** Added before every reply, to simulate an upstream's latency. */
  latency_ms: z.number().int().min(0).max(600_000).default(0),
  /** Added between two streamed chunks, to simulate generation speed. */
  chunk_latency_ms: z.number().int().min(0).max(60_000).default(0),
});

const provider = z.discriminatedUnion("kind", [openaiProvider, azureProvider, mockProvider]);

/** USD per million tokens of each kind. */
const prices = z.strictObject({
  input_per_mtok: usdPerMtok,
  /** Defaults to the input price. */
  cached_input_per_mtok: usdPerMtok.optional(),
  output_per_mtok: usdPerMtok,
  /** Defaults to the output price. */
  reasoning_per_mtok: usdPerMtok.optional(),
  /** Audio tokens of the prompt and of the completion; default to the input and output prices. */
  audio_input_per_mtok: usdPerMtok.optional(),
  audio_output_per_mtok: usdPerMtok.optional(),
});

/** OpenAI's service tiers besides the default ("auto" lets the upstream's project setting decide). */
export const serviceTiers = ["flex", "scale", "priority"] as const;

/** The APIs a model may serve: chat completions (streamed or not) and embeddings. */
export const modelEndpoints = ["chat", "embeddings", "responses"] as const;
export type ModelEndpoint = (typeof modelEndpoints)[number];

const model = z.strictObject({
  /** Public model name clients send. */
  name,
  /**
   * The APIs the model serves; any when unset. A call to another is refused by the gateway, as the upstream would
   * refuse it (a chat call to an embedding model), without a round trip.
   */
  endpoints: z.array(z.enum(modelEndpoints)).min(1).optional(),
  /** In fallback order; a weight on any target picks the first choice at random by weight. */
  targets: z
    .array(
      z.strictObject({
        provider: z.string().min(1),
        /** Upstream model (or Azure deployment) name. */
        model: z.string().min(1),
        weight: z.number().int().min(0).max(1_000_000).optional(),
        /** Overrides the model's timeout_ms for this target. */
        timeout_ms: z.number().int().min(1).max(600_000).optional(),
        /** Overrides the model's retries for this target. */
        retries: z.number().int().min(0).max(5).optional(),
      }),
    )
    .min(1)
    .max(16),
  pricing: prices.extend({
    /**
     * Prices of OpenAI's other service tiers for this model. A request may ask for a tier (`service_tier`) only if it
     * is priced here, and is billed at the tier the upstream says served it.
     */
    service_tiers: z.partialRecord(z.enum(serviceTiers), prices).optional(),
  }),
  /** Per upstream attempt. */
  timeout_ms: z.number().int().min(1).max(600_000).default(60_000),
  /** Extra attempts on the same target after a retryable failure. */
  retries: z.number().int().min(0).max(5).default(0),
  /** Whole-request limit (every attempt, backoff and fallback); GATEWAY_REQUEST_TIMEOUT_MS when unset. */
  request_timeout_ms: z.number().int().min(1).max(3_600_000).optional(),
  /** Output tokens a request without max_tokens is budgeted for; GATEWAY_DEFAULT_MAX_OUTPUT_TOKENS when unset. */
  max_output_tokens: z.number().int().min(1).max(10_000_000).optional(),
  /** The most tokens the model reads in a request: bounds what its budget reservation takes a prompt at. */
  context_window: z.number().int().min(1).max(100_000_000).optional(),
});

const file = z
  .strictObject({
    providers: z.array(provider).min(1),
    models: z.array(model).min(1),
  })
  .superRefine((cfg, ctx) => {
    const providers = new Set<string>();
    cfg.providers.forEach((p, i) => {
      if (providers.has(p.name)) ctx.addIssue({ code: "custom", path: ["providers", i, "name"], message: `duplicate provider "${p.name}"` });
      providers.add(p.name);
      // Without a key the OpenAI API (or its regional eu.api.openai.com) answers every call 401; only other upstreams (a
      // local server) may need none.
      const openaiApi = p.kind === "openai" && (!p.base_url || /(^|\.)api\.openai\.com$/i.test(new URL(p.base_url).hostname));
      if (openaiApi && !p.api_key_env && !Object.keys(p.headers ?? {}).some((h) => h.toLowerCase() === "authorization")) {
        ctx.addIssue({
          code: "custom",
          path: ["providers", i, "api_key_env"],
          message: "the OpenAI API needs a key: name the variable that holds it (such as OPENAI_API_KEY)",
        });
      }
      if (p.kind === "azure") azureAuthIssues(p).forEach(([key, message]) => ctx.addIssue({ code: "custom", path: ["providers", i, key], message }));
    });
    const models = new Set<string>();
    cfg.models.forEach((m, i) => {
      if (models.has(m.name)) ctx.addIssue({ code: "custom", path: ["models", i, "name"], message: `duplicate model "${m.name}"` });
      models.add(m.name);
      m.targets.forEach((t, j) => {
        if (!providers.has(t.provider)) {
          ctx.addIssue({
            code: "custom",
            path: ["models", i, "targets", j, "provider"],
            message: `unknown provider "${t.provider}" (configured: ${[...providers].join(", ")})`,
          });
        }
      });
      // Cached input dearer than input is a typo (a 100x one, as a rule): a provider discounts it, never charges more.
      const tiers = Object.entries(m.pricing.service_tiers ?? {}).map(([tier, p]) => [["service_tiers", tier], p] as const);
      for (const [where, p] of [[[], m.pricing] as const, ...tiers]) {
        if (p.cached_input_per_mtok && p.cached_input_per_mtok.micros > p.input_per_mtok.micros) {
          ctx.addIssue({
            code: "custom",
            path: ["models", i, "pricing", ...where, "cached_input_per_mtok"],
            message: `"${p.cached_input_per_mtok.text}" is above input_per_mtok ("${p.input_per_mtok.text}")`,
          });
        }
      }
      // A target without a weight beside weighted ones would never be picked first: say which is meant.
      const weighted = m.targets.filter((t) => t.weight !== undefined);
      if (weighted.length > 0 && weighted.length < m.targets.length) {
        const j = m.targets.findIndex((t) => t.weight === undefined);
        ctx.addIssue({
          code: "custom",
          path: ["models", i, "targets", j, "weight"],
          message: "give every target of the model a weight, or none (0 keeps a target for fallback only)",
        });
      } else if (weighted.length > 0 && weighted.every((t) => t.weight === 0)) {
        ctx.addIssue({ code: "custom", path: ["models", i, "targets"], message: "at least one weight must be above 0" });
      }
    });
  });

/** What is wrong with how an azure provider authenticates, by the key at fault. */
function azureAuthIssues(p: z.infer<typeof azureProvider>): [string, string][] {
  const servicePrincipal = (["tenant_id", "client_id", "client_secret_env"] as const).filter((key) => p[key] !== undefined);
  const entra = ["authority_host", "scope", ...servicePrincipal] as const;
  if (p.auth !== "entra_id") {
    const stray = entra.filter((key) => p[key] !== undefined);
    if (stray.length > 0) return stray.map((key) => [key, "only with auth: entra_id"]);
    if (p.api_key_env === undefined) {
      return [["api_key_env", "an azure provider needs a key (name the variable that holds it) or auth: entra_id"]];
    }
    return [];
  }
  if (p.api_key_env !== undefined) {
    return [["api_key_env", "give api_key_env or auth: entra_id, not both: Entra ID tokens replace the key"]];
  }
  if (servicePrincipal.length > 0 && servicePrincipal.length < 3) {
    return [["auth", "a service principal needs tenant_id, client_id and client_secret_env together (none for DefaultAzureCredential)"]];
  }
  return [];
}

export type ProviderConfig = z.infer<typeof provider>;
export type OpenAIProviderConfig = z.infer<typeof openaiProvider>;
export type AzureProviderConfig = z.infer<typeof azureProvider>;
export type MockProviderConfig = z.infer<typeof mockProvider>;

export interface Target {
  provider: string;
  model: string;
  weight: number | undefined;
  /** Per-attempt limit of this target; the model's when undefined. */
  timeoutMs?: number | undefined;
  /** Retries on this target; the model's when undefined. */
  retries?: number | undefined;
}

/** A public model: where it is served and what it costs. */
export interface ModelRoute {
  name: string;
  /** The APIs the model serves; any when undefined. */
  endpoints?: ReadonlySet<ModelEndpoint> | undefined;
  targets: Target[];
  price: Price;
  /** Prices as configured (USD per million tokens), for listings. */
  pricing: { input: string; cachedInput: string; output: string; reasoning: string };
  /** Prices of the other service tiers a request may ask for, by tier name. */
  tierPrices: ReadonlyMap<string, Price>;
  timeoutMs: number;
  retries: number;
  /** Whole-request limit; the gateway's default when undefined. */
  requestTimeoutMs?: number | undefined;
  /** Output tokens budgeted for requests that set no max_tokens; the gateway's default when undefined. */
  maxOutputTokens?: number | undefined;
  /** The most tokens the model reads in a request (its context window), when configured. */
  contextWindow?: number | undefined;
}

export interface GatewayConfig {
  providers: ProviderConfig[];
  /** By public name, in file order. */
  models: ReadonlyMap<string, ModelRoute>;
}

/** Parses the text of a config file, YAML or JSON; `source` names it in errors. */
export function parseGatewayConfig(text: string, source: string): GatewayConfig {
  let raw: unknown;
  const lines = new LineCounter();
  try {
    // JSON through the YAML parser too (JSON is YAML): it refuses duplicate keys, which JSON.parse resolves to the
    // last, so a repeated price could silently become 0. Its errors by line and column alone: the lines it would quote
    // may hold a header's credential, and the message is logged.
    raw = parseYaml(text, { uniqueKeys: true, prettyErrors: false, lineCounter: lines });
  } catch (e) {
    const at = e instanceof YAMLError ? lines.linePos(e.pos[0]) : undefined;
    const where = at ? `line ${at.line}, column ${at.col}: ` : "";
    // The parser's own advice (use YAML.parseAllDocuments()) is for programmers.
    const message = e instanceof YAMLError && e.code === "MULTIPLE_DOCS" ? "more than one document (a second ---): give one" : (e as Error).message;
    throw new ConfigError(`invalid gateway config ${source}: ${where}${message}`);
  }
  // An empty file (a ConfigMap key that rendered nothing) would be "expected object, received null".
  if (raw === null || raw === undefined) {
    throw new ConfigError(`invalid gateway config ${source}: the file is empty (or only comments): give its providers and models`);
  }
  const result = file.safeParse(raw, {
    error: (issue) =>
      issue.code === "unrecognized_keys" ? unknownKeys(issue) : issue.code === "invalid_type" ? unquoted(issue) : undefined,
  });
  if (!result.success) {
    // An unknown key by its own path ("providers[0].api_key_envv"), as a key of the wrong value is named.
    const problems = result.error.issues.flatMap((issue) =>
      issue.code === "unrecognized_keys"
        ? issue.keys.map((key) => `${fieldPath([...issue.path, key])}: ${[unknownKeyHints[key] ?? "unknown key", issue.message].join(" ").trim()}`)
        : [`${fieldPath(issue.path)}: ${issue.message}`],
    );
    throw new ConfigError(`invalid gateway config ${source}: ${problems.join("; ")}`);
  }
  const models = new Map<string, ModelRoute>();
  for (const m of result.data.models) {
    const { input, cached, output, reasoning, price } = priceOf(m.pricing);
    // A tier that prices no audio of its own bills audio at the model's audio prices, not at its own text prices.
    const tierPrices = new Map(
      Object.entries(m.pricing.service_tiers ?? {}).map(([tier, p]) => [tier, priceOf(p, m.pricing).price]),
    );
    models.set(m.name, {
      name: m.name,
      endpoints: m.endpoints && new Set(m.endpoints),
      targets: m.targets.map((t) => ({
        provider: t.provider,
        model: t.model,
        weight: t.weight,
        timeoutMs: t.timeout_ms,
        retries: t.retries,
      })),
      price,
      pricing: { input: input.text, cachedInput: cached.text, output: output.text, reasoning: reasoning.text },
      tierPrices,
      timeoutMs: m.timeout_ms,
      retries: m.retries,
      requestTimeoutMs: m.request_timeout_ms,
      maxOutputTokens: m.max_output_tokens,
      contextWindow: m.context_window,
    });
  }
  return { providers: result.data.providers, models };
}

/**
 * A model's or tier's prices: cached input and reasoning at the input and output prices unless set; audio at the
 * model's audio prices (`model`, for a tier) or else the input and output prices.
 */
function priceOf(p: z.infer<typeof prices>, model?: z.infer<typeof prices>) {
  const { input_per_mtok: input, output_per_mtok: output } = p;
  const cached = p.cached_input_per_mtok ?? input;
  const reasoning = p.reasoning_per_mtok ?? output;
  const price: Price = {
    inputMicros: input.micros,
    cachedInputMicros: cached.micros,
    outputMicros: output.micros,
    reasoningMicros: reasoning.micros,
    audioInputMicros: (p.audio_input_per_mtok ?? model?.audio_input_per_mtok ?? input).micros,
    audioOutputMicros: (p.audio_output_per_mtok ?? model?.audio_output_per_mtok ?? output).micros,
  };
  return { input, cached, output, reasoning, price };
}

/** Reads and parses the config file at `path`, or throws a ConfigError naming the file and field. */
export function loadGatewayConfig(path: string): GatewayConfig {
  return parseGatewayConfig(readGatewayConfigText(path), path);
}

/** The text of the config file at `path`; a ConfigError naming it when it cannot be read. */
export function readGatewayConfigText(path: string): string {
  try {
    return readFileSync(path, "utf8");
  } catch (e) {
    throw new ConfigError(`cannot read gateway config ${path}: ${(e as Error).message}`);
  }
}

/** What an operator meant by keys other gateways take, for the message of an unknown key. */
const unknownKeyHints: Record<string, string> = {
  api_key: "unknown key: name the variable that holds the key in api_key_env",
  deployment: "unknown key: an Azure deployment is the model of a target naming this provider",
};

/** The keys an object (or a record of fixed keys) takes, for the message of a key it does not: "(keys here: a, b)". */
function unknownKeys(issue: z.core.$ZodRawIssue<z.core.$ZodIssueUnrecognizedKeys>): string {
  const def = issue.inst?._zod.def as { shape?: object; keyType?: { options?: unknown[] } } | undefined;
  const known = def?.shape ? Object.keys(def.shape) : (def?.keyType?.options ?? []).map(String);
  return known.length > 0 ? `(keys here: ${known.join(", ")})` : "";
}

/**
 * A name YAML read as a number or boolean (`name: 4`, `model: 3.5`): that it must be quoted, rather than zod's "expected
 * string, received number".
 */
function unquoted(issue: z.core.$ZodRawIssue<z.core.$ZodIssueInvalidType>): string | undefined {
  const { input } = issue;
  if (issue.expected !== "string" || (typeof input !== "number" && typeof input !== "boolean")) return undefined;
  const key = issue.path?.at(-1);
  const what = key === "name" || key === "provider" || key === "model" ? "a name" : "it";
  const quoted = typeof key === "string" ? `${key}: "${input}"` : `"${input}"`;
  return `${what} must be a string, but YAML reads ${input} as a ${typeof input}: quote it as written (${quoted})`;
}

/** ["models", 0, "pricing"] -> "models[0].pricing" */
function fieldPath(path: readonly PropertyKey[]): string {
  let out = "";
  for (const part of path) out += typeof part === "number" ? `[${part}]` : `${out ? "." : ""}${String(part)}`;
  return out || "(root)";
}
