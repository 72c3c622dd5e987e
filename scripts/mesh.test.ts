import { expect, test } from "bun:test";
import { join } from "node:path";
import { runCommand } from "../lib/processes.ts";

const launcher = join(import.meta.dir, "mesh.ts");

test("the launcher reads MESH_READY_TIMEOUT_MS as a whole number in decimal digits, like every other variable", async () => {
  // GATEWAY_PORT is refused too, so nothing starts whatever the launcher makes of the timeout.
  for (const value of ["1e3", "0x3E8", "60000.0"]) {
    const { stdout, stderr, code } = await runCommand([process.execPath, launcher], {
      env: { GATEWAY_PORT: "x", MESH_READY_TIMEOUT_MS: value },
    });
    expect(code).toBe(2);
    expect(stdout).toBe("");
    expect(stderr).toContain(`MESH_READY_TIMEOUT_MS ("${value}"): must be a whole number in decimal digits`);
  }
});
