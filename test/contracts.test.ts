import { expect, test } from "bun:test";
import { mkdtemp, readdir, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import * as path from "node:path";
import { runCommand } from "../lib/processes.ts";

const root = path.resolve(import.meta.dir, "..");
const bin = path.join(root, "node_modules", ".bin");

async function run(args: string[]) {
  const { stdout, stderr, code } = await runCommand(args, { cwd: root, env: { PATH: `${bin}:${process.env.PATH}` } });
  return { out: stdout + stderr, code };
}

async function files(dir: string): Promise<string[]> {
  const entries = await readdir(dir, { recursive: true, withFileTypes: true });
  return entries.filter((e) => e.isFile()).map((e) => path.relative(dir, path.join(e.parentPath, e.name))).sort();
}

test("buf lint passes with STANDARD rules", async () => {
  const { out, code } = await run([path.join(bin, "buf"), "lint"]);
  expect(out).toBe("");
  expect(code).toBe(0);
}, 30_000);

test("gen/ is exactly what buf generate makes from proto/", async () => {
  const out = await mkdtemp(path.join(tmpdir(), "gen-"));
  try {
    const result = await run([path.join(bin, "buf"), "generate", "--output", out]);
    expect(result.out).toBe("");
    const fresh = path.join(out, "gen");
    const committed = path.join(root, "gen");
    expect(await files(committed)).toEqual(await files(fresh));
    for (const file of await files(fresh)) {
      expect(await readFile(path.join(committed, file), "utf8")).toBe(await readFile(path.join(fresh, file), "utf8"));
    }
  } finally {
    await rm(out, { recursive: true, force: true });
  }
}, 30_000);
