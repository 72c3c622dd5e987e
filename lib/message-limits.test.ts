import { expect, test } from "bun:test";
import { create, type DescField, type DescMessage, type DescFile, ScalarType, toBinary } from "@bufbuild/protobuf";
import fc from "fast-check";
import { file_analytics_v1_analytics } from "../gen/analytics/v1/analytics_pb.ts";
import { file_billing_v1_billing } from "../gen/billing/v1/billing_pb.ts";
import { file_gateway_v1_gateway } from "../gen/gateway/v1/gateway_pb.ts";
import { encodedBytes } from "./message-limits.ts";

const messages = [file_analytics_v1_analytics, file_billing_v1_billing, file_gateway_v1_gateway].flatMap((f: DescFile) =>
  f.messages.flatMap(function nested(m: DescMessage): DescMessage[] {
    return [m, ...m.nestedMessages.flatMap(nested)];
  }),
);

/**
 * A value of every field (or none), at random: zero values, negatives, long and non-ASCII text, lone surrogates, a
 * Struct's JSON.
 */
function filled(desc: DescMessage, random: () => number, depth = 0): Record<string, unknown> {
  const init: Record<string, unknown> = {};
  const pick = <T>(values: T[]) => values[Math.floor(random() * values.length)] as T;
  const scalar = (type: ScalarType | undefined): unknown => {
    switch (type) {
      case ScalarType.STRING:
        return pick(["", "a", "é€😀", "\ud800x", "x".repeat(200)]);
      case ScalarType.BYTES:
        return pick([new Uint8Array(0), new Uint8Array(300)]);
      case ScalarType.BOOL:
        return pick([true, false]);
      case ScalarType.DOUBLE:
      case ScalarType.FLOAT:
        return pick([0, -0, 1.5, -2e30]);
      case ScalarType.INT64:
      case ScalarType.SINT64:
      case ScalarType.SFIXED64:
        return pick([0n, 1n, -1n, 300n, -(2n ** 63n), 2n ** 63n - 1n, 2n ** 35n]);
      case ScalarType.UINT64:
      case ScalarType.FIXED64:
        return pick([0n, 127n, 128n, 2n ** 64n - 1n, 2n ** 40n]);
      case ScalarType.UINT32:
      case ScalarType.FIXED32:
        return pick([0, 127, 128, 2 ** 32 - 1]);
      default:
        return pick([0, 1, -1, 2 ** 31 - 1, -(2 ** 31), 16_384]);
    }
  };
  const value = (field: DescField): unknown => {
    // A Struct is held as its JSON.
    if (field.message?.typeName === "google.protobuf.Struct") return pick([{}, { a: 1, b: ["x", null, { c: true }] }]);
    if (field.message) return depth > 3 ? create(field.message) : create(field.message, filled(field.message, random, depth + 1));
    if (field.enum) return pick(field.enum.values).number;
    return scalar(field.scalar);
  };
  for (const field of desc.fields) {
    if (random() < 0.2) continue;
    if (field.fieldKind === "list") init[field.localName] = Array.from({ length: pick([0, 1, 3]) }, () => value(field));
    else if (field.fieldKind === "map") {
      const keys = field.mapKey === ScalarType.STRING ? ["", "k", "ключ"] : field.mapKey === ScalarType.BOOL ? ["true", "false"] : ["0", "-5", "300"];
      init[field.localName] = Object.fromEntries(keys.slice(0, pick([0, 1, 3])).map((k) => [k, value(field)]));
    } else if (field.oneof) init[field.oneof.localName] = { case: field.localName, value: value(field) };
    else init[field.localName] = value(field);
  }
  return init;
}

test("a message's encoded size is counted as toBinary writes it, for every message of the contracts", () => {
  fc.assert(
    fc.property(fc.integer({ min: 0, max: messages.length - 1 }), fc.integer(), (i, seed) => {
      const desc = messages[i] as DescMessage;
      let state = seed >>> 0 || 1;
      const random = () => ((state = (state * 1_103_515_245 + 12_345) >>> 0) / 2 ** 32);
      const message = create(desc, filled(desc, random));
      // Fields of a later version of the contract, kept as they came.
      if (random() < 0.3) message.$unknown = [{ no: 999, wireType: 2, data: new Uint8Array([3, 1, 2, 3]) }];
      expect(encodedBytes(desc, message)).toBe(toBinary(desc, message).byteLength);
    }),
    { numRuns: 3000 },
  );
});
