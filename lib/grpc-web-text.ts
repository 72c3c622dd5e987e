import type * as http from "node:http";
import { Code, ConnectError } from "@connectrpc/connect";
import type { NodeRequest, NodeResponse } from "./server.ts";

const textType = "application/grpc-web-text";

/** Whether a request is gRPC-Web in text mode: protoc-gen-grpc-web's default, and its only mode for server streams. */
export const isGrpcWebText = (req: NodeRequest) => req.headers["content-type"]?.startsWith(textType) ?? false;

/**
 * Serves a gRPC-Web text request as the binary gRPC-Web it encodes: the request's base64 is decoded as it arrives,
 * and each chunk of the response is sent as base64 of its own, so a server stream's messages are not held back.
 */
export function transcodeGrpcWebText(req: NodeRequest, res: NodeResponse): void {
  req.headers["content-type"] = `application/grpc-web${req.headers["content-type"]?.slice(textType.length) || "+proto"}`;
  // The base64's length is a third more than the body it decodes to, which is what a limit on its size is about.
  delete req.headers["content-length"];
  const chunks = req[Symbol.asyncIterator].bind(req);
  // connect-node reads the body by iterating the request.
  Object.defineProperty(req, Symbol.asyncIterator, { value: () => decodeBase64Stream(chunks()) });

  const target = res as http.ServerResponse;
  const writeHead = target.writeHead.bind(target);
  const write = target.write.bind(target) as (chunk: string, callback?: (err?: Error | null) => void) => boolean;
  target.writeHead = ((status: number, headers: http.OutgoingHttpHeaders = {}) => {
    const type = String(headers["content-type"] ?? "application/grpc-web+proto");
    const { "content-length": _, ...rest } = headers;
    return writeHead(status, { ...rest, "content-type": type.replace("application/grpc-web", textType) });
  }) as typeof target.writeHead;
  // connect-node writes (chunk, encoding, callback) and ends without a chunk.
  target.write = ((chunk: Uint8Array | string, ...rest: unknown[]) => {
    const callback = rest.find((r) => typeof r === "function") as ((err?: Error | null) => void) | undefined;
    return write(Buffer.from(chunk).toString("base64"), callback);
  }) as typeof target.write;
}

/** Bytes of base64 text that may arrive in any pieces and be padded mid-stream (each response chunk on its own). */
async function* decodeBase64Stream(text: AsyncIterable<Uint8Array | string>): AsyncGenerator<Uint8Array> {
  let pending = "";
  for await (const chunk of text) {
    pending += (typeof chunk === "string" ? chunk : Buffer.from(chunk).toString("latin1")).replace(/\s+/g, "");
    const whole = pending.length - (pending.length % 4);
    if (whole === 0) continue;
    yield decodeBase64(pending.slice(0, whole));
    pending = pending.slice(whole);
  }
  if (pending) yield decodeBase64(pending);
}

/** One part of base64 text: whole groups of four, the last maybe padded, or left short at the end of the text. */
const base64Part = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}(?:==)?|[A-Za-z0-9+/]{3}=?)?$/;

/**
 * Base64 that may hold padding between its parts. Anything else (a character outside its alphabet, a part cut short
 * mid-text) is INVALID_ARGUMENT, as a message that does not decode is: Buffer would skip it and decode the rest into
 * other bytes.
 */
export function decodeBase64(text: string): Uint8Array {
  const parts = text.split(/(?<==)(?=[^=])/);
  for (const part of parts) {
    if (!base64Part.test(part)) throw new ConnectError("the request body is not base64 (grpc-web-text)", Code.InvalidArgument);
  }
  return Buffer.concat(parts.map((part) => Buffer.from(part, "base64")));
}
