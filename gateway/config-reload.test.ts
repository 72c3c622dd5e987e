import { describe, expect, test } from "bun:test";
import { Registry } from "prom-client";
import { Endpoint } from "../gen/common/v1/common_pb.ts";
import { createKeyAuthorizer } from "./auth.ts";
import { ConfigError } from "../lib/config.ts";
import { parseGatewayConfig } from "./config.ts";
import { createConfigReloader } from "./config-reload.ts";
import { createGatewayCore } from "./core.ts";
import { GatewayError } from "./errors.ts";
import { createProviders } from "./providers/index.ts";
import { type Provider, UpstreamError } from "./providers/provider.ts";
import { eventually } from "../test/support.ts";
import { createBillingFake, createRecordingShipper, createTestLogger } from "./testing.ts";

/** A config of mock providers: `latency` answers after `ms`, `spare` at once; `models` is the models section. */
const configOf = (models: string, ms = 0) =>
  parseGatewayConfig(
    `providers:
  - { name: latency, kind: mock, latency_ms: ${ms} }
  - { name: spare, kind: mock }
models:
${models}`,
    "reload-test.yaml",
  );

const priced = (name: string, provider: string, price: string) => `  - name: ${name}
    targets: [{ provider: ${provider}, model: mock-echo-1 }]
    pricing: { input_per_mtok: "${price}", output_per_mtok: "${price}" }
`;

function startCore(config: ReturnType<typeof configOf>, providers: ReadonlyMap<string, Provider> = createProviders(config.providers, {})) {
  const billing = createBillingFake({ "sk-good": { id: "key_good", orgId: "org_1" } });
  const shipper = createRecordingShipper();
  const core = createGatewayCore({
    config,
    providers,
    keys: createKeyAuthorizer({ billing: billing.client }),
    shipper,
    instanceId: "gw-reload",
    log: createTestLogger(),
  });
  const chat = (model: string) => {
    const call = core.begin(Endpoint.CHAT_COMPLETIONS, "sk-good");
    return core.handle(call, () => core.chat(call, { model, messages: [{ role: "user", content: "the same prompt" }] }));
  };
  return { core, shipper, chat };
}

test("a reloaded config's models and prices serve from the next request on; a model it dropped is unknown", async () => {
  const { core, chat } = startCore(configOf(priced("kept", "spare", "1") + priced("dropped", "spare", "1")));
  const before = await chat("kept");
  expect(core.routes.map((r) => r.name)).toEqual(["kept", "dropped"]);

  const next = configOf(priced("kept", "spare", "10") + priced("added", "latency", "2"));
  core.reconfigure(next, createProviders(next.providers, {}));

  expect(core.routes.map((r) => r.name)).toEqual(["kept", "added"]);
  const after = await chat("kept");
  // The same prompt and answer, ten times the price.
  expect(after.tokens).toEqual(before.tokens);
  expect(after.costNanos).toBe(before.costNanos * 10n);
  expect((await chat("added")).provider).toBe("latency");
  const dropped = await chat("dropped").catch((e: unknown) => e);
  expect(dropped).toBeInstanceOf(GatewayError);
  expect(dropped).toMatchObject({ status: 404, code: "model_not_found" });
});

test("a request admitted before a reload is metered at the price it began under", async () => {
  const { core, chat, shipper } = startCore(configOf(priced("m", "latency", "1"), 150));
  const baseline = await chat("m");
  const running = chat("m");
  // Admitted and waiting on its upstream (150 ms) when the price goes up.
  await Bun.sleep(40);
  const next = configOf(priced("m", "latency", "3"), 150);
  core.reconfigure(next, createProviders(next.providers, {}));
  expect((await running).costNanos).toBe(baseline.costNanos);
  expect((await chat("m")).costNanos).toBe(baseline.costNanos * 3n);
  expect(shipper.rows.map((row) => row.costNanos)).toEqual([baseline.costNanos, baseline.costNanos, baseline.costNanos * 3n]);
});

test("a config naming a provider it was not given is refused, and the running config stays", async () => {
  const config = configOf(priced("m", "spare", "1"));
  const { core, chat } = startCore(config);
  const next = configOf(priced("m", "spare", "1") + priced("n", "latency", "1"));
  const withoutLatency = new Map([...createProviders(next.providers, {})].filter(([name]) => name !== "latency"));
  expect(() => core.reconfigure(next, withoutLatency)).toThrow('no provider "latency" for model n');
  expect(core.routes.map((r) => r.name)).toEqual(["m"]);
  expect((await chat("m")).provider).toBe("spare");
});

test("an attempt on a provider a reload removed fails as not configured: the next target is tried, and the last says so", async () => {
  // `latency` fails each attempt after 100 ms; the route falls back to `spare`, which a reload removes meanwhile.
  const fallback = `  - name: r
    targets: [{ provider: latency, model: mock-echo-1 }, { provider: spare, model: mock-echo-1 }]
    pricing: { input_per_mtok: "1", output_per_mtok: "1" }
`;
  const config = configOf(fallback);
  const providers = new Map(createProviders(config.providers, {}));
  const failing = async (): Promise<never> => {
    await Bun.sleep(100);
    throw new UpstreamError("transient", "latency answered 500: boom", 500);
  };
  providers.set("latency", {
    name: "latency",
    kind: "mock",
    chat: failing,
    streamChat: failing,
    embed: failing,
    responses: failing,
    streamResponses: failing,
    storedResponse: failing,
  });
  const { core, chat } = startCore(config, providers);
  const running = chat("r").catch((e: unknown) => e);
  await Bun.sleep(30);
  const next = configOf(priced("r", "latency", "1"));
  core.reconfigure(next, new Map([...providers].filter(([name]) => name !== "spare")));
  const failed = await running;
  expect(failed).toBeInstanceOf(GatewayError);
  expect(failed).toMatchObject({ status: 502, message: "Every upstream of `r` failed; the last one is not configured." });
});

test("reloads while requests run lose none: each is answered and metered once, at one config's price or the other's", async () => {
  const cheap = configOf(priced("m", "latency", "1"), 5);
  const dear = configOf(priced("m", "latency", "2"), 5);
  const { core, chat, shipper } = startCore(cheap);
  const unit = (await chat("m")).costNanos;
  let reloads = 0;
  const reloading = (async () => {
    for (; reloads < 40; reloads++) {
      const next = reloads % 2 === 0 ? dear : cheap;
      core.reconfigure(next, createProviders(next.providers, {}));
      await Bun.sleep(2);
    }
  })();
  // Begun ten at a time, a millisecond apart, so that they straddle the reloads.
  const running: ReturnType<typeof chat>[] = [];
  for (let i = 0; i < 300; i++) {
    running.push(chat("m"));
    if (i % 10 === 9) await Bun.sleep(1);
  }
  const answers = await Promise.all(running);
  await reloading;
  expect(reloads).toBe(40);
  const costs = answers.map((a) => a.costNanos);
  expect(costs.every((c) => c === unit || c === unit * 2n)).toBe(true);
  expect(new Set(costs).size).toBe(2);
  expect(shipper.rows.length).toBe(301);
  expect(new Set(shipper.rows.map((row) => row.requestId)).size).toBe(301);
  expect(shipper.rows.slice(1).map((row) => row.costNanos)).toEqual(costs);
});

describe("the config reloader", () => {
  /** A file in memory: its text, or undefined when it cannot be read; and what was applied and logged. */
  function reloaderOn(initialText: string, pollMs = 0) {
    const file = { text: initialText as string | undefined };
    const applied: string[] = [];
    const registry = new Registry();
    const log = createTestLogger();
    const reloader = createConfigReloader({
      path: "/etc/gateway.yaml",
      initialText,
      pollMs,
      log,
      registry,
      read: (path) => {
        if (file.text === undefined) throw new ConfigError(`cannot read gateway config ${path}: ENOENT`);
        return file.text;
      },
      apply(text) {
        if (text.includes("broken")) throw new ConfigError("line 1, column 9: broken");
        applied.push(text);
        return { models: text.length };
      },
    });
    const counts = async () => {
      const metrics = await registry.getSingleMetricAsString("gateway_config_reloads_total");
      const count = (result: string) => Number(new RegExp(`result="${result}"\\} (\\d+)`).exec(metrics)?.[1]);
      return { applied: count("applied"), refused: count("refused") };
    };
    const logged = (msg: string) => log.lines.filter((line) => line.includes(`"msg":"${msg}`));
    return { file, applied, reloader, counts, logged };
  }

  test("reload() applies the file as it reads now, changed or not, and refuses one that does not hold or cannot be read", async () => {
    const { file, applied, reloader, counts, logged } = reloaderOn("v1");
    reloader.reload();
    file.text = "v2";
    reloader.reload();
    file.text = "v2 broken";
    reloader.reload();
    file.text = undefined;
    reloader.reload();
    expect(applied).toEqual(["v1", "v2"]);
    expect(await counts()).toEqual({ applied: 2, refused: 2 });
    expect(logged("gateway config reloaded")).toEqual([
      expect.stringContaining('"models":2'),
      expect.stringContaining('"models":2'),
    ]);
    expect(logged("gateway config not reloaded")).toEqual([
      expect.stringContaining('"err":"line 1, column 9: broken"'),
      expect.stringContaining('"err":"cannot read gateway config /etc/gateway.yaml: ENOENT"'),
    ]);
  });

  test("a poll applies a changed file once, and refuses a broken or unreadable one once however many polls see it", async () => {
    const { file, applied, reloader, counts } = reloaderOn("v1", 5);
    const settled = async (expected: { applied: number; refused: number }) => {
      await eventually(async () => JSON.stringify(await counts()) === JSON.stringify(expected), { intervalMs: 5 });
      // Several more polls see the same file.
      await Bun.sleep(40);
      expect(await counts()).toEqual(expected);
    };
    try {
      await Bun.sleep(40);
      expect(applied).toEqual([]);
      file.text = "v2";
      await settled({ applied: 1, refused: 0 });
      expect(applied).toEqual(["v2"]);
      file.text = "v3 broken";
      await settled({ applied: 1, refused: 1 });
      file.text = undefined;
      await settled({ applied: 1, refused: 2 });
      // Readable again with the text last applied: a change from what the poll last saw, so applied again.
      file.text = "v2";
      await settled({ applied: 2, refused: 2 });
      expect(applied).toEqual(["v2", "v2"]);
    } finally {
      reloader.stop();
    }
    file.text = "v4";
    await Bun.sleep(40);
    expect(applied).toEqual(["v2", "v2"]);
  });
});
