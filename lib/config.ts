import { z } from "zod";

/** A bad environment: the message names every offending variable. */
export class ConfigError extends Error {
  override name = "ConfigError";
}

/** A whole number written in decimal digits alone: Number() would also take " ", "0x1F", "1e3" and "8080.0". */
const int = (min: number, max: number) =>
  z
    .string()
    .trim()
    .regex(/^\d+$/, "must be a whole number in decimal digits")
    .transform(Number)
    .pipe(z.number().min(min).max(max));

/** A decimal number such as 0.25 (or .25, 1., 2.5e-1, as Number reads them), never blank or hexadecimal. */
const decimal = (min: number, max: number) =>
  z
    .string()
    .trim()
    .regex(/^(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$/, "must be a decimal number such as 0.25")
    .transform(Number)
    .pipe(z.number().min(min).max(max));

/** The largest int64, which the contracts' amounts (nano-USD, tokens) are. */
const maxInt64 = 2n ** 63n - 1n;

/** A whole number up to the largest int64 (nano-USD amounts, token counts), in decimal digits alone. */
const bigint = (min: bigint) =>
  z
    .string()
    .trim()
    .regex(/^\d+$/, "must be a whole number in decimal digits")
    .transform(BigInt)
    .pipe(z.bigint().min(min).max(maxInt64));

/**
 * Milliseconds between runs of something a process does over and over (a poll, a sync), up to `max`: 0 never runs
 * it (`off` says how the refusal names that), and fewer than 50 would take its thread's time for nothing.
 */
const periodMs = (max: number, off: string) =>
  int(0, max).refine((ms) => ms === 0 || ms >= 50, `must be 0 (${off}) or at least 50 (ms)`);

/** A port to listen on; 0 asks the system for any free one (its number is logged), as it always did. */
const port = (fallback: number) => int(0, 65535).default(fallback);

/** A service's base URL: anything else (host:port without a scheme, say) would fail on every call, not at start. */
const httpUrl = z.url({ protocol: /^https?$/, error: "must be an http:// or https:// URL" });

// Unset, these fall back to something else entirely (an embedded database, the published token), so set but blank
// (a Kubernetes Secret key that rendered nothing) stops the process rather than meaning unset.
const refusesBlank = new WeakSet<z.ZodType>();

/** `schema`, for a variable that set but blank stops the process rather than reading as unset. */
function setOrUnset<T extends z.ZodType>(schema: T): T {
  refusesBlank.add(schema);
  return schema;
}

/** A string with something in it besides whitespace. */
const filled = z.string().refine((s) => s.trim() !== "", "must not be empty: unset it for the default");

/**
 * A connection string pg reads: a postgres:// or postgresql:// URL (one without a host, `user@/db?host=/socket`, too),
 * a socket: URL or a socket directory's path. pg would throw "Invalid URL" at the first connection, naming nothing:
 * a password with an unencoded `/`, `#` or `?`, or a port past 65535. Or it would dial the wrong host: one whose `/`,
 * `#` or `?` follows digits (`mesh:2024/pw@db`) reads as host `mesh`, port 2024, and the rest as the database name,
 * fragment or query, where an `@` is then the sign of it (a query's value may hold one).
 */
const postgresUrl = filled.refine((s) => {
  if (s.trim() === "" || s.startsWith("/")) return true;
  const url = URL.parse(s) ?? URL.parse(s.replace("@/", "@___DUMMY___/"));
  if (url === null || !["postgres:", "postgresql:", "socket:"].includes(url.protocol)) return false;
  return !/@/.test(url.pathname + url.hash) && !/^\?[^=&]*@/.test(url.search);
}, "must be a postgres:// URL, its user and password percent-encoded (@ as %40, / as %2F, # as %23, ? as %3F)");

/** `*`, or a comma-separated list of origins such as `https://app.example.com,http://localhost:5173`. */
const origins = z
  .string()
  .transform((value) =>
    value
      .split(",")
      .map((s) => s.trim())
      .filter((s) => s !== ""),
  )
  .pipe(z.array(z.string().refine((s) => s === "*" || isOrigin(s), "each entry must be * or an origin such as https://app.example.com")));

function isOrigin(value: string): boolean {
  try {
    const url = new URL(value);
    return (url.protocol === "http:" || url.protocol === "https:") && url.origin === value;
  } catch {
    return false;
  }
}

/**
 * OTEL_RESOURCE_ATTRIBUTES as OpenTelemetry SDKs read it: comma-separated key=value pairs, with `,` and `=` in a key or
 * value percent-encoded (and any other character may be). A value the SDKs would discard whole is refused here.
 */
const resourceAttributes = z.string().transform((value, ctx) => {
  const attributes: Record<string, string> = {};
  for (const entry of value.split(",").filter((e) => e.trim() !== "")) {
    const pair = entry.split("=");
    let key = "";
    let decoded = "";
    try {
      key = decodeURIComponent(pair[0]?.trim() ?? "");
      decoded = decodeURIComponent(pair[1]?.trim() ?? "");
    } catch {
      key = "";
    }
    if (pair.length !== 2 || key === "") {
      ctx.addIssue({ code: "custom", message: `"${entry}" is not key=value (percent-encode a , or = in either)` });
      return z.NEVER;
    }
    attributes[key] = decoded;
  }
  return attributes;
});

/** An HTTP field name (RFC 9110's token). */
const httpFieldName = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/;

/** `text` percent-decoded, or undefined for a bad escape. */
function percentDecoded(text: string): string | undefined {
  try {
    return decodeURIComponent(text);
  } catch {
    return undefined;
  }
}

/**
 * OTEL_EXPORTER_OTLP_HEADERS (and its _TRACES_ form), which the exporter reads itself: comma-separated name=value
 * pairs, percent-encoded. The SDK drops an entry without `=`, with an empty value or a bad escape, and cuts a value at
 * a `;` (baggage metadata to it): the collector would refuse every export for a credential that never went out, so
 * such an entry stops the service. Errors name the entry by number and header name, never its value (a credential).
 */
const otlpHeaders = z.string().superRefine((value, ctx) => {
  otlpHeaderEntries(value).forEach(({ entry, name, raw, decoded }, i) => {
    if (entry.trim() === "") return;
    const problem =
      name === undefined
        ? "is not name=value"
        : !httpFieldName.test(name)
          ? "has a name that is no HTTP header name"
          : raw === ""
            ? "has an empty value"
            : raw.includes(";")
              ? "has a ; in its value, which the exporter cuts it at (percent-encode it: %3B)"
              : decoded === undefined
                ? "has a bad percent-encoding in its value"
                : /[\x00-\x08\x0a-\x1f\x7f]/.test(decoded)
                  ? "has a control character in its value"
                  : undefined;
    if (!problem) return;
    const named = name && httpFieldName.test(name) ? ` (${name})` : "";
    ctx.addIssue({ code: "custom", message: `entry ${i + 1}${named} ${problem}` });
  });
});

/**
 * An OTLP header variable's entries as the exporter splits them: the name (undefined without one before a `=`, or when
 * its percent-encoding is bad), the value as written and percent-decoded (undefined when that fails).
 */
function otlpHeaderEntries(value: string): { entry: string; name?: string; raw: string; decoded?: string }[] {
  return value.split(",").map((entry) => {
    const at = entry.indexOf("=");
    const raw = entry.slice(at + 1).trim();
    const name = at > 0 ? percentDecoded(entry.slice(0, at).trim()) || undefined : undefined;
    return { entry, name, raw, decoded: percentDecoded(raw) };
  });
}

/**
 * The values OTLP header variables send (`authorization=Basic%20...`), decoded, with the credential after a scheme word
 * on its own too (`Basic dXNl...` and `dXNl...`): what a collector quoting them back must not put in the logs.
 */
export function otlpHeaderValues(...variables: (string | undefined)[]): string[] {
  return variables.flatMap((value) =>
    otlpHeaderEntries(value ?? "").flatMap(({ entry, decoded }) => {
      const sent = decoded?.trim();
      if (!entry.includes("=") || !sent) return [];
      const words = sent.split(/\s+/);
      return words.length > 1 ? [sent, ...words.slice(1)] : [sent];
    }),
  );
}

/** OTEL_TRACES_SAMPLER's values as OpenTelemetry SDKs read them (the ones built in). */
export const samplerNames = [
  "always_on",
  "always_off",
  "traceidratio",
  "parentbased_always_on",
  "parentbased_always_off",
  "parentbased_traceidratio",
] as const;
export type SamplerName = (typeof samplerNames)[number];

/** OTEL_TRACES_EXPORTER's values this service has: another (zipkin, say) is warned of at start and ignored. */
export const traceExporterNames = ["otlp", "console", "none"] as const;
export type TraceExporterName = (typeof traceExporterNames)[number];

/** OTEL_PROPAGATORS' values this service has: another (jaeger, xray) is warned of at start and ignored. */
export const propagatorNames = ["tracecontext", "baggage", "b3", "b3multi", "none"] as const;
export type PropagatorName = (typeof propagatorNames)[number];

/** A comma-separated list of names, as OpenTelemetry SDKs read OTEL_TRACES_EXPORTER: trimmed, in any case. */
const names = z.string().transform((value) =>
  value
    .split(",")
    .map((s) => s.trim().toLowerCase())
    .filter((s) => s !== ""),
);

/** One of OpenTelemetry's enum values, which SDKs read in any case (the specification's SHOULD), trimmed. */
const otelEnum = <const T extends readonly [string, ...string[]]>(values: T) =>
  z.string().trim().toLowerCase().pipe(z.enum(values));

/** OTEL_EXPORTER_OTLP_PROTOCOL's values. */
const otlpProtocols = ["grpc", "http/protobuf", "http/json"] as const;

/** The admin token when ADMIN_TOKEN is unset: published in this repository, so fit only for a developer's machine. */
export const defaultAdminToken = "dev-admin-token-change-me";

/** Variables every service reads. Service schemas extend this shape. */
export const commonEnv = {
  // Trimmed, as numbers and URLs are: a value from a file or `echo` ends in a newline.
  LOG_LEVEL: z.string().trim().pipe(z.enum(["debug", "info", "warn", "error"])).default("info"),
  MESH_DATA_DIR: z.string().trim().min(1).default(".data"),
  /** Bearer token for admin RPCs and service-to-service calls. */
  ADMIN_TOKEN: setOrUnset(
    z
      .string()
      .min(16, "must be at least 16 characters")
      // Callers' tokens are trimmed, so a configured one with a newline (a Secret made with echo) would match none.
      .refine((s) => s.trim() === s, "must not begin or end with whitespace (a newline from echo, say)")
      .default(defaultAdminToken),
  ),
  /**
   * Where spans go: `otlp` (to the endpoint below), `console` (one log line each), both, or `none`. A name this
   * service does not have is warned of at start and ignored, as OpenTelemetry asks of its SDKs.
   */
  OTEL_TRACES_EXPORTER: names.optional(),
  /**
   * The headers trace context is read from and sent onward in: `tracecontext` and `baggage` (W3C's, the default), `b3`
   * (Zipkin's single header) or `b3multi` (its X-B3-* headers), or `none`; others are warned of at start and ignored.
   */
  OTEL_PROPAGATORS: names.optional(),
  OTEL_EXPORTER_OTLP_ENDPOINT: httpUrl.optional(),
  /** The full URL traces are posted to, as is (no /v1/traces appended), over OTEL_EXPORTER_OTLP_ENDPOINT. */
  OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: httpUrl.optional(),
  /** Headers sent with every export (a collector's credentials), as the exporter reads them; see otlpHeaders. */
  OTEL_EXPORTER_OTLP_HEADERS: otlpHeaders.optional(),
  /** The same for traces alone, over OTEL_EXPORTER_OTLP_HEADERS' header of the same name. */
  OTEL_EXPORTER_OTLP_TRACES_HEADERS: otlpHeaders.optional(),
  /**
   * The OTLP transport asked for: `http/protobuf` (OpenTelemetry's default, which every OTLP/HTTP receiver takes) or
   * `http/json`. `grpc` goes as http/protobuf and is warned of at start, its endpoint (4317) being the collector's gRPC
   * port, which no export reaches.
   */
  OTEL_EXPORTER_OTLP_PROTOCOL: otelEnum(otlpProtocols).optional(),
  OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: otelEnum(otlpProtocols).optional(),
  /** The batch span processor's, as OpenTelemetry names them: ms between exports (500 here, 5000 in the SDKs)... */
  OTEL_BSP_SCHEDULE_DELAY: int(0, 600_000).default(500),
  /** ...ms an export may take... */
  OTEL_BSP_EXPORT_TIMEOUT: int(1, 600_000).default(30_000),
  /** ...spans waiting to be exported, past which more are dropped... */
  OTEL_BSP_MAX_QUEUE_SIZE: int(1, 10_000_000).default(2048),
  /** ...and spans in one export (at most the queue's size). */
  OTEL_BSP_MAX_EXPORT_BATCH_SIZE: int(1, 10_000_000).default(512),
  /** `true` turns tracing off whatever else is set, as in every OpenTelemetry SDK: no span is recorded or exported. */
  OTEL_SDK_DISABLED: z
    .string()
    .trim()
    .toLowerCase()
    .refine((s) => s === "true" || s === "false", "must be true or false")
    .transform((s) => s === "true")
    .optional(),
  /** service.name of exported spans, in place of the service's own name. */
  OTEL_SERVICE_NAME: z.string().trim().optional(),
  /** More attributes of the resource of exported spans (deployment.environment.name=prod,k8s.pod.name=...). */
  OTEL_RESOURCE_ATTRIBUTES: resourceAttributes.optional(),
  /**
   * OpenTelemetry's sampler names: parentbased_* follow a caller's sampling decision (its traceparent), the others
   * decide alone; *traceidratio samples OTEL_TRACES_SAMPLER_ARG of the traces they decide.
   */
  OTEL_TRACES_SAMPLER: otelEnum(samplerNames).default("parentbased_traceidratio"),
  /** Fraction of traces the traceidratio samplers sample, 0..1. */
  OTEL_TRACES_SAMPLER_ARG: decimal(0, 1).default(1),
  /** How long SIGTERM waits for in-flight requests and streams before closing them. */
  SHUTDOWN_GRACE_MS: int(0, 600_000).default(10_000),
  /**
   * How long after SIGTERM /readyz answers 503 `draining` while every port still serves, so load balancers stop sending
   * new connections before the ports close; then SHUTDOWN_GRACE_MS begins.
   */
  SHUTDOWN_DRAIN_MS: int(0, 120_000).default(0),
  /**
   * How long a connection to the service's port takes new calls (each connection's age within ±10% of it) before it is
   * sent GOAWAY, so clients that keep one connection to a Service spread their calls over its replicas; 0 for ever.
   */
  CONNECTION_MAX_AGE_MS: int(0, 86_400_000)
    .refine((ms) => ms === 0 || ms >= 1000, "must be 0 (never) or at least 1000")
    .default(300_000),
  /** How long calls in flight on a connection past its age may take before they are cut (10 minutes unless set). */
  CONNECTION_MAX_AGE_GRACE_MS: int(0, 86_400_000).optional(),
  /**
   * Browser origins that may call the service's APIs. Any by default, as OpenAI's API allows: every API takes a bearer
   * token, never a cookie, so a page can only use a token it already holds.
   */
  CORS_ALLOWED_ORIGINS: origins.default(["*"]),
};

export const env = { port, int, periodMs, decimal, bigint, httpUrl, filled, postgresUrl, setOrUnset };

/** Parses `source` with the schema built from `shape`, or throws a ConfigError naming each bad variable. */
export function parseEnv<S extends z.ZodRawShape>(
  shape: S,
  source: Record<string, string | undefined> = process.env,
): z.infer<z.ZodObject<S>> {
  // Blank values mean "unset", as in most shells' `VAR= cmd`, except those of setOrUnset variables.
  const cleaned = Object.fromEntries(
    Object.entries(source).filter(([k, v]) => v?.trim() !== "" || refusesBlank.has(shape[k] as z.ZodType)),
  );
  const result = z.object(shape).safeParse(cleaned);
  if (result.success) return result.data;
  const problems = result.error.issues.map((issue) => {
    // The variable is the path's head; the rest points inside its parsed value (an entry of a list).
    const [head, ...inside] = issue.path;
    const name = String(head);
    const value = cleaned[name];
    const shown =
      value === undefined
        ? "unset"
        : value === ""
          ? "set but empty"
          : value.trim() === ""
            ? "set but blank"
            : // Escaped, so a value's line break keeps the message on one line.
              JSON.stringify(looksSecret(name) ? "***" : withoutCredentials(value));
    const entry = typeof inside[0] === "number" ? `, entry ${inside[0] + 1}` : "";
    return `${name} (${shown}${entry}): ${issue.message}`;
  });
  throw new ConfigError(`invalid environment: ${problems.join("; ")}`);
}

/**
 * The command line of a program configured by its environment alone: `--help` (or `-h`) prints what it does and where
 * its variables are described, exit 0; any other argument is refused, exit 2, rather than ignored (`--help` would
 * otherwise start it). `about` is what follows the usage line.
 */
export function exitOnArguments(usage: { command: string; script: string; about: string }, args = process.argv.slice(2)): void {
  const [first] = args;
  if (first === "--help" || first === "-h") {
    process.stdout.write(
      `usage: ${usage.command} (bun ${usage.script}): ${usage.about}\n` +
        "configured by environment variables, not arguments: each is described in README.md, section Configuration\n",
    );
    process.exit(0);
  }
  if (first !== undefined) {
    process.stderr.write(
      `${usage.command} takes no arguments, not "${first}": it is configured by its environment (${usage.command} -- --help)\n`,
    );
    process.exit(2);
  }
}

/** parseEnv for composition roots: prints the error on stderr and exits 2. */
export function loadEnvOrExit<S extends z.ZodRawShape>(shape: S): z.infer<z.ZodObject<S>> {
  try {
    return parseEnv(shape);
  } catch (e) {
    if (!(e instanceof ConfigError)) throw e;
    process.stderr.write(`${e.message}\n`);
    process.exit(2);
  }
}

function looksSecret(name: string): boolean {
  return /TOKEN|KEY|SECRET|PASSWORD|HEADERS/i.test(name);
}

/**
 * A URL's `user:password@` masked (CLICKHOUSE_URL and DATABASE_URL may carry them), with or without its scheme: up to
 * its last `@`, as a password that makes the URL bad may hold a `/`, `?` or `#`. So is any `password=` value: a query
 * parameter (`?password=`, `sslpassword=`) or libpq's `host=db password=...`, which DATABASE_URL does not take; and
 * the value of a query parameter named as a credential (`?api-key=`, `access_token=`, `sig=`), as collectors and
 * proxies take them.
 */
export function withoutCredentials(value: string): string {
  return value
    .replace(/^([A-Za-z][A-Za-z0-9+.-]*:\/\/)?.*@/s, (_, scheme: string | undefined) => `${scheme ?? ""}***@`)
    .replace(/(password\s*=\s*)('(?:[^'\\]|\\.)*'?|[^&\s]*)/gi, "$1***")
    .replace(credentialParameter, "$1***");
}

// A query parameter whose name says it is a credential: its value is up to the next parameter, fragment or space.
const credentialParameter = /([?&;][\w.-]*(?:key|token|secret|sig|signature|auth|credential|passwd|pwd)[\w.-]*=)[^&#\s]*/gi;
