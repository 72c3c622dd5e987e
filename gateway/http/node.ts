import type { ServerResponse } from "node:http";
import { constants } from "node:http2";
import { type HttpRoutes, headersOf, type NodeRequest, type NodeResponse, send } from "../../lib/server.ts";
import type { BodyBudget, BodyHold } from "../body-budget.ts";
import { bodiesAtCapacity, bodyTooLarge } from "../errors.ts";
import { pathOf, type RestApp, type RestRequest, utf8Text } from "./app.ts";

/**
 * Serves a RestApp on startServer's node:http(2) requests, for paths under `prefix`. Requests are
 * handed over as they are (no Fetch Request or Headers built) and streams written with back-pressure: a stream whose
 * client takes nothing for the server's idle limit is cut by the server, as an RPC's is, and one whose events are cut
 * off while a write waits is ended here, its connection closed (HTTP/1.1) or its stream reset (HTTP/2).
 */
export function restRoutes(app: RestApp, options: { prefix?: string; bodies?: BodyBudget } = {}): HttpRoutes {
  const prefix = options.prefix ?? "/v1/";
  const bodies = options.bodies;
  const root = prefix.replace(/\/$/, "");
  return (req, res) => {
    const url = req.url ?? "/";
    // Of an absolute-form target (`POST http://host/v1/...`, as a proxy is sent it), its path.
    const path = pathOf(url);
    if (!path.startsWith(prefix) && path !== root) return false;
    return serve(app, req, res, url, path, bodies?.hold()).then(() => true);
  };
}

async function serve(
  app: RestApp,
  req: NodeRequest,
  res: NodeResponse,
  url: string,
  path: string,
  hold?: BodyHold,
): Promise<void> {
  const gone = new AbortController();
  // Closed before it was ended: the client left. Not writableFinished, which Bun sets on an HTTP/2 stream the client
  // reset (RST_STREAM), whose stream then went on unread and unmetered, waiting for a drain that never comes.
  // Answered or not, the request is done with its body.
  res.once("close", () => {
    hold?.release();
    if (!res.writableEnded) gone.abort();
  });
  const query = url.indexOf("?");
  const request: RestRequest = {
    method: req.method ?? "GET",
    path,
    query: query < 0 ? undefined : url.slice(query + 1),
    headers: headersOf(req.headers),
    text: (limit) => readText(req, limit, hold),
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
      // A write to a response closed meanwhile never drains.
      if (!out.write(value) && (gone.signal.aborted || !(await drained(res, response.cutOff)))) {
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
 * Whether what was written went out: false, the response ended, when the events were cut off first, or when the
 * client left (or, taking nothing for the idle limit, was cut).
 */
function drained(res: NodeResponse, cutOff: AbortSignal | undefined): Promise<boolean> {
  return new Promise((resolve) => {
    const done = (wentOut: boolean) => {
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
    if (cutOff?.aborted) return end();
    res.on("drain", drain);
    res.on("close", close);
    cutOff?.addEventListener("abort", end, { once: true });
  });
}

/**
 * The body as text, up to `limit` bytes, its bytes counted in `hold` as they arrive (a declared length that could not
 * fit refused unread); past either bound the rest is drained so the 413 or 503 can still be sent.
 */
function readText(req: NodeRequest, limit: number, hold: BodyHold | undefined): Promise<string> {
  const declared = req.headers["content-length"];
  if (declared !== undefined && Number(declared) > limit) {
    req.resume();
    return Promise.reject(bodyTooLarge(limit));
  }
  if (declared !== undefined && hold && !hold.fits(Number(declared))) {
    req.resume();
    return Promise.reject(bodiesAtCapacity());
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
      if (hold && !hold.cover(size)) {
        over = true;
        chunks.length = 0;
        reject(bodiesAtCapacity());
        return;
      }
      chunks.push(chunk);
    });
    req.once("end", () => {
      if (over) return;
      try {
        resolve(utf8Text(chunks.length === 1 ? (chunks[0] as Buffer) : Buffer.concat(chunks, size)));
      } catch (e) {
        reject(e);
      }
    });
    req.once("error", reject);
  });
}
