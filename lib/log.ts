import { trace } from "@opentelemetry/api";

export type LogLevel = "debug" | "info" | "warn" | "error";
export type LogFields = Record<string, unknown>;

export interface Logger {
  debug(msg: string, fields?: LogFields): void;
  info(msg: string, fields?: LogFields): void;
  warn(msg: string, fields?: LogFields): void;
  error(msg: string, fields?: LogFields): void;
  child(fields: LogFields): Logger;
}

const order: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40 };

// Field names whose values are never written, whatever the caller passes. A name ending in "token" (admin_token,
// accessToken) is one; counts of tokens (input_tokens, token_count, monthly_tokens) are not.
const secretField = /secret|password|passwd|authorization|cookie|api_?key$|token$/i;
// Key-shaped words inside text (an upstream's error message may quote the key it refused, masked or not).
const secretText = new RegExp(
  [
    String.raw`\b(?:sk|rk)-[^\s,;'"]{3,}`,
    // xAI's and Groq's keys are long: a model or provider named xai-something is not one.
    String.raw`\b(?:xai-|gsk_)[A-Za-z0-9]{20,}`,
    String.raw`\bBearer\s+[^\s,;'"]+`,
    // A JWT (an Entra ID access token), wherever it stands: its header, payload and signature, base64url.
    String.raw`\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*`,
    String.raw`\bapi[-_]?key["']?\s*[:=]\s*["']?[^\s,;'"]+`,
  ].join("|"),
  "gi",
);
// Shorter known values would redact ordinary words.
// Shorter "keys" are placeholders (ollama, EMPTY): nothing to hide, and every mention of them would go.
const minKnownSecretLength = 8;
// From this length a key is no word: it goes wherever it appears, in encoded text (key%3D..., \n...) too.
const anywhereSecretLength = 16;

/**
 * Text with key-shaped words and every `known` secret (provider keys, the admin token: keys of any shape, such as
 * Azure's 32 hex digits) replaced by "[redacted]": one of 16 characters or more wherever it appears, also URL-encoded;
 * a shorter one (8 to 15, such as a self-hosted server's `--api-key`) where it stands as a word of its own, so a key
 * that is also a word inside others leaves them be. Logs, span statuses and upstream error messages all pass through.
 */
export function redactSecrets(text: string, known: readonly string[] = []): string {
  for (const secret of known) {
    if (secret.length < minKnownSecretLength) continue;
    if (secret.length >= anywhereSecretLength) {
      text = text.replaceAll(secret, "[redacted]");
      const encoded = encodeURIComponent(secret);
      if (encoded !== secret) text = text.replaceAll(encoded, "[redacted]");
    } else if (text.includes(secret)) {
      const escaped = secret.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
      text = text.replace(new RegExp(`(?<![A-Za-z0-9])${escaped}(?![A-Za-z0-9])`, "g"), "[redacted]");
    }
  }
  return text.replace(secretText, "[redacted]");
}

export interface LoggerOptions {
  service: string;
  level?: LogLevel;
  /** Where lines go; stdout by default. Tests pass an array sink. */
  write?: (line: string) => void;
}

/**
 * Characters JSON leaves unescaped that line readers other than `\n`-splitting ones take for line breaks: C1 controls
 * (NEL, U+0085) and the line and paragraph separators. Python's str.splitlines, for one, cuts an entry holding one (an
 * upstream's error message, a client's model name) into two lines neither of which parses.
 */
const lineBreaksJsonKeeps = /[\u0080-\u009f\u2028\u2029]/g;
const escapedChar = (c: string) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`;

/** A logger that writes one JSON object per line with the active trace_id and span_id. */
export function createLogger(options: LoggerOptions, bound: LogFields = {}): Logger {
  const min = order[options.level ?? "info"];
  const write = options.write ?? ((line: string) => process.stdout.write(line));
  const emit = (level: LogLevel, msg: string, fields?: LogFields) => {
    if (order[level] < min) return;
    const span = trace.getActiveSpan()?.spanContext();
    const record: LogFields = {
      time: new Date().toISOString(),
      level,
      service: options.service,
      msg,
      ...(span ? { trace_id: span.traceId, span_id: span.spanId } : {}),
      ...redact(bound),
      ...redact(fields),
    };
    write(`${JSON.stringify(record, jsonSafe).replace(lineBreaksJsonKeeps, escapedChar)}\n`);
  };
  return {
    debug: (m, f) => emit("debug", m, f),
    info: (m, f) => emit("info", m, f),
    warn: (m, f) => emit("warn", m, f),
    error: (m, f) => emit("error", m, f),
    child: (fields) => createLogger(options, { ...bound, ...fields }),
  };
}

/**
 * Logs a dependency's outage once: its first failure at `level`, the rest at debug (every request that meets the
 * outage fails alike; metrics count them), and its end once at info, with how long it lasted and how many failed.
 */
export function createOutageLog(
  log: Logger | undefined,
  messages: { failed: string; recovered: string },
  level: "warn" | "error" = "warn",
) {
  let since: number | undefined;
  let failures = 0;
  return {
    failed(fields?: LogFields): void {
      (since === undefined ? log?.[level] : log?.debug)?.(messages.failed, fields);
      since ??= performance.now();
      failures++;
    },
    recovered(fields?: LogFields): void {
      if (since === undefined) return;
      log?.info(messages.recovered, { ...fields, outage_ms: Math.round(performance.now() - since), failures });
      since = undefined;
      failures = 0;
    },
  };
}

export type OutageLog = ReturnType<typeof createOutageLog>;

function redact(fields: LogFields | undefined): LogFields {
  if (!fields) return {};
  const out: LogFields = {};
  for (const [k, v] of Object.entries(fields)) {
    out[k] = secretField.test(k)
      ? "[redacted]"
      : v instanceof Error
        ? { name: v.name, message: redactSecrets(v.message) }
        : typeof v === "string"
          ? redactSecrets(v)
          : v;
  }
  return out;
}

function jsonSafe(_key: string, value: unknown): unknown {
  return typeof value === "bigint" ? value.toString() : value;
}
