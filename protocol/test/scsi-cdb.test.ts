import { describe, expect, it } from 'vitest';
import {
  ScsiCdbError,
  ScsiOp,
  ScsiStatus,
  buildCompareAndWrite,
  buildInquiry,
  buildModeSense10,
  buildModeSense6,
  buildRead10,
  buildRead16,
  buildReadCapacity10,
  buildReadCapacity16,
  buildReportLuns,
  buildRequestSense,
  buildSyncCache10,
  buildSyncCache16,
  buildTestUnitReady,
  buildUnmap,
  buildUnmapParameterList,
  buildWrite10,
  buildWrite16,
  buildWriteSame16,
  cdbAllocationLength,
  cdbLength,
  cdbLengthOf,
  cdbParameterListLength,
  decodeBlockCdb,
  decodeUnmapParameterList,
  encodeBlockCdb,
  iscsiResponseName,
  isBlockCommandOpcode,
  scsiOpModifiesMedium,
  scsiOpName,
  scsiStatusName,
  transferLengthBytes,
} from '../src/scsi/index.ts';
import type { BlockCdb, BlockCdbFields, BlockOp } from '../src/scsi/index.ts';

const hex = (s: string): Buffer => Buffer.from(s.replace(/\s+/g, ''), 'hex');

function mustDecode(cdb: Buffer): BlockCdb {
  const d = decodeBlockCdb(cdb);
  if (!d) throw new Error(`not decoded: ${cdb.toString('hex')}`);
  return d;
}

function catchCdbError(fn: () => unknown): ScsiCdbError {
  try {
    fn();
  } catch (e) {
    if (e instanceof ScsiCdbError) return e;
    throw e;
  }
  throw new Error('expected ScsiCdbError');
}

describe('decodeBlockCdb on hand-assembled CDBs', () => {
  it('READ(10) with FUA', () => {
    const d = mustDecode(hex('28 08 00 00 10 00 00 00 08 00'));
    expect(d).toMatchObject({
      op: 'READ_10',
      opcode: 0x28,
      kind: 'read',
      cdbLength: 10,
      lba: 0x1000,
      blocks: 8,
      fua: true,
      dpo: false,
      rdprotect: 0,
      groupNumber: 0,
      isWrite: false,
      dataInBlocks: 8,
      dataOutBlocks: 0,
      toEndOfMedium: false,
    });
    expect(d.wrprotect).toBeUndefined();
    expect(d.bytchk).toBeUndefined();
  });

  it('WRITE(16) with DPO, WRPROTECT, group number and a 40-bit LBA', () => {
    const d = mustDecode(hex('8a 70 00 00 00 12 34 56 78 9a 00 01 00 00 05 00'));
    expect(d).toMatchObject({
      op: 'WRITE_16',
      lba: 0x12_3456_789a,
      blocks: 0x10000,
      fua: false,
      dpo: true,
      wrprotect: 3,
      groupNumber: 5,
      isWrite: true,
      dataOutBlocks: 0x10000,
      dataInBlocks: 0,
    });
  });

  it('READ(12) and WRITE(12) read a 32-bit transfer length from bytes 6-9', () => {
    expect(mustDecode(hex('a8 00 00 00 00 64 00 01 00 00 00 00'))).toMatchObject({ op: 'READ_12', lba: 100, blocks: 65536 });
    expect(mustDecode(hex('aa 18 ff ff ff ff 00 00 00 01 03 00'))).toMatchObject({
      op: 'WRITE_12',
      lba: 0xffff_ffff,
      blocks: 1,
      fua: true,
      dpo: true,
      groupNumber: 3,
    });
  });

  it('uses a 16-byte iSCSI CDB field for a 10-byte command and reads CONTROL from byte 9', () => {
    const cdb = Buffer.alloc(16);
    hex('2a 00 00 00 00 07 00 00 02 04').copy(cdb);
    expect(mustDecode(cdb)).toMatchObject({ op: 'WRITE_10', lba: 7, blocks: 2, control: 4 });
  });

  it('reads an LBA of exactly Number.MAX_SAFE_INTEGER', () => {
    const d = mustDecode(hex('88 00 00 1f ff ff ff ff ff ff 00 00 00 01 00 00'));
    expect(d.lba).toBe(Number.MAX_SAFE_INTEGER);
  });

  it('rejects a 64-bit LBA beyond Number.MAX_SAFE_INTEGER as LBA OUT OF RANGE', () => {
    const e = catchCdbError(() => decodeBlockCdb(hex('88 00 00 20 00 00 00 00 00 00 00 00 00 01 00 00')));
    expect(e.code).toBe('LBA_OUT_OF_RANGE');
    expect(e.sense).toEqual({ key: 0x5, asc: 0x21, ascq: 0x00 });
    expect(e.fieldPointer).toBe(2);
    const e2 = catchCdbError(() => decodeBlockCdb(hex('89 00 ff ff ff ff ff ff ff ff 00 00 00 01 00 00')));
    expect(e2.code).toBe('LBA_OUT_OF_RANGE');
  });

  it('rejects a buffer shorter than the command', () => {
    const e = catchCdbError(() => decodeBlockCdb(hex('28 00 00 00 00 00 00 00')));
    expect(e.code).toBe('CDB_TOO_SHORT');
    expect(e.sense).toEqual({ key: 0x5, asc: 0x24, ascq: 0x00 });
  });

  it('returns undefined for commands that are not block I/O', () => {
    expect(decodeBlockCdb(buildInquiry(false, 0, 96))).toBeUndefined();
    expect(decodeBlockCdb(buildTestUnitReady())).toBeUndefined();
    expect(decodeBlockCdb(buildReadCapacity16())).toBeUndefined();
    expect(decodeBlockCdb(Buffer.alloc(0))).toBeUndefined();
    expect(isBlockCommandOpcode(0x28)).toBe(true);
    expect(isBlockCommandOpcode(0x12)).toBe(false);
  });
});

describe('6-byte READ/WRITE', () => {
  it('treats transfer length 0 as 256 blocks', () => {
    const d = mustDecode(hex('08 00 00 10 00 00'));
    expect(d).toMatchObject({ op: 'READ_6', lba: 0x10, blocks: 256, dataInBlocks: 256 });
    expect(mustDecode(hex('0a 00 00 10 00 00'))).toMatchObject({ op: 'WRITE_6', blocks: 256, dataOutBlocks: 256 });
  });

  it('has a 21-bit LBA: the top three bits of byte 1 are not part of it', () => {
    expect(mustDecode(hex('08 1f ff ff 01 00')).lba).toBe(0x1f_ffff);
    expect(mustDecode(hex('08 ff ff ff 01 00')).lba).toBe(0x1f_ffff);
    expect(() => encodeBlockCdb('READ_6', { lba: 0x20_0000, blocks: 1 })).toThrow(RangeError);
  });

  it('has no FUA, DPO or group number', () => {
    const d = mustDecode(hex('0a 00 00 01 05 00'));
    expect(d).toMatchObject({ fua: false, dpo: false, groupNumber: 0, blocks: 5 });
    expect(() => encodeBlockCdb('WRITE_6', { lba: 1, blocks: 1, fua: true })).toThrow(RangeError);
  });

  it('encodes 256 blocks as 0 and cannot express zero blocks', () => {
    expect(encodeBlockCdb('WRITE_6', { lba: 0x12345, blocks: 256 })).toEqual(hex('0a 01 23 45 00 00'));
    expect(() => encodeBlockCdb('READ_6', { lba: 0, blocks: 0 })).toThrow(RangeError);
    expect(() => encodeBlockCdb('READ_6', { lba: 0, blocks: 257 })).toThrow(RangeError);
  });

  it('10/12/16-byte transfer length 0 means no transfer', () => {
    for (const op of ['READ_10', 'WRITE_12', 'READ_16'] as const) {
      const d = mustDecode(encodeBlockCdb(op, { lba: 5, blocks: 0 }));
      expect(d.blocks).toBe(0);
      expect(d.dataInBlocks + d.dataOutBlocks).toBe(0);
      expect(d.toEndOfMedium).toBe(false);
    }
  });
});

describe('encodeBlockCdb / decodeBlockCdb round trip for every block command', () => {
  const cases: Array<[BlockOp, BlockCdbFields, Partial<BlockCdb>]> = [
    ['READ_6', { lba: 0x1a_bcde, blocks: 17, control: 0x04 }, { dataInBlocks: 17 }],
    ['WRITE_6', { lba: 3, blocks: 200 }, { dataOutBlocks: 200, isWrite: true }],
    ['READ_10', { lba: 0xfedc_ba98, blocks: 0xffff, fua: true, dpo: true, rdprotect: 5, groupNumber: 0x3f }, {}],
    ['READ_12', { lba: 42, blocks: 0x0100_0000, dpo: true, rdprotect: 1 }, {}],
    ['READ_16', { lba: 2 ** 40 + 7, blocks: 0xffff_ffff, fua: true, groupNumber: 9 }, {}],
    ['WRITE_10', { lba: 1, blocks: 1, fua: true, wrprotect: 7 }, { isWrite: true, dataOutBlocks: 1 }],
    ['WRITE_12', { lba: 2, blocks: 3, dpo: true }, { isWrite: true }],
    ['WRITE_16', { lba: Number.MAX_SAFE_INTEGER - 10, blocks: 10, fua: true, dpo: true, wrprotect: 2, control: 1 }, {}],
    ['VERIFY_10', { lba: 9, blocks: 4, dpo: true, bytchk: 1, vrprotect: 3 }, { kind: 'verify', dataOutBlocks: 4, isWrite: false }],
    ['VERIFY_12', { lba: 9, blocks: 4, bytchk: 0 }, { dataOutBlocks: 0, dataInBlocks: 0 }],
    ['VERIFY_16', { lba: 2 ** 33, blocks: 4, bytchk: 3 }, { dataOutBlocks: 1 }],
    ['WRITE_AND_VERIFY_10', { lba: 11, blocks: 6, bytchk: 1, dpo: true }, { dataOutBlocks: 6, isWrite: true }],
    ['WRITE_AND_VERIFY_12', { lba: 11, blocks: 6, wrprotect: 1 }, { dataOutBlocks: 6 }],
    ['WRITE_AND_VERIFY_16', { lba: 2 ** 45, blocks: 6, bytchk: 0 }, { dataOutBlocks: 6, kind: 'write-and-verify' }],
    ['WRITE_SAME_10', { lba: 100, blocks: 2048, unmap: true, anchor: true }, { dataOutBlocks: 1, isWrite: true }],
    ['WRITE_SAME_16', { lba: 2 ** 36, blocks: 0x8000_0000, unmap: true, ndob: true }, { dataOutBlocks: 0 }],
    ['UNMAP', { parameterListLength: 24, anchor: true, groupNumber: 2 }, { lba: 0, blocks: 0, isWrite: true, dataOutBlocks: 0 }],
    ['COMPARE_AND_WRITE', { lba: 77, blocks: 1, fua: true, wrprotect: 1 }, { numberOfLogicalBlocks: 1, dataOutBlocks: 2 }],
    ['ORWRITE_16', { lba: 5, blocks: 8, orprotect: 4, fua: true }, { kind: 'orwrite', dataOutBlocks: 8, isWrite: true }],
    ['WRITE_ATOMIC_16', { lba: 5, blocks: 16, atomicBoundary: 8, fua: true }, { kind: 'write', dataOutBlocks: 16 }],
    ['WRITE_STREAM_16', { lba: 5, blocks: 16, streamId: 3, dpo: true }, { kind: 'write', dataOutBlocks: 16 }],
    ['SYNCHRONIZE_CACHE_10', { lba: 10, blocks: 20, immed: true }, { kind: 'synchronize-cache', isWrite: false }],
    ['SYNCHRONIZE_CACHE_16', { lba: 2 ** 50, blocks: 1 }, { immed: false, toEndOfMedium: false }],
    ['PRE_FETCH_10', { lba: 10, blocks: 0, immed: true }, { kind: 'pre-fetch', toEndOfMedium: true }],
    ['PRE_FETCH_16', { lba: 2 ** 34, blocks: 99, groupNumber: 1 }, { dataInBlocks: 0 }],
  ];

  it('covers every block opcode', () => {
    const covered = new Set(cases.map((c) => ScsiOp[c[0]] as number));
    const decodable: number[] = [];
    for (let op = 0; op < 256; op++) if (isBlockCommandOpcode(op)) decodable.push(op);
    expect(decodable.length).toBe(cases.length);
    for (const op of decodable) expect(covered.has(op), `0x${op.toString(16)}`).toBe(true);
  });

  for (const [op, fields, extra] of cases) {
    it(op, () => {
      const cdb = encodeBlockCdb(op, fields);
      expect(cdb[0]).toBe(ScsiOp[op]);
      expect(cdb.length).toBe(cdbLength(cdb[0]!));
      const d = mustDecode(cdb);
      expect(d.op).toBe(op);
      expect(scsiOpName(cdb)).toBe(op);
      const expected: Record<string, unknown> = {
        fua: fields.fua ?? false,
        dpo: fields.dpo ?? false,
        groupNumber: fields.groupNumber ?? 0,
        control: fields.control ?? 0,
        ...extra,
      };
      if (op !== 'UNMAP') {
        expected.lba = fields.lba;
        expected.blocks = fields.blocks;
      }
      for (const k of [
        'bytchk',
        'unmap',
        'anchor',
        'ndob',
        'immed',
        'rdprotect',
        'wrprotect',
        'vrprotect',
        'orprotect',
        'parameterListLength',
        'atomicBoundary',
        'streamId',
      ] as const) {
        if (fields[k] !== undefined) expected[k] = fields[k];
      }
      expect(d).toMatchObject(expected);
      // Re-encoding the decoded command gives the same bytes.
      expect(encodeBlockCdb(op, d)).toEqual(cdb);
    });
  }
});

describe('command-specific semantics', () => {
  it('FUA and DPO are independent bits 3 and 4 of byte 1', () => {
    for (const op of ['READ_10', 'READ_12', 'READ_16', 'WRITE_10', 'WRITE_12', 'WRITE_16'] as const) {
      expect(encodeBlockCdb(op, { lba: 1, blocks: 1, fua: true })[1]).toBe(0x08);
      expect(encodeBlockCdb(op, { lba: 1, blocks: 1, dpo: true })[1]).toBe(0x10);
      expect(mustDecode(encodeBlockCdb(op, { lba: 1, blocks: 1, fua: true }))).toMatchObject({ fua: true, dpo: false });
      expect(mustDecode(encodeBlockCdb(op, { lba: 1, blocks: 1, dpo: true }))).toMatchObject({ fua: false, dpo: true });
    }
  });

  it('VERIFY has no FUA bit and refuses one', () => {
    expect(() => encodeBlockCdb('VERIFY_10', { lba: 1, blocks: 1, fua: true })).toThrow(/no fua/);
    // Bit 3 set in a VERIFY CDB is not reported as FUA.
    expect(mustDecode(hex('2f 08 00 00 00 01 00 00 01 00')).fua).toBe(false);
  });

  it('VERIFY BYTCHK decides how much data-out there is', () => {
    const v = (bytchk: number, blocks: number): number =>
      mustDecode(encodeBlockCdb('VERIFY_16', { lba: 0, blocks, bytchk })).dataOutBlocks;
    expect(v(0, 8)).toBe(0);
    expect(v(1, 8)).toBe(8);
    expect(v(3, 8)).toBe(1);
    expect(v(3, 0)).toBe(0);
    expect(mustDecode(hex('2f 02 00 00 00 00 00 00 08 00'))).toMatchObject({ bytchk: 1, dataOutBlocks: 8 });
  });

  it('WRITE SAME carries one block unless NDOB, and 0 blocks means to the end of the medium', () => {
    const ws = mustDecode(hex('93 08 00 00 00 00 00 00 10 00 00 00 00 00 00 00'));
    expect(ws).toMatchObject({ unmap: true, anchor: false, ndob: false, blocks: 0, toEndOfMedium: true, dataOutBlocks: 1 });
    const ndob = mustDecode(hex('93 09 00 00 00 00 00 00 10 00 00 00 00 08 00 00'));
    expect(ndob).toMatchObject({ ndob: true, unmap: true, blocks: 8, dataOutBlocks: 0, toEndOfMedium: false });
    expect(mustDecode(hex('41 10 00 00 00 00 00 00 01 00'))).toMatchObject({ anchor: true, unmap: false });
    expect(buildWriteSame16(16, 32, { unmap: true })).toEqual(hex('93 08 00 00 00 00 00 00 00 10 00 00 00 20 00 00'));
    expect(() => encodeBlockCdb('WRITE_SAME_10', { lba: 1, blocks: 1, ndob: true })).toThrow(RangeError);
  });

  it('COMPARE AND WRITE reads NUMBER OF LOGICAL BLOCKS from byte 13 and carries twice that', () => {
    const d = mustDecode(hex('89 18 00 00 00 00 00 00 04 00 00 00 00 02 00 00'));
    expect(d).toMatchObject({ lba: 0x400, blocks: 2, numberOfLogicalBlocks: 2, dataOutBlocks: 4, fua: true, dpo: true });
    expect(buildCompareAndWrite(0x400, 2, { fua: true, dpo: true })).toEqual(hex('89 18 00 00 00 00 00 00 04 00 00 00 00 02 00 00'));
    expect(() => buildCompareAndWrite(0, 256)).toThrow(RangeError);
  });

  it('SYNCHRONIZE CACHE: IMMED is bit 1 and 0 blocks means to the end', () => {
    expect(buildSyncCache10()).toEqual(hex('35 00 00 00 00 00 00 00 00 00'));
    expect(mustDecode(buildSyncCache10())).toMatchObject({ lba: 0, blocks: 0, toEndOfMedium: true, immed: false });
    expect(buildSyncCache16(0x100, 8, true)).toEqual(hex('91 02 00 00 00 00 00 00 01 00 00 00 00 08 00 00'));
    expect(mustDecode(buildSyncCache16(0x100, 8, true))).toMatchObject({ immed: true, blocks: 8, toEndOfMedium: false, isWrite: false });
  });

  it('UNMAP keeps its ranges in the parameter list', () => {
    const d = mustDecode(buildUnmap(0x58));
    expect(buildUnmap(0x58)).toEqual(hex('42 00 00 00 00 00 00 00 58 00'));
    expect(d).toMatchObject({ op: 'UNMAP', parameterListLength: 0x58, anchor: false, lba: 0, blocks: 0, isWrite: true });
    expect(() => encodeBlockCdb('UNMAP', { lba: 5 })).toThrow(RangeError);
  });

  it('rejects values that do not fit their field', () => {
    expect(() => buildRead10(2 ** 32, 1)).toThrow(RangeError);
    expect(() => buildRead10(0, 0x10000)).toThrow(RangeError);
    expect(() => buildRead16(Number.MAX_SAFE_INTEGER + 1, 1)).toThrow(RangeError);
    expect(() => buildWrite16(-1, 1)).toThrow(RangeError);
    expect(() => buildWrite10(0, 1.5)).toThrow(RangeError);
    expect(() => encodeBlockCdb('READ_10', { lba: 0, blocks: 1, rdprotect: 8 })).toThrow(RangeError);
    expect(() => encodeBlockCdb('READ_10', { lba: 0, blocks: 1, wrprotect: 1 })).toThrow(/no wrprotect/);
    expect(() => encodeBlockCdb('READ_10', { lba: 0, blocks: 1, groupNumber: 64 })).toThrow(RangeError);
  });

  it('builders produce the expected bytes', () => {
    expect(buildRead10(0x12345678, 0x100, { fua: true })).toEqual(hex('28 08 12 34 56 78 00 01 00 00'));
    expect(buildWrite10(1, 2)).toEqual(hex('2a 00 00 00 00 01 00 00 02 00'));
    expect(buildRead16(2 ** 32, 1)).toEqual(hex('88 00 00 00 00 01 00 00 00 00 00 00 00 01 00 00'));
    expect(buildWrite16(0, 0x01020304, { dpo: true, groupNumber: 1 })).toEqual(
      hex('8a 10 00 00 00 00 00 00 00 00 01 02 03 04 01 00'),
    );
  });
});

describe('decodeUnmapParameterList', () => {
  // Five descriptors, as an initiator lays them out (header 00 56 00 50).
  const list = hex(`
    00 56 00 50 00 00 00 00
    00 00 00 00 12 34 56 77 00 00 00 01 00 00 00 00
    00 00 00 00 12 34 56 78 00 00 00 02 00 00 00 00
    00 00 00 00 12 34 00 00 00 00 0d 05 00 00 00 00
    00 00 00 5a 5a 5a 5a 5a 00 00 00 00 00 00 00 00
    00 00 00 00 00 a5 a5 a5 00 00 00 07 00 00 00 00`);

  it('decodes every descriptor, including zero-block ones', () => {
    expect(decodeUnmapParameterList(list)).toEqual([
      { lba: 0x12345677, blocks: 1 },
      { lba: 0x12345678, blocks: 2 },
      { lba: 0x12340000, blocks: 3333 },
      { lba: 0x5a5a5a5a5a, blocks: 0 },
      { lba: 0xa5a5a5, blocks: 7 },
    ]);
  });

  it('round trips through buildUnmapParameterList', () => {
    const extents = [
      { lba: 0, blocks: 8 },
      { lba: 2 ** 40, blocks: 0xffff_ffff },
    ];
    const buf = buildUnmapParameterList(extents);
    expect(buf.length).toBe(40);
    expect(buf.subarray(0, 4)).toEqual(hex('00 26 00 20'));
    expect(decodeUnmapParameterList(buf)).toEqual(extents);
    expect(buildUnmapParameterList([
      { lba: 0x12345677, blocks: 1 },
      { lba: 0x12345678, blocks: 2 },
      { lba: 0x12340000, blocks: 3333 },
      { lba: 0x5a5a5a5a5a, blocks: 0 },
      { lba: 0xa5a5a5, blocks: 7 },
    ])).toEqual(list);
  });

  it('an empty list unmaps nothing', () => {
    expect(decodeUnmapParameterList(Buffer.alloc(0))).toEqual([]);
    expect(decodeUnmapParameterList(hex('00 06 00 00 00 00 00 00'))).toEqual([]);
  });

  it('a list shorter than its header is a PARAMETER LIST LENGTH ERROR', () => {
    const e = catchCdbError(() => decodeUnmapParameterList(hex('00 16 00 10 00 00')));
    expect(e.code).toBe('PARAMETER_LIST_LENGTH');
    expect(e.sense).toEqual({ key: 0x5, asc: 0x1a, ascq: 0x00 });
  });

  it('inconsistent header lengths are INVALID FIELD IN PARAMETER LIST', () => {
    const bad = Buffer.from(list);
    bad.writeUInt16BE(0x20, 0); // UNMAP DATA LENGTH smaller than descriptors + 6
    const e = catchCdbError(() => decodeUnmapParameterList(bad));
    expect(e.code).toBe('INVALID_PARAMETER_LIST');
    expect(e.sense).toEqual({ key: 0x5, asc: 0x26, ascq: 0x00 });
  });

  it('ignores an incomplete last descriptor and a list cut by PARAMETER LIST LENGTH', () => {
    const partial = Buffer.from(list);
    partial.writeUInt16BE(0x56 - 8, 0);
    partial.writeUInt16BE(0x50 - 8, 2);
    expect(decodeUnmapParameterList(partial)).toHaveLength(4);
    expect(decodeUnmapParameterList(list.subarray(0, 8 + 16 * 2 + 5))).toEqual([
      { lba: 0x12345677, blocks: 1 },
      { lba: 0x12345678, blocks: 2 },
    ]);
  });

  it('rejects an LBA beyond Number.MAX_SAFE_INTEGER', () => {
    const buf = buildUnmapParameterList([{ lba: 1, blocks: 1 }]);
    buf.writeUInt32BE(0xffff_ffff, 8);
    expect(catchCdbError(() => decodeUnmapParameterList(buf)).code).toBe('LBA_OUT_OF_RANGE');
  });
});

describe('cdbLength', () => {
  it('follows the group code', () => {
    expect(cdbLength(0x00)).toBe(6);
    expect(cdbLength(0x1f)).toBe(6);
    expect(cdbLength(0x28)).toBe(10);
    expect(cdbLength(0x5f)).toBe(10);
    expect(cdbLength(0x7f)).toBeUndefined();
    expect(cdbLength(0x88)).toBe(16);
    expect(cdbLength(0xa0)).toBe(12);
    expect(cdbLength(0xc0)).toBeUndefined();
    expect(cdbLength(0xff)).toBeUndefined();
  });

  it('reads the variable-length CDB size from byte 7', () => {
    const cdb = Buffer.alloc(32);
    cdb[0] = 0x7f;
    cdb[7] = 0x18;
    expect(cdbLengthOf(cdb)).toBe(32);
    expect(cdbLengthOf(hex('7f 00 00'))).toBeUndefined();
    expect(cdbLengthOf(buildRead16(0, 1))).toBe(16);
  });
});

describe('allocation and parameter list lengths', () => {
  it('reads ALLOCATION LENGTH where the command has one', () => {
    expect(cdbAllocationLength(buildInquiry(true, 0x83, 0x1234))).toBe(0x1234);
    expect(cdbAllocationLength(buildReportLuns(0x10000))).toBe(0x10000);
    expect(cdbAllocationLength(buildReadCapacity16(32))).toBe(32);
    expect(cdbAllocationLength(buildModeSense6({ page: 0x3f, allocLen: 192 }))).toBe(192);
    expect(cdbAllocationLength(buildModeSense10({ page: 0x08, allocLen: 0x2000 }))).toBe(0x2000);
    expect(cdbAllocationLength(buildRequestSense(96))).toBe(96);
    expect(cdbAllocationLength(hex('a3 0c 00 00 00 00 00 00 02 00 00 00'))).toBe(0x200);
    expect(cdbAllocationLength(hex('a3 0a 00 00 00 00 00 00 04 00 00 00'))).toBe(0x400);
    expect(cdbAllocationLength(hex('5e 00 00 00 00 00 00 01 00 00'))).toBe(0x100);
    expect(cdbAllocationLength(hex('3c 02 00 00 00 00 01 02 03 00'))).toBe(0x010203);
    expect(cdbAllocationLength(hex('9e 12 00 00 00 00 00 00 00 00 00 00 00 18 00 00'))).toBe(0x18);
  });

  it('is undefined where the command has none', () => {
    expect(cdbAllocationLength(buildRead10(0, 1))).toBeUndefined();
    expect(cdbAllocationLength(buildReadCapacity10())).toBeUndefined();
    expect(cdbAllocationLength(hex('9e 1f 00 00 00 00 00 00 00 00 00 00 00 18 00 00'))).toBeUndefined();
    expect(cdbAllocationLength(Buffer.alloc(0))).toBeUndefined();
    expect(cdbAllocationLength(hex('12 00 00'))).toBeUndefined();
  });

  it('reads PARAMETER LIST LENGTH of data-out commands', () => {
    expect(cdbParameterListLength(hex('15 10 00 00 18 00'))).toBe(0x18);
    expect(cdbParameterListLength(hex('55 10 00 00 00 00 00 00 20 00'))).toBe(0x20);
    expect(cdbParameterListLength(hex('5f 00 00 00 00 00 00 00 18 00'))).toBe(0x18);
    expect(cdbParameterListLength(hex('3b 02 00 00 00 00 01 00 00 00'))).toBe(0x10000);
    expect(cdbParameterListLength(hex('83 00 00 00 00 00 00 00 00 00 00 00 00 40 00 00'))).toBe(0x40);
    expect(cdbParameterListLength(buildUnmap(24))).toBe(24);
    expect(cdbParameterListLength(buildRead10(0, 1))).toBeUndefined();
  });
});

describe('transferLengthBytes', () => {
  it('computes block I/O in bytes', () => {
    expect(transferLengthBytes(buildRead10(0, 8), 512)).toBe(4096);
    expect(transferLengthBytes(buildWrite16(0, 3), 4096)).toBe(12288);
    expect(transferLengthBytes(hex('08 00 00 00 00 00'), 512)).toBe(256 * 512);
    expect(transferLengthBytes(buildCompareAndWrite(0, 1), 512)).toBe(1024);
    expect(transferLengthBytes(buildWriteSame16(0, 1000), 512)).toBe(512);
    expect(transferLengthBytes(buildWriteSame16(0, 1000, { ndob: true }), 512)).toBe(0);
    expect(transferLengthBytes(buildSyncCache10(), 512)).toBe(0);
    expect(transferLengthBytes(buildUnmap(40), 512)).toBe(40);
  });

  it('uses allocation / parameter list lengths and fixed sizes otherwise', () => {
    expect(transferLengthBytes(buildInquiry(false, 0, 36), 512)).toBe(36);
    expect(transferLengthBytes(buildReadCapacity10(), 512)).toBe(8);
    expect(transferLengthBytes(buildTestUnitReady(), 512)).toBe(0);
    expect(transferLengthBytes(hex('15 10 00 00 18 00'), 512)).toBe(0x18);
    expect(transferLengthBytes(hex('c1 00 00 00 00 00 00 00 00 00'), 512)).toBeUndefined();
  });
});

describe('SPC builders', () => {
  it('INQUIRY', () => {
    expect(buildInquiry(false, 0, 96)).toEqual(hex('12 00 00 00 60 00'));
    expect(buildInquiry(true, 0x80, 0x100)).toEqual(hex('12 01 80 01 00 00'));
    expect(() => buildInquiry(false, 0x83, 96)).toThrow(RangeError);
  });

  it('READ CAPACITY, REPORT LUNS, TEST UNIT READY, REQUEST SENSE', () => {
    expect(buildReadCapacity10()).toEqual(hex('25 00 00 00 00 00 00 00 00 00'));
    expect(buildReadCapacity16()).toEqual(hex('9e 10 00 00 00 00 00 00 00 00 00 00 00 20 00 00'));
    expect(buildReportLuns(0x1000)).toEqual(hex('a0 00 00 00 00 00 00 00 10 00 00 00'));
    expect(buildReportLuns(16, 2)[2]).toBe(2);
    expect(() => buildReportLuns(8)).toThrow(RangeError);
    expect(buildTestUnitReady()).toEqual(hex('00 00 00 00 00 00'));
    expect(buildRequestSense(18, true)).toEqual(hex('03 01 00 00 12 00'));
  });

  it('MODE SENSE(6) and (10)', () => {
    expect(buildModeSense6({ page: 0x3f, pageControl: 0, allocLen: 0xff })).toEqual(hex('1a 00 3f 00 ff 00'));
    expect(buildModeSense6({ page: 0x08, pageControl: 1, dbd: true, subpage: 0, allocLen: 32 })).toEqual(
      hex('1a 08 48 00 20 00'),
    );
    expect(buildModeSense10({ page: 0x0a, subpage: 0xff, pageControl: 2, llbaa: true, allocLen: 0x400 })).toEqual(
      hex('5a 10 8a ff 00 00 00 04 00 00'),
    );
    expect(() => buildModeSense6({ page: 0x40, allocLen: 4 })).toThrow(RangeError);
    expect(() => buildModeSense6({ page: 0x08, allocLen: 256 })).toThrow(RangeError);
  });
});

describe('scsiOpName', () => {
  it('names plain opcodes', () => {
    expect(scsiOpName(buildTestUnitReady())).toBe('TEST_UNIT_READY');
    expect(scsiOpName(buildInquiry(false, 0, 36))).toBe('INQUIRY');
    expect(scsiOpName(buildReadCapacity10())).toBe('READ_CAPACITY_10');
    expect(scsiOpName(buildReportLuns(16))).toBe('REPORT_LUNS');
    expect(scsiOpName(hex('5f 01'))).toBe('PERSISTENT_RESERVE_OUT');
    expect(scsiOpName(hex('83 00'))).toBe('EXTENDED_COPY');
    expect(scsiOpName(hex('84 00'))).toBe('RECEIVE_COPY_RESULTS');
  });

  it('resolves service actions, falling back to the generic name', () => {
    expect(scsiOpName(buildReadCapacity16())).toBe('READ_CAPACITY_16');
    expect(scsiOpName(hex('9e 12'))).toBe('GET_LBA_STATUS');
    expect(scsiOpName(hex('9e 1f'))).toBe('SERVICE_ACTION_IN_16');
    expect(scsiOpName(hex('9e'))).toBe('SERVICE_ACTION_IN_16');
    expect(scsiOpName(hex('a3 0c'))).toBe('REPORT_SUPPORTED_OPERATION_CODES');
    expect(scsiOpName(hex('a3 0a'))).toBe('REPORT_TARGET_PORT_GROUPS');
    expect(scsiOpName(hex('a3 1e'))).toBe('MAINTENANCE_IN');
    expect(scsiOpName(hex('a4 0a'))).toBe('SET_TARGET_PORT_GROUPS');
    expect(scsiOpName(hex('83 10'))).toBe('POPULATE_TOKEN');
    expect(scsiOpName(hex('83 11'))).toBe('WRITE_USING_TOKEN');
    expect(scsiOpName(hex('83 1f'))).toBe('THIRD_PARTY_COPY_OUT');
    expect(scsiOpName(hex('84 07'))).toBe('RECEIVE_ROD_TOKEN_INFORMATION');
    expect(scsiOpName(hex('84 1f'))).toBe('THIRD_PARTY_COPY_IN');
    expect(scsiOpName(hex('9f 11'))).toBe('WRITE_LONG_16');
  });

  it('names 32-byte variable-length commands by their service action', () => {
    const cdb = Buffer.alloc(32);
    cdb[0] = 0x7f;
    cdb[7] = 0x18;
    cdb.writeUInt16BE(0x000b, 8);
    expect(scsiOpName(cdb)).toBe('WRITE_32');
    cdb.writeUInt16BE(0x0009, 8);
    expect(scsiOpName(cdb)).toBe('READ_32');
    cdb.writeUInt16BE(0x0800, 8);
    expect(scsiOpName(cdb)).toBe('VARIABLE_LENGTH');
  });

  it('gives UNKNOWN_0xNN for unassigned opcodes and EMPTY_CDB for nothing', () => {
    expect(scsiOpName(hex('c1 00'))).toBe('UNKNOWN_0xc1');
    expect(scsiOpName(hex('02'))).toBe('UNKNOWN_0x02');
    expect(scsiOpName(Buffer.alloc(0))).toBe('EMPTY_CDB');
  });

  it('names are uppercase with underscores', () => {
    for (let op = 0; op < 256; op++) {
      expect(scsiOpName(Buffer.from([op, 0, 0, 0, 0, 0, 0, 0, 0, 0]))).toMatch(/^[A-Z0-9_]+(0x[0-9a-f]{2})?$/);
    }
  });
});

describe('scsiOpModifiesMedium', () => {
  it('flags every way of changing user data', () => {
    const writes = [
      buildWrite10(0, 1),
      buildWriteSame16(0, 1),
      buildUnmap(24),
      buildCompareAndWrite(0, 1),
      hex('04 00 00 00 00 00'), // FORMAT UNIT
      hex('48 01 00 00 00 00 00 00 00 00'), // SANITIZE
      hex('83 00'),
      hex('83 11'),
      hex('9f 11'),
      hex('9f 12'),
    ];
    for (const cdb of writes) expect(scsiOpModifiesMedium(cdb), scsiOpName(cdb)).toBe(true);
    const w32 = Buffer.alloc(32);
    w32[0] = 0x7f;
    w32.writeUInt16BE(0x000d, 8);
    expect(scsiOpModifiesMedium(w32)).toBe(true);
  });

  it('does not flag reads and housekeeping', () => {
    const reads = [
      buildRead16(0, 1),
      buildSyncCache10(),
      buildInquiry(false, 0, 36),
      buildReadCapacity16(),
      hex('83 10'), // POPULATE TOKEN only reads
      hex('2f 00 00 00 00 00 00 00 01 00'),
      Buffer.alloc(0),
    ];
    for (const cdb of reads) expect(scsiOpModifiesMedium(cdb), scsiOpName(cdb)).toBe(false);
  });
});

describe('status codes', () => {
  it('have their SAM values and stable names', () => {
    expect(ScsiStatus).toEqual({
      GOOD: 0x00,
      CHECK_CONDITION: 0x02,
      CONDITION_MET: 0x04,
      BUSY: 0x08,
      RESERVATION_CONFLICT: 0x18,
      TASK_SET_FULL: 0x28,
      ACA_ACTIVE: 0x30,
      TASK_ABORTED: 0x40,
    });
    expect(scsiStatusName(0x02)).toBe('CHECK_CONDITION');
    expect(scsiStatusName(0x18)).toBe('RESERVATION_CONFLICT');
    expect(scsiStatusName(0x22)).toBe('COMMAND_TERMINATED');
    expect(scsiStatusName(0x3e)).toBe('UNKNOWN_0x3e');
    expect(iscsiResponseName(0x00)).toBe('COMMAND_COMPLETED_AT_TARGET');
    expect(iscsiResponseName(0x01)).toBe('TARGET_FAILURE');
    expect(iscsiResponseName(0x85)).toBe('VENDOR_0x85');
    expect(iscsiResponseName(0x02)).toBe('RESERVED_0x02');
  });
});
