import type { ServerResponse } from "node:http";
import { constants } from "node:http2";
import { type HttpRoutes, headersOf, type NodeRequest, type NodeResponse, send } from "../../lib/server.ts";
import { bodyTooLarge } from "../errors.ts";
import type { RestApp, RestRequest } from "./app.ts";

/**
 * Serves a RestApp on startServer's node:http(2) requests, for paths under `prefix`. Requests are
 * handed over as they are (no Fetch Request or Headers built) and streams written with back-pressure: a stream whose
 * client takes nothing for `stalledMs` (the service ports' idle limit by default) is ended, its connection closed
 * (HTTP/1.1) or its stream reset (HTTP/2), and so is one whose events are cut off while a write waits.
 */
export function restRoutes(app: RestApp, options: { prefix?: string; stalledMs?: number } = {}): HttpRoutes {
  const prefix = options.prefix ?? "/v1/";
  const stalledMs = options.stalledMs ?? 65_000;
  return (req, res) => {
    const url = req.url ?? "/";
    if (!url.startsWith(prefix)) return false;
    return serve(app, req, res, url, stalledMs).then(() => true);
  };
}

async function serve(app: RestApp, req: NodeRequest, res: NodeResponse, url: string, stalledMs: number): Promise<void> {
  const gone = new AbortController();
  res.once("close", () => {
    if (!res.writableFinished) gone.abort();
  });
  const query = url.indexOf("?");
  const request: RestRequest = {
    method: req.method ?? "GET",
    path: query < 0 ? url : url.slice(0, query),
    headers: headersOf(req.headers),
    text: (limit) => readText(req, limit),
    signal: gone.signal,
  };
  const response = await app.handle(request);
  if (typeof response.body === "string") {
    send(res, response.status, response.headers, response.body);
    return;
  }
  // One signature for HTTP/1.1 and HTTP/2 responses, as lib/server's send does.
  const out = res as ServerResponse;
  out.writeHead(response.status, response.headers);
  const events = response.body[Symbol.asyncIterator]();
  let ended = false;
  try {
    while (!gone.signal.aborted) {
      const { done, value } = await events.next();
      if (done) break;
      if (!out.write(value) && !(await drained(res, stalledMs, response.cutOff))) {
        ended = true;
        break;
      }
    }
  } finally {
    // Stops the stream (and with it the upstream call) when the client left mid-way.
    if (gone.signal.aborted || ended) await events.return?.();
    if (!res.writableEnded) res.end();
  }
}

/**
 * Whether what was written went out: false, the response ended, when the client took nothing for `stalledMs`, when
 * the events were cut off first, or when it left.
 */
function drained(res: NodeResponse, stalledMs: number, cutOff: AbortSignal | undefined): Promise<boolean> {
  return new Promise((resolve) => {
    const done = (wentOut: boolean) => {
      clearTimeout(timer);
      res.off("drain", drain);
      res.off("close", close);
      cutOff?.removeEventListener("abort", end);
      resolve(wentOut);
    };
    const drain = () => done(true);
    const close = () => done(false);
    const end = () => {
      done(false);
      if ("stream" in res) res.stream.close(constants.NGHTTP2_CANCEL);
      else res.destroy();
    };
    const timer = setTimeout(end, stalledMs);
    if (cutOff?.aborted) return end();
    res.on("drain", drain);
    res.on("close", close);
    cutOff?.addEventListener("abort", end, { once: true });
  });
}

/** The body as text, up to `limit` bytes; past it the rest is drained so the 413 can still be sent. */
function readText(req: NodeRequest, limit: number): Promise<string> {
  const declared = req.headers["content-length"];
  if (declared !== undefined && Number(declared) > limit) {
    req.resume();
    return Promise.reject(bodyTooLarge(limit));
  }
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    let over = false;
    req.on("data", (chunk: Buffer) => {
      if (over) return;
      size += chunk.length;
      if (size > limit) {
        over = true;
        chunks.length = 0;
        reject(bodyTooLarge(limit));
        return;
      }
      chunks.push(chunk);
    });
    req.once("end", () => {
      if (!over) resolve(chunks.length === 1 ? (chunks[0] as Buffer).toString("utf8") : Buffer.concat(chunks, size).toString("utf8"));
    });
    req.once("error", reject);
  });
}
