import { describe, expect, it } from 'vitest';
import {
  decodeTextData,
  DEFAULT_MAX_TEXT_LENGTH,
  encodeTextData,
  isValidKeyName,
  splitTextData,
  TextAssembler,
  TextFormatError,
  TextTooLongError,
  type TextPair,
} from '../src/text.ts';

const b = (s: string) => Buffer.from(s, 'utf8');

function formatError(fn: () => unknown): TextFormatError {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(TextFormatError);
    return e as TextFormatError;
  }
  throw new Error('expected a TextFormatError');
}

// The operational-stage Login Request libiscsi sent in the recorded CHAP session.
const LIBISCSI_OPERATIONAL: TextPair[] = [
  ['HeaderDigest', 'None,CRC32C'],
  ['DataDigest', 'None'],
  ['InitialR2T', 'No'],
  ['ImmediateData', 'Yes'],
  ['MaxBurstLength', '262144'],
  ['FirstBurstLength', '262144'],
  ['DefaultTime2Wait', '2'],
  ['DefaultTime2Retain', '0'],
  ['MaxOutstandingR2T', '1'],
  ['ErrorRecoveryLevel', '0'],
  ['IFMarker', 'No'],
  ['OFMarker', 'No'],
  ['MaxConnections', '1'],
  ['MaxRecvDataSegmentLength', '262144'],
  ['DataPDUInOrder', 'Yes'],
  ['DataSequenceInOrder', 'Yes'],
];

describe('decodeTextData', () => {
  it('decodes NUL-terminated records in order', () => {
    const data = b('InitiatorName=iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-inq\0TargetName=iqn.2026-11.example:chap\0SessionType=Normal\0AuthMethod=CHAP,None\0');
    expect(decodeTextData(data)).toEqual([
      ['InitiatorName', 'iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-inq'],
      ['TargetName', 'iqn.2026-11.example:chap'],
      ['SessionType', 'Normal'],
      ['AuthMethod', 'CHAP,None'],
    ]);
  });

  it('tolerates a missing final NUL', () => {
    expect(decodeTextData(b('A=1\0B=2'))).toEqual([
      ['A', '1'],
      ['B', '2'],
    ]);
  });

  it('skips empty records from padding counted into the length', () => {
    expect(decodeTextData(b('A=1\0\0\0\0'))).toEqual([['A', '1']]);
  });

  it('returns nothing for an empty segment', () => {
    expect(decodeTextData(Buffer.alloc(0))).toEqual([]);
  });

  it('keeps the value after the first "=" whole, including further "=" and an empty value', () => {
    expect(decodeTextData(b('CHAP_C=0bAAAA==\0TargetAlias=\0'))).toEqual([
      ['CHAP_C', '0bAAAA=='],
      ['TargetAlias', ''],
    ]);
  });

  it('keeps duplicates: detecting them is the negotiator job', () => {
    expect(decodeTextData(b('A=1\0A=2\0'))).toEqual([
      ['A', '1'],
      ['A', '2'],
    ]);
  });

  it('decodes UTF-8 values (aliases are iSCSI local names)', () => {
    expect(decodeTextData(b('InitiatorAlias=hôte-π\0'))).toEqual([['InitiatorAlias', 'hôte-π']]);
  });

  it('accepts extension keys X- and X#', () => {
    expect(decodeTextData(b('X-com.example.bus.size=16\0X#NodeArchitecture=detour/1\0'))).toEqual([
      ['X-com.example.bus.size', '16'],
      ['X#NodeArchitecture', 'detour/1'],
    ]);
  });

  const malformed: Array<[string, Buffer, TextFormatError['reason']]> = [
    ['a record without "="', b('HeaderDigest\0'), 'missing-separator'],
    ['an empty key', b('=Yes\0'), 'empty-key'],
    ['a 64-byte key', b(`${'K'.repeat(64)}=1\0`), 'key-too-long'],
    ['a space in the key', b('Header Digest=None\0'), 'invalid-key-character'],
    ['a slash in the key', b('Max/Burst=1\0'), 'invalid-key-character'],
    ['a "#" outside the X# prefix', b('A#B=1\0'), 'invalid-key-character'],
    ['a non-ASCII byte in the key', Buffer.concat([b('Ke'), Buffer.of(0xc3, 0xa9), b('=1\0')]), 'invalid-key-character'],
    ['invalid UTF-8 in the value', Buffer.concat([b('TargetAlias='), Buffer.of(0xff, 0xfe), b('\0')]), 'invalid-utf8'],
  ];
  it.each(malformed)('rejects %s', (_, data, reason) => {
    expect(formatError(() => decodeTextData(data)).reason).toBe(reason);
  });

  it('accepts a key of exactly 63 bytes', () => {
    const key = 'K'.repeat(63);
    expect(decodeTextData(b(`${key}=1\0`))).toEqual([[key, '1']]);
  });

  it('gives the error a kind', () => {
    expect(formatError(() => decodeTextData(b('oops\0'))).kind).toBe('text-format');
  });
});

describe('encodeTextData', () => {
  it('writes key=value records each ending with NUL', () => {
    expect(encodeTextData([['HeaderDigest', 'None'], ['MaxBurstLength', '262144']]).toString('latin1')).toBe(
      'HeaderDigest=None\0MaxBurstLength=262144\0',
    );
  });

  it('round-trips a recorded Login Request text byte for byte', () => {
    const wire = encodeTextData(LIBISCSI_OPERATIONAL);
    expect(decodeTextData(wire)).toEqual(LIBISCSI_OPERATIONAL);
    expect(wire.length).toBe(LIBISCSI_OPERATIONAL.reduce((n, [k, v]) => n + k.length + v.length + 2, 0));
  });

  it('encodes UTF-8 values', () => {
    expect(encodeTextData([['TargetAlias', 'π']])).toEqual(Buffer.from('TargetAlias=\u03c0\0', 'utf8'));
  });

  it('accepts any iterable, such as a Map', () => {
    expect(encodeTextData(new Map([['A', '1']])).toString()).toBe('A=1\0');
  });

  it('refuses a key it could not decode back', () => {
    expect(formatError(() => encodeTextData([['Bad Key', '1']])).reason).toBe('invalid-key-character');
    expect(formatError(() => encodeTextData([['', '1']])).reason).toBe('empty-key');
  });

  it('refuses a NUL inside a value', () => {
    expect(formatError(() => encodeTextData([['A', 'x\0y']])).reason).toBe('nul-in-value');
  });

  it('isValidKeyName agrees with the decoder', () => {
    expect(isValidKeyName('MaxRecvDataSegmentLength')).toBe(true);
    expect(isValidKeyName('X#NodeArchitecture')).toBe(true);
    expect(isValidKeyName('a=b')).toBe(false);
  });
});

describe('TextAssembler', () => {
  it('returns the pairs only when the PDU with C=0 arrives', () => {
    const asm = new TextAssembler();
    expect(asm.push(b('A=1\0'), true)).toBeUndefined();
    expect(asm.inProgress).toBe(true);
    expect(asm.push(b('B=2\0'), false)).toEqual([
      ['A', '1'],
      ['B', '2'],
    ]);
    expect(asm.inProgress).toBe(false);
    expect(asm.bufferedLength).toBe(0);
  });

  it('joins a pair cut across PDU boundaries, even inside the key and the value', () => {
    const asm = new TextAssembler();
    expect(asm.push(b('MaxBur'), true)).toBeUndefined();
    expect(asm.push(b('stLength=26'), true)).toBeUndefined();
    expect(asm.push(b('2144\0Data'), true)).toBeUndefined();
    expect(asm.push(b('Digest=None\0'), false)).toEqual([
      ['MaxBurstLength', '262144'],
      ['DataDigest', 'None'],
    ]);
  });

  it('reassembles a recorded text split at every possible single boundary', () => {
    const wire = encodeTextData(LIBISCSI_OPERATIONAL);
    for (let cut = 1; cut < wire.length; cut++) {
      const asm = new TextAssembler();
      expect(asm.push(wire.subarray(0, cut), true)).toBeUndefined();
      expect(asm.push(wire.subarray(cut), false)).toEqual(LIBISCSI_OPERATIONAL);
    }
  });

  it('handles a single complete PDU', () => {
    expect(new TextAssembler().push(b('A=1\0'), false)).toEqual([['A', '1']]);
  });

  it('accepts empty continuation PDUs', () => {
    const asm = new TextAssembler();
    expect(asm.push(Buffer.alloc(0), true)).toBeUndefined();
    expect(asm.push(b('A=1'), true)).toBeUndefined();
    expect(asm.push(Buffer.alloc(0), false)).toEqual([['A', '1']]);
  });

  it('is reusable for the next text', () => {
    const asm = new TextAssembler();
    asm.push(b('A=1\0'), false);
    expect(asm.push(b('B=2\0'), false)).toEqual([['B', '2']]);
  });

  it('defaults to a 64 KiB limit', () => {
    expect(new TextAssembler().maxLength).toBe(DEFAULT_MAX_TEXT_LENGTH);
    expect(DEFAULT_MAX_TEXT_LENGTH).toBe(65536);
  });

  it('throws TextTooLongError past the limit and starts over afterwards', () => {
    const asm = new TextAssembler({ maxLength: 10 });
    expect(asm.push(b('A=12345\0'), true)).toBeUndefined();
    let caught: unknown;
    try {
      asm.push(b('B=1\0'), true);
    } catch (e) {
      caught = e;
    }
    expect(caught).toBeInstanceOf(TextTooLongError);
    expect((caught as TextTooLongError).kind).toBe('text-too-long');
    expect((caught as TextTooLongError).limit).toBe(10);
    expect(asm.bufferedLength).toBe(0);
    expect(asm.push(b('C=1\0'), false)).toEqual([['C', '1']]);
  });

  it('accepts a text of exactly the limit', () => {
    const asm = new TextAssembler({ maxLength: 8 });
    expect(asm.push(b('A=1\0'), true)).toBeUndefined();
    expect(asm.push(b('B=2\0'), false)).toEqual([
      ['A', '1'],
      ['B', '2'],
    ]);
  });

  it('throws TextFormatError on a malformed text and resets', () => {
    const asm = new TextAssembler();
    asm.push(b('A'), true);
    expect(() => asm.push(b('\0'), false)).toThrow(TextFormatError);
    expect(asm.inProgress).toBe(false);
  });

  it('refuses a nonsensical limit', () => {
    expect(() => new TextAssembler({ maxLength: 0 })).toThrow(RangeError);
  });
});

describe('splitTextData', () => {
  it('cuts into chunks of at most the limit, C set on all but the last', () => {
    const text = b('0123456789');
    const chunks = splitTextData(text, 4);
    expect(chunks.map((c) => c.data.toString())).toEqual(['0123', '4567', '89']);
    expect(chunks.map((c) => c.continue)).toEqual([true, true, false]);
  });

  it('does not produce an empty trailing chunk on an exact multiple', () => {
    const chunks = splitTextData(b('01234567'), 4);
    expect(chunks.map((c) => [c.data.toString(), c.continue])).toEqual([
      ['0123', true],
      ['4567', false],
    ]);
  });

  it('keeps a short text in one chunk with C=0', () => {
    expect(splitTextData(b('A=1\0'), 8192)).toEqual([{ data: b('A=1\0'), continue: false }]);
  });

  it('yields one empty chunk for an empty text', () => {
    expect(splitTextData(Buffer.alloc(0), 512)).toEqual([{ data: Buffer.alloc(0), continue: false }]);
  });

  it('round-trips through TextAssembler for many segment sizes', () => {
    const wire = encodeTextData(LIBISCSI_OPERATIONAL);
    for (const size of [1, 7, 64, 255, 512, wire.length - 1, wire.length, wire.length + 1]) {
      const asm = new TextAssembler();
      const chunks = splitTextData(wire, size);
      expect(chunks.every((c) => c.data.length <= size)).toBe(true);
      let result: TextPair[] | undefined;
      for (const c of chunks) result = asm.push(c.data, c.continue);
      expect(result).toEqual(LIBISCSI_OPERATIONAL);
    }
  });

  it('refuses a nonsensical segment length', () => {
    expect(() => splitTextData(b('A=1\0'), 0)).toThrow(RangeError);
  });
});
