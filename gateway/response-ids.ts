import { createCipheriv, createDecipheriv, createHmac, hkdfSync } from "node:crypto";
import { isObject } from "./request-checks.ts";

/**
 * The Responses API ids the gateway hands its clients. Every org's requests go to the same upstream accounts, so an
 * upstream's own id, passed on, would let an org that learns another's id continue (and read) that conversation. The
 * client gets instead `resp_` and, in base64url, the upstream id and the provider that made it sealed with AES-256-GCM
 * under its scope (the org's id, and the project's for a key of a project): another org's or project's, a tampered or a
 * foreign id does not open. The seal's nonce is an HMAC of what it seals, so one upstream response has one id for its
 * scope, whether created, streamed or retrieved.
 *
 * The ids of items (`msg_`, `fc_`, `rs_`, ...) are sealed the same way under a key of their own, after the upstream
 * id's own type prefix: an input item naming a stored one by its id has the upstream read it into the request. So are
 * the ids of chat's audio answers (`message.audio.id`, `delta.audio.id`), as `audio_` and the sealed rest under a key of
 * their own again: an assistant message naming one by `audio.id` has the model hear that audio again.
 */
export interface ResponseIds {
  /** The client's id of an upstream response `upstreamId` that `provider` made for `scope`. */
  wrap(upstreamId: string, scope: string, provider: string): string;
  /** The upstream id and provider of a client's id; undefined when it is not one the gateway made for `scope`. */
  unwrap(id: string, scope: string): { upstreamId: string; provider: string } | undefined;
  /** The client's id of an item `provider` made for `scope`: the upstream id's type prefix (`msg_`), then sealed. */
  wrapItem(upstreamId: string, scope: string, provider: string): string;
  /** As unwrap, for an item's id. */
  unwrapItem(id: string, scope: string): { upstreamId: string; provider: string } | undefined;
  /** The client's id of a chat audio answer `provider` made for `scope`: `audio_`, then sealed. */
  wrapAudio(upstreamId: string, scope: string, provider: string): string;
  /** As unwrap, for an audio answer's id. */
  unwrapAudio(id: string, scope: string): { upstreamId: string; provider: string } | undefined;
}

const prefix = "resp_";
const audioPrefix = "audio_";
const version = 1;
const nonceBytes = 12;
const tagBytes = 16;
// OpenAI's ids are about 50 characters: anything much longer is no id the gateway made.
const maxIdLength = 1024;

/**
 * The key of the gateway's response ids: from GATEWAY_RESPONSE_ID_SECRET when set, else from ADMIN_TOKEN (which every
 * replica of a mesh shares) under a label of its own, so the admin token itself never keys anything but admin calls.
 */
export function responseIdKey(secret: string | undefined, adminToken: string): Buffer {
  const [material, label] =
    secret === undefined
      ? [adminToken, "gateway response ids from ADMIN_TOKEN v1"]
      : [secret, "gateway response ids v1"];
  return Buffer.from(hkdfSync("sha256", material, "", label, 64));
}

export function createResponseIds(key: Buffer): ResponseIds {
  const responses = sealer(key.subarray(0, 32), key.subarray(32, 64));
  const itemKey = (label: string) => createHmac("sha256", key).update(label).digest();
  const items = sealer(itemKey("item ids seal"), itemKey("item ids nonce"));
  const audio = sealer(itemKey("audio ids seal"), itemKey("audio ids nonce"));
  return {
    wrap: (upstreamId, scope, provider) => prefix + responses.seal(upstreamId, scope, provider),
    unwrap(id, scope) {
      return id.startsWith(prefix) ? responses.open(id.slice(prefix.length), scope) : undefined;
    },
    wrapItem: (upstreamId, scope, provider) => itemPrefix(upstreamId) + items.seal(upstreamId, scope, provider),
    unwrapItem(id, scope) {
      // The prefix is lowercase letters and one `_`, so the first `_` ends it.
      const shown = id.slice(0, id.indexOf("_") + 1);
      if (!/^[a-z]{1,32}_$/.test(shown)) return undefined;
      const opened = items.open(id.slice(shown.length), scope);
      return opened && itemPrefix(opened.upstreamId) === shown ? opened : undefined;
    },
    wrapAudio: (upstreamId, scope, provider) => audioPrefix + audio.seal(upstreamId, scope, provider),
    unwrapAudio(id, scope) {
      return id.startsWith(audioPrefix) ? audio.open(id.slice(audioPrefix.length), scope) : undefined;
    },
  };
}

/** An item id's type prefix (`msg_`, `fc_`, `rs_`), kept in the client's id; `item_` for an id without one. */
const itemPrefix = (upstreamId: string) => /^[a-z]{1,32}_/.exec(upstreamId)?.[0] ?? "item_";

/** Seals an upstream id and its provider for a scope, in base64url, and opens what it sealed. */
function sealer(sealKey: Buffer, nonceKey: Buffer) {
  return {
    seal(upstreamId: string, scope: string, provider: string): string {
      const name = Buffer.from(provider, "utf8");
      if (name.length > 255) throw new Error(`provider name too long for a response id: ${provider.slice(0, 40)}`);
      const plain = Buffer.concat([Buffer.from([name.length]), name, Buffer.from(upstreamId, "utf8")]);
      const org = Buffer.from(scope, "utf8");
      const mac = createHmac("sha256", nonceKey).update(org).update("\0").update(plain);
      const nonce = mac.digest().subarray(0, nonceBytes);
      const cipher = createCipheriv("aes-256-gcm", sealKey, nonce);
      cipher.setAAD(Buffer.concat([Buffer.from([version]), org]));
      const sealed = Buffer.concat([cipher.update(plain), cipher.final()]);
      return Buffer.concat([Buffer.from([version]), nonce, sealed, cipher.getAuthTag()]).toString("base64url");
    },
    open(text: string, scope: string): { upstreamId: string; provider: string } | undefined {
      if (text.length > maxIdLength || !/^[A-Za-z0-9_-]+$/.test(text)) return undefined;
      const bytes = Buffer.from(text, "base64url");
      if (bytes.length < 1 + nonceBytes + 1 + tagBytes || bytes[0] !== version) return undefined;
      try {
        const decipher = createDecipheriv("aes-256-gcm", sealKey, bytes.subarray(1, 1 + nonceBytes));
        decipher.setAAD(Buffer.concat([Buffer.from([version]), Buffer.from(scope, "utf8")]));
        decipher.setAuthTag(bytes.subarray(bytes.length - tagBytes));
        const sealed = bytes.subarray(1 + nonceBytes, bytes.length - tagBytes);
        const plain = Buffer.concat([decipher.update(sealed), decipher.final()]);
        const length = plain[0] as number;
        if (plain.length < 1 + length) return undefined;
        return {
          provider: plain.subarray(1, 1 + length).toString("utf8"),
          upstreamId: plain.subarray(1 + length).toString("utf8"),
        };
      } catch {
        // Sealed for another scope, under another key, or altered.
        return undefined;
      }
    },
  };
}

/** The client's ids of what one provider made for one scope: of responses, and of their items. */
export interface ClientIds {
  response(upstreamId: string): string;
  item(upstreamId: string): string;
}

/** Fields of an item that hold an item's id: its own, and the MCP approval request an MCP call or approval answers. */
export const itemIdFields = ["id", "approval_request_id"] as const;

/**
 * A response object with the client's ids: its own, the one it continued and its output items'. A copy, down to its
 * items: a provider may send one object in several events (the mock does), each to be given the client's ids once.
 */
export function clientResponse<T>(response: T, ids: ClientIds): T {
  if (!isObject(response)) return response;
  const copy: Record<string, unknown> = { ...response };
  if (typeof copy.id === "string") copy.id = ids.response(copy.id);
  if (typeof copy.previous_response_id === "string") copy.previous_response_id = ids.response(copy.previous_response_id);
  if (Array.isArray(copy.output)) copy.output = copy.output.map((item) => clientItem(item, ids));
  return copy as T;
}

/** An item (a copy) with the client's ids. */
export function clientItem<T>(item: T, ids: ClientIds): T {
  if (!isObject(item)) return item;
  const copy: Record<string, unknown> = { ...item };
  for (const field of itemIdFields) {
    const id = copy[field];
    if (typeof id === "string") copy[field] = ids.item(id);
  }
  return copy as T;
}

/** A page of a response's input items (`data`, `first_id`, `last_id`) with the client's ids. */
export function clientItemPage<T>(page: T, ids: ClientIds): T {
  if (!isObject(page)) return page;
  const copy: Record<string, unknown> = { ...page };
  if (Array.isArray(copy.data)) copy.data = copy.data.map((item) => clientItem(item, ids));
  for (const field of ["first_id", "last_id"]) {
    const id = copy[field];
    if (typeof id === "string") copy[field] = ids.item(id);
  }
  return copy as T;
}

/** A streamed event with the client's ids: in its response, its item, and the `item_id` of the item it adds to. */
export function clientEvent<T extends object>(event: T, ids: ClientIds): T {
  const copy = { ...event } as Record<string, unknown>;
  if (copy.response !== undefined) copy.response = clientResponse(copy.response, ids);
  if (copy.item !== undefined) copy.item = clientItem(copy.item, ids);
  if (typeof copy.item_id === "string") copy.item_id = ids.item(copy.item_id);
  return copy as T;
}

/**
 * A chat answer's choices with the client's ids of their audio answers, whole (`message.audio.id`) or streamed
 * (`delta.audio.id`), in place: each choice gets an audio object of its own.
 */
export function clientAudio(choices: readonly object[], audioId: (upstreamId: string) => string): void {
  // Called for every streamed chunk: each choice's message and delta are looked at without a list made for them.
  for (const choice of choices as { message?: unknown; delta?: unknown }[]) {
    withClientAudio(choice.message, audioId);
    withClientAudio(choice.delta, audioId);
  }
}

function withClientAudio(said: unknown, audioId: (upstreamId: string) => string): void {
  if (!isObject(said) || !isObject(said.audio) || typeof said.audio.id !== "string") return;
  said.audio = { ...said.audio, id: audioId(said.audio.id) };
}
