import { describe, expect, test } from "bun:test";
import { createResponseIds, responseIdKey } from "./response-ids.ts";

const ids = createResponseIds(responseIdKey("s".repeat(32), "admin-token-0123456789"));

describe("response ids", () => {
  test("open for the org they were made for, with the upstream id and provider; the same id each time", () => {
    const id = ids.wrap("resp_68af0123456789abcdef", "org_1", "openai-eu");
    expect(id).toMatch(/^resp_[A-Za-z0-9_-]+$/);
    expect(id).not.toContain("68af");
    expect(ids.unwrap(id, "org_1")).toEqual({ upstreamId: "resp_68af0123456789abcdef", provider: "openai-eu" });
    expect(ids.wrap("resp_68af0123456789abcdef", "org_1", "openai-eu")).toBe(id);
    expect(ids.wrap("resp_68af0123456789abcdef", "org_2", "openai-eu")).not.toBe(id);
    expect(ids.wrap("resp_68af0123456789abcdef", "org_1", "azure")).not.toBe(id);
  });

  test("do not open for another org, under another key, altered anywhere, or when not the gateway's", () => {
    const id = ids.wrap("resp_1", "org_1", "p");
    expect(ids.unwrap(id, "org_2")).toBeUndefined();
    expect(ids.unwrap(id, "org_")).toBeUndefined();
    const rotated = createResponseIds(responseIdKey("t".repeat(32), "admin-token-0123456789"));
    expect(rotated.unwrap(id, "org_1")).toBeUndefined();
    // The same admin token without the secret derives another key.
    expect(createResponseIds(responseIdKey(undefined, "s".repeat(32))).unwrap(id, "org_1")).toBeUndefined();
    const bytes = Buffer.from(id.slice(5), "base64url");
    for (let i = 0; i < bytes.length; i++) {
      const altered = Buffer.from(bytes);
      altered[i] = (altered[i] as number) ^ 1;
      expect(ids.unwrap(`resp_${altered.toString("base64url")}`, "org_1")).toBeUndefined();
    }
    for (const other of ["resp_1", "resp_", "", "resp_!!!", `resp_${"A".repeat(2000)}`, id.slice(0, -4), `${id}AAAA`]) {
      expect(ids.unwrap(other, "org_1")).toBeUndefined();
    }
  });
});

describe("item ids", () => {
  test("keep the upstream id's type prefix and open for the org they were made for, the same id each time", () => {
    const id = ids.wrapItem("rs_68af0123456789abcdef", "org_1", "openai-eu");
    expect(id).toMatch(/^rs_[A-Za-z0-9_-]+$/);
    expect(id).not.toContain("68af");
    expect(ids.unwrapItem(id, "org_1")).toEqual({ upstreamId: "rs_68af0123456789abcdef", provider: "openai-eu" });
    expect(ids.wrapItem("rs_68af0123456789abcdef", "org_1", "openai-eu")).toBe(id);
    expect(ids.unwrapItem(id, "org_2")).toBeUndefined();
    // An id without a type prefix is shown as an item's.
    const bare = ids.wrapItem("0123", "org_1", "p");
    expect(bare).toStartWith("item_");
    expect(ids.unwrapItem(bare, "org_1")?.upstreamId).toBe("0123");
  });

  test("are not response ids, nor the other way round; another prefix, an altered or an upstream's own does not open", () => {
    const item = ids.wrapItem("msg_1", "org_1", "p");
    const response = ids.wrap("msg_1", "org_1", "p");
    expect(ids.unwrap(`resp_${item.slice(4)}`, "org_1")).toBeUndefined();
    expect(ids.unwrapItem(`msg_${response.slice(5)}`, "org_1")).toBeUndefined();
    expect(ids.unwrapItem(`fc_${item.slice(4)}`, "org_1")).toBeUndefined();
    const bytes = Buffer.from(item.slice(4), "base64url");
    for (let i = 0; i < bytes.length; i++) {
      const altered = Buffer.from(bytes);
      altered[i] = (altered[i] as number) ^ 1;
      expect(ids.unwrapItem(`msg_${altered.toString("base64url")}`, "org_1")).toBeUndefined();
    }
    for (const other of ["msg_1", "msg_", "", "_abc", "MSG_abc", `msg_${"A".repeat(2000)}`, item.slice(0, -4)]) {
      expect(ids.unwrapItem(other, "org_1")).toBeUndefined();
    }
  });
});

describe("audio ids", () => {
  test("open for the org they were made for, the same id each time, and are neither item nor response ids", () => {
    const id = ids.wrapAudio("audio_6750fe3f2b948190", "org_1", "openai-eu");
    expect(id).toMatch(/^audio_[A-Za-z0-9_-]+$/);
    expect(id).not.toContain("6750fe");
    expect(ids.unwrapAudio(id, "org_1")).toEqual({ upstreamId: "audio_6750fe3f2b948190", provider: "openai-eu" });
    expect(ids.wrapAudio("audio_6750fe3f2b948190", "org_1", "openai-eu")).toBe(id);
    expect(ids.unwrapAudio(id, "org_2")).toBeUndefined();
    // An item id of the same upstream id looks alike (`audio_` and the sealed rest) but is sealed under another key.
    const item = ids.wrapItem("audio_6750fe3f2b948190", "org_1", "openai-eu");
    expect(item).toStartWith("audio_");
    expect(ids.unwrapAudio(item, "org_1")).toBeUndefined();
    expect(ids.unwrapItem(id, "org_1")).toBeUndefined();
    expect(ids.unwrap(`resp_${id.slice(6)}`, "org_1")).toBeUndefined();
    for (const other of ["audio_6750fe3f2b948190", "audio_", "", `x${id}`, id.slice(0, -4)]) {
      expect(ids.unwrapAudio(other, "org_1")).toBeUndefined();
    }
  });
});
