import { expect, test } from "bun:test";
import { pingReadiness } from "./health.ts";
import { createLogger } from "./log.ts";

const log = createLogger({ service: "t", level: "error", write: () => {} });

test("a ping that never settles is a timeout once its bound has passed, and is told the bound", async () => {
  let given: number | undefined;
  const readiness = pingReadiness(
    "clickhouse",
    (timeoutMs) => {
      given = timeoutMs;
      return new Promise(() => {});
    },
    log,
    50,
  );
  const started = performance.now();
  expect(await readiness()).toEqual({ ready: false, checks: { clickhouse: "timeout" } });
  expect(performance.now() - started).toBeLessThan(1_000);
  expect(given).toBe(50);
  expect(await pingReadiness("clickhouse", async () => {}, log)()).toEqual({ ready: true, checks: { clickhouse: "ok" } });
  const failing = pingReadiness("postgres", () => Promise.reject(new Error("ECONNREFUSED 10.0.0.1:5432")), log);
  expect(await failing()).toEqual({ ready: false, checks: { postgres: "unreachable" } });
});
