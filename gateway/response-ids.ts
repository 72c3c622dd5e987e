import { createCipheriv, createDecipheriv, createHmac, hkdfSync } from "node:crypto";

/**
 * The Responses API ids the gateway hands its clients. Every org's requests go to the same upstream accounts, so an
 * upstream's own id, passed on, would let an org that learns another's id continue (and read) that conversation. The
 * client gets instead `resp_` and, in base64url, the upstream id and the provider that made it sealed with AES-256-GCM
 * under the org's id: another org's, a tampered or a foreign id does not open. The seal's nonce is an HMAC of what it
 * seals, so one upstream response has one id for its org, whether created, streamed or retrieved.
 */
export interface ResponseIds {
  /** The client's id of an upstream response `upstreamId` that `provider` made for `orgId`. */
  wrap(upstreamId: string, orgId: string, provider: string): string;
  /** The upstream id and provider of a client's id; undefined when it is not one the gateway made for `orgId`. */
  unwrap(id: string, orgId: string): { upstreamId: string; provider: string } | undefined;
}

const prefix = "resp_";
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
  const sealKey = key.subarray(0, 32);
  const nonceKey = key.subarray(32, 64);
  return {
    wrap(upstreamId, orgId, provider) {
      const name = Buffer.from(provider, "utf8");
      if (name.length > 255) throw new Error(`provider name too long for a response id: ${provider.slice(0, 40)}`);
      const plain = Buffer.concat([Buffer.from([name.length]), name, Buffer.from(upstreamId, "utf8")]);
      const org = Buffer.from(orgId, "utf8");
      const mac = createHmac("sha256", nonceKey).update(org).update("\0").update(plain);
      const nonce = mac.digest().subarray(0, nonceBytes);
      const cipher = createCipheriv("aes-256-gcm", sealKey, nonce);
      cipher.setAAD(Buffer.concat([Buffer.from([version]), org]));
      const sealed = Buffer.concat([cipher.update(plain), cipher.final()]);
      const bytes = Buffer.concat([Buffer.from([version]), nonce, sealed, cipher.getAuthTag()]);
      return prefix + bytes.toString("base64url");
    },
    unwrap(id, orgId) {
      if (!id.startsWith(prefix) || id.length > maxIdLength || !/^[A-Za-z0-9_-]+$/.test(id.slice(prefix.length))) {
        return undefined;
      }
      const bytes = Buffer.from(id.slice(prefix.length), "base64url");
      if (bytes.length < 1 + nonceBytes + 1 + tagBytes || bytes[0] !== version) return undefined;
      try {
        const decipher = createDecipheriv("aes-256-gcm", sealKey, bytes.subarray(1, 1 + nonceBytes));
        decipher.setAAD(Buffer.concat([Buffer.from([version]), Buffer.from(orgId, "utf8")]));
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
        // Sealed for another org, under another key, or altered.
        return undefined;
      }
    },
  };
}

/** Puts the client's ids (`wrap`) in a response object's id fields: its own and the one it continued. */
export function wrapResponseObject(response: unknown, wrap: (upstreamId: string) => string): void {
  if (typeof response !== "object" || response === null) return;
  const fields = response as Record<string, unknown>;
  if (typeof fields.id === "string") fields.id = wrap(fields.id);
  if (typeof fields.previous_response_id === "string") fields.previous_response_id = wrap(fields.previous_response_id);
}
