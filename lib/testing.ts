import net from "node:net";
import { networkInterfaces } from "node:os";
import { expect } from "bun:test";

/**
 * Runs a service that cannot start (`env` breaks it) to its exit and checks it failed in the logs' own form: exit 1,
 * every line one JSON object, one of them an error, and `secret` (a password it was given) in none. Resolves with the
 * error lines.
 */
export async function expectJsonStartFailure(
  cmd: string[],
  env: Record<string, string | undefined>,
  secret: string,
  cwd?: string,
): Promise<Record<string, unknown>[]> {
  const proc = Bun.spawn(cmd, { cwd, env: { ...process.env, ...env }, stdout: "pipe", stderr: "pipe" });
  const [out, err, code] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
  expect(code).toBe(1);
  const lines = `${out}${err}`.split("\n").filter((line) => line !== "");
  expect(lines.length).toBeGreaterThan(0);
  for (const line of lines) expect(() => JSON.parse(line), line).not.toThrow();
  const errors = lines.map((line) => JSON.parse(line)).filter((record) => record.level === "error");
  expect(errors.length).toBeGreaterThan(0);
  expect(`${out}${err}`).not.toContain(secret);
  return errors;
}

/**
 * Sends `head` (a request line and headers, ending in a blank line) over a raw connection to `url` and never the body
 * it declares; resolves with the response head that comes back, or what arrived before the connection closed. What
 * answers such a request has not waited for its body.
 */
export function answerToHead(url: string, head: string): Promise<string> {
  return new Promise((resolve) => {
    const socket = net.connect(Number(new URL(url).port), "127.0.0.1");
    let received = "";
    socket.on("data", (d) => {
      received += d.toString();
      if (received.includes("\r\n\r\n")) {
        socket.destroy();
        resolve(received);
      }
    });
    socket.on("error", () => resolve(received));
    socket.on("close", () => resolve(received));
    socket.write(head);
  });
}

/** Sends `bytes` over a raw connection to `url`; resolves with all that comes back until the server closes it. */
export function answerUntilClosed(url: string, bytes: string): Promise<string> {
  return new Promise((resolve) => {
    const socket = net.connect(Number(new URL(url).port), "127.0.0.1");
    let received = "";
    socket.on("data", (d) => (received += d.toString()));
    socket.on("error", () => resolve(received));
    socket.on("close", () => resolve(received));
    socket.write(bytes);
  });
}

/** A non-loopback IPv4 address of this machine's: a call to it arrives from it, as one from the network would. */
export const externalAddress: string | undefined = Object.values(networkInterfaces())
  .flat()
  .find((a) => a?.family === "IPv4" && !a.internal)?.address;

/**
 * A kept-alive HTTP/1.1 connection to `url`: `get(path)` sends a GET on it and resolves with the whole answer (head
 * and body, as one string) once its body is in; `closed` resolves when the server closes the connection.
 */
export function keptAliveConnection(url: string) {
  const socket = net.connect(Number(new URL(url).port), "127.0.0.1");
  let received = "";
  let answered: (() => void) | undefined;
  socket.on("data", (d) => {
    received += d.toString();
    const end = received.indexOf("\r\n\r\n");
    const length = Number(/^content-length: *(\d+)/im.exec(received)?.[1] ?? "0");
    if (end >= 0 && received.length >= end + 4 + length) answered?.();
  });
  socket.on("error", () => {});
  const closed = new Promise<void>((resolve) => socket.on("close", () => resolve()));
  return {
    closed,
    get(path: string): Promise<string> {
      received = "";
      const answer = new Promise<string>((resolve) => {
        answered = () => resolve(received);
        void closed.then(() => resolve(received));
      });
      socket.write(`GET ${path} HTTP/1.1\r\nHost: mesh\r\nConnection: keep-alive\r\n\r\n`);
      return answer;
    },
    destroy: () => socket.destroy(),
  };
}

/**
 * Runs `cmd` as a container runs its command where it can (as root, with unshare): pid 1 of a PID namespace of its
 * own, to which the kernel delivers only the signals it has a handler for (SIGKILL aside). Elsewhere it is a plain
 * child. `pid` is the one to signal; `lines` fills with its output lines; `exited` resolves with its exit code.
 */
export async function spawnAsContainerInit(
  cmd: string[],
  options: { env: Record<string, string | undefined>; cwd?: string },
) {
  const asInit = process.getuid?.() === 0 && Bun.which("unshare") !== null;
  const proc = Bun.spawn(asInit ? ["unshare", "--pid", "--fork", "--kill-child", ...cmd] : cmd, {
    cwd: options.cwd,
    env: { ...process.env, ...options.env },
    stdout: "pipe",
    stderr: "pipe",
  });
  const lines: string[] = [];
  for (const stream of [proc.stdout, proc.stderr]) {
    void (async () => {
      let buffered = "";
      for await (const chunk of stream) {
        buffered += Buffer.from(chunk).toString();
        const complete = buffered.split("\n");
        buffered = complete.pop() ?? "";
        lines.push(...complete.filter(Boolean));
      }
    })();
  }
  let pid = proc.pid;
  for (let tries = 0; asInit && pid === proc.pid && tries < 100; tries++) {
    const child = Number((await Bun.$`pgrep -P ${proc.pid}`.nothrow().text()).trim().split("\n")[0]);
    if (child > 0) pid = child;
    else await Bun.sleep(20);
  }
  return { proc, pid, asInit, lines, exited: proc.exited };
}

/** Resolves once one of `lines` contains `text`; rejects after `timeoutMs`. */
export async function waitForLine(lines: readonly string[], text: string, timeoutMs = 30_000): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const line = lines.find((l) => l.includes(text));
    if (line !== undefined) return line;
    if (Date.now() > deadline) {
      throw new Error(`no line with ${text} in ${timeoutMs} ms: ${lines.slice(-5).join("\n")}`);
    }
    await Bun.sleep(20);
  }
}

/**
 * What a kept-alive HTTP/1.1 client sees of a server's drain (`close(graceMs, drainMs)`): its answer to `path` before
 * the drain, its next one while draining, and whether its connection was closed before the port was.
 */
async function drainSeenKeptAlive(
  url: string,
  path: string,
  close: (graceMs: number, drainMs: number) => Promise<unknown>,
): Promise<{ before: string; during: string; closed: "before the port closed" | "with the port" }> {
  const connection = keptAliveConnection(url);
  const before = await connection.get(path);
  const closing = close(1_000, 600);
  await Bun.sleep(100);
  const during = await connection.get(path);
  const closed = await Promise.race([
    connection.closed.then(() => "before the port closed" as const),
    closing.then(() => "with the port" as const),
  ]);
  await closing;
  return { before, during, closed };
}

/**
 * Checks that a draining server closes a kept-alive HTTP/1.1 connection after its next answer (`Connection: close`),
 * rather than leaving it to be reset when the port closes: its client opens a new connection for the next request,
 * which goes to a replica the endpoint change left.
 */
export async function expectDrainClosesKeptAlive(
  url: string,
  path: string,
  close: (graceMs: number, drainMs: number) => Promise<unknown>,
): Promise<void> {
  const { before, during, closed } = await drainSeenKeptAlive(url, path, close);
  expect(before).not.toMatch(/^connection: close/im);
  expect(during).toStartWith("HTTP/1.1 200");
  expect(during).toMatch(/^connection: close/im);
  expect(closed).toBe("before the port closed");
}

/**
 * A client that sends a chunked body on regardless of the answer, as one streaming a large upload does: `head` (the
 * request line and headers, ending in a blank line), then chunks of 1 MiB (`chunk`, whose bytes that must be) until the
 * server closes the connection or `most` bytes are sent. Returns what came back and how much was sent.
 */
export async function sendRegardless(url: string, head: string, chunk: string, most: number) {
  const socket = net.connect(Number(new URL(url).port), "127.0.0.1");
  let received = "";
  let open = true;
  socket.on("data", (d) => (received += d.toString()));
  socket.on("error", () => {});
  const closed = new Promise<void>((resolve) => socket.on("close", () => ((open = false), resolve())));
  socket.write(head);
  const framed = `100000\r\n${chunk}\r\n`;
  let sent = 0;
  while (open && sent < most) {
    sent += 0x100000;
    if (!socket.write(framed)) await new Promise((resolve) => (socket.once("drain", resolve), socket.once("close", resolve)));
  }
  socket.destroy();
  await closed;
  return { received, sent };
}
