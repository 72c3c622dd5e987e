import { expect, test } from "bun:test";
import { cp, mkdir, mkdtemp, readdir, readFile, rm } from "node:fs/promises";
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

// Versions of proto/ a deployment upgrading one service at a time may run beside today's: the one before the latest
// change (uncommitted changes included), so each change is checked against what it changes, and the first, which
// every version since must still serve. None in a checkout without history.
const earlierContracts = (() => {
  const git = (...args: string[]) => Bun.spawnSync(["git", ...args], { cwd: root });
  const log = git("log", "--format=%H", "HEAD", "--", "proto");
  const versions = log.exitCode === 0 ? log.stdout.toString().split("\n").filter((sha) => sha !== "") : [];
  if (versions.length === 0) return [];
  const changed = git("diff", "--quiet", "HEAD", "--", "proto").exitCode !== 0;
  const before = changed ? "HEAD" : `${versions[0]}^`;
  const first = versions.at(-1) as string;
  const exists = (ref: string) => git("rev-parse", "--verify", "-q", `${ref}:proto`).exitCode === 0;
  return [...new Set([before, first])].filter(exists);
})();

const compatibleTitle = "buf breaking passes against the version of proto/ before its latest change and the first";
test.skipIf(earlierContracts.length === 0)(compatibleTitle, async () => {
  const dir = await mkdtemp(path.join(tmpdir(), "contracts-"));
  try {
    const breaks: string[] = [];
    for (const [i, sha] of earlierContracts.entries()) {
      const against = path.join(dir, String(i));
      await mkdir(against);
      const archive = await run(["sh", "-c", `git archive ${sha} proto | tar -x -C '${against}'`]);
      expect(archive).toEqual({ out: "", code: 0 });
      await cp(path.join(root, "third_party"), path.join(against, "third_party"), { recursive: true });
      await cp(path.join(root, "buf.yaml"), path.join(against, "buf.yaml"));
      const { out } = await run([path.join(bin, "buf"), "breaking", "--against", against]);
      for (const line of out.split("\n")) if (line !== "") breaks.push(`${sha}: ${line}`);
    }
    expect(breaks).toEqual([]);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}, 30_000);
