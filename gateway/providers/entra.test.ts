import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import type { Server } from "bun";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ConfigError } from "../../lib/config.ts";
import { parseGatewayConfig } from "../config.ts";
import { tokenFetchHungAfterMs } from "./entra.ts";

async function waitFor(condition: () => boolean, timeoutMs = 10_000) {
  for (const deadline = Date.now() + timeoutMs; !condition(); await Bun.sleep(20)) {
    if (Date.now() > deadline) throw new Error("condition not met");
  }
}

/**
 * Azure OpenAI providers with `auth: entra_id`, on real sockets: a fake Entra ID (HTTPS, its self-signed certificate
 * made here and trusted by the gateway's process through NODE_EXTRA_CA_CERTS, as an operator trusts a private CA) and a
 * fake Azure OpenAI resource that takes only a bearer token Entra issued and has not expired.
 */

const routes = (provider: string, extra = "") =>
  [
    "providers:",
    `  - ${provider}`,
    "models:",
    "  - name: gpt",
    "    targets: [{ provider: az, model: dep }]",
    '    pricing: { input_per_mtok: "1", output_per_mtok: "1" }',
    extra,
  ].join("\n");

describe("config", () => {
  const parse = (provider: string) => () => parseGatewayConfig(routes(provider), "gw.yaml");

  test("an azure provider takes api_key_env or auth: entra_id, never both, and is refused with one line otherwise", () => {
    const base = 'name: az, kind: azure, base_url: "https://r.openai.azure.com/"';
    expect(parse(`{ ${base}, auth: entra_id }`)).not.toThrow();
    expect(parse(`{ ${base}, api_key_env: AZ_KEY }`)).not.toThrow();
    expect(parse(`{ ${base}, auth: api_key, api_key_env: AZ_KEY }`)).not.toThrow();
    expect(parse(`{ ${base}, auth: entra_id, tenant_id: t1, client_id: c-1, client_secret_env: AZ_SECRET }`)).not.toThrow();
    const refused: [string, string][] = [
      [`{ ${base}, auth: entra_id, api_key_env: AZ_KEY }`, "providers[0].api_key_env: give api_key_env or auth: entra_id, not both"],
      [`{ ${base} }`, "providers[0].api_key_env: an azure provider needs a key (name the variable that holds it) or auth: entra_id"],
      [`{ ${base}, auth: entra_id, tenant_id: t1, client_id: c-1 }`, "providers[0].auth: a service principal needs tenant_id, client_id and client_secret_env together"],
      [`{ ${base}, api_key_env: AZ_KEY, tenant_id: t1 }`, "providers[0].tenant_id: only with auth: entra_id"],
      [`{ ${base}, auth: entra_id, authority_host: "http://login.example" }`, "providers[0].authority_host: must be an https:// URL"],
      [`{ ${base}, auth: bearer }`, "providers[0].auth"],
    ];
    for (const [provider, message] of refused) {
      let error: unknown;
      try {
        parse(provider)();
      } catch (e) {
        error = e;
      }
      expect(error, provider).toBeInstanceOf(ConfigError);
      expect((error as Error).message).toContain(message);
      expect((error as Error).message).not.toContain("\n");
    }
  });
});

/** Entra ID's token endpoint and OpenID metadata for any tenant, over HTTPS, issuing JWT-shaped tokens. */
function startEntra(cert: string, key: string) {
  const state = {
    /** Seconds each token lasts. */
    expiresIn: 3600,
    /** What a token request must carry: the client secret, or (workload identity) the federated token as assertion. */
    secret: "",
    assertion: "",
    down: false,
    hang: false,
    issued: new Map<string, number>(),
    requests: 0,
  };
  let n = 0;
  const server: Server<undefined> = Bun.serve({
    port: 0,
    hostname: "127.0.0.1",
    tls: { cert, key },
    async fetch(req): Promise<Response> {
      const url = new URL(req.url);
      const origin = `https://127.0.0.1:${server.port}`;
      const tenant = url.pathname.split("/")[1];
      if (url.pathname.endsWith("/.well-known/openid-configuration")) {
        return Response.json({
          token_endpoint: `${origin}/${tenant}/oauth2/v2.0/token`,
          authorization_endpoint: `${origin}/${tenant}/oauth2/v2.0/authorize`,
          end_session_endpoint: `${origin}/${tenant}/oauth2/v2.0/logout`,
          issuer: `${origin}/${tenant}/v2.0`,
          jwks_uri: `${origin}/${tenant}/discovery/v2.0/keys`,
        });
      }
      if (!url.pathname.endsWith("/oauth2/v2.0/token")) return new Response("not found", { status: 404 });
      state.requests++;
      if (state.hang) return new Promise<Response>(() => {});
      if (state.down) return Response.json({ error: "temporarily_unavailable", error_description: "AADSTS90033: down" }, { status: 503 });
      const form = new URLSearchParams(await req.text());
      const proof = form.get("client_secret") ?? form.get("client_assertion");
      if (proof !== (state.secret || state.assertion) || form.get("scope") !== "https://cognitiveservices.azure.com/.default") {
        return Response.json({ error: "invalid_client", error_description: "AADSTS7000215: Invalid client secret provided." }, { status: 401 });
      }
      const b64 = (o: object) => Buffer.from(JSON.stringify(o)).toString("base64url");
      const token = `${b64({ alg: "RS256", typ: "JWT" })}.${b64({ n: ++n, aud: "https://cognitiveservices.azure.com" })}.c2lnbmF0dXJl${n}`;
      state.issued.set(token, Date.now() + state.expiresIn * 1000);
      return Response.json({ token_type: "Bearer", expires_in: state.expiresIn, ext_expires_in: state.expiresIn, access_token: token });
    },
  });
  return { state, url: `https://127.0.0.1:${server.port}`, stop: () => server.stop(true) };
}

/** An Azure OpenAI resource's deployment `dep` that takes only an unexpired token `issued` holds. */
function startAzure(issued: Map<string, number>) {
  const seen: string[] = [];
  const state = { refuseAll: false };
  const server = Bun.serve({
    port: 0,
    hostname: "127.0.0.1",
    async fetch(req) {
      const token = /^Bearer (.+)$/.exec(req.headers.get("authorization") ?? "")?.[1] ?? "";
      seen.push(token);
      const expires = issued.get(token);
      if (state.refuseAll || req.headers.has("api-key") || expires === undefined || expires <= Date.now()) {
        const message = "Access token is missing, invalid, audience is incorrect (https://cognitiveservices.azure.com), or have expired.";
        return Response.json({ error: { code: "401", message: `${message} Got: ${token}` } }, { status: 401 });
      }
      const { pathname } = new URL(req.url);
      const body = (await req.json()) as { model: string };
      const v1 = pathname === "/openai/v1/chat/completions" && body.model === "dep";
      if (pathname !== "/openai/deployments/dep/chat/completions" && !v1) return new Response("no", { status: 404 });
      return Response.json({
        id: "c1",
        object: "chat.completion",
        created: 1,
        model: "dep",
        choices: [{ index: 0, message: { role: "assistant", content: "hi" }, finish_reason: "stop" }],
        usage: { prompt_tokens: 3, completion_tokens: 1, total_tokens: 4 },
      });
    },
  });
  return { seen, state, url: `http://127.0.0.1:${server.port}/`, stop: () => server.stop(true) };
}

/** The gateway in a process of its own, trusting the fake Entra ID's certificate as an operator trusts a private CA. */
async function startGateway(dir: string, yaml: string, env: Record<string, string>) {
  const file = join(dir, `routes-${Math.random().toString(36).slice(2)}.yaml`);
  writeFileSync(file, yaml);
  const proc = Bun.spawn([process.execPath, join(import.meta.dir, "../testing/gateway-process.ts"), file], {
    env: { PATH: process.env.PATH, NODE_EXTRA_CA_CERTS: join(dir, "cert.pem"), ...env },
    stdin: "pipe",
    stdout: "pipe",
    stderr: "pipe",
  });
  const lines: string[] = [];
  void (async () => {
    let buffered = "";
    for await (const chunk of proc.stdout) {
      buffered += Buffer.from(chunk).toString();
      const parts = buffered.split("\n");
      buffered = parts.pop() ?? "";
      lines.push(...parts);
    }
  })();
  const stderr = new Response(proc.stderr).text();
  const deadline = Date.now() + 30_000;
  while (!lines.some((l) => l.startsWith("listening "))) {
    if (Date.now() > deadline || proc.exitCode !== null) throw new Error(`gateway did not start: ${await stderr}`);
    await Bun.sleep(20);
  }
  const url = lines.find((l) => l.startsWith("listening "))!.slice("listening ".length).replace(/\/$/, "");
  const chat = (timeoutMs = 60_000) =>
    fetch(`${url}/v1/chat/completions`, {
      method: "POST",
      headers: { authorization: "Bearer sk-good", "content-type": "application/json" },
      body: JSON.stringify({ model: "gpt", messages: [{ role: "user", content: "hello" }] }),
      signal: AbortSignal.timeout(timeoutMs),
    });
  /** The metrics row of a request, once recorded. */
  const row = async (requestId: string) => {
    for (const deadline = Date.now() + 10_000; Date.now() < deadline; await Bun.sleep(20)) {
      const line = lines.find((l) => l.startsWith("row ") && l.includes(requestId));
      if (line) return JSON.parse(line.slice(4)) as Record<string, unknown>;
    }
    throw new Error(`no metrics for ${requestId}`);
  };
  const stop = async () => {
    if (proc.exitCode === null && !proc.killed) proc.stdin.end();
    await proc.exited;
  };
  return { lines, chat, row, stop, stderr };
}

describe("Entra ID tokens", () => {
  let dir: string;
  let cert: string;
  let key: string;

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "entra-test-"));
    const made = Bun.spawn(
      ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
        "-keyout", join(dir, "key.pem"), "-out", join(dir, "cert.pem"), "-subj", "/CN=127.0.0.1",
        "-addext", "subjectAltName=IP:127.0.0.1"],
      { stdout: "ignore", stderr: "pipe" },
    );
    expect(await made.exited, await new Response(made.stderr).text()).toBe(0);
    cert = await Bun.file(join(dir, "cert.pem")).text();
    key = await Bun.file(join(dir, "key.pem")).text();
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  const secret = "s3cr3t~client~secret~value~0123456789";
  const servicePrincipal = (entra: string, azure: string) =>
    `{ name: az, kind: azure, base_url: "${azure}", auth: entra_id, tenant_id: tenant-1, client_id: client-1, client_secret_env: AZ_SECRET, authority_host: "${entra}" }`;

  test("each call carries a current token: a token about to expire is replaced, and none is sent expired", async () => {
    const entra = startEntra(cert, key);
    entra.state.secret = secret;
    // Refreshed from its last second, a token of 3 s is used for at most 2.
    entra.state.expiresIn = 3;
    const azure = startAzure(entra.state.issued);
    const gateway = await startGateway(dir, routes(servicePrincipal(entra.url, azure.url)), { AZ_SECRET: secret });
    try {
      const started = Date.now();
      const statuses: number[] = [];
      while (Date.now() - started < 7000) {
        const response = await gateway.chat();
        statuses.push(response.status);
        expect(response.status, await response.clone().text()).toBe(200);
        expect(((await response.json()) as { choices: { message: { content: string } }[] }).choices[0]!.message.content).toBe("hi");
        await Bun.sleep(100);
      }
      // Every call's token was one Entra issued, and more than one was used as they expired.
      expect(azure.seen.every((t) => entra.state.issued.has(t))).toBe(true);
      expect(new Set(azure.seen).size).toBeGreaterThanOrEqual(2);
      expect(statuses.length).toBeGreaterThan(5);
      // No token in the gateway's logs, nor the secret.
      await gateway.stop();
      const output = gateway.lines.join("\n") + (await gateway.stderr);
      for (const token of entra.state.issued.keys()) expect(output).not.toContain(token);
      expect(output).not.toContain(secret);
    } finally {
      await gateway.stop();
      azure.stop();
      entra.stop();
    }
  }, 60_000);

  test("the resource's v1 API is sent the token as its bearer too", async () => {
    const entra = startEntra(cert, key);
    entra.state.secret = secret;
    const azure = startAzure(entra.state.issued);
    const v1 = servicePrincipal(entra.url, `${azure.url}openai/v1`);
    const gateway = await startGateway(dir, routes(v1), { AZ_SECRET: secret });
    try {
      const response = await gateway.chat();
      expect(response.status, await response.clone().text()).toBe(200);
      expect(entra.state.issued.has(azure.seen[0]!)).toBe(true);
    } finally {
      await gateway.stop();
      azure.stop();
      entra.stop();
    }
  }, 60_000);

  test("workload identity (DefaultAzureCredential with AKS's variables) gets the tokens", async () => {
    const entra = startEntra(cert, key);
    entra.state.assertion = "federated.service-account.token";
    writeFileSync(join(dir, "federated-token"), entra.state.assertion);
    const azure = startAzure(entra.state.issued);
    const provider = `{ name: az, kind: azure, base_url: "${azure.url}", auth: entra_id, authority_host: "${entra.url}" }`;
    const gateway = await startGateway(dir, routes(provider), {
      AZURE_FEDERATED_TOKEN_FILE: join(dir, "federated-token"),
      AZURE_CLIENT_ID: "client-2",
      AZURE_TENANT_ID: "tenant-2",
    });
    try {
      const response = await gateway.chat();
      expect(response.status, await response.clone().text()).toBe(200);
      expect(azure.seen.length).toBe(1);
      expect(entra.state.issued.has(azure.seen[0]!)).toBe(true);
      // Refused, with the token quoted back: the gateway's words and logs never hold it.
      azure.state.refuseAll = true;
      const refused = await gateway.chat();
      expect(refused.status).toBe(502);
      expect(await refused.text()).toContain("refused the gateway's request (HTTP 401)");
      await waitFor(() => gateway.lines.some((l) => l.includes("Access token is missing")));
      expect(gateway.lines.join("\n")).not.toContain(azure.seen[0]!);
    } finally {
      await gateway.stop();
      azure.stop();
      entra.stop();
    }
  }, 60_000);

  test("a token endpoint that refuses the secret or never answers fails the attempt (502, 504), metered, the upstream never called; a stalled fetch is given up", async () => {
    const entra = startEntra(cert, key);
    entra.state.secret = "another secret";
    const azure = startAzure(entra.state.issued);
    const gateway = await startGateway(
      dir,
      routes(servicePrincipal(entra.url, azure.url), "    timeout_ms: 2000\n    retries: 0"),
      { AZ_SECRET: secret },
    );
    const failure = async (response: Response) => {
      const { error } = (await response.json()) as { error: { message: string } };
      const row = await gateway.row(response.headers.get("x-request-id")!);
      return { status: response.status, message: error.message, row };
    };
    try {
      const refused = await failure(await gateway.chat());
      expect(refused).toMatchObject({ status: 502, message: "The upstream of `gpt` is not configured." });
      expect(refused.row).toMatchObject({ status: "REQUEST_STATUS_UPSTREAM_ERROR", httpStatus: 502, provider: "az" });
      await waitFor(() => gateway.lines.some((l) => l.includes("no Entra ID token") && l.includes("AADSTS7000215")));

      entra.state.secret = secret;
      entra.state.hang = true;
      const hangs = Date.now();
      const hung = await failure(await gateway.chat());
      // At the attempt's 2 s, not left waiting on the token endpoint.
      expect(Date.now() - hangs).toBeLessThan(tokenFetchHungAfterMs);
      expect(hung).toMatchObject({ status: 504, row: { status: "REQUEST_STATUS_TIMEOUT", httpStatus: 504 } });
      // The stalled fetch is given up once it has gone unanswered that long, and the next call's token comes.
      entra.state.hang = false;
      await Bun.sleep(tokenFetchHungAfterMs - (Date.now() - hangs) + 500);
      expect((await gateway.chat()).status).toBe(200);
      expect(azure.seen.length).toBe(1);

    } finally {
      await gateway.stop();
      azure.stop();
      entra.stop();
    }
  }, 60_000);

  test("a token endpoint that is down fails the attempt as the target's failure: 502, metered", async () => {
    const entra = startEntra(cert, key);
    entra.state.down = true;
    const azure = startAzure(entra.state.issued);
    const gateway = await startGateway(
      dir,
      routes(servicePrincipal(entra.url, azure.url), "    timeout_ms: 2000\n    retries: 1"),
      { AZ_SECRET: secret },
    );
    try {
      const down = await gateway.chat();
      expect(down.status).toBe(502);
      expect(((await down.json()) as { error: { message: string } }).error.message).toBe("The upstream of `gpt` gave no usable answer.");
      const row = await gateway.row(down.headers.get("x-request-id")!);
      expect(row).toMatchObject({ status: "REQUEST_STATUS_UPSTREAM_ERROR", httpStatus: 502, provider: "az" });
      await waitFor(() => gateway.lines.some((l) => l.includes("no Entra ID token") && l.includes("AADSTS90033")));
      expect(azure.seen).toEqual([]);
      expect(gateway.lines.join("\n")).not.toContain(secret);
    } finally {
      await gateway.stop();
      azure.stop();
      entra.stop();
    }
  }, 60_000);
});
