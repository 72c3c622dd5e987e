/**
 * A test-only server speaking the part of ClickHouse's HTTP interface that @clickhouse/client uses, over the
 * in-process engine (chdb): ping, queries with a FORMAT, server-side query parameters, settings, insert
 * bodies (optionally gzip), and errors as ClickHouse reports them (status, X-ClickHouse-Exception-Code, and a
 * "Code: N. DB::Exception: ..." body). It lets the @clickhouse/client store backend run in CI where no modern
 * ClickHouse server can be installed. Names must be database-qualified: the `database` parameter is not applied,
 * since every request shares the process's one chdb session. Bun refuses a request line past about 16 KB (a real server
 * takes 1 MiB, http_max_uri_size), as load balancers in front of one do (AWS's takes 16 KB, nginx 8 KB by default).
 *
 * Run standalone (its own process, its own data directory), e.g. for tests that stop and restart ClickHouse:
 *   bun analytics/store/testing/clickhouse-http-server.ts --path <dir> [--port <n>]
 * It prints one JSON line {"msg":"listening","port":n} and exits 0 on SIGTERM.
 */
import { parseArgs } from "node:util";
import { openChdbSession } from "../chdb-driver.ts";

export interface ClickHouseHttpServerOptions {
  /** chdb data directory; the process's session on it is shared with the process's other users. */
  path: string;
  port?: number;
  hostname?: string;
  /** Credentials the server requires; unset accepts any. */
  user?: string;
  password?: string;
  /**
   * Longest request URL (path and query string) answered, as a proxy in front of a server caps it (nginx takes 8 KB by
   * default); a longer one is 414, as such a proxy answers it. Unset, Bun's own bound (about 16 KB) holds.
   */
  maxUrlBytes?: number;
}

export interface ClickHouseHttpServer {
  url: string;
  port: number;
  /** Stops listening and releases the chdb session. */
  stop(): Promise<void>;
}

// Request parameters that are not settings.
const reserved = new Set(["query", "query_id", "database", "session_id", "default_format", "role", "user", "password"]);
// Settings that govern HTTP transport only; this server answers uncompressed and without progress headers.
const transportOnly = new Set([
  "enable_http_compression",
  "http_zlib_compression_level",
  "send_progress_in_http_headers",
  "http_headers_progress_interval_ms",
  "wait_end_of_query",
  "http_wait_end_of_query",
  "output_format_json_quote_64bit_integers",
]);

const insertWithData = /^\s*INSERT\s+INTO\s+([\w.]+)\s*(?:\(([^)]*)\))?\s*FORMAT\s+(\w+)\s*;?\s*$/is;
const trailingFormat = /\s+FORMAT\s+(\w+)\s*;?\s*$/is;
const placeholder = /\{(\w+):([^{}]+?)\}/g;

const contentTypes: Record<string, string> = {
  JSONEachRow: "application/x-ndjson; charset=UTF-8",
  JSONCompactEachRow: "application/x-ndjson; charset=UTF-8",
  JSON: "application/json; charset=UTF-8",
  JSONCompact: "application/json; charset=UTF-8",
  CSV: "text/csv; charset=UTF-8",
  TabSeparated: "text/tab-separated-values; charset=UTF-8",
};

// How ClickHouse's HTTP handler maps some exception codes to HTTP statuses; everything else is 500.
const statusByCode: Record<number, number> = {
  36: 400, // BAD_ARGUMENTS
  47: 400, // UNKNOWN_IDENTIFIER
  62: 400, // SYNTAX_ERROR
  60: 404, // UNKNOWN_TABLE
  81: 404, // UNKNOWN_DATABASE
  115: 400, // UNKNOWN_SETTING
  164: 403, // READONLY
  194: 401, // REQUIRED_PASSWORD
  516: 401, // AUTHENTICATION_FAILED
};

export function startClickHouseHttpServer(options: ClickHouseHttpServerOptions): ClickHouseHttpServer {
  const { session, release } = openChdbSession(options.path);

  const fail = (code: number, message: string, queryId: string) =>
    new Response(`${message}\n`, {
      status: statusByCode[code] ?? 500,
      headers: {
        "content-type": "text/plain; charset=UTF-8",
        "x-clickhouse-exception-code": String(code),
        "x-clickhouse-query-id": queryId,
      },
    });

  const authorized = (req: Request, params: URLSearchParams): boolean => {
    if (options.user === undefined) return true;
    let user = req.headers.get("x-clickhouse-user") ?? params.get("user");
    let password = req.headers.get("x-clickhouse-key") ?? params.get("password") ?? "";
    const basic = /^Basic\s+(.+)$/i.exec(req.headers.get("authorization") ?? "");
    if (basic?.[1]) {
      const decoded = Buffer.from(basic[1], "base64").toString("utf8");
      const colon = decoded.indexOf(":");
      user = decoded.slice(0, colon);
      password = decoded.slice(colon + 1);
    }
    return user === options.user && password === (options.password ?? "");
  };

  const handle = async (req: Request): Promise<Response> => {
    const url = new URL(req.url);
    if (options.maxUrlBytes !== undefined && url.pathname.length + url.search.length > options.maxUrlBytes) {
      return new Response("414 Request-URI Too Large\n", { status: 414, headers: { "content-type": "text/html" } });
    }
    if (url.pathname === "/ping" || (url.pathname === "/" && req.method === "GET" && !url.searchParams.has("query"))) {
      return new Response("Ok.\n", { headers: { "content-type": "text/html; charset=UTF-8" } });
    }
    const params = new URLSearchParams(url.searchParams);
    const queryId = params.get("query_id") ?? crypto.randomUUID();
    if (!authorized(req, params)) {
      return fail(516, "Code: 516. DB::Exception: Authentication failed: wrong user or password. (AUTHENTICATION_FAILED)", queryId);
    }
    let body = new Uint8Array(await req.arrayBuffer());
    if (req.headers.get("content-encoding") === "gzip") body = new Uint8Array(Bun.gunzipSync(body));
    if ((req.headers.get("content-type") ?? "").startsWith("multipart/form-data")) {
      const form = await new Response(body, { headers: { "content-type": req.headers.get("content-type") ?? "" } }).formData();
      for (const [name, value] of form) if (typeof value === "string") params.set(name, value);
      body = new Uint8Array();
    }
    let sql = params.get("query") ?? "";
    let data: Uint8Array | undefined;
    if (sql && body.length > 0) data = body;
    else if (!sql) sql = new TextDecoder().decode(body);

    const settings: Record<string, string> = {};
    const bound: Record<string, unknown> = {};
    for (const [name, value] of params) {
      if (name.startsWith("param_")) continue;
      if (!reserved.has(name) && !transportOnly.has(name)) settings[name] = value;
    }
    try {
      const types = new Map([...sql.matchAll(placeholder)].map((m) => [m[1] as string, m[2] as string]));
      for (const [name, value] of params) {
        if (!name.startsWith("param_")) continue;
        const key = name.slice("param_".length);
        bound[key] = paramValue(value, types.get(key) ?? "String");
      }

      // As a server does: a request that sets readonly (or a GET) may only read.
      if ((Number(settings.readonly ?? 0) > 0 || req.method === "GET") && !/^\s*(SELECT|WITH)\b/i.test(sql)) {
        return fail(164, "Code: 164. DB::Exception: Cannot execute query in readonly mode. (READONLY)", queryId);
      }
      const insert = data ? insertWithData.exec(sql) : null;
      if (insert) {
        const [, table, columns, format] = insert;
        const summary = await session.insert({
          table: table as string,
          columns: columns ? columns.split(",").map((c) => c.trim()) : undefined,
          values: data as Uint8Array,
          format: format as "JSONEachRow",
          settings,
        });
        return new Response("", {
          headers: {
            "x-clickhouse-query-id": queryId,
            "x-clickhouse-summary": summaryHeader(summary.rowsWritten, summary.bytesWritten),
          },
        });
      }
      if (data) return fail(62, "Code: 62. DB::Exception: This server takes data only for INSERT ... FORMAT. (SYNTAX_ERROR)", queryId);

      const formatMatch = trailingFormat.exec(sql);
      const format = formatMatch?.[1] ?? params.get("default_format") ?? "TabSeparated";
      if (formatMatch) sql = sql.slice(0, formatMatch.index);
      const settingNames = Object.keys(settings);
      if (settingNames.length > 0) {
        if (!/^\s*(SELECT|WITH|INSERT)\b/i.test(sql)) {
          return fail(115, `Code: 115. DB::Exception: The test server applies settings only to SELECT and INSERT, not: ${settingNames.join(", ")}. (UNKNOWN_SETTING)`, queryId);
        }
        sql += ` SETTINGS ${settingNames.map((n) => `${n} = ${settingLiteral(settings[n] as string)}`).join(", ")}`;
      }
      const result =
        Object.keys(bound).length > 0
          ? await session.queryBindAsync(sql, bound, { format })
          : await session.queryAsync(sql, { format });
      return new Response(result.bytes(), {
        headers: {
          "content-type": contentTypes[format] ?? "text/plain; charset=UTF-8",
          "x-clickhouse-format": format,
          "x-clickhouse-query-id": queryId,
          "x-clickhouse-summary": summaryHeader(0, 0, result.rowsRead, result.bytesRead),
        },
      });
    } catch (e) {
      const error = e as Error & { clickhouseCode?: number };
      const code = error.clickhouseCode ?? Number(/^Code: (\d+)\./.exec(error.message)?.[1] ?? 1001);
      const message = /^Code: \d+\./.test(error.message)
        ? error.message
        : `Code: ${code}. DB::Exception: ${error.message}. (STD_EXCEPTION)`;
      return fail(code, message, queryId);
    }
  };

  const server = Bun.serve({ port: options.port ?? 0, hostname: options.hostname ?? "127.0.0.1", fetch: handle });
  const port = server.port as number;
  return {
    url: `http://127.0.0.1:${port}`,
    port,
    async stop() {
      await server.stop(true);
      release();
    },
  };
}

function summaryHeader(writtenRows: number, writtenBytes: number, readRows = 0, readBytes = 0): string {
  return JSON.stringify({
    read_rows: String(readRows),
    read_bytes: String(readBytes),
    written_rows: String(writtenRows),
    written_bytes: String(writtenBytes),
    total_rows_to_read: "0",
    result_rows: String(writtenRows),
    result_bytes: String(writtenBytes),
    elapsed_ns: "0",
  });
}

function settingLiteral(value: string): string {
  return /^-?\d+(\.\d+)?$/.test(value) ? value : `'${value.replace(/\\/g, "\\\\").replace(/'/g, "\\'")}'`;
}

/**
 * A `param_` value as chdb's binding takes it. Scalars arrive escaped as TSV fields; composite values
 * (Array, Tuple, Map) as literals, which are parsed so chdb writes them back the same way.
 */
function paramValue(text: string, type: string): unknown {
  if (text === "\\N") return null;
  const bare = type.replace(/^(Nullable|LowCardinality)\((.*)\)$/s, "$2").trim();
  if (/^(Array|Tuple|Map)\(/.test(bare)) return parseLiteral(text);
  return tsvUnescape(text);
}

const escapes: Record<string, string> = { b: "\b", f: "\f", n: "\n", r: "\r", t: "\t", "0": "\0" };

function tsvUnescape(text: string): string {
  return text.replace(/\\(.)/gs, (_, c: string) => escapes[c] ?? c);
}

/** chdb writes a value with this constructor name as a tuple literal. */
class TupleParam {
  constructor(readonly values: unknown[]) {}
}

function parseLiteral(text: string): unknown {
  let i = 0;
  const skip = () => {
    while (i < text.length && /\s/.test(text[i] as string)) i++;
  };
  const expect = (c: string) => {
    skip();
    if (text[i] !== c) throw new Error(`Code: 27. DB::Exception: Cannot parse ${JSON.stringify(text)}: expected ${c} at ${i}. (CANNOT_PARSE_INPUT_ASSERTION_FAILED)`);
    i++;
  };
  const list = (close: string, item: () => void) => {
    skip();
    if (text[i] === close) {
      i++;
      return;
    }
    for (;;) {
      item();
      skip();
      if (text[i] === ",") {
        i++;
        continue;
      }
      expect(close);
      return;
    }
  };
  const value = (): unknown => {
    skip();
    const c = text[i];
    if (c === "[") {
      i++;
      const items: unknown[] = [];
      list("]", () => items.push(value()));
      return items;
    }
    if (c === "(") {
      i++;
      const items: unknown[] = [];
      list(")", () => items.push(value()));
      return new TupleParam(items);
    }
    if (c === "{") {
      i++;
      const map = new Map<unknown, unknown>();
      list("}", () => {
        const key = value();
        expect(":");
        map.set(key, value());
      });
      return map;
    }
    if (c === "'") {
      i++;
      let out = "";
      while (i < text.length && text[i] !== "'") {
        if (text[i] === "\\") {
          const next = text[i + 1] as string;
          out += escapes[next] ?? next;
          i += 2;
        } else out += text[i++];
      }
      i++;
      return out;
    }
    const start = i;
    while (i < text.length && !/[\s,\])}:]/.test(text[i] as string)) i++;
    const token = text.slice(start, i);
    if (/^null$/i.test(token)) return null;
    if (/^(true|false)$/i.test(token)) return token.toLowerCase() === "true";
    if (/^-?\d+$/.test(token)) return BigInt(token);
    return Number(token);
  };
  const result = value();
  skip();
  if (i !== text.length) throw new Error(`Code: 27. DB::Exception: Cannot parse ${JSON.stringify(text)}. (CANNOT_PARSE_INPUT_ASSERTION_FAILED)`);
  return result;
}

if (import.meta.main) {
  const { values } = parseArgs({ options: { path: { type: "string" }, port: { type: "string" } } });
  if (!values.path) {
    process.stderr.write("usage: clickhouse-http-server.ts --path <chdb data dir> [--port <n>]\n");
    process.exit(2);
  }
  const server = startClickHouseHttpServer({ path: values.path, port: Number(values.port ?? 0) });
  process.stdout.write(`${JSON.stringify({ msg: "listening", port: server.port })}\n`);
  const stop = () => void server.stop().then(() => process.exit(0));
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}
