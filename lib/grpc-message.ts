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

/** The spec's percent-encoding of a status message: UTF-8 bytes outside 0x20-0x7E, and `%`. */
export function encodeGrpcMessage(text: string): string {
  return text.replace(/[^\x20-\x24\x26-\x7e]/gu, (c) => encodeURIComponent(c));
}
