import { expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import * as path from "node:path";

/** The README's configuration table against the variables the code reads. */
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
