import { describe, expect, it } from 'vitest';
import { crc32c, crc32cOf, readDigest, writeDigest } from '../src/digest.ts';

// RFC 3720 appendix B.4 gives these as the bytes on the wire.
const vectors: Array<[string, Buffer, string]> = [
  ['32 bytes of zeros', Buffer.alloc(32, 0), 'aa36918a'],
  ['32 bytes of ones', Buffer.alloc(32, 0xff), '43aba862'],
  ['32 bytes incrementing', Buffer.from(Array.from({ length: 32 }, (_, i) => i)), '4e79dd46'],
  ['32 bytes decrementing', Buffer.from(Array.from({ length: 32 }, (_, i) => 31 - i)), '5cdb3f11'],
  [
    'an iSCSI SCSI Read (10) command PDU',
    Buffer.from(
      '01c00000 00000000 00000000 00000000 14000000 00000400 00000014 00000018 28000000 00000000 02000000 00000000'.replace(/ /g, ''),
      'hex',
    ),
    '563a96d9',
  ],
];

describe('CRC32C (RFC 3720 B.4 vectors)', () => {
  for (const [name, input, wire] of vectors) {
    it(name, () => {
      const out = Buffer.alloc(4);
      writeDigest(out, 0, crc32c(input));
      expect(out.toString('hex')).toBe(wire);
      expect(readDigest(out, 0)).toBe(crc32c(input));
    });
  }

  it('continues across buffers exactly as over the concatenation', () => {
    const a = Buffer.from('hello, ');
    const b = Buffer.from('iSCSI world');
    expect(crc32cOf([a, Buffer.alloc(0), b])).toBe(crc32c(Buffer.concat([a, b])));
  });
});
