/**
 * Images for tests as base64 data URLs: headers of the stated size, as a PNG, JPEG, GIF or WebP file begins, then
 * `padding` bytes of nothing (the gateway reads only the header).
 */
export type ImageFormat = "png" | "jpeg" | "gif" | "webp-lossy" | "webp-lossless" | "webp-extended";

export function imageDataUrl(format: ImageFormat, width: number, height: number, padding = 64): string {
  const bytes: number[] = [];
  const u16be = (n: number) => bytes.push(n >>> 8, n & 0xff);
  const u32be = (n: number) => bytes.push(n >>> 24, (n >>> 16) & 0xff, (n >>> 8) & 0xff, n & 0xff);
  const u16le = (n: number) => bytes.push(n & 0xff, n >>> 8);
  const u24le = (n: number) => bytes.push(n & 0xff, (n >>> 8) & 0xff, n >>> 16);
  const ascii = (s: string) => bytes.push(...Buffer.from(s, "latin1"));
  let type = `image/${format}`;
  if (format === "png") {
    bytes.push(0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a);
    u32be(13);
    ascii("IHDR");
    u32be(width);
    u32be(height);
    bytes.push(8, 2, 0, 0, 0, 0, 0, 0, 0);
  } else if (format === "gif") {
    ascii("GIF89a");
    u16le(width);
    u16le(height);
    bytes.push(0, 0, 0);
  } else if (format === "jpeg") {
    bytes.push(0xff, 0xd8);
    // An EXIF segment of 3,000 bytes and a quantization table come before the frame header.
    bytes.push(0xff, 0xe1);
    u16be(3000);
    ascii("Exif\0\0");
    bytes.push(...new Array(3000 - 8).fill(0));
    bytes.push(0xff, 0xdb);
    u16be(67);
    bytes.push(...new Array(65).fill(1));
    bytes.push(0xff, 0xc2);
    u16be(17);
    bytes.push(8);
    u16be(height);
    u16be(width);
    bytes.push(3, 1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1);
  } else {
    type = "image/webp";
    ascii("RIFF");
    bytes.push(0, 0, 0, 0);
    ascii("WEBP");
    if (format === "webp-lossy") {
      ascii("VP8 ");
      bytes.push(0, 0, 0, 0, 0, 0, 0, 0x9d, 0x01, 0x2a);
      u16le(width);
      u16le(height);
    } else if (format === "webp-lossless") {
      ascii("VP8L");
      bytes.push(0, 0, 0, 0, 0x2f);
      const bits = (width - 1) | ((height - 1) << 14);
      bytes.push(bits & 0xff, (bits >>> 8) & 0xff, (bits >>> 16) & 0xff, (bits >>> 24) & 0xff);
    } else {
      ascii("VP8X");
      bytes.push(10, 0, 0, 0, 0, 0, 0, 0);
      u24le(width - 1);
      u24le(height - 1);
    }
  }
  return `data:${type};base64,${Buffer.concat([Buffer.from(bytes), Buffer.alloc(padding)]).toString("base64")}`;
}
