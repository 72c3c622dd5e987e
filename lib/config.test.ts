import { describe, expect, test } from "bun:test";
import { z } from "zod";
import { commonEnv, ConfigError, defaultAdminToken, env, parseEnv } from "./config.ts";
import { runCommand } from "./processes.ts";

const shape = { ...commonEnv, GATEWAY_PORT: env.port(8080), BILLING_URL: z.url().default("http://127.0.0.1:8081") };

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

  test("never echoes a secret's value", () => {
    expect(() => parseEnv(shape, { ADMIN_TOKEN: "short" })).toThrow('ADMIN_TOKEN ("***")');
  });

  test("rejects ports out of range", () => {
    expect(() => parseEnv(shape, { GATEWAY_PORT: "70000" })).toThrow("GATEWAY_PORT");
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
    env: { ADMIN_TOKEN: "", BILLING_PORT: "0", MESH_DATA_DIR: "/nonexistent" },
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
