import { describe, expect, test } from "bun:test";
import { BinaryReader, WireType } from "@bufbuild/protobuf/wire";
import { commonEnv, ConfigError, defaultAdminToken, env, parseEnv } from "./config.ts";
import { freePort, runCommand } from "./processes.ts";

const shape = { ...commonEnv, GATEWAY_PORT: env.port(8080), BILLING_URL: env.httpUrl.default("http://127.0.0.1:8081") };

describe("parseEnv", () => {
  test("fills defaults and coerces numbers", () => {
    const cfg = parseEnv(shape, {});
    expect(cfg.GATEWAY_PORT).toBe(8080);
    expect(cfg.MESH_DATA_DIR).toBe(".data");
    expect(cfg.LOG_LEVEL).toBe("info");
    expect(parseEnv(shape, { GATEWAY_PORT: "9000" }).GATEWAY_PORT).toBe(9000);
  });

  test("treats empty strings as unset", () => {
    expect(parseEnv(shape, { GATEWAY_PORT: "" }).GATEWAY_PORT).toBe(8080);
  });

  test("names every bad variable and its value", () => {
    let error: unknown;
    try {
      parseEnv(shape, { GATEWAY_PORT: "80a", LOG_LEVEL: "loud", BILLING_URL: "not a url" });
    } catch (e) {
      error = e;
    }
    expect(error).toBeInstanceOf(ConfigError);
    const message = (error as Error).message;
    expect(message).toContain('GATEWAY_PORT ("80a")');
    expect(message).toContain('LOG_LEVEL ("loud")');
    expect(message).toContain('BILLING_URL ("not a url")');
  });

  test("reads a level or a path with surrounding whitespace (a newline from a file or echo) as numbers are read", () => {
    const cfg = parseEnv(shape, { LOG_LEVEL: "debug\n", MESH_DATA_DIR: " /var/lib/mesh\n", GATEWAY_PORT: " 9000\n" });
    expect([cfg.LOG_LEVEL, cfg.MESH_DATA_DIR, cfg.GATEWAY_PORT]).toEqual(["debug", "/var/lib/mesh", 9000]);
  });

  test("shows a refused value's line breaks escaped, keeping its message on one line", () => {
    expect(() => parseEnv(shape, { GATEWAY_PORT: "80a\n9000" })).toThrow(/^invalid environment: GATEWAY_PORT \("80a\\n9000"\): [^\n]*$/);
  });

  test("never echoes a secret's value", () => {
    expect(() => parseEnv(shape, { ADMIN_TOKEN: "short" })).toThrow('ADMIN_TOKEN ("***")');
  });

  test("never echoes the credentials of a URL", () => {
    const cases = [
      ["clickhouse://mesh:hunter2@ch:9000/mesh", "clickhouse://***@ch:9000/mesh"],
      ["mesh:p@ss:w0rd@ch:8123", "***@ch:8123"],
      ["https://mesh:hunter2@ch:8443x", "https://***@ch:8443x"],
      // A credential in a query parameter, as collectors and proxies take them.
      ["collector:4318?api-key=abc123&region=eu", "collector:4318?api-key=***&region=eu"],
      ["billing:8081/x?access_token=abc#top", "billing:8081/x?access_token=***#top"],
      ["billing:8081/x?X-Amz-Signature=abc&region=eu", "billing:8081/x?X-Amz-Signature=***&region=eu"],
    ];
    for (const [value, shown] of cases) {
      let message = "";
      try {
        parseEnv(shape, { BILLING_URL: value });
      } catch (e) {
        message = (e as Error).message;
      }
      expect(message).toBe(`invalid environment: BILLING_URL ("${shown}"): must be an http:// or https:// URL`);
    }
  });

  test("a DATABASE_URL pg could not read stops the service at start, naming it, its credentials masked", () => {
    const shape = { DATABASE_URL: env.setOrUnset(env.postgresUrl.optional()) };
    // A password with an unencoded / or #, a port past 65535, another database's scheme: pg threw "Invalid URL" at the
    // first connection (billing's migrations), naming neither the variable nor what was wrong, or dialled host "x".
    const refused = [
      ["postgres://mesh:pa/ss@db:5432/mesh", "postgres://***@db:5432/mesh"],
      ["postgres://mesh:pa#ss@db:5432/mesh", "postgres://***@db:5432/mesh"],
      ["postgres://mesh:secret-pw@db:99999/mesh", "postgres://***@db:99999/mesh"],
      // A password whose /, # or ? follows digits: pg dialled host "mesh" at port 2024.
      ["postgres://mesh:2024/pw@db:5432/mesh", "postgres://***@db:5432/mesh"],
      ["postgres://mesh:2024#pw@db:5432/mesh", "postgres://***@db:5432/mesh"],
      ["postgres://mesh:2024?pw@db:5432/mesh", "postgres://***@db:5432/mesh"],
      // A password elsewhere than before the @: in the query, or in libpq's keyword form, which pg does not read.
      ["postgres://mesh@db:99999/mesh?sslmode=require&password=hunter2", "postgres://***@db:99999/mesh?sslmode=require&password=***"],
      ["host=db user=mesh password=hunter2 dbname=mesh", "host=db user=mesh password=*** dbname=mesh"],
      ["host=db password = 'hunter 2' dbname=mesh", "host=db password = *** dbname=mesh"],
      ["mysql://x/y", "mysql://x/y"],
      ["db:5432", "db:5432"],
    ];
    for (const [value, shown] of refused) {
      expect(() => parseEnv(shape, { DATABASE_URL: value })).toThrow(
        `invalid environment: DATABASE_URL ("${shown}"): must be a postgres:// URL, its user and password percent-encoded`,
      );
    }
    for (const value of [
      "postgres://mesh:pa%2Fss@db:5432/mesh",
      "postgres://mesh:p@ss@db:5432/mesh?application_name=jobs@eu",
      "postgresql://mesh@/mesh?host=/var/run/postgresql",
      "socket:/var/run/postgresql?db=mesh",
      "/var/run/postgresql mesh",
    ]) {
      expect(parseEnv(shape, { DATABASE_URL: value }).DATABASE_URL).toBe(value);
    }
  });

  test("rejects ports out of range", () => {
    expect(() => parseEnv(shape, { GATEWAY_PORT: "70000" })).toThrow("GATEWAY_PORT");
    // 0 asks the system for any free port, as it always did.
    expect(parseEnv(shape, { GATEWAY_PORT: "0" })).toMatchObject({ GATEWAY_PORT: 0 });
  });

  test("takes OpenTelemetry's sampler names only, parentbased_traceidratio when unset", () => {
    expect(parseEnv(shape, {})).toMatchObject({ OTEL_TRACES_SAMPLER: "parentbased_traceidratio" });
    expect(parseEnv(shape, { OTEL_TRACES_SAMPLER: "traceidratio" })).toMatchObject({ OTEL_TRACES_SAMPLER: "traceidratio" });
    expect(() => parseEnv(shape, { OTEL_TRACES_SAMPLER: "ratio" })).toThrow('OTEL_TRACES_SAMPLER ("ratio")');
    // OpenTelemetry's SDKs read enum values in any case.
    expect(parseEnv(shape, { OTEL_TRACES_SAMPLER: " ParentBased_Always_Off", OTEL_EXPORTER_OTLP_PROTOCOL: "HTTP/JSON" })).toMatchObject({
      OTEL_TRACES_SAMPLER: "parentbased_always_off",
      OTEL_EXPORTER_OTLP_PROTOCOL: "http/json",
    });
  });

  test("treats blank numbers as unset and takes whole numbers only in decimal digits", () => {
    expect(parseEnv(shape, { GATEWAY_PORT: " ", OTEL_TRACES_SAMPLER_ARG: " ", SHUTDOWN_DRAIN_MS: "\t" })).toMatchObject({
      GATEWAY_PORT: 8080,
      OTEL_TRACES_SAMPLER_ARG: 1,
      SHUTDOWN_DRAIN_MS: 0,
    });
    expect(parseEnv(shape, { GATEWAY_PORT: " 9000 ", OTEL_TRACES_SAMPLER_ARG: "0.25" })).toMatchObject({
      GATEWAY_PORT: 9000,
      OTEL_TRACES_SAMPLER_ARG: 0.25,
    });
    for (const value of ["0x1F90", "8080.0", "1e3", "0b11", "-1", "+80"]) {
      expect(() => parseEnv(shape, { GATEWAY_PORT: value })).toThrow(`GATEWAY_PORT ("${value}"): must be a whole number`);
    }
    expect(() => parseEnv(shape, { OTEL_TRACES_SAMPLER_ARG: "0x1" })).toThrow('OTEL_TRACES_SAMPLER_ARG ("0x1")');
    // Decimals as they were read before: .5, 1. and an exponent.
    for (const [value, parsed] of [[".5", 0.5], ["1.", 1], ["2.5e-1", 0.25]] as const) {
      expect(parseEnv(shape, { OTEL_TRACES_SAMPLER_ARG: value })).toMatchObject({ OTEL_TRACES_SAMPLER_ARG: parsed });
    }
    expect(() => parseEnv(shape, { SHUTDOWN_GRACE_MS: "1e3" })).toThrow('SHUTDOWN_GRACE_MS ("1e3")');
  });

  test("takes an amount up to the largest int64, which the contracts carry, and no more", () => {
    const amounts = { LEASE_NANOS: env.bigint(1n).default(1n) };
    expect(parseEnv(amounts, { LEASE_NANOS: "9223372036854775807" })).toEqual({ LEASE_NANOS: 2n ** 63n - 1n });
    expect(() => parseEnv(amounts, { LEASE_NANOS: "9223372036854775808" })).toThrow('LEASE_NANOS ("9223372036854775808")');
  });

  test("refuses an admin token with surrounding whitespace, which no caller's trimmed token could match", () => {
    for (const token of ["own-admin-token-0123456789\n", " own-admin-token-0123456789", " ".repeat(20), "\n"]) {
      expect(() => parseEnv(shape, { ADMIN_TOKEN: token })).toThrow("ADMIN_TOKEN");
    }
    expect(() => parseEnv(shape, { ADMIN_TOKEN: "own-admin-token-0123456789\n" })).toThrow(
      'ADMIN_TOKEN ("***"): must not begin or end with whitespace',
    );
    expect(parseEnv(shape, { ADMIN_TOKEN: "own admin token 0123456789" }).ADMIN_TOKEN).toBe("own admin token 0123456789");
  });
});

describe("a service refuses to start, naming the variable, rather than fall back from a variable set but blank", () => {
  test.each([
    ["billing", "DATABASE_URL", ""],
    ["billing", "DATABASE_URL", " "],
    ["analytics", "CLICKHOUSE_URL", ""],
    ["gateway", "GATEWAY_CONFIG", ""],
    ["billing", "ADMIN_TOKEN", "own-admin-token-0123456789\n"],
    ["billing", "ADMIN_TOKEN", " ".repeat(20)],
  ])("%s with %s=%j", async (service, name, value) => {
    const { stdout, stderr, code } = await runCommand([process.execPath, `${service}/main.ts`], {
      // Past the environment, the data directory would fail the start, not fall back to the embedded stores.
      env: { [name]: value, MESH_DATA_DIR: "/nonexistent" },
    });
    expect(code).toBe(2);
    expect(stdout).toBe("");
    expect(stderr).toStartWith(`invalid environment: ${name} (`);
  });
});

test("a service started with a bad variable exits non-zero naming it", async () => {
  const script = `
    import { loadEnvOrExit, env } from "./lib/config.ts";
    loadEnvOrExit({ GATEWAY_PORT: env.port(8080) });
    console.log("started");
  `;
  const { stdout, stderr, code } = await runCommand([process.execPath, "-e", script], { env: { GATEWAY_PORT: "eighty" } });
  expect(code).toBe(2);
  expect(stdout).toBe("");
  expect(stderr).toContain('GATEWAY_PORT ("eighty")');
});

test("an empty ADMIN_TOKEN stops a service rather than falling back to the public default", async () => {
  expect(() => parseEnv(shape, { ADMIN_TOKEN: "" })).toThrow("ADMIN_TOKEN (set but empty): must be at least 16 characters");
  const { stdout, stderr, code } = await runCommand([process.execPath, "billing/main.ts"], {
    env: { ADMIN_TOKEN: "", BILLING_PORT: "59001", MESH_DATA_DIR: "/nonexistent" },
  });
  expect(code).toBe(2);
  expect(stdout).toBe("");
  expect(stderr).toBe("invalid environment: ADMIN_TOKEN (set but empty): must be at least 16 characters\n");
});

test("a service on the default admin token warns at start; one on its own token does not", async () => {
  const script = `
    import { commonEnv, parseEnv } from "./lib/config.ts";
    import { createRuntime } from "./lib/runtime.ts";
    createRuntime("config-test", parseEnv(commonEnv));
  `;
  const run = (env: Record<string, string | undefined>) => runCommand([process.execPath, "-e", script], { env });
  const defaulted = await run({ ADMIN_TOKEN: undefined });
  const [line, ...more] = defaulted.stdout.trim().split("\n").map((l) => JSON.parse(l));
  // It says what holds: the published token is of no use from another machine.
  const msg = expect.stringMatching(/^ADMIN_TOKEN .* accept it only from this machine \(loopback\)/);
  expect(line).toMatchObject({ level: "warn", service: "config-test", msg });
  expect(more).toEqual([]);
  expect((await run({ ADMIN_TOKEN: defaultAdminToken })).stdout).toContain("development default");
  expect((await run({ ADMIN_TOKEN: "own-admin-token-0123456789" })).stdout).toBe("");
});

test("URL variables take only http:// and https:// URLs", async () => {
  for (const value of ["localhost:58011", "ftp://billing:8081", "billing"]) {
    expect(() => parseEnv(shape, { BILLING_URL: value })).toThrow(`BILLING_URL ("${value}"): must be an http:// or https:// URL`);
    expect(() => parseEnv(shape, { OTEL_EXPORTER_OTLP_ENDPOINT: value })).toThrow("OTEL_EXPORTER_OTLP_ENDPOINT");
  }
  expect(parseEnv(shape, { BILLING_URL: "https://billing:8081" }).BILLING_URL).toBe("https://billing:8081");
  for (const [service, name, value] of [
    ["gateway", "BILLING_URL", "localhost:58011"],
    ["analytics", "CLICKHOUSE_URL", "localhost:8123"],
    ["billing", "OTEL_EXPORTER_OTLP_ENDPOINT", "localhost:58050"],
  ]) {
    const { stdout, stderr, code } = await runCommand([process.execPath, `${service}/main.ts`], {
      env: { [name as string]: value, MESH_DATA_DIR: "/nonexistent" },
    });
    expect(code).toBe(2);
    expect(stdout).toBe("");
    expect(stderr).toBe(`invalid environment: ${name} ("${value}"): must be an http:// or https:// URL\n`);
  }
});

test("an error nothing caught is one JSON error line, and the service carries on", async () => {
  for (const [what, fault] of [
    ["promise rejection", 'Promise.reject(new Error("boom"));'],
    ["exception", 'setTimeout(() => { throw new Error("boom"); }, 10);'],
  ]) {
    const script = `
      import { commonEnv, parseEnv } from "./lib/config.ts";
      import { createRuntime } from "./lib/runtime.ts";
      createRuntime("config-test", parseEnv(commonEnv));
      ${fault}
      await Bun.sleep(200);
      console.log(JSON.stringify({ msg: "still running" }));
    `;
    const { code, stdout, stderr } = await runCommand([process.execPath, "-e", script], {
      env: { ADMIN_TOKEN: "own-admin-token-0123456789", OTEL_EXPORTER_OTLP_ENDPOINT: undefined },
    });
    expect(code).toBe(0);
    expect(stderr).toBe("");
    expect(stdout.trim().split("\n").map((l) => JSON.parse(l))).toEqual([
      expect.objectContaining({ level: "error", msg: `uncaught: ${what}`, err: expect.objectContaining({ message: "boom" }) }),
      { msg: "still running" },
    ]);
  }
});

test("failed trace exports are logged, once a minute, and an endpoint ending in /v1/traces is warned of", async () => {
  const script = `
    import { commonEnv, parseEnv } from "./lib/config.ts";
    import { createRuntime } from "./lib/runtime.ts";
    const runtime = createRuntime("config-test", parseEnv(commonEnv));
    for (let i = 0; i < 3; i++) {
      runtime.telemetry.tracer.startSpan("s").end();
      await Bun.sleep(700);
    }
    await runtime.telemetry.shutdown().catch(() => {});
  `;
  const closed = await freePort();
  const run = async (endpoint: string) => {
    const env = { ADMIN_TOKEN: "own-admin-token-0123456789", OTEL_EXPORTER_OTLP_ENDPOINT: endpoint };
    const { stdout } = await runCommand([process.execPath, "-e", script], { env });
    return stdout.trim().split("\n").map((l) => JSON.parse(l));
  };
  const lines: Array<{ level: string; msg: string }> = await run(`http://127.0.0.1:${closed}`);
  // Three failed exports, one line; and the spans still unexported when shutdown's limit passed, as shutdown says.
  const refused = lines.filter((l) => l.msg.includes("ECONNREFUSED"));
  expect(refused).toEqual([expect.objectContaining({ level: "error" })]);
  expect(lines.filter((l) => !refused.includes(l)).map((l) => l.msg)).toEqual(["opentelemetry: spans not exported at shutdown"]);
  const [warning] = await run(`http://127.0.0.1:${closed}/v1/traces`);
  expect(warning).toMatchObject({ level: "warn", msg: expect.stringMatching(/^OTEL_EXPORTER_OTLP_ENDPOINT ends in \/v1\/traces/) });
}, 60_000);

test("a collector refusing exports with the credentials it was sent quoted back has them redacted from the log", async () => {
  const collector = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    fetch: (req) =>
      new Response(`denied: ${req.headers.get("authorization")} (user ${req.headers.get("x-scope-token")})`, { status: 401 }),
  });
  const script = `
    import { commonEnv, parseEnv } from "./lib/config.ts";
    import { createRuntime } from "./lib/runtime.ts";
    const runtime = createRuntime("config-test", parseEnv(commonEnv));
    runtime.telemetry.tracer.startSpan("s").end();
    await Bun.sleep(1000);
    await runtime.telemetry.shutdown();
  `;
  try {
    const { stdout } = await runCommand([process.execPath, "-e", script], {
      env: {
        ADMIN_TOKEN: "own-admin-token-0123456789",
        OTEL_EXPORTER_OTLP_ENDPOINT: `http://127.0.0.1:${collector.port}`,
        OTEL_EXPORTER_OTLP_HEADERS: "authorization=Basic%20bWVzaDpjb2xsZWN0b3ItcGFzcw%3D%3D",
        OTEL_EXPORTER_OTLP_TRACES_HEADERS: "x-scope-token=scope-token-0123456789",
      },
    });
    const refused = stdout.trim().split("\n").map((l) => JSON.parse(l)).filter((l) => l.msg.includes("Unauthorized"));
    expect(refused).toEqual([expect.objectContaining({ level: "error" })]);
    expect(refused[0].msg).toContain("denied: [redacted] (user [redacted])");
    expect(stdout).not.toContain("bWVzaDpjb2xsZWN0b3ItcGFzcw");
    expect(stdout).not.toContain("scope-token-0123456789");
  } finally {
    await collector.stop(true);
  }
}, 60_000);

test("a collector refusing every export in words of its own each time (a request id) is still logged once a minute", async () => {
  let refusals = 0;
  const collector = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    fetch: () => new Response(`forbidden (request ${++refusals})`, { status: 403 }),
  });
  const script = `
    import { commonEnv, parseEnv } from "./lib/config.ts";
    import { createRuntime } from "./lib/runtime.ts";
    const runtime = createRuntime("config-test", parseEnv(commonEnv));
    for (let i = 0; i < 3; i++) {
      runtime.telemetry.tracer.startSpan("s").end();
      await Bun.sleep(700);
    }
    await runtime.telemetry.shutdown();
  `;
  try {
    const env = { ADMIN_TOKEN: "own-admin-token-0123456789", OTEL_EXPORTER_OTLP_ENDPOINT: `http://127.0.0.1:${collector.port}` };
    const { stdout } = await runCommand([process.execPath, "-e", script], { env });
    expect(refusals).toBe(3);
    const refused = stdout.trim().split("\n").map((l) => JSON.parse(l)).filter((l) => l.msg.includes("Forbidden"));
    expect(refused).toEqual([expect.objectContaining({ level: "error", msg: expect.stringContaining("forbidden (request 1)") })]);
  } finally {
    await collector.stop(true);
  }
}, 60_000);

/** The parts of an OTLP trace export the tests below read. */
interface OtlpRequest {
  resourceSpans: {
    resource: { attributes: { key: string; value: { stringValue?: string } }[] };
    scopeSpans: { spans: { name: string }[] }[];
  }[];
}

/** An OTLP/HTTP protobuf export (application/x-protobuf) read into the shape of its JSON form. */
async function protobufOtlp(req: Request): Promise<OtlpRequest> {
  expect(req.headers.get("content-type")).toBe("application/x-protobuf");
  // Each message's length-delimited fields by number: submessages, strings and bytes.
  const fields = (bytes: Uint8Array) => {
    const found = new Map<number, Uint8Array[]>();
    const reader = new BinaryReader(bytes);
    while (reader.pos < reader.len) {
      const [no, type] = reader.tag();
      if (type === WireType.LengthDelimited) found.set(no, [...(found.get(no) ?? []), reader.bytes()]);
      else reader.skip(type, no);
    }
    return (no: number) => found.get(no) ?? [];
  };
  const text = (bytes: Uint8Array | undefined) => new TextDecoder().decode(bytes);
  // ExportTraceServiceRequest: 1 ResourceSpans (1 Resource (1 KeyValue (1 key, 2 AnyValue (1 string))), 2 ScopeSpans
  // (2 Span (5 name))).
  return {
    resourceSpans: fields(new Uint8Array(await req.arrayBuffer()))(1).map((rs) => ({
      resource: {
        attributes: fields(fields(rs)(1)[0] ?? new Uint8Array())(1).map((kv) => ({
          key: text(fields(kv)(1)[0]),
          value: { stringValue: text(fields(fields(kv)(2)[0] ?? new Uint8Array())(1)[0]) },
        })),
      },
      scopeSpans: fields(rs)(2).map((ss) => ({ spans: fields(ss)(2).map((span) => ({ name: text(fields(span)(5)[0]) })) })),
    })),
  };
}

/** Runs a service's runtime with `env`, ends `spans` spans at once and stops; returns what a collector on loopback received. */
async function exportedWith(env: Record<string, string | undefined>, spans = 1) {
  const received: Array<{ path: string; headers: Headers; resource: Record<string, string>; spans: number }> = [];
  const collector = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    async fetch(req) {
      const json = req.headers.get("content-type") === "application/json";
      const body = json ? await req.json() : await protobufOtlp(req);
      for (const rs of (body as OtlpRequest).resourceSpans) {
        const resource = Object.fromEntries(rs.resource.attributes.map((a) => [a.key, a.value.stringValue ?? ""]));
        const spans = rs.scopeSpans.reduce((n, ss) => n + ss.spans.length, 0);
        received.push({ path: new URL(req.url).pathname, headers: req.headers, resource, spans });
      }
      // An empty ExportTraceServiceResponse, in the request's encoding, as a collector answers.
      return json ? Response.json({}) : new Response(new Uint8Array(), { headers: { "content-type": "application/x-protobuf" } });
    },
  });
  const script = `
    import { commonEnv, parseEnv } from "./lib/config.ts";
    import { createRuntime } from "./lib/runtime.ts";
    const runtime = createRuntime("config-test", parseEnv(commonEnv), "replica-1");
    for (let i = 0; i < ${spans}; i++) runtime.telemetry.tracer.startSpan("s").end();
    await runtime.telemetry.shutdown();
  `;
  try {
    const collectorUrl = `http://127.0.0.1:${collector.port}`;
    const filled = Object.fromEntries(Object.entries(env).map(([k, v]) => [k, v?.replace("$COLLECTOR", collectorUrl)]));
    const result = await runCommand([process.execPath, "-e", script], {
      env: { ADMIN_TOKEN: "own-admin-token-0123456789", OTEL_EXPORTER_OTLP_ENDPOINT: undefined, ...filled },
    });
    return { ...result, received };
  } finally {
    await collector.stop(true);
  }
}

test("OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES name the service and describe it in exported spans", async () => {
  const plain = await exportedWith({ OTEL_EXPORTER_OTLP_ENDPOINT: "$COLLECTOR" });
  expect(plain.received.map((r) => r.resource)).toEqual([
    expect.objectContaining({
      "service.name": "config-test",
      "service.instance.id": "replica-1",
      "telemetry.sdk.language": "nodejs",
      "telemetry.sdk.name": "opentelemetry",
    }),
  ]);
  const { received, stderr } = await exportedWith({
    OTEL_EXPORTER_OTLP_ENDPOINT: "$COLLECTOR",
    OTEL_SERVICE_NAME: "gateway-eu",
    // OTEL_SERVICE_NAME wins over a service.name here; percent-encoded characters are decoded.
    OTEL_RESOURCE_ATTRIBUTES: "deployment.environment.name=prod, k8s.pod.name=gateway-0,service.name=x,team=a%2Cb%3Dc",
  });
  expect(stderr).toBe("");
  expect(received.map((r) => r.resource)).toEqual([
    expect.objectContaining({
      "service.name": "gateway-eu",
      "service.version": expect.any(String),
      "service.instance.id": "replica-1",
      "deployment.environment.name": "prod",
      "k8s.pod.name": "gateway-0",
      team: "a,b=c",
    }),
  ]);
});

test("an OTEL_RESOURCE_ATTRIBUTES OpenTelemetry would discard stops the service, naming the entry", () => {
  expect(parseEnv(shape, { OTEL_RESOURCE_ATTRIBUTES: "a=1,,b=2, " }).OTEL_RESOURCE_ATTRIBUTES).toEqual({ a: "1", b: "2" });
  for (const [value, entry] of [
    ["a=1,b", "b"],
    ["a=1=2", "a=1=2"],
    ["=1", "=1"],
    ["a=%E0%A4%A", "a=%E0%A4%A"],
  ]) {
    expect(() => parseEnv(shape, { OTEL_RESOURCE_ATTRIBUTES: value })).toThrow(
      `OTEL_RESOURCE_ATTRIBUTES ("${value}"): "${entry}" is not key=value`,
    );
  }
});

test("OTLP headers the exporter would drop or cut stop the service, naming the entry but never its value", () => {
  const fine = "x-collector-token=t0k3n, authorization=Basic%20dTpwAw%3D%3D,,x-b=a%3Bb";
  expect(parseEnv(shape, { OTEL_EXPORTER_OTLP_HEADERS: fine }).OTEL_EXPORTER_OTLP_HEADERS).toBe(fine);
  for (const [value, problem] of [
    ["x-a=1,s3cr3t", "entry 2 is not name=value"],
    ["=s3cr3t", "entry 1 is not name=value"],
    ["x-a=", "entry 1 (x-a) has an empty value"],
    ["x a=s3cr3t", "entry 1 has a name that is no HTTP header name"],
    ["x-a=s3cr3t;v=1", "entry 1 (x-a) has a ; in its value, which the exporter cuts it at (percent-encode it: %3B)"],
    ["x-a=s3cr3t%E0%A4%A", "entry 1 (x-a) has a bad percent-encoding in its value"],
    ["x-a=s3cr3t%0D%0Ax-b: 1", "entry 1 (x-a) has a control character in its value"],
  ]) {
    for (const name of ["OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS"]) {
      const refused = (() => {
        try {
          parseEnv(shape, { [name]: value });
          return "";
        } catch (e) {
          return (e as Error).message;
        }
      })();
      expect(refused).toBe(`invalid environment: ${name} ("***"): ${problem}`);
      expect(refused).not.toContain("s3cr3t");
    }
  }
});

test("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is where traces go, as it is, alone or over OTEL_EXPORTER_OTLP_ENDPOINT", async () => {
  const alone = await exportedWith({ OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: "$COLLECTOR/otlp/traces" });
  expect(alone.received.map((r) => r.path)).toEqual(["/otlp/traces"]);
  const both = await exportedWith({
    OTEL_EXPORTER_OTLP_ENDPOINT: `http://127.0.0.1:${await freePort()}/v1/traces`,
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: "$COLLECTOR/v1/traces",
    OTEL_EXPORTER_OTLP_HEADERS: "x-collector-token=t0k3n",
  });
  expect(both.received.map((r) => [r.path, r.headers.get("x-collector-token")])).toEqual([["/v1/traces", "t0k3n"]]);
  // The endpoint ending in /v1/traces is not the one used, so nothing is warned of; no export failed.
  expect(both.stdout).toBe("");
});

test("OTEL_SDK_DISABLED=true exports nothing, whatever endpoint is set; only true or false is taken", async () => {
  const endpoints = {
    OTEL_EXPORTER_OTLP_ENDPOINT: "$COLLECTOR",
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: "$COLLECTOR/v1/traces",
  };
  expect((await exportedWith({ ...endpoints, OTEL_SDK_DISABLED: "TRUE" })).received).toEqual([]);
  expect((await exportedWith({ ...endpoints, OTEL_SDK_DISABLED: "false" })).received).toHaveLength(1);
  expect(parseEnv(shape, {}).OTEL_SDK_DISABLED).toBeUndefined();
  expect(() => parseEnv(shape, { OTEL_SDK_DISABLED: "1" })).toThrow('OTEL_SDK_DISABLED ("1"): must be true or false');
});

test("OTEL_TRACES_EXPORTER sends spans to otlp, console (a JSON log line each), both or none; others are warned of", async () => {
  const run = async (value: string) => {
    const { stdout, received } = await exportedWith({ OTEL_EXPORTER_OTLP_ENDPOINT: "$COLLECTOR", OTEL_TRACES_EXPORTER: value });
    const lines: Array<Record<string, unknown>> = stdout.trim().split("\n").filter(Boolean).map((l) => JSON.parse(l));
    const printed = lines.filter((l) => l.msg === "span");
    return { otlp: received.length, console: printed.length, warnings: lines.filter((l) => !printed.includes(l)) };
  };
  expect(await run("none")).toEqual({ otlp: 0, console: 0, warnings: [] });
  expect(await run("otlp")).toEqual({ otlp: 1, console: 0, warnings: [] });
  expect(await run("console")).toMatchObject({ otlp: 0, console: 1, warnings: [] });
  expect(await run(" OTLP , Console ")).toMatchObject({ otlp: 1, console: 1, warnings: [] });
  const { stdout } = await exportedWith({ OTEL_TRACES_EXPORTER: "console" });
  expect(JSON.parse(stdout)).toEqual({
    time: expect.any(String),
    level: "info",
    service: "config-test",
    msg: "span",
    trace_id: expect.stringMatching(/^[0-9a-f]{32}$/),
    span_id: expect.stringMatching(/^[0-9a-f]{16}$/),
    name: "s",
    kind: "internal",
    start: expect.any(String),
    duration_ms: expect.any(Number),
    status: "unset",
    attributes: {},
  });
  // Named but not had: warned of and ignored, never a stop; with nothing else named, the default (otlp) stands.
  const warned = (names: string) => [
    expect.objectContaining({ level: "warn", msg: expect.stringMatching(new RegExp(`^OTEL_TRACES_EXPORTER names ${names},`)) }),
  ];
  expect(await run("zipkin")).toEqual({ otlp: 1, console: 0, warnings: warned("zipkin") });
  expect(await run("jaeger,none")).toEqual({ otlp: 0, console: 0, warnings: warned("jaeger") });
}, 60_000);

test("OTEL_PROPAGATORS chooses the headers trace context is read from and sent in; others are warned of", async () => {
  // What a service continues of a caller's headers, and the headers it sends onward.
  const script = `
    import { context, propagation, trace } from "@opentelemetry/api";
    import { commonEnv, parseEnv } from "./lib/config.ts";
    import { createRuntime } from "./lib/runtime.ts";
    import { extractContext } from "./lib/telemetry.ts";
    createRuntime("config-test", parseEnv(commonEnv));
    const caller = extractContext(new Headers({
      traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
      b3: "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1",
      baggage: "tenant=a",
    }));
    const sent = {};
    propagation.inject(caller, sent);
    console.log(JSON.stringify({
      traceId: trace.getSpanContext(caller)?.traceId ?? null,
      baggage: propagation.getBaggage(caller)?.getEntry("tenant")?.value ?? null,
      sent: Object.keys(sent).sort(),
    }));
  `;
  const run = async (value?: string) => {
    const env = { ADMIN_TOKEN: "own-admin-token-0123456789", OTEL_EXPORTER_OTLP_ENDPOINT: undefined, OTEL_PROPAGATORS: value };
    const { stdout, stderr } = await runCommand([process.execPath, "-e", script], { env });
    expect(stderr).toBe("");
    return stdout.trim().split("\n").map((l) => JSON.parse(l));
  };
  const w3c = "4bf92f3577b34da6a3ce929d0e0e4736";
  const b3 = "80f198ee56343ba864fe8b2a57d3eff7";
  expect(await run()).toEqual([{ traceId: w3c, baggage: "a", sent: ["baggage", "traceparent"] }]);
  expect(await run("tracecontext")).toEqual([{ traceId: w3c, baggage: null, sent: ["traceparent"] }]);
  expect(await run("B3")).toEqual([{ traceId: b3, baggage: null, sent: ["b3"] }]);
  const multi = ["x-b3-sampled", "x-b3-spanid", "x-b3-traceid"];
  expect(await run("b3multi, baggage")).toEqual([{ traceId: b3, baggage: "a", sent: ["baggage", ...multi] }]);
  expect(await run("none")).toEqual([{ traceId: null, baggage: null, sent: [] }]);
  // Named but not had: warned of and ignored, never a stop; with nothing else named, the default stands.
  const [warning, result] = await run("jaeger");
  expect(warning).toMatchObject({ level: "warn", msg: expect.stringMatching(/^OTEL_PROPAGATORS names jaeger,.*tracecontext,baggage is used/) });
  expect(result).toEqual({ traceId: w3c, baggage: "a", sent: ["baggage", "traceparent"] });
  expect((await run("xray,b3multi"))[1]).toEqual({ traceId: b3, baggage: null, sent: multi });
}, 60_000);

test("OTEL_BSP_* size and pace the batches spans are exported in", async () => {
  const endpoint = { OTEL_EXPORTER_OTLP_ENDPOINT: "$COLLECTOR" };
  // Batches in any order: shutdown exports them all at once.
  const batches = async (env: Record<string, string>) =>
    (await exportedWith({ ...endpoint, ...env }, 5)).received.map((r) => r.spans).sort();
  expect(await batches({})).toEqual([5]);
  expect(await batches({ OTEL_BSP_MAX_EXPORT_BATCH_SIZE: "2" })).toEqual([1, 2, 2]);
  // A batch is at most the queue: one of 3 goes as soon as it is full.
  expect(await batches({ OTEL_BSP_MAX_QUEUE_SIZE: "3" })).toEqual([2, 3]);
  expect(parseEnv(shape, { OTEL_BSP_SCHEDULE_DELAY: "5000", OTEL_BSP_EXPORT_TIMEOUT: "10000" })).toMatchObject({
    OTEL_BSP_SCHEDULE_DELAY: 5000,
    OTEL_BSP_EXPORT_TIMEOUT: 10000,
  });
  expect(() => parseEnv(shape, { OTEL_BSP_MAX_QUEUE_SIZE: "0" })).toThrow("OTEL_BSP_MAX_QUEUE_SIZE");
});

test("OTEL_EXPORTER_OTLP_PROTOCOL sends protobuf or JSON; grpc is warned of at start, going as protobuf; others stop it", async () => {
  const endpoint = { OTEL_EXPORTER_OTLP_ENDPOINT: "$COLLECTOR" };
  for (const variable of ["OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"]) {
    const { stdout, received } = await exportedWith({ ...endpoint, [variable]: "grpc" });
    expect(received.map((r) => r.headers.get("content-type"))).toEqual(["application/x-protobuf"]);
    expect(stdout.trim().split("\n").map((l) => JSON.parse(l))).toEqual([
      expect.objectContaining({ level: "warn", msg: expect.stringMatching(new RegExp(`^${variable} is grpc.*4318`)) }),
    ]);
  }
  // OpenTelemetry's default, protobuf, unless JSON is asked for; the signal's own variable wins.
  const sent = async (env: Record<string, string>) => {
    const { stdout, received } = await exportedWith({ ...endpoint, ...env });
    expect(stdout).toBe("");
    return received.map((r) => [r.headers.get("content-type"), r.resource["service.name"]]);
  };
  const protobuf = [["application/x-protobuf", "config-test"]];
  const json = [["application/json", "config-test"]];
  expect(await sent({})).toEqual(protobuf);
  expect(await sent({ OTEL_EXPORTER_OTLP_PROTOCOL: "http/protobuf" })).toEqual(protobuf);
  expect(await sent({ OTEL_EXPORTER_OTLP_PROTOCOL: "http/json" })).toEqual(json);
  expect(await sent({ OTEL_EXPORTER_OTLP_PROTOCOL: "http/json", OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: "http/protobuf" })).toEqual(
    protobuf,
  );
  expect(await sent({ OTEL_EXPORTER_OTLP_PROTOCOL: "http/protobuf", OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: "http/json" })).toEqual(
    json,
  );
  expect(() => parseEnv(shape, { OTEL_EXPORTER_OTLP_PROTOCOL: "http" })).toThrow('OTEL_EXPORTER_OTLP_PROTOCOL ("http")');
});
