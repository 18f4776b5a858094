import { crc32c as nativeCrc32c } from '@node-rs/crc32';

/**
 * CRC32C (Castagnoli) as iSCSI uses it (RFC 7143 section 13.1, RFC 3720 appendix B.4): initial
 * value all ones, final complement. The native implementation uses the SSE4.2 / ARMv8 CRC
 * instructions, which is what lets data digests keep up with multi-GB/s links.
 */
export function crc32c(data: Uint8Array, seed = 0): number {
  return nativeCrc32c(data as Buffer, seed) >>> 0;
}

/** Continues a CRC over several buffers (header + AHS, or data + padding) without concatenating. */
export function crc32cOf(parts: readonly Uint8Array[]): number {
  let c = 0;
  for (const p of parts) if (p.length > 0) c = nativeCrc32c(p as Buffer, c);
  return c >>> 0;
}

// On the wire the digest is the CRC's four bytes least significant first: the B.4 vector for 32
// zero bytes is "aa 36 91 8a", i.e. 0x8a9136aa stored little-endian.
export function writeDigest(buf: Buffer, offset: number, crc: number): void {
  buf.writeUInt32LE(crc >>> 0, offset);
}

export function readDigest(buf: Buffer, offset: number): number {
  return buf.readUInt32LE(offset);
}

export const DIGEST_LENGTH = 4;
