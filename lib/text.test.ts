import { expect, test } from "bun:test";
import { clipped } from "./text.ts";

test("clipped keeps short text, marks a cut, and never cuts a character in two", () => {
  expect(clipped("model", 5)).toBe("model");
  expect(clipped("models", 5)).toBe("model...");
  expect(clipped("models", 5, "\u2026")).toBe("model\u2026");
  // "a" then emoji (two UTF-16 units each): a cut at 4 units would keep half of the second emoji.
  const text = `a${"\u{1F600}".repeat(3)}`;
  expect(clipped(text, 4)).toBe("a\u{1F600}...");
  expect(clipped(text, 5)).toBe("a\u{1F600}\u{1F600}...");
  for (let max = 0; max < text.length; max++) expect(encodeURIComponent(clipped(text, max))).toBeString();
});
