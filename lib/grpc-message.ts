import type * as http from "node:http";
import type { NodeResponse } from "./server.ts";

/**
 * connect writes `grpc-message` through encodeURIComponent, and grpc-js reads it with decodeURI, which leaves `%3A`,
 * `%2C` and the like in the message its callers see. The gRPC spec percent-encodes only `%` and bytes outside
 * 0x20-0x7E; that every client (grpc-js, grpcio, connect) reads back as the plain text, so it is what is sent.
 */
export function sendGrpcMessageAsSpecified(res: NodeResponse): void {
  const target = res as http.ServerResponse;
  const writeHead = target.writeHead.bind(target);
  const addTrailers = target.addTrailers.bind(target);
  // connect-node calls writeHead(status, headers) and addTrailers(headers), with lower-cased names.
  target.writeHead = ((status: number, headers?: http.OutgoingHttpHeaders) =>
    writeHead(status, reencoded(headers))) as typeof target.writeHead;
  target.addTrailers = (headers) => addTrailers(reencoded(headers as http.OutgoingHttpHeaders));
}

function reencoded<H extends http.OutgoingHttpHeaders | undefined>(headers: H): H {
  const message = headers?.["grpc-message"];
  if (typeof message !== "string") return headers;
  let text: string;
  try {
    text = decodeURIComponent(message);
  } catch {
    return headers;
  }
  return { ...headers, "grpc-message": encodeGrpcMessage(text) };
}

/**
 * Most bytes a status message takes on the wire. gRPC's C core (grpcio, grpc++) and grpc-java refuse an answer whose
 * metadata is over 8 KiB by default, failing the call RESOURCE_EXHAUSTED in place of its status and metadata: an
 * upstream's message of 2,000 characters in Chinese is 18 KB percent-encoded. A longer one is cut, ending in "...".
 */
export const maxGrpcMessageBytes = 4096;

const encodedChar = /[^\x20-\x24\x26-\x7e]/u;

/** The spec's percent-encoding of a status message: UTF-8 bytes outside 0x20-0x7E, and `%`; cut to maxGrpcMessageBytes. */
export function encodeGrpcMessage(text: string): string {
  const encoded = text.replace(new RegExp(encodedChar, "gu"), (c) => encodeURIComponent(c));
  if (encoded.length <= maxGrpcMessageBytes) return encoded;
  let cut = "";
  for (const c of text) {
    const piece = encodedChar.test(c) ? encodeURIComponent(c) : c;
    if (cut.length + piece.length > maxGrpcMessageBytes - 3) break;
    cut += piece;
  }
  return `${cut}...`;
}
