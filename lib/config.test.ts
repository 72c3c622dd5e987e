import { describe, expect, test } from "bun:test";
import { z } from "zod";
import { commonEnv, ConfigError, env, parseEnv } from "./config.ts";
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
