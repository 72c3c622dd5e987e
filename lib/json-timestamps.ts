import type { DescField, DescMessage } from "@bufbuild/protobuf";
import { Code, ConnectError, type ConnectRouter } from "@connectrpc/connect";
import type { UniversalHandler, UniversalServerRequest } from "@connectrpc/connect/protocol";

const timestampType = "google.protobuf.Timestamp";

// RFC 3339 as ProtoJSON writes a Timestamp: protobuf-es matches the same shape, then reads it with Date.parse, which
// rolls a day the month does not have (2026-02-29, 11-31) or hour 24 over into the next instead of refusing it.
const rfc3339 = /^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.\d{1,9})?(?:Z|[+-](\d{2}):(\d{2}))$/;

const months = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
  "November", "December"];

/** Why `text` is no instant on the calendar, or undefined when it is one (or not of the shape the decoder refuses). */
export function impossibleTimestamp(text: string): string | undefined {
  const parts = rfc3339.exec(text);
  if (!parts) return undefined;
  const [year = 0, month = 0, day = 0, hour = 0, minute = 0, second = 0, offsetHours = 0, offsetMinutes = 0] = parts
    .slice(1)
    .map((part) => Number(part ?? 0));
  if (month < 1 || month > 12) return "its month is not 01..12";
  const days = month === 2 ? (leap(year) ? 29 : 28) : [4, 6, 9, 11].includes(month) ? 30 : 31;
  if (day < 1 || day > days) return `${months[month - 1]} ${year} has days 01..${days}`;
  if (hour > 23 || minute > 59 || second > 59) return "its time of day is not within 00:00:00..23:59:59";
  if (offsetHours > 23 || offsetMinutes > 59) return "its offset is not within 00:00..23:59";
  return undefined;
}

const leap = (year: number) => (year % 4 === 0 && year % 100 !== 0) || year % 400 === 0;

const holdsTimestamps = new WeakMap<DescMessage, boolean>();

/** Whether a message of this type can hold a Timestamp, in itself or in any message it holds. */
function reachesTimestamp(message: DescMessage): boolean {
  let found = holdsTimestamps.get(message);
  if (found === undefined) {
    found = search(message, new Set());
    holdsTimestamps.set(message, found);
  }
  return found;
}

function search(message: DescMessage, seen: Set<DescMessage>): boolean {
  if (message.typeName === timestampType) return true;
  if (seen.has(message)) return false;
  seen.add(message);
  return message.fields.some((field) => {
    const inner = messageOf(field);
    return inner !== undefined && search(inner, seen);
  });
}

function messageOf(field: DescField): DescMessage | undefined {
  if (field.fieldKind === "message") return field.message;
  if (field.fieldKind === "list" && field.listKind === "message") return field.message;
  if (field.fieldKind === "map" && field.mapKind === "message") return field.message;
  return undefined;
}

/**
 * Refuses (InvalidArgument, naming the field) a Connect JSON request whose Timestamps name no instant on the calendar,
 * which protobuf-es would decode as another instant: usage dated 2026-11-31 would be billed in December. Wraps each
 * unary and server-streaming method whose request can hold a Timestamp; a body of another content type, compressed,
 * over `maxBytes` (which Connect refuses itself) or that is no JSON is passed on unlooked at.
 */
export function checkJsonTimestampsOf(router: ConnectRouter, maxBytes: number): void {
  router.handlers.forEach((handler, i) => {
    const kind = handler.method.methodKind;
    if ((kind === "unary" || kind === "server_streaming") && reachesTimestamp(handler.method.input)) {
      router.handlers[i] = checkedHandler(handler, maxBytes);
    }
  });
}

function checkedHandler(handler: UniversalHandler, maxBytes: number): UniversalHandler {
  const checked = (req: UniversalServerRequest) => {
    const body = req.body;
    const encoding = req.header.get("content-encoding");
    if (
      !/^application\/json(;|$)/i.test(req.header.get("content-type") ?? "") ||
      (encoding !== null && encoding !== "identity") ||
      typeof body !== "object" ||
      body === null ||
      !(Symbol.asyncIterator in body)
    ) {
      return handler(req);
    }
    return handler({ ...req, body: checkedBody(body as AsyncIterable<Uint8Array>, handler.method.input, maxBytes) });
  };
  return Object.assign(checked, handler);
}

async function* checkedBody(body: AsyncIterable<Uint8Array>, input: DescMessage, maxBytes: number) {
  const chunks: Uint8Array[] = [];
  let size = 0;
  const iterator = body[Symbol.asyncIterator]();
  for (let next = await iterator.next(); !next.done; next = await iterator.next()) {
    chunks.push(next.value);
    size += next.value.byteLength;
    if (size <= maxBytes) continue;
    // Too large to be served: Connect refuses it as it reads on.
    yield* chunks;
    for (next = await iterator.next(); !next.done; next = await iterator.next()) yield next.value;
    return;
  }
  const bytes = Buffer.concat(chunks);
  checkJsonTimestamps(input, bytes);
  yield bytes;
}

/** checkJsonTimestampsOf's check of one request message's JSON text. */
export function checkJsonTimestamps(input: DescMessage, bytes: Uint8Array): void {
  let json: unknown;
  try {
    json = JSON.parse(Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString("utf8"));
  } catch {
    return;
  }
  walk(input, json, "");
}

function walk(message: DescMessage, json: unknown, path: string): void {
  if (message.typeName === timestampType) {
    const problem = typeof json === "string" ? impossibleTimestamp(json) : undefined;
    if (problem) {
      throw new ConnectError(`${path || "message"}: "${json}" is no date-time: ${problem}`, Code.InvalidArgument);
    }
    return;
  }
  if (typeof json !== "object" || json === null || Array.isArray(json)) return;
  const members = json as Record<string, unknown>;
  for (const field of message.fields) {
    const inner = messageOf(field);
    if (!inner || !reachesTimestamp(inner)) continue;
    const value = Object.hasOwn(members, field.jsonName) ? members[field.jsonName] : members[field.name];
    const at = path ? `${path}.${field.name}` : field.name;
    if (field.fieldKind === "list" && Array.isArray(value)) value.forEach((v, i) => walk(inner, v, `${at}[${i}]`));
    else if (field.fieldKind === "map" && typeof value === "object" && value !== null) {
      for (const [key, v] of Object.entries(value)) walk(inner, v, `${at}[${JSON.stringify(key)}]`);
    } else if (field.fieldKind === "message") walk(inner, value, at);
  }
}
