import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { copyFile, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import * as path from "node:path";
import OpenAI from "openai";
import { freePort, runCommand, spawnService } from "../../lib/processes.ts";
import { type Demo, ensureDemo, type Mesh, type ServiceName, startMesh } from "../../scripts/mesh.ts";
import { eventually } from "../support.ts";

// Operators' view of the mesh: a stock Prometheus scrapes every service, promtool accepts every
// exposition, and the health endpoints mean what the README says.
const adminToken = "ops-admin-token-0123456789";
let dataDir: string;
let mesh: Mesh;
let demo: Demo;
// The gateway's config: the default one, copied where the reload test may rewrite it.
let gatewayConfig: string;

beforeAll(async () => {
  dataDir = await mkdtemp(path.join(tmpdir(), "mesh-ops-"));
  gatewayConfig = path.join(dataDir, "gateway.yaml");
  await copyFile(path.join(import.meta.dir, "../../gateway/config.default.yaml"), gatewayConfig);
  mesh = await startMesh({
    dataDir,
    adminToken,
    ports: { gateway: 0, billing: 0, analytics: 0 },
    serviceEnv: { gateway: { GATEWAY_CONFIG: gatewayConfig } },
    onLine: () => {},
  });
  demo = await ensureDemo(mesh, { dataDir, adminToken });
  const client = new OpenAI({ baseURL: demo.baseUrl, apiKey: demo.apiKey, maxRetries: 0 });
  for (let i = 0; i < 3; i++) {
    await client.chat.completions.create({ model: "mock", messages: [{ role: "user", content: `ping ${i}` }] });
  }
}, 120_000);

afterAll(async () => {
  await mesh?.stop();
  await rm(dataDir, { recursive: true, force: true });
}, 60_000);

const services: ServiceName[] = ["gateway", "billing", "analytics"];

// CI installs Prometheus (.ci/run); elsewhere these tests run when it is on PATH.
const havePrometheus = Bun.which("prometheus") !== null && Bun.which("promtool") !== null;
if (!havePrometheus && process.env.CI) throw new Error("CI must provide prometheus and promtool");

describe.skipIf(!havePrometheus)("Prometheus (needs Debian's prometheus package)", () => {
  test.each(services)("promtool check metrics accepts %s's /metrics", async (name) => {
    const text = await (await fetch(`${mesh.urls[name]}/metrics`)).text();
    expect(text).toContain("rpc_server_handled_total");
    const { stdout, stderr, code } = await runCommand(["promtool", "check", "metrics"], { stdin: text });
    expect(stdout + stderr).toBe("");
    expect(code).toBe(0);
  });

  test("every metric the alert rules use is one a service exposes", async () => {
    const rules = await Bun.file(path.join(import.meta.dir, "../../deploy/prometheus/alerts.yaml")).text();
    const used = new Set(rules.match(/\b(?:gateway|analytics|billing)_[a-z_]+\b/g));
    // Names in prose (annotations) are metric names too, or environment variables, which are upper case.
    expect(used.size).toBeGreaterThan(5);
    const exposed = (await Promise.all(services.map(async (s) => (await fetch(`${mesh.urls[s]}/metrics`)).text()))).join("\n");
    for (const name of used) expect(exposed).toContain(`# TYPE ${name} `);
  });

  test("a stock Prometheus scrapes all three services and answers a query", async () => {
    const port = await freePort();
    const configFile = path.join(dataDir, "prometheus.yml");
    const targets = services.map((s) => `"${new URL(mesh.urls[s]).host}"`).join(", ");
    await writeFile(
      configFile,
      `global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: mesh\n    static_configs:\n      - targets: [${targets}]\n`,
    );
    const prometheus = spawnService({
      name: "prometheus",
      cmd: [
        "prometheus",
        `--config.file=${configFile}`,
        `--storage.tsdb.path=${path.join(dataDir, "prometheus")}`,
        `--web.listen-address=127.0.0.1:${port}`,
      ],
      env: {},
      readyUrl: `http://127.0.0.1:${port}/-/ready`,
      onLine: () => {},
    });
    try {
      await prometheus.ready;
      const query = async (promql: string) => {
        const url = `http://127.0.0.1:${port}/api/v1/query?query=${encodeURIComponent(promql)}`;
        const body = (await (await fetch(url)).json()) as { data: { result: { metric: Record<string, string>; value: [number, string] }[] } };
        return body.data.result;
      };
      const deadline = Date.now() + 30_000;
      let up: Awaited<ReturnType<typeof query>> = [];
      while (Date.now() < deadline) {
        up = await query("up == 1");
        if (up.length === 3) break;
        await Bun.sleep(250);
      }
      expect(up).toHaveLength(3);
      const handled = await query('sum by (service) (rpc_server_handled_total{rpc_method="AuthorizeKey"})');
      expect(handled.find((r) => r.metric.service === "billing")?.value[1]).toBeDefined();
      expect(Number(handled.find((r) => r.metric.service === "billing")?.value[1])).toBeGreaterThanOrEqual(1);
      // Domain metrics of each service, as an operator would chart them.
      for (const promql of [
        'sum(gateway_requests_total{model="mock",status="ok"})',
        'sum(gateway_tokens_total{model="mock",type="input"})',
        "sum(billing_key_authorizations_total)",
      ]) {
        let value = 0;
        while (value === 0 && Date.now() < deadline) {
          value = Number((await query(promql))[0]?.value[1] ?? 0);
          if (value === 0) await Bun.sleep(250);
        }
        expect(value).toBeGreaterThan(0);
      }
    } finally {
      await prometheus.stop();
    }
  }, 60_000);
});

describe("health", () => {
  test.each(services)("%s answers /healthz and /readyz", async (name) => {
    expect((await fetch(`${mesh.urls[name]}/healthz`)).status).toBe(200);
    const ready = await fetch(`${mesh.urls[name]}/readyz`);
    expect(ready.status).toBe(200);
    expect(((await ready.json()) as { status: string }).status).toBe("ready");
  });
});

describe("config reload", () => {
  const reloads = async () => {
    const text = await (await fetch(`${mesh.urls.gateway}/metrics`)).text();
    const count = (result: string) =>
      Number(new RegExp(`^gateway_config_reloads_total\\{[^}]*result="${result}"[^}]*\\} (\\S+)$`, "m").exec(text)?.[1]);
    return { applied: count("applied"), refused: count("refused") };
  };
  /** The reload counts, once `done` holds for them. */
  const reloadsWhen = (done: (r: Awaited<ReturnType<typeof reloads>>) => boolean) =>
    eventually(async () => {
      const r = await reloads();
      return done(r) && r;
    });

  test("SIGHUP serves the config file as it now reads, from the next request; a file that does not hold is refused and the running config stays", async () => {
    const client = new OpenAI({ baseURL: demo.baseUrl, apiKey: demo.apiKey, maxRetries: 0 });
    const ask = (model: string) => client.chat.completions.create({ model, messages: [{ role: "user", content: "reloaded?" }] }).withResponse();
    const gateway = mesh.processes.gateway.proc.pid;
    const original = await readFile(gatewayConfig, "utf8");
    expect((await client.models.list()).data.map((m) => m.id)).not.toContain("mock-reloaded");
    const unknown = await ask("mock-reloaded").catch((e: unknown) => e);
    expect(unknown).toMatchObject({ status: 404, code: "model_not_found" });

    // A model added, at ten times the mock model's prices.
    await writeFile(
      gatewayConfig,
      `${original}
  - name: mock-reloaded
    targets:
      - { provider: mock, model: mock-echo-1 }
    pricing: { input_per_mtok: "5", output_per_mtok: "15" }
`,
    );
    process.kill(gateway, "SIGHUP");
    expect(await reloadsWhen((r) => r.applied === 1)).toEqual({ applied: 1, refused: 0 });
    expect((await client.models.list()).data.map((m) => m.id)).toContain("mock-reloaded");
    const [mock, reloaded] = [await ask("mock"), await ask("mock-reloaded")];
    expect(reloaded.data.usage).toEqual(mock.data.usage);
    const cost = (answer: typeof mock) => BigInt(answer.response.headers.get("x-gateway-cost-nanos") ?? "-1");
    expect(cost(reloaded)).toBe(cost(mock) * 10n);

    // A file that does not parse, then one naming a provider it does not define: both refused, nothing changes.
    for (const broken of ["models: [", `${original}\n  - name: ghost\n    targets: [{ provider: nowhere, model: x }]\n    pricing: { input_per_mtok: "1", output_per_mtok: "1" }\n`]) {
      await writeFile(gatewayConfig, broken);
      const before = await reloads();
      process.kill(gateway, "SIGHUP");
      expect(await reloadsWhen((r) => r.refused === before.refused + 1)).toEqual({ applied: 1, refused: before.refused + 1 });
      expect((await ask("mock-reloaded")).response.status).toBe(200);
    }
    expect(await reloadsWhen((r) => r.refused === 2)).toEqual({ applied: 1, refused: 2 });

    // Back to the file the gateway started with: the added model is gone again.
    await writeFile(gatewayConfig, original);
    process.kill(gateway, "SIGHUP");
    expect(await reloadsWhen((r) => r.applied === 2)).toEqual({ applied: 2, refused: 2 });
    expect((await client.models.list()).data.map((m) => m.id)).not.toContain("mock-reloaded");
  }, 60_000);
});
