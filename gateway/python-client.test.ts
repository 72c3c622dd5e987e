import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import * as path from "node:path";
import { runCommand } from "../lib/processes.ts";
import { startTestGateway } from "./testing/served-gateway.ts";

// Debian's Python with its grpcio and protobuf packages (a pyenv or venv python3 on PATH may lack them).
const python = ["/usr/bin/python3", Bun.which("python3")].find(
  (p) => p && Bun.spawnSync([p, "-c", "import grpc, google.protobuf"], { stderr: "ignore" }).exitCode === 0,
);
if (!python && process.env.CI) throw new Error("CI must provide python3 with grpcio and protobuf (Debian's python3-grpcio)");

const root = path.resolve(import.meta.dir, "..");
let gateway: Awaited<ReturnType<typeof startTestGateway>>;
let dir: string;

describe.skipIf(!python)("a Python gRPC client (needs Debian's python3-grpcio and python3-protobuf)", () => {
  beforeAll(async () => {
    gateway = await startTestGateway(
      [
        "providers:",
        "  - { name: mock, kind: mock, latency_ms: 0 }",
        "models:",
        "  - name: ok",
        "    targets: [{ provider: mock, model: ok }]",
        '    pricing: { input_per_mtok: "1", output_per_mtok: "2" }',
      ].join("\n"),
    );
    dir = await mkdtemp(path.join(tmpdir(), "python-client-"));
  });
  afterAll(async () => {
    await gateway?.close();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  test("calls GatewayService over gRPC with messages built from the contracts' descriptors", async () => {
    // The client knows the contracts only as buf's descriptor set, as a client in any language can.
    const descriptors = path.join(dir, "contracts.binpb");
    const built = await runCommand([path.join(root, "node_modules/.bin/buf"), "build", "-o", descriptors], { cwd: root });
    expect(built.code).toBe(0);
    const target = new URL(gateway.url).host;
    const run = await runCommand([python as string, path.join(root, "test/python/gateway_client.py"), target, "sk-good", descriptors], {
      cwd: root,
    });
    expect(run.stderr).toBe("");
    expect(run.code).toBe(0);
    const seen = JSON.parse(run.stdout);
    expect(seen.models).toEqual(["ok"]);
    expect(seen.content).toBe("mock reply: hello from python");
    // int64 fields arrive as Python ints.
    expect(seen.cost_nanos).toBeGreaterThan(0);
    expect(seen.request_id).toMatch(/^[0-9A-HJKMNP-TV-Z]{26}$/);
    expect(seen.streamed).toBe("mock reply: streamed to python");
    expect(seen.streamed_output_tokens).toBeGreaterThan(0);
    // Status messages read back as the plain text, punctuation and all.
    const refused = { code: "UNAUTHENTICATED", error_code: "invalid_api_key", message: "Incorrect API key provided." };
    expect(seen.refused).toEqual(refused);
    expect(seen.invalid).toEqual({
      code: "INVALID_ARGUMENT",
      param: "temperature",
      message: "Invalid 'temperature': decimal above maximum value. Expected a value <= 2, but got 5 instead.",
    });
  }, 30_000);
});
