// Envelopes for tests that speak gRPC by hand. Kept out of lib/testing.ts, which loads bun:test, so that the scripts
// tests run as processes of their own (gateway/testing/) can use them too.

/**
 * A message in the envelope gRPC, gRPC-Web and Connect streams carry it in: a byte of `flags` (0x01 compressed, 0x80 an
 * answer's trailers or end), the message's length as a big-endian 32-bit number, then the message.
 */
export function grpcFrame(message: Uint8Array, flags = 0): Buffer {
  const frame = Buffer.alloc(5 + message.length);
  frame[0] = flags;
  frame.writeUInt32BE(message.length, 1);
  frame.set(message, 5);
  return frame;
}

/** The whole envelopes (as grpcFrame writes them) at the start of `bytes`, in order; one cut short is left out. */
export function grpcFrames(bytes: Uint8Array): { flags: number; message: Buffer }[] {
  const buffer = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const frames: { flags: number; message: Buffer }[] = [];
  for (let at = 0; at + 5 <= buffer.length; ) {
    const end = at + 5 + buffer.readUInt32BE(at + 1);
    if (end > buffer.length) break;
    frames.push({ flags: buffer[at] as number, message: buffer.subarray(at + 5, end) });
    at = end;
  }
  return frames;
}
