import { expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import * as path from "node:path";

/** The README's configuration table against the variables the code reads and their defaults. */
const root = path.resolve(import.meta.dir, "..");
const read = (file: string) => readFileSync(path.join(root, file), "utf8");

// Every environment schema: the services' composition roots, the shared one, the launcher and meshctl.
const schemaFiles = [
  "lib/config.ts",
  "gateway/main.ts",
  "billing/main.ts",
  "analytics/main.ts",
  "scripts/mesh.ts",
  "bin/meshctl.ts",
];

test("the configuration table lists every variable the code reads, and only those", () => {
  const inCode = new Set(
    schemaFiles.flatMap((file) =>
      [...read(file).matchAll(/^\s+([A-Z][A-Z0-9_]{2,}): /gm)].map((m) => m[1] as string),
    ),
  );
  const documented = new Set(
    [...read("README.md").matchAll(/^\| `([A-Z][A-Z0-9_]+)` \|/gm)].map((m) => m[1] as string),
  );
  expect(inCode.size).toBeGreaterThan(40);
  expect([...inCode].filter((name) => !documented.has(name))).toEqual([]);
  expect([...documented].filter((name) => !inCode.has(name))).toEqual([]);
});

// Names a default may be written with in the schemas, besides literals.
const constants: Record<string, unknown> = {
  defaultAdminToken: (await import("../lib/config.ts")).defaultAdminToken,
  defaultIngestOptions: (await import("../analytics/ingest.ts")).defaultIngestOptions,
  defaultRollupLagMs: (await import("../analytics/store/store.ts")).defaultRollupLagMs,
  defaultChdbReportTimeoutSeconds: (await import("../analytics/store/driver.ts")).defaultChdbReportTimeoutSeconds,
  defaultBatchBytes: (await import("../gateway/spool.ts")).defaultBatchBytes,
  defaultMaxAnswerBytes: (await import("../gateway/providers/index.ts")).defaultMaxAnswerBytes,
  minBatchBytes: (await import("../gateway/spool.ts")).minBatchBytes,
  defaultReadMaxBytes: (await import("../lib/server.ts")).defaultReadMaxBytes,
};

test("the configuration table's defaults are the schemas' defaults", () => {
  // The default column when it begins with one value in backticks (`8080`, not "unset" or a sentence).
  const documented = new Map(
    [...read("README.md").matchAll(/^\| `([A-Z][A-Z0-9_]+)` \| [^|]+ \| `([^`]*)`[^|]*\|/gm)].map((m) => [m[1], m[2]]),
  );
  const checked: string[] = [];
  const differ: string[] = [];
  for (const file of schemaFiles) {
    for (const [, name, schema] of read(file).matchAll(/^\s+([A-Z][A-Z0-9_]{2,}): (.*?),$/gms)) {
      // env.port(8080) or its .default(...), when that is a literal or one of the constants above.
      const given = /\benv\.port\(([^()]+)\)|\.default\(([^()]+)\)[^()]*$/.exec(schema ?? "");
      const expression = given?.[1] ?? given?.[2];
      if (!name || !documented.has(name) || expression === undefined || !/^[\w.\s*"-]+$/.test(expression)) continue;
      const value = Function(...Object.keys(constants), `return (${expression});`)(...Object.values(constants));
      checked.push(name);
      if (String(value) !== documented.get(name)) differ.push(`${name}: ${value} in ${file}, ${documented.get(name)} in README`);
    }
  }
  expect(differ).toEqual([]);
  expect(new Set(checked).size).toBeGreaterThan(50);
});

test("the configuration table's ranges are the schemas' bounds", () => {
  // A meaning that gives its variable's range as (`1` to `300`), or (`1048576` to `1073741824`; ...).
  const documented = [...read("README.md").matchAll(/^\| `([A-Z][A-Z0-9_]+)` \|.*\(`(\d+)` to `(\d+)`[;)]/gm)].map(
    (m) => [m[1] as string, `${m[2]}..${m[3]}`] as const,
  );
  // env.int(least, most) or env.decimal(...), its bounds literals or the constants above.
  const inCode = new Map<string, [string, string]>();
  for (const file of schemaFiles) {
    const schemas = read(file).matchAll(/^\s+([A-Z][A-Z0-9_]{2,}): (?:env\.)?(?:int|decimal)\(([^,()]+), ([^,()]+)\)/gm);
    for (const [, name, least, most] of schemas) if (name && least && most) inCode.set(name, [least, most]);
  }
  const value = (expression: string) =>
    Function(...Object.keys(constants), `return (${expression});`)(...Object.values(constants)) as number;
  const differ = documented.flatMap(([name, range]) => {
    const bounds = inCode.get(name);
    const actual = bounds && `${value(bounds[0])}..${value(bounds[1])}`;
    return actual === range ? [] : [`${name}: ${actual ?? "no range"} in code, ${range} in README`];
  });
  expect(documented.length).toBeGreaterThanOrEqual(4);
  expect(differ).toEqual([]);
});

test("the REST API's list of errors names every status the gateway answers with", () => {
  const readme = read("README.md");
  const start = readme.indexOf("Errors use OpenAI's body");
  const list = readme.slice(start, readme.indexOf("\n- ", start));
  const statuses = new Set([...read("gateway/errors.ts").matchAll(/GatewayError\(\s*(\d{3}),/g)].map((m) => m[1]));
  // 499 is a client that left, which is answered nothing.
  statuses.delete("499");
  expect(start).toBeGreaterThan(0);
  expect([...statuses].filter((status) => !new RegExp(`\\b${status}\\b`).test(list))).toEqual([]);
});

test("every meshctl example in README is a command line meshctl takes", async () => {
  const { runCli } = await import("../bin/meshctl.ts");
  const examples = [...read("README.md").matchAll(/npm run -s ctl -- (.+?)(?= && |\s+#|$)/gm)].map((m) => m[1] as string);
  expect(examples.length).toBeGreaterThan(10);
  const refused: string[] = [];
  for (const example of examples) {
    // Words as a shell splits these: quoted ones whole.
    const argv = [...example.matchAll(/"([^"]*)"|'([^']*)'|(\S+)/g)].map((m) => m[1] ?? m[2] ?? m[3] ?? "");
    const errors: string[] = [];
    // Nothing listens there: a command line meshctl takes fails on the service (1), a wrong one before it (2).
    const code = await runCli(argv, {
      env: { BILLING_URL: "http://127.0.0.1:1", ANALYTICS_URL: "http://127.0.0.1:1" },
      out: () => {},
      err: (text) => errors.push(text),
    });
    if (code !== 1) refused.push(`${example}: ${errors.join("").trim()}`);
  }
  expect(refused).toEqual([]);
});
