import { expect, test } from "bun:test";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { runCommand } from "../lib/processes.ts";

const root = resolve(import.meta.dir, "..");

test.each(["gateway", "billing", "analytics"])(
  "npm run %s -- --help says what it does and where its variables are described; another argument is refused, nothing started",
  async (service) => {
    const dataDir = join(mkdtempSync(join(tmpdir(), `${service}-args-`)), "data");
    // An environment it would refuse at start: read before the arguments, --help printed that refusal instead.
    const env = { MESH_DATA_DIR: dataDir, LOG_LEVEL: "loud" };
    const main = join(root, service, "main.ts");
    try {
      const help = await runCommand([process.execPath, main, "--help"], { env });
      expect(help).toMatchObject({ code: 0, stderr: "" });
      expect(help.stdout).toStartWith(`usage: npm run ${service} (bun ${service}/main.ts): `);
      expect(help.stdout).toContain("each is described in README.md, section Configuration");
      expect(await runCommand([process.execPath, main, "-h"], { env })).toEqual(help);
      expect(await runCommand([process.execPath, main, "--port", "9000"], { env })).toEqual({
        code: 2,
        stdout: "",
        stderr: `npm run ${service} takes no arguments, not "--port": it is configured by its environment (npm run ${service} -- --help)\n`,
      });
      expect(existsSync(dataDir)).toBe(false);
    } finally {
      rmSync(join(dataDir, ".."), { recursive: true, force: true });
    }
  },
  60_000,
);
