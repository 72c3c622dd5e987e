import { describe, expect, test } from "bun:test";
import { parseEmbeddingInput } from "./embedding-request.ts";
import { GatewayError } from "./errors.ts";

function rejection(body: unknown): [param: string | null, code: string] {
  try {
    parseEmbeddingInput(body);
  } catch (e) {
    if (!(e instanceof GatewayError)) throw e;
    expect([e.status, e.type]).toEqual([400, "invalid_request_error"]);
    return [e.param, e.code];
  }
  throw new Error("the body was accepted");
}

// Each body fails on one field: [what, the request's fields over a valid one, param, code].
const invalid: Array<[string, Record<string, unknown>, string | null, string]> = [
  ["no model", { model: undefined }, "model", "missing_required_parameter"],
  ["no input", { input: undefined }, "input", "missing_required_parameter"],
  ["an empty string", { input: "" }, "input", "invalid_value"],
  ["input as a number", { input: 5 }, "input", "invalid_type"],
  ["input as an object", { input: { text: "a" } }, "input", "invalid_type"],
  ["an empty array", { input: [] }, "input", "empty_array"],
  ["2049 strings", { input: Array.from({ length: 2049 }, () => "a") }, "input", "array_above_max_length"],
  ["2049 token arrays", { input: Array.from({ length: 2049 }, () => [1]) }, "input", "array_above_max_length"],
  ["an empty string among strings", { input: ["a", ""] }, "input[1]", "invalid_value"],
  ["strings mixed with tokens", { input: ["a", [1]] }, "input[1]", "invalid_type"],
  ["an object among inputs", { input: [{}] }, "input[0]", "invalid_type"],
  ["a negative token", { input: [1, -2] }, "input[1]", "invalid_value"],
  ["a fractional token", { input: [1.5] }, "input[0]", "invalid_value"],
  ["an empty token array", { input: [[1], []] }, "input[1]", "empty_array"],
  ["a bad token in a token array", { input: [[1], [2, "x"]] }, "input[1][1]", "invalid_value"],
  ["dimensions of 0", { dimensions: 0 }, "dimensions", "integer_below_min_value"],
  ["dimensions as a fraction", { dimensions: 1.5 }, "dimensions", "invalid_type"],
  ["an unknown encoding", { encoding_format: "hex" }, "encoding_format", "invalid_value"],
  ["user not a string", { user: 5 }, "user", "invalid_type"],
];

describe("embedding input", () => {
  test.each(invalid)("400 for %s", (_, fields, param, code) => {
    expect(rejection({ model: "m", input: "hi", ...fields })).toEqual([param, code]);
  });

  test("a string, strings, token ids or token arrays; unknown fields pass through; float by default", () => {
    for (const input of ["hi", ["a", "b"], Array.from({ length: 2048 }, () => "a"), [1, 2, 3], Array.from({ length: 5000 }, () => 7), [[1], [2, 3]]]) {
      expect(parseEmbeddingInput({ model: "m", input }).upstream.input).toEqual(input);
    }
    const input = parseEmbeddingInput({ model: "m", input: "hi", dimensions: 8, user: "u", a_future_field: 1 });
    expect(input).toEqual({
      model: "m",
      user: "u",
      upstream: { model: "m", input: "hi", dimensions: 8, user: "u", a_future_field: 1, encoding_format: "float" } as never,
    });
    expect(parseEmbeddingInput({ model: "m", input: "hi", encoding_format: "base64" }).upstream.encoding_format).toBe("base64");
  });
});
