/**
 * The least a Bun proxy can do: Bun's HTTP server in front of an upstream through Bun's fetch, each request's body
 * passed on and the answer streamed back, with no key, limit, routing, cost or metrics. bench/gateway.ts sends every
 * row's load through it as well, so that what the runtime alone adds (two hops, its HTTP client's thread) is measured
 * in the same run as what the gateway adds.
 *   bun bench/bare-proxy.ts <upstream base URL>   (prints its own base URL, with /v1, on its first line)
 */
const upstream = process.argv[2];
if (!upstream) {
  process.stderr.write("usage: bun bench/bare-proxy.ts <upstream base URL>\n");
  process.exit(2);
}

const server = Bun.serve({
  port: 0,
  hostname: "127.0.0.1",
  async fetch(request) {
    const path = new URL(request.url).pathname.replace(/^\/v1/, "");
    const answer = await fetch(`${upstream}${path}`, {
      method: request.method,
      headers: { "content-type": request.headers.get("content-type") ?? "application/json" },
      body: request.method === "POST" ? await request.arrayBuffer() : undefined,
    });
    return new Response(answer.body, {
      status: answer.status,
      headers: { "content-type": answer.headers.get("content-type") ?? "application/json" },
    });
  },
});
process.stdout.write(`http://127.0.0.1:${server.port}/v1\n`);
