import { describe, expect, test } from "bun:test";
import { fileURLToPath } from "node:url";
import { ConfigError } from "../lib/config.ts";
import { costNanos } from "../lib/money.ts";
import { loadGatewayConfig, parseGatewayConfig } from "./config.ts";

const base = (models: string) => `
providers:
  - { name: mock, kind: mock }
  - { name: openai, kind: openai, api_key_env: OPENAI_API_KEY }
models:
${models}`;

const tokens = (input: number, output: number, cached = 0, reasoning = 0) => ({
  inputTokens: BigInt(input),
  cachedInputTokens: BigInt(cached),
  outputTokens: BigInt(output),
  reasoningTokens: BigInt(reasoning),
});

function configError(text: string, source = "test.yaml"): string {
  try {
    parseGatewayConfig(text, source);
  } catch (e) {
    expect(e).toBeInstanceOf(ConfigError);
    return (e as Error).message;
  }
  throw new Error("expected a ConfigError");
}

describe("gateway config", () => {
  test("the shipped default file parses and serves mock offline", () => {
    const config = loadGatewayConfig(fileURLToPath(new URL("./config.default.yaml", import.meta.url)));
    const mock = config.models.get("mock");
    expect(mock?.targets).toEqual([{ provider: "mock", model: "mock-echo-1", weight: undefined }]);
    expect(config.providers.find((p) => p.name === "mock")?.kind).toBe("mock");
    for (const name of ["gpt-4o", "gpt-4o-mini", "text-embedding-3-small"]) expect(config.models.has(name)).toBe(true);
    // Its embedding models serve embeddings only: a chat call to one is refused without an upstream round trip.
    for (const name of ["text-embedding-3-small", "text-embedding-3-large"]) {
      expect([name, config.models.get(name)?.endpoints]).toEqual([name, new Set(["embeddings"])]);
    }
    expect(config.models.get("gpt-4o")?.endpoints).toBeUndefined();
  });

  test("the shipped chat models budget the most output OpenAI publishes for them when a request sets no max_tokens", () => {
    const config = loadGatewayConfig(fileURLToPath(new URL("./config.default.yaml", import.meta.url)));
    const published = {
      "gpt-4o": 16_384,
      "gpt-4o-mini": 16_384,
      "gpt-4.1": 32_768,
      "gpt-4.1-mini": 32_768,
      "gpt-4.1-nano": 32_768,
      "o4-mini": 100_000,
    };
    for (const [name, most] of Object.entries(published)) {
      expect([name, config.models.get(name)?.maxOutputTokens]).toEqual([name, most]);
    }
    // Every OpenAI chat model shipped is one of them.
    const chat = [...config.models.values()].filter(
      (m) => m.targets[0]?.provider === "openai" && !m.name.includes("embedding"),
    );
    expect(chat.map((m) => m.name).sort()).toEqual(Object.keys(published).sort());
  });

  test("prices become exact micro-USD and costs exact nano-USD", () => {
    const config = parseGatewayConfig(
      base(`
  - name: gpt-4o
    targets: [{ provider: openai, model: gpt-4o-2024-08-06 }]
    pricing: { input_per_mtok: "2.50", cached_input_per_mtok: "1.25", output_per_mtok: "10.00" }
  - name: cheap
    targets: [{ provider: mock, model: m }]
    pricing: { input_per_mtok: "0.000001", output_per_mtok: "0.075" }
`),
      "test.yaml",
    );
    const gpt4o = config.models.get("gpt-4o");
    expect(gpt4o?.price).toEqual({
      inputMicros: 2_500_000n,
      cachedInputMicros: 1_250_000n,
      outputMicros: 10_000_000n,
      // unset reasoning and audio prices fall back to the output and input prices
      reasoningMicros: 10_000_000n,
      audioInputMicros: 2_500_000n,
      audioOutputMicros: 10_000_000n,
    });
    expect(gpt4o?.pricing).toEqual({ input: "2.50", cachedInput: "1.25", output: "10.00", reasoning: "10.00" });
    // 1000 input of which 400 cached, 500 output of which 100 reasoning:
    // (600*2.50 + 400*1.25 + 400*10 + 100*10) USD / 1M = $0.007
    expect(costNanos(tokens(1000, 500, 400, 100), gpt4o!.price)).toBe(7_000_000n);
    const cheap = config.models.get("cheap")!;
    expect(cheap.price.cachedInputMicros).toBe(1n);
    // 3 input at 1 micro-USD/M = 0.003 nano; 7 output at 75_000 micro-USD/M = 525 nano -> 525.003 -> 525
    expect(costNanos(tokens(3, 7), cheap.price)).toBe(525n);
    expect(cheap.timeoutMs).toBe(60_000);
    expect(cheap.retries).toBe(0);
  });

  test("a model may price other service tiers; their cached and reasoning prices default as the model's do", () => {
    const config = parseGatewayConfig(
      base(`
  - name: o3
    targets: [{ provider: openai, model: o3 }]
    pricing:
      input_per_mtok: "2"
      output_per_mtok: "8"
      service_tiers: { flex: { input_per_mtok: "1", cached_input_per_mtok: "0.25", output_per_mtok: "4" } }
`),
      "test.yaml",
    );
    expect(config.models.get("o3")?.tierPrices).toEqual(
      new Map([
        [
          "flex",
          {
            inputMicros: 1_000_000n,
            cachedInputMicros: 250_000n,
            outputMicros: 4_000_000n,
            reasoningMicros: 4_000_000n,
            audioInputMicros: 1_000_000n,
            audioOutputMicros: 4_000_000n,
          },
        ],
      ]),
    );
    // A tier that prices no audio bills it at the model's audio prices, not at the tier's text prices.
    const audio = parseGatewayConfig(
      base(`
  - name: gpt-4o-audio
    targets: [{ provider: openai, model: gpt-4o-audio }]
    pricing:
      input_per_mtok: "2.5"
      output_per_mtok: "10"
      audio_input_per_mtok: "40"
      audio_output_per_mtok: "80"
      service_tiers: { flex: { input_per_mtok: "1", output_per_mtok: "4" } }
`),
      "test.yaml",
    );
    expect(audio.models.get("gpt-4o-audio")?.tierPrices.get("flex")).toMatchObject({
      inputMicros: 1_000_000n,
      audioInputMicros: 40_000_000n,
      audioOutputMicros: 80_000_000n,
    });
    expect(
      configError(
        base(`
  - name: o3
    targets: [{ provider: openai, model: o3 }]
    pricing: { input_per_mtok: "2", output_per_mtok: "8", service_tiers: { turbo: { input_per_mtok: "1", output_per_mtok: "4" } } }
`),
      ),
    ).toContain("models[0].pricing.service_tiers");
  });

  test("JSON files parse too", () => {
    const config = parseGatewayConfig(
      JSON.stringify({
        providers: [{ name: "mock", kind: "mock", latency_ms: 5 }],
        models: [{ name: "m", targets: [{ provider: "mock", model: "x" }], pricing: { input_per_mtok: "1", output_per_mtok: "2" } }],
      }),
      "routes.json",
    );
    expect(config.models.get("m")?.price.outputMicros).toBe(2_000_000n);
  });

  test("a bad price string names the field", () => {
    const message = configError(
      base(`
  - name: m
    targets: [{ provider: mock, model: x }]
    pricing: { input_per_mtok: "1.5", output_per_mtok: "abc" }
`),
    );
    expect(message).toContain("test.yaml");
    expect(message).toContain("models[0].pricing.output_per_mtok");
    expect(message).toContain('"abc"');
  });

  test("a price written with whitespace around it is listed without it, as it is charged", () => {
    const cfg = parseGatewayConfig(
      base(`  - { name: m, targets: [{ provider: mock, model: x }], pricing: { input_per_mtok: " 2.50", output_per_mtok: "10 " } }`),
      "t.yaml",
    );
    expect(cfg.models.get("m")?.pricing).toEqual({ input: "2.50", cachedInput: "2.50", output: "10", reasoning: "10" });
  });

  test("a price over $10,000 per million tokens, or cached input dearer than input, is refused", () => {
    const priced = (pricing: string) => base(`  - { name: m, targets: [{ provider: mock, model: x }], pricing: ${pricing} }`);
    expect(configError(priced('{ input_per_mtok: "999999999", output_per_mtok: "1" }'))).toContain(
      'models[0].pricing.input_per_mtok: "999999999" is over $10,000 per million tokens',
    );
    expect(
      configError(priced('{ input_per_mtok: "1", output_per_mtok: "1", service_tiers: { priority: { input_per_mtok: "1", output_per_mtok: "10000.5" } } }')),
    ).toContain("models[0].pricing.service_tiers.priority.output_per_mtok");
    expect(configError(priced('{ input_per_mtok: "2.50", cached_input_per_mtok: "125", output_per_mtok: "10" }'))).toContain(
      'models[0].pricing.cached_input_per_mtok: "125" is above input_per_mtok ("2.50")',
    );
    expect(
      configError(
        priced('{ input_per_mtok: "4", output_per_mtok: "8", service_tiers: { flex: { input_per_mtok: "2", cached_input_per_mtok: "3", output_per_mtok: "4" } } }'),
      ),
    ).toContain('models[0].pricing.service_tiers.flex.cached_input_per_mtok: "3" is above input_per_mtok ("2")');
    const dearest = parseGatewayConfig(priced('{ input_per_mtok: "10000", cached_input_per_mtok: "10000", output_per_mtok: "10000" }'), "t.yaml");
    expect(dearest.models.get("m")?.price.inputMicros).toBe(10_000_000_000n);
  });

  test("an unquoted YAML number price is refused with a hint", () => {
    const message = configError(
      base(`
  - name: m
    targets: [{ provider: mock, model: x }]
    pricing: { input_per_mtok: 0.1, output_per_mtok: "1" }
`),
    );
    expect(message).toContain("models[0].pricing.input_per_mtok");
    expect(message).toContain("quote it");
  });

  test("a name YAML reads as a number or boolean is refused naming its entry and saying to quote it", () => {
    const message = configError(`
providers:
  - { name: 7, kind: mock }
models:
  - name: m
    targets: [{ provider: mock, model: x }]
    pricing: { input_per_mtok: "1", output_per_mtok: "1" }
  - name: 4
    targets: [{ provider: "7", model: 3.5 }, { provider: mock, model: true }]
    pricing: { input_per_mtok: "1", output_per_mtok: "1" }
`);
    // Was zod's own "Invalid input: expected string, received number" for each.
    expect(message.replace("invalid gateway config test.yaml: ", "").split("; ")).toEqual([
      'providers[0].name: a name must be a string, but YAML reads 7 as a number: quote it as written (name: "7")',
      'models[1].name: a name must be a string, but YAML reads 4 as a number: quote it as written (name: "4")',
      'models[1].targets[0].model: a name must be a string, but YAML reads 3.5 as a number: quote it as written (model: "3.5")',
      'models[1].targets[1].model: a name must be a string, but YAML reads true as a boolean: quote it as written (model: "true")',
    ]);
  });

  test("an unknown provider reference names the field and the known providers", () => {
    const message = configError(
      base(`
  - name: ok
    targets: [{ provider: mock, model: x }]
    pricing: { input_per_mtok: "1", output_per_mtok: "1" }
  - name: broken
    targets: [{ provider: mock, model: x }, { provider: anthropic, model: y }]
    pricing: { input_per_mtok: "1", output_per_mtok: "1" }
`),
    );
    expect(message).toContain("models[1].targets[1].provider");
    expect(message).toContain('unknown provider "anthropic"');
    expect(message).toContain("mock, openai");
  });

  test("duplicates, unknown kinds, typos and missing fields are refused", () => {
    expect(
      configError(
        base(`
  - { name: m, targets: [{ provider: mock, model: x }], pricing: { input_per_mtok: "1", output_per_mtok: "1" } }
  - { name: m, targets: [{ provider: mock, model: x }], pricing: { input_per_mtok: "1", output_per_mtok: "1" } }
`),
      ),
    ).toContain('models[1].name: duplicate model "m"');
    expect(configError("providers: [{ name: x, kind: bedrock }]\nmodels: []")).toContain("providers[0].kind");
    expect(
      configError(
        base(`
  - { name: m, targets: [{ provider: mock, model: x }], pricing: { input_per_mtok: "1", output_per_mtok: "1" }, timeout: 5 }
`),
      ),
    ).toContain("timeout");
    expect(configError(base(`  - { name: m, targets: [], pricing: { input_per_mtok: "1", output_per_mtok: "1" } }`))).toContain(
      "models[0].targets",
    );
    expect(configError(base(`  - { name: m, targets: [{ provider: mock, model: x }], pricing: { input_per_mtok: "1" } }`))).toContain(
      "models[0].pricing.output_per_mtok",
    );
  });

  test("an unknown key is named by its own path with the keys its place takes, so a typo says what to write", () => {
    const file = `
providers:
  - { name: mock, kind: mock }
  - { name: oa, kind: openai, api_key_envv: OPENAI_API_KEY }
  - { name: az, kind: azure, base_url: "https://x.openai.azure.com/", api_key_env: AZ_KEY, deployment: gpt4o-prod }
  - { name: local, kind: openai, base_url: "http://localhost:8000/v1", api_key: sk-local-0123456789 }
models:
  - name: m
    targets: [{ provider: mock, model: x, weigth: 2 }]
    pricing: { input_per_mtok: "1", output_per_mtok: "1", service_tiers: { flexx: { input_per_mtok: "1", output_per_mtok: "1" } } }
`;
    const problems = configError(file).replace("invalid gateway config test.yaml: ", "").split("; providers").join("\nproviders").split("; models").join("\nmodels").split("\n");
    expect(problems).toEqual([
      'providers[1].api_key_envv: unknown key (keys here: name, kind, base_url, api_key_env, headers, stream_usage, keep_alive_ms)',
      expect.stringMatching(/^providers\[2\]\.deployment: unknown key: an Azure deployment is the model of a target naming this provider \(keys here: name, kind, base_url, api_key_env, api_version, /),
      expect.stringMatching(/^providers\[3\]\.api_key: unknown key: name the variable that holds the key in api_key_env \(keys here: /),
      "models[0].targets[0].weigth: unknown key (keys here: provider, model, weight, timeout_ms, retries)",
      "models[0].pricing.service_tiers.flexx: unknown key (keys here: flex, scale, priority)",
      // The key the typo meant is missing, too.
      "providers[1].api_key_env: the OpenAI API needs a key: name the variable that holds it (such as OPENAI_API_KEY)",
    ]);
    expect(configError(file)).not.toContain("sk-local-0123456789");
  });

  test("a JSON file repeating a key is refused, as YAML is: the last price would have won silently", () => {
    const json = `{"providers": [{"name": "mock", "kind": "mock"}], "models": [{"name": "m",
      "targets": [{"provider": "mock", "model": "x"}],
      "pricing": {"input_per_mtok": "2.50", "output_per_mtok": "10", "input_per_mtok": "0"}}]}`;
    expect(configError(json, "routes.json")).toContain("routes.json");
  });

  test("weights are on every target of a model or on none, and not all 0", () => {
    const weights = (targets: string) =>
      base(`  - { name: m, targets: [${targets}], pricing: { input_per_mtok: "1", output_per_mtok: "1" } }`);
    // The unweighted primary would never have been picked first: every first try went to the canary.
    expect(configError(weights("{ provider: openai, model: a }, { provider: openai, model: b, weight: 1 }"))).toContain(
      "models[0].targets[0].weight: give every target of the model a weight, or none",
    );
    expect(configError(weights("{ provider: openai, model: a, weight: 0 }, { provider: openai, model: b, weight: 0 }"))).toContain(
      "at least one weight must be above 0",
    );
    const fallbackOnly = weights("{ provider: openai, model: a, weight: 3 }, { provider: openai, model: b, weight: 0 }");
    expect(parseGatewayConfig(fallbackOnly, "ok.yaml").models.get("m")?.targets.map((t) => t.weight)).toEqual([3, 0]);
  });

  test("base URLs are http(s) without credentials; headers are valid as fetch sends them", () => {
    const providers = (provider: string) =>
      `providers:\n  - ${provider}\nmodels:\n  - { name: m, targets: [{ provider: p, model: m }], pricing: { input_per_mtok: "1", output_per_mtok: "1" } }`;
    const openai = (fields: string) => providers(`{ name: p, kind: openai, ${fields} }`);
    const azure = (url: string) => providers(`{ name: p, kind: azure, api_key_env: AZURE_KEY, base_url: "${url}" }`);
    for (const url of ["ftp://example.com/v1", "javascript:alert(1)", "file:///etc/passwd", "not a url"]) {
      expect(configError(openai(`base_url: "${url}"`))).toContain("providers[0].base_url: must be an http:// or https:// URL");
    }
    expect(configError(azure("ftp://example.openai.azure.com/"))).toContain("providers[0].base_url: must be an http://");
    expect(configError(openai('base_url: "http://alice:s3cret@example.com/v1"'))).toContain(
      "providers[0].base_url: must not hold credentials (user:password@): give the key in api_key_env",
    );
    expect(configError(openai('headers: { "Bad Header": "x" }'))).toContain('providers[0].headers.Bad Header: Invalid header name');
    expect(configError(openai('headers: { X-Team: "a\\r\\nX-Injected: 1" }'))).toContain("providers[0].headers.X-Team:");
    const ok = parseGatewayConfig(openai('base_url: "HTTPS://example.com/v1", headers: { X-Team: search }'), "t.yaml");
    expect(ok.providers[0]).toMatchObject({ base_url: "HTTPS://example.com/v1", headers: { "X-Team": "search" } });
    expect(parseGatewayConfig(azure("https://x.openai.azure.com/"), "t.yaml").providers[0]?.kind).toBe("azure");
    // Azure API Management in front of a resource wants its subscription key in a header of its own.
    const apim = providers('{ name: p, kind: azure, api_key_env: AZURE_KEY, base_url: "https://apim.example.com/", headers: { Ocp-Apim-Subscription-Key: k }, keep_alive_ms: 1000 }');
    expect(parseGatewayConfig(apim, "t.yaml").providers[0]).toMatchObject({ headers: { "Ocp-Apim-Subscription-Key": "k" }, keep_alive_ms: 1000 });
  });

  test("a base_url the gateway's paths would miss on every call (an endpoint's URL, /v1 twice, a #fragment) is refused", () => {
    const openai = (url: string) =>
      `providers:\n  - { name: p, kind: openai, base_url: "${url}" }\nmodels:\n  - { name: m, targets: [{ provider: p, model: m }], pricing: { input_per_mtok: "1", output_per_mtok: "1" } }`;
    for (const url of [
      "http://localhost:8000/v1/chat/completions",
      "http://localhost:11434/v1/chat/completions/",
      "https://openrouter.ai/api/v1/embeddings",
      "https://api.openai.com/v1/responses",
      "http://localhost:8000/v1/completions",
    ]) {
      expect([url, configError(openai(url))]).toEqual([
        url,
        expect.stringContaining("providers[0].base_url: give the base the gateway adds /chat/completions, /embeddings and /responses to"),
      ]);
    }
    expect(configError(openai("http://localhost:8000/v1/v1"))).toContain("providers[0].base_url: /v1 is in it twice");
    expect(configError(openai("http://localhost:8000/v1#models"))).toContain("providers[0].base_url: must not hold a #fragment");
    // The OpenAI API's own host answers only under /v1.
    for (const url of ["https://api.openai.com", "https://api.openai.com/", "https://API.openai.com/v2", "https://eu.api.openai.com/v1/chat"]) {
      expect([url, configError(openai(url))]).toEqual([url, expect.stringContaining("providers[0].base_url: the OpenAI API's base is https://api.openai.com/v1")]);
    }
    for (const url of ["https://api.openai.com/v1", "https://eu.api.openai.com/v1/", "https://api.openai.com.example.net/"]) {
      const keyed = openai(url).replace("kind: openai,", "kind: openai, api_key_env: OPENAI_API_KEY,");
      expect(parseGatewayConfig(keyed, "t.yaml").providers[0]).toMatchObject({ base_url: url });
    }
    // An Azure deployment's endpoint URL gets Azure's one message, not a second one with an example of another kind.
    const azure = (url: string) =>
      `providers:\n  - { name: p, kind: azure, api_key_env: K, base_url: "${url}" }\nmodels:\n  - { name: m, targets: [{ provider: p, model: m }], pricing: { input_per_mtok: "1", output_per_mtok: "1" } }`;
    for (const url of ["https://x.openai.azure.com/openai/deployments/d/chat/completions", "https://x.openai.azure.com/openai/v1/chat/completions"]) {
      const message = configError(azure(url));
      expect(message).toContain("providers[0].base_url: give the resource endpoint without /openai");
      expect(message).not.toContain("give the base the gateway adds");
    }
    expect(configError(azure("https://apim.example.com/chat/completions"))).toContain("(such as https://example.openai.azure.com/)");
    for (const url of ["http://localhost:8000/v1/", "https://openrouter.ai/api/v1", "https://api.groq.com/openai/v1", "http://h:1/v1?a=b"]) {
      expect(parseGatewayConfig(openai(url), "t.yaml").providers[0]).toMatchObject({ base_url: url });
    }
  });

  test("a provider calling the OpenAI API without a key, which OpenAI refuses on every call, is refused", () => {
    const openai = (fields: string) =>
      `providers:\n  - { name: p, kind: openai${fields} }\nmodels:\n  - { name: m, targets: [{ provider: p, model: m }], pricing: { input_per_mtok: "1", output_per_mtok: "1" } }`;
    for (const fields of ["", ', base_url: "https://api.openai.com/v1"', ', base_url: "https://API.openai.com/v1/"', ', base_url: "https://eu.api.openai.com/v1"', ", headers: { X-Team: a }"]) {
      expect([fields, configError(openai(fields))]).toEqual([
        fields,
        expect.stringContaining("providers[0].api_key_env: the OpenAI API needs a key: name the variable that holds it (such as OPENAI_API_KEY)"),
      ]);
    }
    // A key of its own in a header, or an upstream that needs none.
    for (const fields of [", api_key_env: OPENAI_API_KEY", ", headers: { authorization: Bearer sk-x }", ', base_url: "http://localhost:11434/v1"']) {
      expect(parseGatewayConfig(openai(fields), "t.yaml").providers[0]?.name).toBe("p");
    }
  });

  test("an Azure base_url is the resource endpoint or its v1 API: any other under /openai, which the gateway adds, is refused", () => {
    const azure = (url: string) =>
      `providers:\n  - { name: p, kind: azure, api_key_env: AZURE_KEY, base_url: "${url}" }\nmodels:\n  - { name: m, targets: [{ provider: p, model: m }], pricing: { input_per_mtok: "1", output_per_mtok: "1" } }`;
    const refused = [
      "https://x.openai.azure.com/openai",
      "https://x.openai.azure.com/openai/",
      "https://x.openai.azure.com/OpenAI//",
      // The portal's target URI of a deployment, cut before /chat/completions.
      "https://x.openai.azure.com/openai/deployments/gpt-4o",
    ];
    for (const url of refused) {
      expect(configError(azure(url))).toContain(
        "providers[0].base_url: give the resource endpoint without /openai (e.g. https://example.openai.azure.com/)",
      );
    }
    const served = [
      "https://x.openai.azure.com/",
      "https://x.openai.azure.com",
      "https://proxy.example.com/azure",
      "https://proxy.example.com/openai-proxy/",
      "https://x.openai.azure.com/openai/v1",
      "https://x.openai.azure.com/openai/v1/",
    ];
    for (const url of served) {
      expect(parseGatewayConfig(azure(url), "t.yaml").providers[0]).toMatchObject({ kind: "azure", base_url: url });
    }
  });

  test("a model's endpoints are chat, embeddings or responses, at least one", () => {
    const served = (endpoints: string) =>
      base(`  - { name: m, endpoints: ${endpoints}, targets: [{ provider: mock, model: x }], pricing: { input_per_mtok: "1", output_per_mtok: "1" } }`);
    expect(parseGatewayConfig(served("[chat, embeddings]"), "t.yaml").models.get("m")?.endpoints).toEqual(new Set(["chat", "embeddings"]));
    expect(parseGatewayConfig(served("[responses]"), "t.yaml").models.get("m")?.endpoints).toEqual(new Set(["responses"]));
    expect(configError(served("[completions]"))).toContain("models[0].endpoints[0]");
    expect(configError(served("[]"))).toContain("models[0].endpoints");
  });

  test("a provider's name has no slash: provider/model names a target's breaker once", () => {
    const config = `
providers:
  - { name: a/b, kind: openai }
models:
  - { name: m, targets: [{ provider: a/b, model: c }], pricing: { input_per_mtok: "1", output_per_mtok: "1" } }
`;
    expect(configError(config)).toContain("providers[0].name");
  });

  test("unreadable files and broken syntax are ConfigErrors naming the file", () => {
    expect(() => loadGatewayConfig("/nonexistent/gateway.yaml")).toThrow(/nonexistent\/gateway\.yaml/);
    expect(configError("providers: [", "broken.yaml")).toContain("broken.yaml");
    expect(configError("{", "broken.json")).toContain("broken.json");
    for (const empty of ["", "\n", "# routes come later\n"]) {
      expect(configError(empty, "empty.yaml")).toBe("invalid gateway config empty.yaml: the file is empty (or only comments): give its providers and models");
    }
  });

  test("broken syntax is named by line and column on one line, never quoting the file's lines and the credentials in them", () => {
    const provider = (headers: string) => `
providers:
  - name: up
    kind: openai
    base_url: https://llm.internal/v1
    headers:
${headers}
models: []
`;
    const secret = "sk-live-0123456789abcdef";
    const broken = [
      [`      Authorization: "Bearer ${secret}`, "line 9, column 1: Missing closing"],
      [`      Authorization: Bearer ${secret}\n      Authorization: Bearer ${secret}`, "line 8, column 7: Map keys must be unique"],
      [`      Authorization: Bearer ${secret}\n     X-Team: search`, "line 8, column 1: All mapping items must start at the same column"],
    ] as const;
    for (const [headers, expected] of broken) {
      const message = configError(provider(headers), "/etc/gateway/routes.yaml");
      expect(message).toStartWith(`invalid gateway config /etc/gateway/routes.yaml: ${expected}`);
      expect(message).not.toContain(secret);
      expect(message).not.toContain("\n");
    }
    expect(configError(`${provider("      X-Team: a")}---\nmodels: []\n`)).toContain("line 9, column 1: more than one document (a second ---)");
  });
});
