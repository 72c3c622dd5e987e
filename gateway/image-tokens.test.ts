import { describe, expect, test } from "bun:test";
import { estimatedImageTokens, imageSize, imageTokens, maxImageTokens, unknownModelBound } from "./image-tokens.ts";
import { type ImageFormat, imageDataUrl } from "./testing/images.ts";

const high = (width: number, height: number) => ({ url: imageDataUrl("png", width, height), detail: "high" });
const byUrl = { url: "https://example.com/cat.png" };

describe("image sizes read from a data URL's header", () => {
  test("PNG, JPEG (past its EXIF), GIF and the three kinds of WebP", () => {
    const formats: ImageFormat[] = ["png", "jpeg", "gif", "webp-lossy", "webp-lossless", "webp-extended"];
    for (const format of formats) {
      expect(imageSize(imageDataUrl(format, 1920, 1080))).toEqual({ width: 1920, height: 1080 });
      expect(imageSize(imageDataUrl(format, 3, 7000))).toEqual({ width: 3, height: 7000 });
    }
  });

  test("no size for a URL, a header of another kind, text that is not base64, or a size of 0", () => {
    expect(imageSize("https://example.com/cat.png")).toBeUndefined();
    expect(imageSize(undefined)).toBeUndefined();
    expect(imageSize("data:image/png,not-base64")).toBeUndefined();
    expect(imageSize(`data:image/png;base64,${Buffer.from("%PDF-1.7 and more text here").toString("base64")}`)).toBeUndefined();
    expect(imageSize(`data:image/png;base64,iVBORw0K GgoAAAANSUhEUgAAAAEAAAAB`)).toBeUndefined();
    expect(imageSize(imageDataUrl("png", 0, 100))).toBeUndefined();
    // A JPEG cut off before its frame header.
    expect(imageSize(imageDataUrl("jpeg", 100, 100).slice(0, 200))).toBeUndefined();
  });

  test("reading a header takes the same few bytes however large the image", () => {
    const large = imageDataUrl("jpeg", 4032, 3024, 20 * 1024 * 1024);
    const started = performance.now();
    for (let i = 0; i < 1000; i++) expect(imageSize(large)?.width).toBe(4032);
    expect(performance.now() - started).toBeLessThan(500);
  });
});

describe("image tokens by model family, as OpenAI's vision guide counts them", () => {
  test("gpt-4o, gpt-4.1 and the like: 85 and 170 a 512-pixel tile, after fitting in 2048 and 768 on the short side", () => {
    // The guide's examples: 1024x1024 is 4 tiles, 2048x4096 is 6 (768x1536), any low-detail image 85.
    expect(imageTokens(high(1024, 1024), "gpt-4o")).toBe(765);
    expect(imageTokens(high(2048, 4096), "gpt-4o-2024-08-06")).toBe(1105);
    expect(imageTokens({ ...high(4096, 8192), detail: "low" }, "gpt-4.1")).toBe(85);
    expect(imageTokens(high(512, 512), "openai/gpt-4o")).toBe(255);
    // 2048x800 is 1966x768: 4 tiles by 2.
    expect(imageTokens(high(2048, 800), "gpt-4o")).toBe(85 + 8 * 170);
  });

  test("gpt-4o-mini: 2,833 and 5,667 a tile, so a 1024-pixel image is 25,501 tokens", () => {
    expect(imageTokens(high(1024, 1024), "gpt-4o-mini")).toBe(25_501);
    expect(imageTokens({ ...high(1024, 1024), detail: "low" }, "gpt-4o-mini-2024-07-18")).toBe(2833);
    expect(imageTokens(high(2048, 800), "gpt-4o-mini")).toBe(2833 + 8 * 5667);
  });

  test("gpt-4.1-mini, gpt-4.1-nano and o4-mini: 32-pixel patches, at most 1,536, times the model's multiplier", () => {
    // The guide's examples: 1024x1024 is 1,024 patches; 1800x2400 is scaled to 1,452.
    expect(imageTokens(high(1024, 1024), "gpt-4.1-mini")).toBe(Math.ceil(1024 * 1.62));
    expect(imageTokens(high(1800, 2400), "gpt-4.1-nano")).toBe(Math.ceil(1452 * 2.46));
    expect(imageTokens(high(1800, 2400), "o4-mini")).toBe(Math.ceil(1452 * 1.72));
    // Detail does not change what they are billed.
    expect(imageTokens({ ...high(1024, 1024), detail: "low" }, "gpt-4.1-mini")).toBe(Math.ceil(1024 * 1.62));
  });

  test("the o-series and GPT-5 have tiles of their own", () => {
    expect(imageTokens(high(1024, 1024), "o3")).toBe(75 + 4 * 150);
    expect(imageTokens(high(1024, 1024), "gpt-5")).toBe(70 + 4 * 140);
    expect(imageTokens(high(1024, 1024), "gpt-5-mini")).toBe(Math.ceil(1024 * 1.62));
  });

  test("an image of unknown size counts as a 2048x2048 one; a model of no known family by gpt-4o's rules", () => {
    expect(imageTokens(byUrl, "gpt-4o-mini")).toBe(25_501);
    expect(imageTokens(byUrl, "gpt-4o")).toBe(765);
    // 2048x2048 is scaled to 1248x1248: 39 patches by 39.
    expect(imageTokens(byUrl, "gpt-4.1-nano")).toBe(Math.ceil(1521 * 2.46));
    expect(imageTokens(byUrl, "llama-3.2-vision")).toBe(765);
    expect(imageTokens({ ...byUrl, detail: "low" }, undefined)).toBe(85);
    expect(imageTokens(high(300, 200), "qwen2-vl")).toBe(255);
  });

  test("before a target is chosen, an image counts at the dearest of a route's models", () => {
    expect(estimatedImageTokens(high(1024, 1024), ["gpt-4o", "gpt-4o-mini"])).toBe(25_501);
    expect(estimatedImageTokens(high(1024, 1024), [])).toBe(765);
  });
});

describe("the most an image may cost, which budgets reserve", () => {
  test("exact where its size is known, the most its family bills for any image where it is not", () => {
    expect(maxImageTokens(high(1024, 1024), ["gpt-4o"])).toBe(765);
    expect(maxImageTokens(byUrl, ["gpt-4o"])).toBe(85 + 8 * 170);
    expect(maxImageTokens({ ...byUrl, detail: "low" }, ["gpt-4o-mini"])).toBe(2833);
    expect(maxImageTokens(byUrl, ["gpt-4o-mini"])).toBe(48_169);
    expect(maxImageTokens(byUrl, ["gpt-4.1-nano"])).toBe(Math.ceil(1536 * 2.46));
    // The dearest of a route's targets.
    expect(maxImageTokens(high(1024, 1024), ["gpt-4o", "gpt-4o-mini"])).toBe(25_501);
  });

  test("on a model of no known family, the most any of OpenAI's models bills for an image, whatever its size", () => {
    expect(unknownModelBound).toBe(48_169);
    expect(maxImageTokens(high(64, 64), ["llama-3.2-vision"])).toBe(48_169);
    expect(maxImageTokens(byUrl, [])).toBe(48_169);
    expect(maxImageTokens(high(64, 64), ["gpt-4o", "my-azure-deployment"])).toBe(48_169);
  });
});
