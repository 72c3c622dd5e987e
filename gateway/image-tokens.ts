/**
 * Tokens an image costs, by the rules OpenAI's images and vision guide gives for each model family, so that counts,
 * rate limits and budget reservations take an image at what its upstream bills rather than at one figure for all.
 *
 * - Tiles (GPT-4o, GPT-4.1, GPT-4.5, GPT-5, the o1 and o3 models, gpt-4o-mini): at `detail: "high"` (or `auto`, or
 *   none) the image is scaled to fit in 2048x2048, then down so its shortest side is at most 768, and costs a base
 *   plus a price for each 512-pixel tile covering it; at `low`, the base alone. gpt-4o-mini's base and tile are 2,833
 *   and 5,667 tokens: a 1024-pixel image costs it 25,501, gpt-4o 765.
 * - Patches (gpt-4.1-mini, gpt-4.1-nano, o4-mini, gpt-5-mini, gpt-5-nano): the 32-pixel patches covering the image,
 *   scaled down to fit in 1,536 of them, times the model's multiplier; `detail` changes nothing.
 *
 * The size is read from the header of a base64 data URL (PNG, JPEG, GIF, WebP): a few bytes decoded, however large
 * the image, and nothing fetched. An image sent by URL, or whose header does not read, is counted as a 2048x2048 one
 * (four tiles, or 1,521 patches). A model of none of these families is counted by gpt-4o's rules; what a budget
 * reserves for its image is `unknownModelBound`, the most any of OpenAI's models bills for one.
 */

/** How a family of models is billed for an image. */
type ImageRule = { tiles: { base: number; tile: number } } | { patches: { multiplier: number } };

// The first family whose pattern matches a model's name (its provider's prefix, such as `openai/`, and `ft:` dropped).
const families: [RegExp, ImageRule][] = [
  [/^(?:gpt-4\.1-mini|gpt-5-mini)/, { patches: { multiplier: 1.62 } }],
  [/^(?:gpt-4\.1-nano|gpt-5-nano)/, { patches: { multiplier: 2.46 } }],
  [/^(?:o4-mini|codex-mini)/, { patches: { multiplier: 1.72 } }],
  [/^gpt-4o-mini/, { tiles: { base: 2833, tile: 5667 } }],
  [/^gpt-5(?:-chat|-\d{4}-\d\d-\d\d|$)/, { tiles: { base: 70, tile: 140 } }],
  [/^o[13](?:-|$)/, { tiles: { base: 75, tile: 150 } }],
  [/^computer-use-preview/, { tiles: { base: 65, tile: 129 } }],
  [/^(?:chatgpt-4o|gpt-4o|gpt-4\.1|gpt-4\.5|gpt-4-turbo|gpt-4-vision)/, { tiles: { base: 85, tile: 170 } }],
];
/** The rules a model of no family here is estimated by: gpt-4o's. */
const defaultRule: ImageRule = { tiles: { base: 85, tile: 170 } };

function ruleOf(model: string | undefined): ImageRule | undefined {
  const name = (model?.slice(model.lastIndexOf("/") + 1) ?? "").replace(/^ft:/i, "").toLowerCase();
  return families.find(([pattern]) => pattern.test(name))?.[1];
}

/** The size an image of unknown size is counted at. */
const unknownSide = 2048;
const maxPatches = 1536;
const patchSide = 32;

/** Tokens of a high-detail image of `width` x `height` pixels by tiles of `tile` tokens over `base`. */
function tileTokens(width: number, height: number, { base, tile }: { base: number; tile: number }): number {
  let w = width;
  let h = height;
  if (Math.max(w, h) > 2048) {
    const scale = 2048 / Math.max(w, h);
    w = Math.max(Math.round(w * scale), 1);
    h = Math.max(Math.round(h * scale), 1);
  }
  if (Math.min(w, h) > 768) {
    const scale = 768 / Math.min(w, h);
    w = Math.max(Math.round(w * scale), 1);
    h = Math.max(Math.round(h * scale), 1);
  }
  return base + tile * Math.ceil(w / 512) * Math.ceil(h / 512);
}

/** Tokens of an image of `width` x `height` pixels by 32-pixel patches, scaled down to fit in 1,536 of them. */
function patchTokens(width: number, height: number, multiplier: number): number {
  const covering = (w: number, h: number) => Math.ceil(w / patchSide) * Math.ceil(h / patchSide);
  let patches = covering(width, height);
  if (patches > maxPatches) {
    // As the guide scales it: to the budget's area, then down to whole patches along the side that needs it more.
    let shrink = Math.sqrt((patchSide * patchSide * maxPatches) / (width * height));
    const across = (width * shrink) / patchSide;
    const down = (height * shrink) / patchSide;
    shrink *= Math.min(Math.floor(across) / across, Math.floor(down) / down);
    const scaled = covering(Math.max(Math.floor(width * shrink), 1), Math.max(Math.floor(height * shrink), 1));
    patches = Math.min(scaled, maxPatches);
  }
  return Math.ceil(patches * multiplier);
}

function tokensBy(rule: ImageRule, size: ImageSize | undefined, detail: unknown): number {
  const { width, height } = size ?? { width: unknownSide, height: unknownSide };
  if ("patches" in rule) return patchTokens(width, height, rule.patches.multiplier);
  return detail === "low" ? rule.tiles.base : tileTokens(width, height, rule.tiles);
}

/** The most an image may cost by `rule`, whatever its size. */
function mostBy(rule: ImageRule, detail: unknown): number {
  if ("patches" in rule) return Math.ceil(maxPatches * rule.patches.multiplier);
  // Fit in 2048 and no more than 768 on its shortest side: 4 tiles by 2 at most.
  return detail === "low" ? rule.tiles.base : rule.tiles.base + 8 * rule.tiles.tile;
}

/**
 * What a budget reserves for an image on a model of no family here: the most any of OpenAI's models bills for one,
 * 48,169 tokens (gpt-4o-mini, 8 tiles: an image whose longer side is about 2.7 times its shorter, 2048x800).
 */
export const unknownModelBound = Math.max(...families.map(([, rule]) => mostBy(rule, "high")));

/** An image part as the gateway reads it: its URL and detail, in whatever shape a client sent them. */
export interface ImageInput {
  url?: unknown;
  detail?: unknown;
}

/** Tokens `model` is billed for an image: by its size when its data URL tells it, else as a 2048x2048 one. */
export function imageTokens(image: ImageInput, model: string | undefined): number {
  return tokensBy(ruleOf(model) ?? defaultRule, imageSize(image.url), image.detail);
}

/**
 * The most an image may cost on any of `models` (a route's targets, one of which will serve it): exact where its size
 * is known, else the most its family bills for any image, and `unknownModelBound` on a model of no family here.
 */
export function maxImageTokens(image: ImageInput, models: readonly (string | undefined)[]): number {
  const size = imageSize(image.url);
  let most = 0;
  for (const model of models.length > 0 ? models : [undefined]) {
    const rule = ruleOf(model);
    const tokens = !rule ? unknownModelBound : size ? tokensBy(rule, size, image.detail) : mostBy(rule, image.detail);
    most = Math.max(most, tokens);
  }
  return most;
}

/** What `imageTokens` counts on the dearest of `models`: an estimate before a target is chosen. */
export function estimatedImageTokens(image: ImageInput, models: readonly (string | undefined)[]): number {
  let most = 0;
  for (const model of models.length > 0 ? models : [undefined]) most = Math.max(most, imageTokens(image, model));
  return most;
}

/** Width and height in pixels. */
export interface ImageSize {
  width: number;
  height: number;
}

// The longest media type and parameters a data URL's header is looked for in.
const maxDataUrlHeader = 256;
// Segments of a JPEG read, at most, for its frame header (EXIF, ICC profiles and the like come before it).
const maxJpegSegments = 64;
const base64Text = /^[A-Za-z0-9+/=_-]*$/;

/**
 * The size of a PNG, JPEG, GIF or WebP image given as a base64 data URL, read from its header: each read decodes a
 * few bytes where they are, so the work is bounded whatever the image's size. None for any other URL, a header that
 * does not read, or a size of 0.
 */
export function imageSize(url: unknown): ImageSize | undefined {
  if (typeof url !== "string" || !url.startsWith("data:")) return undefined;
  const comma = url.slice(0, maxDataUrlHeader).indexOf(",");
  if (comma < 0 || !/;base64$/i.test(url.slice(0, comma))) return undefined;
  const start = comma + 1;
  /** `length` bytes of the image from `offset` (fewer at its end); none where the text is not base64. */
  const read = (offset: number, length: number): Uint8Array | undefined => {
    const from = start + Math.floor(offset / 3) * 4;
    const text = url.slice(from, start + Math.ceil((offset + length) / 3) * 4);
    if (!base64Text.test(text)) return undefined;
    const bytes = Buffer.from(text, "base64");
    return bytes.subarray(offset % 3, (offset % 3) + length);
  };
  const head = read(0, 30);
  if (!head || head.length < 10) return undefined;
  const size = sizeFrom(head, read);
  return size && size.width > 0 && size.height > 0 ? size : undefined;
}

function sizeFrom(
  head: Uint8Array,
  read: (offset: number, length: number) => Uint8Array | undefined,
): ImageSize | undefined {
  const view = new DataView(head.buffer, head.byteOffset, head.byteLength);
  const ascii = (at: number, length: number) => String.fromCharCode(...head.subarray(at, at + length));
  // PNG: the signature, then the IHDR chunk's width and height.
  if (head.length >= 24 && head[0] === 0x89 && ascii(1, 3) === "PNG" && ascii(12, 4) === "IHDR") {
    return { width: view.getUint32(16), height: view.getUint32(20) };
  }
  // GIF: its logical screen.
  if (ascii(0, 4) === "GIF8") return { width: view.getUint16(6, true), height: view.getUint16(8, true) };
  if (head.length >= 30 && ascii(0, 4) === "RIFF" && ascii(8, 4) === "WEBP") {
    const chunk = ascii(12, 4);
    // Lossy: the key frame's 14-bit sizes; lossless: 14-bit sizes less one, packed; extended: the canvas, less one.
    if (chunk === "VP8 ") {
      return { width: view.getUint16(26, true) & 0x3fff, height: view.getUint16(28, true) & 0x3fff };
    }
    if (chunk === "VP8L" && head[20] === 0x2f) {
      const bits = view.getUint32(21, true);
      return { width: (bits & 0x3fff) + 1, height: ((bits >>> 14) & 0x3fff) + 1 };
    }
    if (chunk === "VP8X") {
      const width = 1 + ((head[24] as number) | ((head[25] as number) << 8) | ((head[26] as number) << 16));
      const height = 1 + ((head[27] as number) | ((head[28] as number) << 8) | ((head[29] as number) << 16));
      return { width, height };
    }
    return undefined;
  }
  // JPEG: the segments up to its frame header (SOF0-SOF15, but DHT, JPG and DAC), which holds its height and width.
  if (head[0] === 0xff && head[1] === 0xd8) {
    let at = 2;
    for (let segment = 0; segment < maxJpegSegments; segment++) {
      const marker = read(at, 9);
      if (!marker || marker.length < 4 || marker[0] !== 0xff) return undefined;
      const type = marker[1] as number;
      // Fill bytes, and the markers that stand alone.
      if (type === 0xff) {
        at += 1;
        continue;
      }
      if (type === 0x01 || (type >= 0xd0 && type <= 0xd8)) {
        at += 2;
        continue;
      }
      if (type === 0xd9 || type === 0xda) return undefined;
      if (type >= 0xc0 && type <= 0xcf && type !== 0xc4 && type !== 0xc8 && type !== 0xcc) {
        if (marker.length < 9) return undefined;
        const frame = new DataView(marker.buffer, marker.byteOffset, marker.byteLength);
        return { width: frame.getUint16(7), height: frame.getUint16(5) };
      }
      at += 2 + (((marker[2] as number) << 8) | (marker[3] as number));
    }
  }
  return undefined;
}
