import { promisify } from "node:util";
import * as zlib from "node:zlib";
import type { DescField, DescMessage } from "@bufbuild/protobuf";
import { Code, ConnectError, type ConnectRouter } from "@connectrpc/connect";
import type { UniversalHandler, UniversalServerRequest } from "@connectrpc/connect/protocol";

/**
 * Most an answer's rows take encoded: gRPC clients (grpc-js, grpc-go, grpc-java) refuse a message past 4 MiB by
 * default, which would fail the call at the client after the server did all the work. A page ends there, its token
 * going on after it; a report that cannot be paged is refused (ResourceExhausted) with what to narrow.
 */
export const maxAnswerBytes = 3 * 1024 * 1024;

/**
 * How much a request message may hold, counted on its encoded form before it is decoded: a few bytes on the wire
 * (an empty element is two) become an object of hundreds of bytes, so a message within the byte limit can still cost
 * hundreds of megabytes to decode.
 */
export interface MessageLimits {
  /** Largest request body read, compressed or not, and largest message once decompressed. */
  maxBytes: number;
  /** Most values one message may decode into: nested messages, map entries and repeated elements; in JSON, any value. */
  maxNodes: number;
  /**
   * The error for a Connect unary message (a body of declared length, within maxBytes) that inflates past maxBytes;
   * Connect's own resource_exhausted when unset, as for a message of no declared length.
   */
  inflatedTooLarge?: () => ConnectError;
  /** Most elements a repeated or map field may hold in one message. */
  maxElements?: ReadonlyMap<DescField, number>;
  /** The error for a field over its limit, or (field undefined) for a message over maxNodes. */
  refuse: (field: DescField | undefined, max: number, count: number) => ConnectError;
  /**
   * A bound on the body bytes of every request in flight: each call's share covers its bytes as they arrive, and a
   * compressed message's inflated bytes, and is given back when the call ends; a declared length that could not fit
   * is refused before the body is read. Past it, `refuse`'s error.
   */
  bodies?: {
    hold(): { fits(bytes: number): boolean; cover(bytes: number): boolean; release(): void };
    refuse(): ConnectError;
  };
}

const inflaters = new Map<string, (bytes: Uint8Array, options: zlib.ZlibOptions & zlib.BrotliOptions) => Promise<Buffer>>([
  ["gzip", promisify(zlib.gunzip)],
  ["br", promisify(zlib.brotliDecompress)],
]);

/**
 * Holds every unary and server-streaming RPC the router serves to `limits`: its one request message is read whole
 * (after the request gate, as Connect would read it), decompressed, and walked on the wire before Connect decodes it.
 */
export function limitMessages(router: ConnectRouter, limits: MessageLimits): ConnectRouter {
  router.handlers.forEach((handler, i) => {
    const kind = handler.method.methodKind;
    if (kind === "unary" || kind === "server_streaming") router.handlers[i] = limitedHandler(handler, limits);
  });
  return router;
}

function limitedHandler(handler: UniversalHandler, limits: MessageLimits): UniversalHandler {
  const limited = (req: UniversalServerRequest) => {
    const body = req.body;
    if (typeof body !== "object" || body === null || !(Symbol.asyncIterator in body)) return handler(req);
    return handler({ ...req, body: checkedBody(body as AsyncIterable<Uint8Array>, req, handler.method.input, limits) });
  };
  return Object.assign(limited, handler);
}

async function* checkedBody(
  body: AsyncIterable<Uint8Array>,
  req: UniversalServerRequest,
  input: DescMessage,
  limits: MessageLimits,
) {
  const header = req.header;
  // The call's signal aborts once it is answered, or its client left: either way it is done with its body.
  const bodies = limits.bodies;
  const hold = bodies?.hold();
  if (bodies && hold) {
    if (req.signal.aborted) hold.release();
    else req.signal.addEventListener("abort", () => hold.release(), { once: true });
    // Not read at all when its declared length could not fit; only what arrives of it is held.
    if (!hold.fits(Number(header.get("content-length") ?? 0))) throw unread(bodies.refuse());
  }
  const chunks: Uint8Array[] = [];
  let size = 0;
  for await (const chunk of body) {
    size += chunk.byteLength;
    // Room for the envelopes' five bytes; Connect itself refuses whatever is past its readMaxBytes.
    if (size > limits.maxBytes + 5) throw tooLarge(size, limits.maxBytes);
    if (bodies && hold && !hold.cover(size)) throw unread(bodies.refuse());
    chunks.push(chunk);
  }
  const bytes = Buffer.concat(chunks);
  // A compressed message is held inflated too, however few bytes it came in: those count against the bound as well.
  let counted = size;
  const decompressed = async (message: Uint8Array, encoding: string | null) => {
    const out = await inflated(message, encoding, limits.maxBytes);
    if (bodies && hold && out !== undefined && out !== message) {
      counted += out.byteLength;
      if (!hold.cover(counted)) throw unread(bodies.refuse());
    }
    return out;
  };
  const contentType = header.get("content-type") ?? "";
  const json = /[/+]json(;|$)/i.test(contentType);
  // A Connect unary body is the bare message; the other protocols wrap each message in an envelope.
  if (/^application\/(proto|json)(;|$)/i.test(contentType)) {
    const message = await decompressed(bytes, header.get("content-encoding")).catch((e: unknown) => {
      throw tooLargeErrors.has(e as ConnectError) && limits.inflatedTooLarge ? limits.inflatedTooLarge() : e;
    });
    check(input, message, json, limits);
  } else {
    const encoding = header.get("grpc-encoding") ?? header.get("connect-content-encoding");
    for (let pos = 0; pos + 5 <= bytes.length; ) {
      const flags = bytes[pos] ?? 0;
      // A request's envelope says only whether it is compressed: the end-of-stream and trailer flags are answers'.
      if (flags & ~1) {
        throw new ConnectError(`a request message's envelope has flags 0x${flags.toString(16)}; only 0x01, compressed, is a request's`, Code.InvalidArgument);
      }
      const length = bytes.readUInt32BE(pos + 1);
      const message = bytes.subarray(pos + 5, pos + 5 + length);
      check(input, flags & 1 ? await decompressed(message, encoding) : message, json, limits);
      pos += 5 + length;
    }
  }
  yield bytes;
}

/**
 * Refusals past the bound on bodies in flight, the body often left unread part-way: the request then closes, aborting
 * the call's signal as a client that leaves does, though the refusal is what happened.
 */
const unreadRefusals = new WeakSet<ConnectError>();

function unread(error: ConnectError): ConnectError {
  unreadRefusals.add(error);
  return error;
}

/** Whether `error` is such a refusal of a body, rather than anything its client did. */
export function refusedUnread(error: unknown): boolean {
  return error instanceof ConnectError && unreadRefusals.has(error);
}

/** The message decompressed; undefined when it cannot be, which Connect answers itself. */
async function inflated(bytes: Uint8Array, encoding: string | null, maxBytes: number): Promise<Uint8Array | undefined> {
  if (encoding === null || encoding === "identity") return bytes;
  const inflate = inflaters.get(encoding);
  if (!inflate) return undefined;
  return inflate(bytes, { maxOutputLength: maxBytes + 1 }).then(
    (out) => {
      if (out.byteLength > maxBytes) throw tooLarge(out.byteLength, maxBytes);
      return out;
    },
    (e: unknown) => {
      // Output over maxOutputLength is what the limit is for; a corrupt stream is Connect's to report.
      if (e instanceof RangeError || (e as { code?: string }).code === "ERR_BUFFER_TOO_LARGE") throw tooLarge(maxBytes + 1, maxBytes);
      return undefined;
    },
  );
}

/** Refusals of a message past maxBytes once inflated. */
const tooLargeErrors = new WeakSet<ConnectError>();

function tooLarge(size: number, maxBytes: number): ConnectError {
  const error = new ConnectError(`message size ${size} is larger than configured readMaxBytes ${maxBytes}`, Code.ResourceExhausted);
  tooLargeErrors.add(error);
  return error;
}

function check(input: DescMessage, bytes: Uint8Array | undefined, json: boolean, limits: MessageLimits): void {
  if (bytes === undefined) return;
  if (json) {
    // Every value counts, not only arrays and objects: a Struct's scalars each decode to a Value message. Its depth is
    // the decoder's to bound (a message's nesting is the schema's; a Struct's is counted in its nodes).
    const { nodes } = jsonShape(bytes, Number.POSITIVE_INFINITY, limits.maxNodes, "values");
    if (nodes > limits.maxNodes) throw limits.refuse(undefined, limits.maxNodes, nodes);
    return;
  }
  const walk = { bytes, pos: 0, nodes: 0, limits };
  try {
    walkMessage(walk, input, bytes.length, 0);
  } catch (e) {
    // A message that does not parse is the decoder's to report, with its own words.
    if (e !== malformed) throw e;
  }
}

const malformed = new Error("malformed message");

interface Walk {
  bytes: Uint8Array;
  pos: number;
  nodes: number;
  limits: MessageLimits;
}

/** The decoder's own bound on nesting, kept here so that a deep message cannot exhaust the stack before it. */
const maxDepth = 100;

/**
 * Walks one message's fields, as protobuf-es would decode them, counting what they would allocate: up to `end`, or
 * for a group-encoded message up to its EndGroup tag (`group` is its field number).
 */
function walkMessage(w: Walk, desc: DescMessage, end: number, depth: number, group?: number): void {
  if (depth > maxDepth) throw malformed;
  const counts = new Map<DescField, number>();
  while (w.pos < end) {
    const tag = varint(w);
    const wireType = tag & 7;
    if (wireType === 4) {
      if (tag >>> 3 !== group) throw malformed;
      return;
    }
    const field = fieldsOf(desc).get(tag >>> 3);
    if (field === undefined) {
      skip(w, wireType, tag >>> 3, depth);
      continue;
    }
    // A packed list is one record of numbers, at most eight bytes each once decoded: bounded by the message's size.
    if (field.fieldKind === "list" || field.fieldKind === "map" || field.fieldKind === "message") {
      const max = w.limits.maxElements?.get(field);
      const count = (counts.get(field) ?? 0) + 1;
      counts.set(field, count);
      // The whole list is counted, as a decoded one would be; counting skips what it holds.
      if (max !== undefined && count > max) throw w.limits.refuse(field, max, count + countRest(w, tag, end));
      node(w);
    }
    if (field.fieldKind === "message" || (field.fieldKind === "list" && field.listKind === "message")) {
      if (field.delimitedEncoding) walkMessage(w, field.message, w.bytes.length, depth + 1, tag >>> 3);
      else walkMessage(w, field.message, entryEnd(w), depth + 1);
    } else if (field.fieldKind === "map") walkMapEntry(w, field, entryEnd(w), depth + 1);
    else skip(w, wireType, tag >>> 3, depth);
  }
  if (w.pos !== end || group !== undefined) throw malformed;
}

function node(w: Walk): void {
  if (++w.nodes > w.limits.maxNodes) throw w.limits.refuse(undefined, w.limits.maxNodes, w.nodes);
}

/** How many more records of `tag` the message holds from here to `end`, past the one whose value starts here. */
function countRest(w: Walk, tag: number, end: number): number {
  let count = 0;
  skip(w, tag & 7, tag >>> 3, 0);
  while (w.pos < end) {
    const next = varint(w);
    if (next === tag) count++;
    skip(w, next & 7, next >>> 3, 0);
  }
  return count;
}

function walkMapEntry(w: Walk, field: DescField & { fieldKind: "map" }, end: number, depth: number): void {
  while (w.pos < end) {
    const tag = varint(w);
    if (tag >>> 3 === 2 && field.mapKind === "message") {
      node(w);
      walkMessage(w, field.message, entryEnd(w), depth + 1);
    } else skip(w, tag & 7, tag >>> 3, depth);
  }
  if (w.pos !== end) throw malformed;
}

const fieldsByNumber = new WeakMap<DescMessage, Map<number, DescField>>();

function fieldsOf(desc: DescMessage): Map<number, DescField> {
  let fields = fieldsByNumber.get(desc);
  if (fields === undefined) {
    fields = new Map(desc.fields.map((f) => [f.number, f]));
    fieldsByNumber.set(desc, fields);
  }
  return fields;
}

function varint(w: Walk): number {
  let value = 0;
  for (let shift = 0; shift < 70; shift += 7) {
    const byte = w.bytes[w.pos++];
    if (byte === undefined) throw malformed;
    // Past 32 bits only a length's or tag's overflow remains, which makes it malformed anyway.
    if (shift < 35) value += (byte & 0x7f) * 2 ** shift;
    if ((byte & 0x80) === 0) return shift < 35 ? value >>> 0 : value;
  }
  throw malformed;
}

/** Where a length-delimited record that starts here ends. */
function entryEnd(w: Walk): number {
  const len = varint(w);
  if (w.pos + len > w.bytes.length) throw malformed;
  return w.pos + len;
}

function skip(w: Walk, wireType: number, fieldNo: number, depth: number): void {
  switch (wireType) {
    case 0:
      varint(w);
      return;
    case 1:
      w.pos += 8;
      break;
    case 2:
      w.pos = entryEnd(w);
      return;
    case 3:
      if (depth > maxDepth) throw malformed;
      for (;;) {
        const tag = varint(w);
        if ((tag & 7) === 4) {
          if (tag >>> 3 !== fieldNo) throw malformed;
          return;
        }
        skip(w, tag & 7, tag >>> 3, depth + 1);
      }
    case 5:
      w.pos += 4;
      break;
    default:
      throw malformed;
  }
  if (w.pos > w.bytes.length) throw malformed;
}

/**
 * How a JSON text is built, by one scan of its characters outside strings: how deep its arrays and objects nest, and
 * how many nodes it holds: its arrays and objects, each an object of its own once parsed, and its objects' members,
 * each a property to add (`containers`: a number in an array costs next to nothing to parse, an object's key about a
 * microsecond), or every value in it, scalars too (`values`), each of which may decode to a message of its own (a
 * Struct's Value). Stops once either passes its bound. Bytes of UTF-8 or a string's UTF-16 code units alike: JSON's
 * structural characters are ASCII.
 */
export function jsonShape(
  text: string | Uint8Array,
  maxDepth: number,
  maxNodes: number,
  count: "containers" | "values" = "containers",
): { depth: number; nodes: number } {
  const at = typeof text === "string" ? (i: number) => text.charCodeAt(i) : (i: number) => text[i];
  const values = count === "values";
  let depth = 0;
  let deepest = 0;
  // Values: the text's own, then one for each container's first member or element and one after each comma.
  let nodes = values ? 1 : 0;
  let opened = false;
  let inString = false;
  for (let i = 0; i < text.length && deepest <= maxDepth && nodes <= maxNodes; i++) {
    const c = at(i);
    if (inString) {
      if (c === 0x5c) i++;
      else if (c === 0x22) inString = false;
      continue;
    }
    if (opened && c !== 0x20 && c !== 0x0a && c !== 0x0d && c !== 0x09) {
      opened = false;
      if (c !== 0x5d && c !== 0x7d) nodes++;
    }
    if (c === 0x22) inString = true;
    else if (c === 0x5b || c === 0x7b) {
      if (values) opened = true;
      else nodes++;
      deepest = Math.max(deepest, ++depth);
    } else if (c === 0x5d || c === 0x7d) depth--;
    else if (c === 0x2c && values) nodes++;
    else if (c === 0x3a && !values) nodes++;
  }
  return { depth: deepest, nodes };
}
