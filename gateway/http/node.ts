import type { Readable } from "node:stream";
import { type HttpRoutes, type NodeRequest, type NodeResponse, send } from "../../lib/server.ts";
import type { RestApp } from "./app.ts";

/** Serves a RestApp on startServer's node:http(2) requests, for paths under `prefix`. */
export function restRoutes(app: RestApp, prefix = "/v1/"): HttpRoutes {
  return (req, res) => {
    if (!(req.url ?? "/").startsWith(prefix)) return false;
    return serve(app, req, res).then(() => true);
  };
}

async function serve(app: RestApp, req: NodeRequest, res: NodeResponse): Promise<void> {
  const gone = new AbortController();
  res.once("close", () => {
    if (!res.writableFinished) gone.abort();
  });
  const headers = new Headers();
  const raw = req.rawHeaders;
  for (let i = 0; i + 1 < raw.length; i += 2) {
    const name = raw[i] as string;
    // HTTP/2 pseudo-headers (:path, :authority) are not headers of the request.
    if (name.charCodeAt(0) !== 58) headers.append(name, raw[i + 1] as string);
  }
  const host = req.headers.host ?? req.headers[":authority"] ?? "localhost";
  const method = req.method ?? "GET";
  const init: RequestInit = { method, headers, signal: gone.signal };
  if (method !== "GET" && method !== "HEAD") init.body = bodyOf(req);
  const response = await app.fetch(new Request(`http://${host}${req.url}`, init));
  const out: Record<string, string> = {};
  response.headers.forEach((value, name) => {
    out[name] = value;
  });
  send(res, response.status, out, new Uint8Array(await response.arrayBuffer()));
}

/** The request body as a web stream; the app enforces the size limit and cancels past it. */
function bodyOf(req: Readable): ReadableStream<Uint8Array> {
  let discard = false;
  return new ReadableStream<Uint8Array>({
    start(controller) {
      req.on("data", (chunk: Buffer) => {
        if (!discard) controller.enqueue(chunk);
      });
      req.once("end", () => {
        if (!discard) controller.close();
      });
      req.once("error", (e) => {
        if (!discard) controller.error(e);
      });
    },
    cancel() {
      // Drain the rest so the connection can still carry the error response.
      discard = true;
    },
  });
}
