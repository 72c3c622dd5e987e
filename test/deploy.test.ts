import { describe, expect, test } from "bun:test";
import { copyFileSync, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import * as path from "node:path";
import { Deployment, StatefulSet } from "kubernetes-models/apps/v1";
import { PodDisruptionBudget } from "kubernetes-models/policy/v1";
import { Service } from "kubernetes-models/v1";
import { parse, parseAllDocuments } from "yaml";
import { createReadiness } from "../gateway/readiness.ts";
import { pingReadiness } from "../lib/health.ts";
import { createLogger } from "../lib/log.ts";
import { runCommand, stopTimeoutMs } from "../lib/processes.ts";
import { cutAnswerMs, type Readiness } from "../lib/server.ts";

/**
 * The Kubernetes manifests and the image, checked against the Kubernetes API schema and against the code they run:
 * entry files exist, every variable they set is one the service reads, ports and probes line up, the stores replicas
 * share are required, and the gateway's spool survives its pod.
 */
const root = path.resolve(import.meta.dir, "..");
const base = path.join(root, "deploy/k8s/base");

interface EnvVar {
  name: string;
  value?: string;
  valueFrom?: {
    secretKeyRef?: { name: string; key: string; optional?: boolean };
    fieldRef?: { fieldPath: string };
    resourceFieldRef?: { containerName: string; resource: string };
  };
}
interface Container {
  name: string;
  image: string;
  args: string[];
  env: EnvVar[];
  ports: { name: string; containerPort: number }[];
  volumeMounts?: { name: string; mountPath: string }[];
  resources?: { requests?: { cpu?: string; memory?: string }; limits?: { memory?: string } };
  securityContext?: {
    allowPrivilegeEscalation?: boolean;
    readOnlyRootFilesystem?: boolean;
    capabilities?: { drop?: string[] };
  };
  readinessProbe: { httpGet: { path: string; port: string }; timeoutSeconds?: number };
  livenessProbe: { httpGet: { path: string; port: string } };
  startupProbe?: { httpGet: { path: string; port: string }; periodSeconds?: number; failureThreshold?: number };
}
interface Workload {
  kind: "Deployment" | "StatefulSet";
  metadata: { name: string };
  spec: {
    serviceName?: string;
    selector: { matchLabels: Record<string, string> };
    template: {
      metadata: { labels: Record<string, string> };
      spec: {
        automountServiceAccountToken?: boolean;
        terminationGracePeriodSeconds: number;
        securityContext?: { runAsUser?: number; runAsGroup?: number; fsGroup?: number };
        containers: Container[];
        volumes?: { name: string }[];
      };
    };
    volumeClaimTemplates?: { metadata: { name: string } }[];
  };
}
interface DisruptionBudget {
  kind: "PodDisruptionBudget";
  metadata: { name: string };
  spec: { maxUnavailable?: number; selector: { matchLabels: Record<string, string> } };
}
interface ServiceManifest {
  kind: "Service";
  metadata: { name: string };
  spec: { clusterIP?: string; selector: Record<string, string>; ports: { targetPort: string }[] };
}

const files = readdirSync(base).filter((f) => f.endsWith(".yaml") && f !== "kustomization.yaml");
const objects = files.flatMap((f) =>
  parseAllDocuments(readFileSync(path.join(base, f), "utf8")).map(
    (doc) => doc.toJS() as Workload | ServiceManifest | DisruptionBudget,
  ),
);
const workloads = objects.filter((o): o is Workload => o.kind === "Deployment" || o.kind === "StatefulSet");
const services = objects.filter((o): o is ServiceManifest => o.kind === "Service");
const disruptionBudgets = objects.filter((o): o is DisruptionBudget => o.kind === "PodDisruptionBudget");
const workload = (name: string) => {
  const found = workloads.find((w) => w.metadata.name === name);
  if (!found) throw new Error(`no workload ${name}`);
  return found;
};
const container = (name: string) => workload(name).spec.template.spec.containers[0] as Container;
const envOf = (name: string, variable: string) => container(name).env.find((e) => e.name === variable);

/** Variables a service declares: the keys of the env schemas in its main.ts and lib/config.ts's common ones. */
function declaredEnv(entry: string): Set<string> {
  const names = new Set<string>();
  for (const file of [entry, path.join(root, "lib/config.ts")]) {
    for (const match of readFileSync(file, "utf8").matchAll(/^ {2}([A-Z][A-Z0-9_]+): /gm))
      names.add(match[1] as string);
  }
  return names;
}

/** A number default of an env schema entry, as written in `file`. */
function envDefault(file: string, name: string): number {
  const match = new RegExp(`${name}: .*\\.default\\(([0-9_]+)\\)`).exec(readFileSync(path.join(root, file), "utf8"));
  if (!match) throw new Error(`${name} has no number default in ${file}`);
  return Number((match[1] as string).replaceAll("_", ""));
}

describe("Kubernetes manifests", () => {
  test("are valid objects of the Kubernetes API, all listed in the kustomization", () => {
    const models = { Deployment, StatefulSet, Service, PodDisruptionBudget } as const;
    for (const object of objects) {
      const Model = models[object.kind];
      expect(Model).toBeDefined();
      expect(() => new Model(object as never).validate()).not.toThrow();
    }
    const kustomization = parse(readFileSync(path.join(base, "kustomization.yaml"), "utf8")) as { resources: string[] };
    expect([...kustomization.resources].sort()).toEqual([...files].sort());
    expect(workloads.map((w) => w.metadata.name).sort()).toEqual(["analytics", "billing", "gateway"]);
  });

  test("mount only volumes their pods declare", () => {
    for (const w of workloads) {
      const declared = [
        ...(w.spec.template.spec.volumes ?? []).map((v) => v.name),
        ...(w.spec.volumeClaimTemplates ?? []).map((t) => t.metadata.name),
      ];
      for (const mount of container(w.metadata.name).volumeMounts ?? []) expect(declared).toContain(mount.name);
    }
  });

  test("run existing entry files with only variables their service reads", () => {
    for (const w of workloads) {
      const c = container(w.metadata.name);
      const entry = path.join(root, c.args[0] as string);
      expect(existsSync(entry)).toBe(true);
      // Bun itself reads these at start, before any service code runs.
      const declared = new Set([
        ...declaredEnv(entry),
        "BUN_JSC_numberOfGCMarkers",
        "BUN_JSC_forceRAMSize",
        "MIMALLOC_PURGE_DELAY",
      ]);
      for (const variable of c.env) expect(declared).toContain(variable.name);
    }
  });

  test("run the gateway's collections marked by its serving thread alone", () => {
    expect(envOf("gateway", "BUN_JSC_numberOfGCMarkers")?.value).toBe("1");
    expect(envOf("billing", "BUN_JSC_numberOfGCMarkers")).toBeUndefined();
    expect(envOf("analytics", "BUN_JSC_numberOfGCMarkers")).toBeUndefined();
  });

  test("have billing and analytics keep the memory they free for their next batches", async () => {
    for (const name of ["billing", "analytics"]) expect(envOf(name, "MIMALLOC_PURGE_DELAY")?.value).toBe("-1");
    expect(envOf("gateway", "MIMALLOC_PURGE_DELAY")).toBeUndefined();
    // Bun's allocator reads the variable as the process starts: what it printed in its options.
    const { stderr } = await runCommand([process.execPath, "-e", "0"], {
      env: { MIMALLOC_VERBOSE: "1", MIMALLOC_PURGE_DELAY: "-1" },
    });
    expect(stderr).toMatch(/option 'purge_delay': -1\b/);
  });

  test("size the gateway's heap for its pod's memory limit", () => {
    expect(envOf("gateway", "BUN_JSC_forceRAMSize")?.valueFrom).toEqual({
      resourceFieldRef: { containerName: "gateway", resource: "limits.memory" },
    });
    expect(container("gateway").resources?.limits?.memory).toBeDefined();
    expect(envOf("billing", "BUN_JSC_forceRAMSize")).toBeUndefined();
  });

  test("size analytics' heap for half its pod's memory limit, the rest left to what its allocator keeps", () => {
    expect(container("analytics").resources?.limits?.memory).toBe("1Gi");
    expect(envOf("analytics", "BUN_JSC_forceRAMSize")?.value).toBe(String(2 ** 30 / 2));
  });

  test("line up ports, probes and Services with the containers", () => {
    for (const w of workloads) {
      const name = w.metadata.name;
      const c = container(name);
      const port = c.ports[0];
      expect(envOf(name, `${name.toUpperCase()}_PORT`)?.value).toBe(String(port?.containerPort));
      expect(c.readinessProbe.httpGet).toEqual({ path: "/readyz", port: port?.name as string });
      expect(c.livenessProbe.httpGet).toEqual({ path: "/healthz", port: port?.name as string });
      expect(w.spec.template.metadata.labels).toMatchObject(w.spec.selector.matchLabels);
      const own = services.filter((s) =>
        Object.entries(s.spec.selector).every(([k, v]) => w.spec.template.metadata.labels[k] === v),
      );
      expect(own.map((s) => s.metadata.name)).toContain(name);
      for (const s of own) for (const p of s.spec.ports) expect(c.ports.map((cp) => cp.name)).toContain(p.targetPort);
      // Voluntary evictions (drains, upgrades) leave all but one replica serving.
      const budget = disruptionBudgets.find((b) => b.metadata.name === name);
      expect(budget?.spec.selector.matchLabels).toEqual(w.spec.selector.matchLabels);
      expect(budget?.spec.maxUnavailable).toBe(1);
      // Other services reach it by its Service's name.
      for (const other of workloads) {
        const url = envOf(other.metadata.name, `${name.toUpperCase()}_URL`);
        if (url) expect(url.value).toBe(`http://${name}:${port?.containerPort}`);
      }
    }
  });

  test("wait for each service's readiness answer while its dependency hangs, rather than timing out first", async () => {
    const log = createLogger({ service: "test", write: () => {} });
    const hung = (signal?: AbortSignal | null) =>
      new Promise<never>((_, reject) => signal?.addEventListener("abort", () => reject(signal.reason)));
    const checks: Record<string, () => Promise<Readiness>> = {
      // Billing's /readyz hangs while keys it vouched for lately are still admitted: the gateway stays ready.
      gateway: createReadiness({
        billingUrl: "http://billing:8081",
        shipper: { status: () => ({ connected: true, rows: 0, bytes: 0, maxBytes: 1 << 20, full: false, lastError: undefined }) },
        keysVouchedLately: () => true,
        fetch: ((_url: string, init?: RequestInit) => hung(init?.signal)) as unknown as typeof fetch,
        log,
      }),
      billing: pingReadiness("postgres", () => hung(), log),
      analytics: pingReadiness("clickhouse", () => hung(), log),
    };
    const answers = await Promise.all(
      workloads.map(async (w) => {
        const start = performance.now();
        const state = await (checks[w.metadata.name] as () => Promise<Readiness>)();
        return { name: w.metadata.name, ready: state.ready, ms: performance.now() - start };
      }),
    );
    for (const { name, ready, ms } of answers) {
      expect(ready).toBe(name === "gateway");
      // kubelet's default timeout is 1 s; a second more leaves room for a busy node.
      const timeoutMs = (container(name).readinessProbe.timeoutSeconds ?? 1) * 1000;
      expect(timeoutMs).toBeGreaterThan(ms + 1000);
    }
  });

  test("require the stores that replicas share instead of starting engines in each container", () => {
    for (const [name, variable] of [
      ["billing", "DATABASE_URL"],
      ["analytics", "CLICKHOUSE_URL"],
    ] as const) {
      expect(workload(name).spec.template.spec.containers).toHaveLength(1);
      const ref = envOf(name, variable)?.valueFrom?.secretKeyRef;
      expect(ref?.name).toBeDefined();
      expect(ref?.optional ?? false).toBe(false);
    }
  });

  test("let billing and analytics run their migrations to the end before liveness counts", () => {
    // Both listen only once their migrations are applied (or another replica's, under its lock): a liveness probe
    // failing meanwhile would restart them mid-migration, rolling it back, again and again.
    for (const name of ["billing", "analytics"]) {
      const c = container(name);
      expect(c.startupProbe?.httpGet).toEqual(c.livenessProbe.httpGet);
      const seconds = (c.startupProbe?.periodSeconds ?? 10) * (c.startupProbe?.failureThreshold ?? 3);
      expect(seconds).toBeGreaterThanOrEqual(30 * 60);
    }
  });

  test("let a gateway open its spool before liveness counts", () => {
    // It listens once its spool is open, after the LOCK of the container before it has aged: a liveness probe failing
    // meanwhile would kill it and leave a LOCK the next start waits out again.
    const c = container("gateway");
    expect(c.startupProbe?.httpGet).toEqual(c.livenessProbe.httpGet);
    const seconds = (c.startupProbe?.periodSeconds ?? 10) * (c.startupProbe?.failureThreshold ?? 3);
    expect(seconds).toBeGreaterThanOrEqual(5 * 60);
  });

  test("keep each gateway replica's spool on its own volume under a stable name", () => {
    const gateway = workload("gateway");
    expect(gateway.kind).toBe("StatefulSet");
    const governing = services.find((s) => s.metadata.name === gateway.spec.serviceName);
    expect(governing?.spec.clusterIP).toBe("None");
    expect(envOf("gateway", "GATEWAY_INSTANCE_ID")?.valueFrom?.fieldRef?.fieldPath).toBe("metadata.name");
    const spoolDir = envOf("gateway", "GATEWAY_SPOOL_DIR")?.value as string;
    const mount = container("gateway").volumeMounts?.find((m) => spoolDir.startsWith(`${m.mountPath}/`));
    expect(gateway.spec.volumeClaimTemplates?.map((t) => t.metadata.name)).toContain(mount?.name as string);
    // The volume belongs to the group the image's user runs in, so it can write there.
    const security = gateway.spec.template.spec.securityContext;
    expect(security?.fsGroup).toBe(security?.runAsGroup as number);
  });

  test("write nothing to the image, which runs without privileges", () => {
    // A gateway writes its spool and lease journal on its volume (checked above); billing and analytics, required to use
    // servers for their stores, write no file. Admission policies that require a read-only root would refuse the pods.
    for (const w of workloads) {
      expect(container(w.metadata.name).securityContext).toEqual({
        allowPrivilegeEscalation: false,
        readOnlyRootFilesystem: true,
        capabilities: { drop: ["ALL"] },
      });
    }
  });

  test("mount no Kubernetes API token, which no service uses", () => {
    const sources = readdirSync(root, { recursive: true, encoding: "utf8" }).filter(
      (f) => /^(gateway|billing|analytics|lib)\//.test(f) && f.endsWith(".ts") && !f.endsWith(".test.ts"),
    );
    const apiClient = /kubernetes\.io\/serviceaccount|KUBERNETES_SERVICE_HOST/;
    for (const f of sources) expect(readFileSync(path.join(root, f), "utf8")).not.toMatch(apiClient);
    for (const w of workloads) expect(w.spec.template.spec.automountServiceAccountToken).toBe(false);
  });

  test("give a stopping pod the time to drain, finish requests and ship what it holds", () => {
    const graceMs = envDefault("lib/config.ts", "SHUTDOWN_GRACE_MS");
    for (const w of workloads) {
      const name = w.metadata.name;
      const drainMs = Number(envOf(name, "SHUTDOWN_DRAIN_MS")?.value);
      expect(drainMs).toBeGreaterThan(0);
      const flushMs = name === "gateway" ? envDefault("gateway/main.ts", "GATEWAY_FLUSH_TIMEOUT_MS") : 0;
      expect(w.spec.template.spec.terminationGracePeriodSeconds * 1000).toBeGreaterThan(drainMs + graceMs + flushMs);
    }
  });
});

describe("the local launcher", () => {
  test("gives a stopping gateway the time its shutdown takes at worst before killing it", () => {
    // Its grace for requests in flight, a second for those cut then to be answered, 5 s for them to settle and be
    // metered (gateway/main.ts), its spool's flush and 3 s for traces (lib/telemetry.ts).
    const worstMs =
      envDefault("lib/config.ts", "SHUTDOWN_GRACE_MS") +
      cutAnswerMs +
      5_000 +
      envDefault("gateway/main.ts", "GATEWAY_FLUSH_TIMEOUT_MS") +
      3_000;
    expect(stopTimeoutMs).toBeGreaterThan(worstMs);
  });
});

describe("the image", () => {
  const dockerfile = readFileSync(path.join(root, "deploy/Dockerfile"), "utf8");

  test("holds every directory its entry files import from", () => {
    // Sources of the final stage's COPY lines (every argument but the destination).
    const copied = new Set(
      [...dockerfile.matchAll(/^COPY (?!--from)(.+) \S+$/gm)].flatMap((m) => (m[1] as string).split(" ")),
    );
    const transpiler = new Bun.Transpiler({ loader: "ts" });
    const seen = new Set<string>();
    const visit = (file: string) => {
      if (seen.has(file)) return;
      seen.add(file);
      if (!file.endsWith(".ts")) return;
      const source = readFileSync(file, "utf8").replace(/^#!.*\n/, "");
      // Its imports, and the files it starts as workers (tokenizer-worker.ts), named by a URL beside it.
      const workers = [...source.matchAll(/new URL\("(\.[^"]+)", import\.meta\.url\)/g)].map((m) => m[1] as string);
      for (const specifier of [...transpiler.scanImports(source).map((i) => i.path), ...workers]) {
        if (specifier.startsWith(".")) visit(path.resolve(path.dirname(file), specifier));
      }
    };
    const entries = [...workloads.map((w) => container(w.metadata.name).args[0] as string), "bin/meshctl.ts"];
    for (const entry of entries) visit(path.join(root, entry));
    const dirs = new Set([...seen].map((file) => path.relative(root, file).split(path.sep)[0] as string));
    expect(seen).toContain(path.join(root, "gateway/tokenizer-worker.ts"));
    for (const dir of dirs) expect(copied).toContain(dir);
  });

  test("is built, in the README and the Dockerfile, with the name and tag the manifests run", () => {
    const { images } = parse(readFileSync(path.join(base, "kustomization.yaml"), "utf8")) as {
      images: Array<{ name: string; newTag: string }>;
    };
    const pods = new Set(workloads.map((w) => w.spec.template.spec.containers[0]?.image));
    expect([...pods]).toEqual([images[0]?.name]);
    const built = `docker build -f deploy/Dockerfile -t ${images[0]?.name}:${images[0]?.newTag} .`;
    expect(readFileSync(path.join(root, "README.md"), "utf8")).toContain(built);
    expect(dockerfile).toContain(built);
  });

  test("installs its dependencies with a command the lock file satisfies", async () => {
    const install = /^RUN (npm .+)$/m.exec(dockerfile)?.[1]?.split(" ") as string[];
    expect(install).toBeDefined();
    const dir = mkdtempSync(path.join(tmpdir(), "image-install-"));
    try {
      for (const file of ["package.json", "package-lock.json"])
        copyFileSync(path.join(root, file), path.join(dir, file));
      // What the image's build resolves, without the network: the packages are in npm's cache once the suite runs.
      const result = await runCommand([...install, "--dry-run", "--offline"], { cwd: dir });
      expect(
        result.stderr
          .split("\n")
          .filter((line) => line.startsWith("npm error"))
          .slice(0, 4),
      ).toEqual([]);
      expect(result.code).toBe(0);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test("lets its user write MESH_DATA_DIR, where the manifests mount volumes", () => {
    const dataDir = /ENV .*MESH_DATA_DIR=(\S+)/.exec(dockerfile)?.[1] as string;
    expect(dockerfile).toContain(`chown node:node ${dataDir}`);
    expect(dockerfile).toMatch(/^USER node$/m);
    const mount = container("gateway").volumeMounts?.[0]?.mountPath;
    expect(mount).toBe(dataDir);
  });

  test("lets a gateway's fetch run 4096 upstream calls at once (Bun's default is 256)", () => {
    expect(dockerfile).toMatch(/^ENV .*BUN_CONFIG_MAX_HTTP_REQUESTS=4096/m);
  });

});

const havePromtool = Bun.which("promtool") !== null;
if (!havePromtool && process.env.CI) throw new Error("CI must provide promtool (Debian's prometheus package)");

describe.skipIf(!havePromtool)("alert rules (needs Debian's prometheus package)", () => {
  const dir = path.join(root, "deploy/prometheus");

  test("are valid Prometheus rules and pass their unit tests", async () => {
    for (const args of [
      ["check", "rules", "alerts.yaml"],
      ["test", "rules", "alerts.test.yaml"],
    ]) {
      const { stdout, stderr, code } = await runCommand(["promtool", ...args], { cwd: dir });
      expect(`${stdout}${stderr}`).toContain("SUCCESS");
      expect(code).toBe(0);
    }
  });

  test("every alert has a test", () => {
    const rules = parse(readFileSync(path.join(dir, "alerts.yaml"), "utf8")) as {
      groups: { rules: { alert: string }[] }[];
    };
    const tests = parse(readFileSync(path.join(dir, "alerts.test.yaml"), "utf8")) as {
      tests: { alert_rule_test: { alertname: string }[] }[];
    };
    const tested = new Set(tests.tests.flatMap((t) => t.alert_rule_test.map((a) => a.alertname)));
    for (const { alert } of rules.groups.flatMap((g) => g.rules)) expect(tested).toContain(alert);
  });
});
