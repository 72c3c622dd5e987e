import { chmodSync, mkdtempSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, expect, test } from "bun:test";
import { freePort } from "../lib/processes.ts";
import { expectJsonStartFailure, spawnAsContainerInit, waitForLine } from "../lib/testing.ts";

const dataDir = mkdtempSync(join(tmpdir(), "analytics-main-"));
afterAll(() => rmSync(dataDir, { recursive: true, force: true }));

/** Starts analytics/main.ts on a free port; resolves once it logs that it listens. */
async function startAnalytics() {
  const proc = Bun.spawn([process.execPath, join(import.meta.dir, "main.ts")], {
    // Its own process, so its chdb data directory does not clash with this test process's.
    env: {
      ...process.env,
      MESH_DATA_DIR: dataDir,
      ANALYTICS_PORT: String(await freePort()),
      CLICKHOUSE_URL: undefined,
      LOG_LEVEL: "info",
    },
    stdout: "pipe",
    stderr: "inherit",
  });
  started.push(proc);
  const lines: Record<string, unknown>[] = [];
  const decoder = new TextDecoder();
  let buffered = "";
  const reader = proc.stdout.getReader();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new Error(`analytics exited before listening: ${JSON.stringify(lines)}`);
    buffered += decoder.decode(value, { stream: true });
    const complete = buffered.split("\n");
    buffered = complete.pop() ?? "";
    lines.push(...complete.filter(Boolean).map((line) => JSON.parse(line) as Record<string, unknown>));
    const listening = lines.find((l) => l.msg === "listening");
    if (listening) {
      reader.releaseLock();
      return { proc, lines, url: `http://127.0.0.1:${listening.port}` };
    }
  }
}

const started: ReturnType<typeof Bun.spawn>[] = [];
afterAll(() => {
  for (const proc of started) proc.kill("SIGKILL");
});

test("main.ts starts ready, keeps its data across restarts and exits 0 on SIGTERM", async () => {
  const first = await startAnalytics();
  // Where its data lives, as billing's log says of its Postgres.
  expect(first.lines.find((l) => l.msg === "clickhouse ready")?.dataDir).toBe(join(dataDir, "clickhouse"));
  expect(first.lines.find((l) => l.msg === "clickhouse ready")?.migrations_applied).toEqual([
    "0001_requests",
    "0002_rollups",
    "0003_rollup_totals",
  ]);
  // Its rows hold tenants' request metadata: no other user of the machine reads them.
  expect(statSync(join(dataDir, "clickhouse")).mode & 0o777).toBe(0o700);
  const ready = await fetch(`${first.url}/readyz`);
  expect(ready.status).toBe(200);
  expect(await ready.json()).toEqual({ status: "ready", checks: { clickhouse: "ok" } });
  first.proc.kill("SIGTERM");
  expect(await first.proc.exited).toBe(0);

  // As an older version left it: the next start narrows it.
  chmodSync(join(dataDir, "clickhouse"), 0o755);
  const second = await startAnalytics();
  expect(statSync(join(dataDir, "clickhouse")).mode & 0o777).toBe(0o700);
  expect(second.lines.find((l) => l.msg === "clickhouse ready")?.migrations_applied).toEqual([]);
  const res = await fetch(`${second.url}/analytics.v1.AnalyticsService/QueryUsage`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: "Bearer dev-admin-token-change-me" },
    body: JSON.stringify({ orgId: "org_1", range: { start: "2026-01-01T00:00:00Z", end: "2026-02-01T00:00:00Z" } }),
  });
  expect(res.status).toBe(200);
  expect(await res.json()).toEqual({ rows: [{ usage: {} }] });
  second.proc.kill("SIGTERM");
  expect(await second.proc.exited).toBe(0);
});

test("on a data directory another analytics still runs on it exits 1, its error line naming that one's pid", async () => {
  const first = await startAnalytics();
  try {
    const second = Bun.spawn([process.execPath, join(import.meta.dir, "main.ts")], {
      env: { ...process.env, MESH_DATA_DIR: dataDir, ANALYTICS_PORT: String(await freePort()), CLICKHOUSE_URL: undefined },
      stdout: "pipe",
      stderr: "pipe",
    });
    const [out, code] = await Promise.all([new Response(second.stdout).text(), second.exited]);
    expect(code).toBe(1);
    const errors = out.split("\n").filter((l) => l.startsWith("{")).map((l) => JSON.parse(l)).filter((l) => l.level === "error");
    expect(errors).toEqual([
      expect.objectContaining({
        msg: "clickhouse failed to start",
        err: expect.objectContaining({
          message: `${join(dataDir, "clickhouse")} is in use by the analytics (pid ${first.proc.pid}) still running on it: stop that one first, or give this one another MESH_DATA_DIR`,
        }),
      }),
    ]);
    // The first serves on.
    expect((await fetch(`${first.url}/readyz`)).status).toBe(200);
  } finally {
    first.proc.kill("SIGTERM");
    await first.proc.exited;
  }
}, 60_000);

test("with its ClickHouse server unreachable it exits 1, every line it writes one JSON object", async () => {
  const closed = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { data() {} } });
  const port = closed.port;
  closed.stop(true);
  await expectJsonStartFailure(
    [process.execPath, join(import.meta.dir, "main.ts")],
    {
      MESH_DATA_DIR: dataDir,
      ANALYTICS_PORT: String(await freePort()),
      CLICKHOUSE_URL: `http://127.0.0.1:${port}`,
      CLICKHOUSE_PASSWORD: "clickhouse-pass-0123456789",
      LOG_LEVEL: "debug",
    },
    "clickhouse-pass-0123456789",
  );
}, 60_000);

test("with ANALYTICS_PORT taken it exits 1, one JSON error line naming it", async () => {
  const taken = Bun.listen({ hostname: "0.0.0.0", port: 0, socket: { data() {} } });
  try {
    const errors = await expectJsonStartFailure(
      [process.execPath, join(import.meta.dir, "main.ts")],
      { MESH_DATA_DIR: dataDir, ANALYTICS_PORT: String(taken.port), CLICKHOUSE_URL: undefined, LOG_LEVEL: "warn" },
      "dev-admin-token-change-me",
    );
    expect(errors).toEqual([
      expect.objectContaining({ msg: "cannot listen on ANALYTICS_PORT", variable: "ANALYTICS_PORT", port: taken.port }),
    ]);
  } finally {
    taken.stop(true);
  }
}, 60_000);

test("with an unusable MESH_DATA_DIR it exits 1, one JSON error line, as billing and the gateway do", async () => {
  const errors = await expectJsonStartFailure(
    [process.execPath, join(import.meta.dir, "main.ts")],
    { MESH_DATA_DIR: "/proc/nope", ANALYTICS_PORT: String(await freePort()), CLICKHOUSE_URL: undefined, LOG_LEVEL: "warn" },
    "dev-admin-token-change-me",
  );
  expect(errors).toEqual([expect.objectContaining({ msg: "clickhouse failed to start" })]);
}, 60_000);

test("SIGTERM while its migrations wait on a ClickHouse server that never answers ends it at once, as pid 1 of a container", async () => {
  let connected: () => void = () => {};
  const asked = new Promise<void>((resolve) => (connected = resolve));
  const silent = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { open: () => connected(), data() {} } });
  const analytics = await spawnAsContainerInit([process.execPath, join(import.meta.dir, "main.ts")], {
    env: {
      MESH_DATA_DIR: dataDir,
      ANALYTICS_PORT: String(await freePort()),
      CLICKHOUSE_URL: `http://127.0.0.1:${silent.port}`,
      LOG_LEVEL: "info",
    },
  });
  try {
    await asked;
    const sent = Date.now();
    process.kill(analytics.pid, "SIGTERM");
    // Without a handler yet it waited out the client's 45 s request timeout, or (pid 1) ignored the signal for good.
    const code = await Promise.race([analytics.exited, Bun.sleep(5_000).then(() => "still running")]);
    expect(code).toBe(0);
    expect(Date.now() - sent).toBeLessThan(2_000);
    expect(analytics.lines.some((line) => line.includes('"msg":"stopped"'))).toBe(true);
  } finally {
    analytics.proc.kill("SIGKILL");
    silent.stop(true);
  }
}, 30_000);

test("SIGTERM while a roll-up waits on a slow ClickHouse server exits within the pod's grace period", async () => {
  let rollupAsked: () => void = () => {};
  const rollingUp = new Promise<void>((resolve) => (rollupAsked = resolve));
  // A server that answers everything at once with no rows, but never the roll-up's first read (its marks).
  const slow = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    async fetch(req) {
      const text = `${decodeURIComponent(req.url)} ${await req.text()}`;
      if (text.includes("marked_at)) AS key FROM")) {
        rollupAsked();
        return new Promise<Response>(() => {});
      }
      return new Response("");
    },
  });
  const analytics = await spawnAsContainerInit([process.execPath, join(import.meta.dir, "main.ts")], {
    env: {
      MESH_DATA_DIR: dataDir,
      ANALYTICS_PORT: String(await freePort()),
      CLICKHOUSE_URL: slow.url.origin,
      ANALYTICS_ROLLUP_INTERVAL_MS: "100",
      SHUTDOWN_GRACE_MS: "1000",
      LOG_LEVEL: "info",
    },
  });
  try {
    await rollingUp;
    await waitForLine(analytics.lines, '"msg":"listening"');
    const sent = Date.now();
    process.kill(analytics.pid, "SIGTERM");
    // It waited for the roll-up's statement until the client's request timeout, 45 s, past the pod's 30 s.
    const code = await Promise.race([analytics.exited, Bun.sleep(20_000).then(() => "still running")]);
    expect(code).toBe(0);
    expect(Date.now() - sent).toBeLessThan(10_000);
    expect(analytics.lines.some((line) => line.includes("roll-up still running at shutdown"))).toBe(true);
  } finally {
    analytics.proc.kill("SIGKILL");
    slow.stop(true);
  }
}, 40_000);

test("roll-ups on a ClickHouse server that is down are logged once as that starts and once as it ends", async () => {
  // A server that answers everything with no rows, stopped and started again on its port.
  const serve = (port = 0) => Bun.serve({ hostname: "127.0.0.1", port, fetch: () => new Response("") });
  let clickhouse = serve();
  const port = clickhouse.port;
  const analytics = await spawnAsContainerInit([process.execPath, join(import.meta.dir, "main.ts")], {
    env: {
      MESH_DATA_DIR: dataDir,
      ANALYTICS_PORT: String(await freePort()),
      CLICKHOUSE_URL: `http://127.0.0.1:${port}`,
      ANALYTICS_ROLLUP_INTERVAL_MS: "100",
      LOG_LEVEL: "info",
    },
  });
  const failures = () => analytics.lines.filter((line) => line.includes("rolling up failed")).length;
  try {
    await waitForLine(analytics.lines, '"msg":"listening"');
    clickhouse.stop(true);
    // About 15 roll-ups meet the outage.
    await Bun.sleep(1500);
    expect(failures()).toBe(1);
    expect(analytics.lines.filter((line) => line.includes("HTTP request error"))).toEqual([]);
    clickhouse = serve(port);
    const recovered = JSON.parse(await waitForLine(analytics.lines, "roll-ups run again", 5000));
    expect(recovered.failures).toBeGreaterThan(5);
    expect(failures()).toBe(1);
  } finally {
    analytics.proc.kill("SIGKILL");
    clickhouse.stop(true);
  }
}, 30_000);
