/**
 * Block command CDBs (SBC-3/SBC-4): decoding on the target side, building on
 * the initiator side, plus the SPC helpers that tell how much data a CDB
 * moves. Everything is big-endian, as in every SCSI CDB.
 *
 * LBAs are plain numbers. A 64-bit LBA above Number.MAX_SAFE_INTEGER (2^53-1,
 * i.e. 4 EiB of 512-byte blocks) cannot be addressed by any real medium, so
 * it is rejected as LOGICAL BLOCK ADDRESS OUT OF RANGE rather than carried
 * around as a bigint.
 */

import {
  MaintenanceIn,
  MaintenanceOut,
  ScsiOp,
  ServiceActionIn16,
  cdbServiceAction,
} from './opcodes.ts';
import { Asc, SenseKey } from './sense.ts';
import type { SenseCondition } from './sense.ts';

export type BlockOp =
  | 'READ_6'
  | 'READ_10'
  | 'READ_12'
  | 'READ_16'
  | 'WRITE_6'
  | 'WRITE_10'
  | 'WRITE_12'
  | 'WRITE_16'
  | 'VERIFY_10'
  | 'VERIFY_12'
  | 'VERIFY_16'
  | 'WRITE_AND_VERIFY_10'
  | 'WRITE_AND_VERIFY_12'
  | 'WRITE_AND_VERIFY_16'
  | 'WRITE_SAME_10'
  | 'WRITE_SAME_16'
  | 'UNMAP'
  | 'COMPARE_AND_WRITE'
  | 'ORWRITE_16'
  | 'WRITE_ATOMIC_16'
  | 'WRITE_STREAM_16'
  | 'SYNCHRONIZE_CACHE_10'
  | 'SYNCHRONIZE_CACHE_16'
  | 'PRE_FETCH_10'
  | 'PRE_FETCH_16';

export type BlockCommandKind =
  | 'read'
  | 'write'
  | 'verify'
  | 'write-and-verify'
  | 'write-same'
  | 'unmap'
  | 'compare-and-write'
  | 'orwrite'
  | 'synchronize-cache'
  | 'pre-fetch';

/** A decoded block command CDB. Optional fields are present exactly when the command has them. */
export interface BlockCdb {
  readonly op: BlockOp;
  readonly opcode: number;
  readonly kind: BlockCommandKind;
  /** Bytes of CDB this command occupies (6, 10, 12 or 16). */
  readonly cdbLength: number;
  /** First LBA; 0 for UNMAP, whose ranges are in the parameter list. */
  readonly lba: number;
  /**
   * Logical blocks addressed: TRANSFER LENGTH, VERIFICATION LENGTH, NUMBER OF
   * LOGICAL BLOCKS or PREFETCH LENGTH. READ(6)/WRITE(6) length 0 is already
   * turned into 256 here. 0 on other commands means no blocks, except where
   * `toEndOfMedium` is set.
   */
  readonly blocks: number;
  readonly fua: boolean;
  readonly dpo: boolean;
  readonly groupNumber: number;
  readonly control: number;
  /** The command may change the medium's contents. */
  readonly isWrite: boolean;
  /** Logical blocks of data-in the command returns. */
  readonly dataInBlocks: number;
  /** Logical blocks of data-out the command carries (UNMAP carries a parameter list instead). */
  readonly dataOutBlocks: number;
  /**
   * `blocks` is 0 and means "from lba to the last LBA" (SYNCHRONIZE CACHE,
   * PRE-FETCH, and WRITE SAME when the Block Limits VPD page has WSNZ=0).
   */
  readonly toEndOfMedium: boolean;
  /** VERIFY, WRITE AND VERIFY: 0 = medium check only, 1 = compare all blocks, 3 = compare one block to each LBA. */
  readonly bytchk?: number;
  readonly unmap?: boolean;
  /** WRITE SAME and UNMAP. */
  readonly anchor?: boolean;
  /** WRITE SAME(16): no data-out, the device writes zeroes / the provisioning pattern. */
  readonly ndob?: boolean;
  /** SYNCHRONIZE CACHE, PRE-FETCH: report status before the operation completes. */
  readonly immed?: boolean;
  readonly rdprotect?: number;
  readonly wrprotect?: number;
  readonly vrprotect?: number;
  readonly orprotect?: number;
  /** COMPARE AND WRITE: the CDB's NUMBER OF LOGICAL BLOCKS (data-out is twice this). */
  readonly numberOfLogicalBlocks?: number;
  /** UNMAP: bytes of parameter list in data-out. */
  readonly parameterListLength?: number;
  readonly atomicBoundary?: number;
  readonly streamId?: number;
}

/** Fields an initiator sets when building a block CDB; see BlockCdb for their meaning. */
export interface BlockCdbFields {
  readonly lba?: number;
  /** For READ(6)/WRITE(6) 1..256; for COMPARE AND WRITE the NUMBER OF LOGICAL BLOCKS. */
  readonly blocks?: number;
  readonly fua?: boolean;
  readonly dpo?: boolean;
  readonly groupNumber?: number;
  readonly control?: number;
  readonly bytchk?: number;
  readonly unmap?: boolean;
  readonly anchor?: boolean;
  readonly ndob?: boolean;
  readonly immed?: boolean;
  readonly rdprotect?: number;
  readonly wrprotect?: number;
  readonly vrprotect?: number;
  readonly orprotect?: number;
  readonly parameterListLength?: number;
  readonly atomicBoundary?: number;
  readonly streamId?: number;
}

export type ScsiCdbErrorCode = 'CDB_TOO_SHORT' | 'LBA_OUT_OF_RANGE' | 'PARAMETER_LIST_LENGTH' | 'INVALID_PARAMETER_LIST';

/**
 * A CDB or parameter list the target must reject. `sense` is the check
 * condition to report; `fieldPointer` is the offending byte (in the CDB for
 * CDB errors, in the parameter list for parameter list errors).
 */
export class ScsiCdbError extends Error {
  readonly code: ScsiCdbErrorCode;
  readonly sense: SenseCondition;
  readonly fieldPointer: number | undefined;
  constructor(code: ScsiCdbErrorCode, message: string, sense: SenseCondition, fieldPointer?: number) {
    super(message);
    this.name = 'ScsiCdbError';
    this.code = code;
    this.sense = sense;
    this.fieldPointer = fieldPointer;
  }
}

type Flag = 'fua' | 'dpo' | 'bytchk' | 'unmap' | 'anchor' | 'ndob' | 'immed';
type ProtectField = 'rdprotect' | 'wrprotect' | 'vrprotect' | 'orprotect';

interface Field {
  readonly offset: number;
  readonly bytes: 1 | 2 | 3 | 4 | 8;
}

interface Layout {
  readonly op: BlockOp;
  readonly opcode: number;
  readonly length: 6 | 10 | 12 | 16;
  readonly kind: BlockCommandKind;
  readonly lba?: Field;
  readonly len?: Field;
  readonly group?: number;
  readonly protect?: ProtectField;
  readonly flags: readonly Flag[];
  readonly extra?: { readonly name: 'atomicBoundary' | 'streamId' | 'parameterListLength'; readonly field: Field };
}

const L10 = { lba: { offset: 2, bytes: 4 }, len: { offset: 7, bytes: 2 }, group: 6, length: 10 } as const;
const L12 = { lba: { offset: 2, bytes: 4 }, len: { offset: 6, bytes: 4 }, group: 10, length: 12 } as const;
const L16 = { lba: { offset: 2, bytes: 8 }, len: { offset: 10, bytes: 4 }, group: 14, length: 16 } as const;

const layouts: readonly Layout[] = [
  { op: 'READ_6', opcode: ScsiOp.READ_6, length: 6, kind: 'read', flags: [] },
  { op: 'WRITE_6', opcode: ScsiOp.WRITE_6, length: 6, kind: 'write', flags: [] },
  { op: 'READ_10', opcode: ScsiOp.READ_10, kind: 'read', protect: 'rdprotect', flags: ['fua', 'dpo'], ...L10 },
  { op: 'READ_12', opcode: ScsiOp.READ_12, kind: 'read', protect: 'rdprotect', flags: ['fua', 'dpo'], ...L12 },
  { op: 'READ_16', opcode: ScsiOp.READ_16, kind: 'read', protect: 'rdprotect', flags: ['fua', 'dpo'], ...L16 },
  { op: 'WRITE_10', opcode: ScsiOp.WRITE_10, kind: 'write', protect: 'wrprotect', flags: ['fua', 'dpo'], ...L10 },
  { op: 'WRITE_12', opcode: ScsiOp.WRITE_12, kind: 'write', protect: 'wrprotect', flags: ['fua', 'dpo'], ...L12 },
  { op: 'WRITE_16', opcode: ScsiOp.WRITE_16, kind: 'write', protect: 'wrprotect', flags: ['fua', 'dpo'], ...L16 },
  { op: 'VERIFY_10', opcode: ScsiOp.VERIFY_10, kind: 'verify', protect: 'vrprotect', flags: ['dpo', 'bytchk'], ...L10 },
  { op: 'VERIFY_12', opcode: ScsiOp.VERIFY_12, kind: 'verify', protect: 'vrprotect', flags: ['dpo', 'bytchk'], ...L12 },
  { op: 'VERIFY_16', opcode: ScsiOp.VERIFY_16, kind: 'verify', protect: 'vrprotect', flags: ['dpo', 'bytchk'], ...L16 },
  {
    op: 'WRITE_AND_VERIFY_10',
    opcode: ScsiOp.WRITE_AND_VERIFY_10,
    kind: 'write-and-verify',
    protect: 'wrprotect',
    flags: ['dpo', 'bytchk'],
    ...L10,
  },
  {
    op: 'WRITE_AND_VERIFY_12',
    opcode: ScsiOp.WRITE_AND_VERIFY_12,
    kind: 'write-and-verify',
    protect: 'wrprotect',
    flags: ['dpo', 'bytchk'],
    ...L12,
  },
  {
    op: 'WRITE_AND_VERIFY_16',
    opcode: ScsiOp.WRITE_AND_VERIFY_16,
    kind: 'write-and-verify',
    protect: 'wrprotect',
    flags: ['dpo', 'bytchk'],
    ...L16,
  },
  {
    op: 'WRITE_SAME_10',
    opcode: ScsiOp.WRITE_SAME_10,
    kind: 'write-same',
    protect: 'wrprotect',
    flags: ['anchor', 'unmap'],
    ...L10,
  },
  {
    op: 'WRITE_SAME_16',
    opcode: ScsiOp.WRITE_SAME_16,
    kind: 'write-same',
    protect: 'wrprotect',
    flags: ['anchor', 'unmap', 'ndob'],
    ...L16,
  },
  {
    op: 'UNMAP',
    opcode: ScsiOp.UNMAP,
    length: 10,
    kind: 'unmap',
    group: 6,
    flags: ['anchor'],
    extra: { name: 'parameterListLength', field: { offset: 7, bytes: 2 } },
  },
  {
    op: 'COMPARE_AND_WRITE',
    opcode: ScsiOp.COMPARE_AND_WRITE,
    length: 16,
    kind: 'compare-and-write',
    lba: { offset: 2, bytes: 8 },
    len: { offset: 13, bytes: 1 },
    group: 14,
    protect: 'wrprotect',
    flags: ['fua', 'dpo'],
  },
  { op: 'ORWRITE_16', opcode: ScsiOp.ORWRITE_16, kind: 'orwrite', protect: 'orprotect', flags: ['fua', 'dpo'], ...L16 },
  {
    op: 'WRITE_ATOMIC_16',
    opcode: ScsiOp.WRITE_ATOMIC_16,
    length: 16,
    kind: 'write',
    lba: { offset: 2, bytes: 8 },
    len: { offset: 12, bytes: 2 },
    group: 14,
    protect: 'wrprotect',
    flags: ['fua', 'dpo'],
    extra: { name: 'atomicBoundary', field: { offset: 10, bytes: 2 } },
  },
  {
    op: 'WRITE_STREAM_16',
    opcode: ScsiOp.WRITE_STREAM_16,
    length: 16,
    kind: 'write',
    lba: { offset: 2, bytes: 8 },
    len: { offset: 12, bytes: 2 },
    group: 14,
    protect: 'wrprotect',
    flags: ['fua', 'dpo'],
    extra: { name: 'streamId', field: { offset: 10, bytes: 2 } },
  },
  { op: 'SYNCHRONIZE_CACHE_10', opcode: ScsiOp.SYNCHRONIZE_CACHE_10, kind: 'synchronize-cache', flags: ['immed'], ...L10 },
  { op: 'SYNCHRONIZE_CACHE_16', opcode: ScsiOp.SYNCHRONIZE_CACHE_16, kind: 'synchronize-cache', flags: ['immed'], ...L16 },
  { op: 'PRE_FETCH_10', opcode: ScsiOp.PRE_FETCH_10, kind: 'pre-fetch', flags: ['immed'], ...L10 },
  { op: 'PRE_FETCH_16', opcode: ScsiOp.PRE_FETCH_16, kind: 'pre-fetch', flags: ['immed'], ...L16 },
];

const layoutByOpcode = new Map<number, Layout>(layouts.map((l) => [l.opcode, l]));
const layoutByOp = new Map<BlockOp, Layout>(layouts.map((l) => [l.op, l]));

// Byte 1 bit positions. ANCHOR sits at bit 4 in WRITE SAME but bit 0 in UNMAP.
const FUA = 0x08;
const DPO = 0x10;
const IMMED = 0x02;
const NDOB = 0x01;
const WS_UNMAP = 0x08;
const WS_ANCHOR = 0x10;
const UNMAP_ANCHOR = 0x01;
// SBC-4 widened GROUP NUMBER to six bits; SBC-3's five-bit values fit unchanged.
const GROUP_MASK = 0x3f;
const MAX_SAFE_HIGH_WORD = 0x1fffff; // high 32 bits of Number.MAX_SAFE_INTEGER

/** Whether the opcode is one `decodeBlockCdb` understands. */
export function isBlockCommandOpcode(opcode: number): boolean {
  return layoutByOpcode.has(opcode);
}

function readField(cdb: Buffer, f: Field): number {
  switch (f.bytes) {
    case 1:
      return cdb[f.offset]!;
    case 2:
      return cdb.readUInt16BE(f.offset);
    case 3:
      return cdb.readUIntBE(f.offset, 3);
    case 4:
      return cdb.readUInt32BE(f.offset);
    case 8: {
      const hi = cdb.readUInt32BE(f.offset);
      const lo = cdb.readUInt32BE(f.offset + 4);
      if (hi > MAX_SAFE_HIGH_WORD) {
        throw new ScsiCdbError(
          'LBA_OUT_OF_RANGE',
          `LBA 0x${cdb.subarray(f.offset, f.offset + 8).toString('hex')} exceeds Number.MAX_SAFE_INTEGER`,
          { key: SenseKey.ILLEGAL_REQUEST, ...Asc.LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE },
          f.offset,
        );
      }
      return hi * 0x1_0000_0000 + lo;
    }
  }
}

/**
 * Decodes a block I/O CDB. Returns undefined for any opcode that is not one
 * of the block commands listed in BlockOp. The buffer may be longer than the
 * command (iSCSI always carries at least 16 CDB bytes); a shorter one throws
 * ScsiCdbError('CDB_TOO_SHORT'), an LBA above 2^53-1 ScsiCdbError('LBA_OUT_OF_RANGE').
 */
export function decodeBlockCdb(cdb: Buffer): BlockCdb | undefined {
  if (cdb.length === 0) return undefined;
  const layout = layoutByOpcode.get(cdb[0]!);
  if (!layout) return undefined;
  if (cdb.length < layout.length) {
    throw new ScsiCdbError(
      'CDB_TOO_SHORT',
      `${layout.op} needs ${layout.length} CDB bytes, got ${cdb.length}`,
      { key: SenseKey.ILLEGAL_REQUEST, ...Asc.INVALID_FIELD_IN_CDB },
      cdb.length,
    );
  }
  const b1 = cdb[1]!;
  let lba: number;
  let blocks: number;
  if (layout.length === 6) {
    lba = ((b1 & 0x1f) << 16) | cdb.readUInt16BE(2);
    // READ(6)/WRITE(6) cannot express zero blocks: 0 means 256.
    blocks = cdb[4] === 0 ? 256 : cdb[4]!;
  } else {
    lba = layout.lba ? readField(cdb, layout.lba) : 0;
    blocks = layout.len ? readField(cdb, layout.len) : 0;
  }
  // No local helper closure: the TypeScript loader names every closure it creates (a property
  // definition per call), and this runs for every command.
  const flags = layout.flags;
  const kind = layout.kind;
  const bytchk = flags.includes('bytchk') ? (b1 >> 1) & 0x03 : undefined;
  const ndob = flags.includes('ndob') ? (b1 & NDOB) !== 0 : undefined;

  let dataOutBlocks = 0;
  switch (kind) {
    case 'write':
    case 'write-and-verify':
    case 'orwrite':
      dataOutBlocks = blocks;
      break;
    case 'write-same':
      dataOutBlocks = ndob ? 0 : 1;
      break;
    case 'compare-and-write':
      dataOutBlocks = 2 * blocks;
      break;
    case 'verify':
      dataOutBlocks = bytchk === 1 ? blocks : bytchk === 3 && blocks > 0 ? 1 : 0;
      break;
    default:
      break;
  }

  const out: Record<string, unknown> = {
    op: layout.op,
    opcode: layout.opcode,
    kind,
    cdbLength: layout.length,
    lba,
    blocks,
    fua: flags.includes('fua') && (b1 & FUA) !== 0,
    dpo: flags.includes('dpo') && (b1 & DPO) !== 0,
    groupNumber: layout.group !== undefined ? cdb[layout.group]! & GROUP_MASK : 0,
    control: cdb[layout.length - 1]!,
    isWrite:
      kind === 'write' ||
      kind === 'write-and-verify' ||
      kind === 'write-same' ||
      kind === 'unmap' ||
      kind === 'compare-and-write' ||
      kind === 'orwrite',
    dataInBlocks: kind === 'read' ? blocks : 0,
    dataOutBlocks,
    toEndOfMedium:
      blocks === 0 && (kind === 'synchronize-cache' || kind === 'pre-fetch' || kind === 'write-same'),
  };
  if (bytchk !== undefined) out.bytchk = bytchk;
  if (kind === 'write-same') {
    out.unmap = (b1 & WS_UNMAP) !== 0;
    out.anchor = (b1 & WS_ANCHOR) !== 0;
  }
  if (kind === 'unmap') out.anchor = (b1 & UNMAP_ANCHOR) !== 0;
  if (ndob !== undefined) out.ndob = ndob;
  if (flags.includes('immed')) out.immed = (b1 & IMMED) !== 0;
  if (layout.protect) out[layout.protect] = b1 >> 5;
  if (kind === 'compare-and-write') out.numberOfLogicalBlocks = blocks;
  if (layout.extra) out[layout.extra.name] = readField(cdb, layout.extra.field);
  return out as unknown as BlockCdb;
}

function checkUint(name: string, v: number, max: number): number {
  if (!Number.isSafeInteger(v) || v < 0 || v > max) {
    throw new RangeError(`${name} must be an integer in 0..${max}, got ${v}`);
  }
  return v;
}

function writeField(cdb: Buffer, f: Field, name: string, v: number): void {
  switch (f.bytes) {
    case 1:
      cdb[f.offset] = checkUint(name, v, 0xff);
      break;
    case 2:
      cdb.writeUInt16BE(checkUint(name, v, 0xffff), f.offset);
      break;
    case 3:
      cdb.writeUIntBE(checkUint(name, v, 0xff_ffff), f.offset, 3);
      break;
    case 4:
      cdb.writeUInt32BE(checkUint(name, v, 0xffff_ffff), f.offset);
      break;
    case 8:
      cdb.writeBigUInt64BE(BigInt(checkUint(name, v, Number.MAX_SAFE_INTEGER)), f.offset);
      break;
  }
}

const allFieldNames: readonly (keyof BlockCdbFields)[] = [
  'fua',
  'dpo',
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
  'groupNumber',
];

/**
 * Builds a block command CDB. Throws RangeError when a value does not fit
 * its field or when a field is set that this command does not have (e.g.
 * FUA on VERIFY), so that a caller's intent is never silently dropped.
 */
export function encodeBlockCdb(op: BlockOp, fields: BlockCdbFields = {}): Buffer {
  const layout = layoutByOp.get(op);
  if (!layout) throw new RangeError(`unknown block command ${String(op)}`);
  const carried = new Set<keyof BlockCdbFields>(layout.flags);
  if (layout.protect) carried.add(layout.protect);
  if (layout.extra) carried.add(layout.extra.name);
  if (layout.group !== undefined) carried.add('groupNumber');
  for (const name of allFieldNames) {
    const v = fields[name];
    if (v !== undefined && v !== false && v !== 0 && !carried.has(name)) {
      throw new RangeError(`${op} has no ${name} field`);
    }
  }

  const cdb = Buffer.alloc(layout.length);
  cdb[0] = layout.opcode;
  const lba = fields.lba ?? 0;
  const blocks = fields.blocks ?? 0;
  let b1 = 0;
  if (layout.length === 6) {
    checkUint('lba', lba, 0x1f_ffff);
    if (!Number.isInteger(blocks) || blocks < 1 || blocks > 256) {
      throw new RangeError(`${op} transfers 1..256 blocks, got ${blocks}`);
    }
    b1 = lba >> 16;
    cdb.writeUInt16BE(lba & 0xffff, 2);
    cdb[4] = blocks === 256 ? 0 : blocks;
  } else {
    if (layout.lba) writeField(cdb, layout.lba, 'lba', lba);
    else if (fields.lba) throw new RangeError(`${op} has no lba field`);
    if (layout.len) writeField(cdb, layout.len, 'blocks', blocks);
    else if (fields.blocks) throw new RangeError(`${op} has no blocks field`);
  }
  if (fields.fua) b1 |= FUA;
  if (fields.dpo) b1 |= DPO;
  if (fields.immed) b1 |= IMMED;
  if (fields.bytchk !== undefined) b1 |= checkUint('bytchk', fields.bytchk, 3) << 1;
  if (layout.kind === 'write-same') {
    if (fields.unmap) b1 |= WS_UNMAP;
    if (fields.anchor) b1 |= WS_ANCHOR;
    if (fields.ndob) b1 |= NDOB;
  } else if (layout.kind === 'unmap' && fields.anchor) {
    b1 |= UNMAP_ANCHOR;
  }
  if (layout.protect) b1 |= checkUint(layout.protect, fields[layout.protect] ?? 0, 7) << 5;
  cdb[1] = b1;
  if (layout.group !== undefined) cdb[layout.group] = checkUint('groupNumber', fields.groupNumber ?? 0, GROUP_MASK);
  if (layout.extra) writeField(cdb, layout.extra.field, layout.extra.name, fields[layout.extra.name] ?? 0);
  cdb[layout.length - 1] = checkUint('control', fields.control ?? 0, 0xff);
  return cdb;
}

export interface UnmapExtent {
  readonly lba: number;
  readonly blocks: number;
}

function parameterListError(code: 'PARAMETER_LIST_LENGTH' | 'INVALID_PARAMETER_LIST', message: string, fieldPointer: number): ScsiCdbError {
  const c = code === 'PARAMETER_LIST_LENGTH' ? Asc.PARAMETER_LIST_LENGTH_ERROR : Asc.INVALID_FIELD_IN_PARAMETER_LIST;
  return new ScsiCdbError(code, message, { key: SenseKey.ILLEGAL_REQUEST, ...c }, fieldPointer);
}

/**
 * Decodes an UNMAP parameter list (SBC-3/SBC-4): an 8-byte header then
 * 16-byte block descriptors. An empty list is valid and unmaps nothing.
 *
 * Per SBC, a PARAMETER LIST LENGTH that cuts the list short is not an error
 * (the complete descriptors received are used) and an incomplete last
 * descriptor is ignored. A list shorter than its header is a PARAMETER LIST
 * LENGTH ERROR; a header whose two lengths disagree (UNMAP DATA LENGTH below
 * BLOCK DESCRIPTOR DATA LENGTH + 6) is rejected as INVALID FIELD IN
 * PARAMETER LIST rather than guessed at, since unmapping the wrong LBAs
 * destroys data. Descriptors with zero blocks are returned as they are.
 */
export function decodeUnmapParameterList(buf: Buffer): UnmapExtent[] {
  if (buf.length === 0) return [];
  if (buf.length < 8) {
    throw parameterListError('PARAMETER_LIST_LENGTH', `UNMAP parameter list of ${buf.length} bytes is shorter than its 8-byte header`, 0);
  }
  const dataLength = buf.readUInt16BE(0);
  const descriptorLength = buf.readUInt16BE(2);
  if (dataLength < descriptorLength + 6) {
    throw parameterListError(
      'INVALID_PARAMETER_LIST',
      `UNMAP DATA LENGTH ${dataLength} is inconsistent with BLOCK DESCRIPTOR DATA LENGTH ${descriptorLength}`,
      0,
    );
  }
  const available = Math.min(descriptorLength, buf.length - 8);
  const count = Math.floor(available / 16);
  const out: UnmapExtent[] = [];
  for (let i = 0; i < count; i++) {
    const off = 8 + i * 16;
    const lba = readField(buf, { offset: off, bytes: 8 });
    out.push({ lba, blocks: buf.readUInt32BE(off + 8) });
  }
  return out;
}

/** Builds an UNMAP parameter list for the given extents. */
export function buildUnmapParameterList(extents: readonly UnmapExtent[]): Buffer {
  const descriptorLength = extents.length * 16;
  if (descriptorLength + 6 > 0xffff) throw new RangeError(`too many UNMAP descriptors (${extents.length})`);
  const buf = Buffer.alloc(8 + descriptorLength);
  buf.writeUInt16BE(descriptorLength + 6, 0);
  buf.writeUInt16BE(descriptorLength, 2);
  extents.forEach((e, i) => {
    const off = 8 + i * 16;
    writeField(buf, { offset: off, bytes: 8 }, 'lba', e.lba);
    writeField(buf, { offset: off + 8, bytes: 4 }, 'blocks', e.blocks);
  });
  return buf;
}

export interface RwOptions {
  readonly fua?: boolean;
  readonly dpo?: boolean;
  readonly groupNumber?: number;
  readonly control?: number;
}

export function buildRead10(lba: number, blocks: number, opts: RwOptions = {}): Buffer {
  return encodeBlockCdb('READ_10', { ...opts, lba, blocks });
}

export function buildWrite10(lba: number, blocks: number, opts: RwOptions = {}): Buffer {
  return encodeBlockCdb('WRITE_10', { ...opts, lba, blocks });
}

export function buildRead16(lba: number, blocks: number, opts: RwOptions = {}): Buffer {
  return encodeBlockCdb('READ_16', { ...opts, lba, blocks });
}

export function buildWrite16(lba: number, blocks: number, opts: RwOptions = {}): Buffer {
  return encodeBlockCdb('WRITE_16', { ...opts, lba, blocks });
}

/** blocks 0 flushes from lba to the end of the medium. */
export function buildSyncCache10(lba = 0, blocks = 0, immed = false): Buffer {
  return encodeBlockCdb('SYNCHRONIZE_CACHE_10', { lba, blocks, immed });
}

/** blocks 0 flushes from lba to the end of the medium. */
export function buildSyncCache16(lba = 0, blocks = 0, immed = false): Buffer {
  return encodeBlockCdb('SYNCHRONIZE_CACHE_16', { lba, blocks, immed });
}

export function buildWriteSame16(
  lba: number,
  blocks: number,
  opts: { readonly unmap?: boolean; readonly anchor?: boolean; readonly ndob?: boolean } = {},
): Buffer {
  return encodeBlockCdb('WRITE_SAME_16', { ...opts, lba, blocks });
}

export function buildUnmap(parameterListLength: number, anchor = false): Buffer {
  return encodeBlockCdb('UNMAP', { parameterListLength, anchor });
}

/** `blocks` is the NUMBER OF LOGICAL BLOCKS; the data-out must hold 2 × blocks (compare data then write data). */
export function buildCompareAndWrite(lba: number, blocks: number, opts: RwOptions = {}): Buffer {
  return encodeBlockCdb('COMPARE_AND_WRITE', { ...opts, lba, blocks });
}

export function buildTestUnitReady(): Buffer {
  return Buffer.alloc(6);
}

/** INQUIRY; with evpd false the page code must be 0 (standard INQUIRY data). */
export function buildInquiry(evpd: boolean, page: number, allocLen: number): Buffer {
  checkUint('page', page, 0xff);
  if (!evpd && page !== 0) throw new RangeError('INQUIRY page code must be 0 when EVPD is 0');
  const cdb = Buffer.alloc(6);
  cdb[0] = ScsiOp.INQUIRY;
  cdb[1] = evpd ? 0x01 : 0;
  cdb[2] = page;
  cdb.writeUInt16BE(checkUint('allocLen', allocLen, 0xffff), 3);
  return cdb;
}

export function buildReadCapacity10(): Buffer {
  const cdb = Buffer.alloc(10);
  cdb[0] = ScsiOp.READ_CAPACITY_10;
  return cdb;
}

/** READ CAPACITY(16); 32 bytes is the full SBC-4 parameter data. */
export function buildReadCapacity16(allocLen = 32): Buffer {
  const cdb = Buffer.alloc(16);
  cdb[0] = ScsiOp.SERVICE_ACTION_IN_16;
  cdb[1] = ServiceActionIn16.READ_CAPACITY_16;
  cdb.writeUInt32BE(checkUint('allocLen', allocLen, 0xffff_ffff), 10);
  return cdb;
}

/** REPORT LUNS; SPC requires an allocation length of at least 16. */
export function buildReportLuns(allocLen: number, selectReport = 0): Buffer {
  if (checkUint('allocLen', allocLen, 0xffff_ffff) < 16) throw new RangeError('REPORT LUNS allocation length must be >= 16');
  const cdb = Buffer.alloc(12);
  cdb[0] = ScsiOp.REPORT_LUNS;
  cdb[2] = checkUint('selectReport', selectReport, 0xff);
  cdb.writeUInt32BE(allocLen, 6);
  return cdb;
}

export interface ModeSenseOptions {
  readonly page: number;
  readonly subpage?: number;
  /** 0 current, 1 changeable, 2 default, 3 saved. */
  readonly pageControl?: number;
  /** Disable block descriptors. */
  readonly dbd?: boolean;
  readonly allocLen: number;
}

function modeSensePageByte(o: ModeSenseOptions): number {
  return (checkUint('pageControl', o.pageControl ?? 0, 3) << 6) | checkUint('page', o.page, 0x3f);
}

export function buildModeSense6(o: ModeSenseOptions): Buffer {
  const cdb = Buffer.alloc(6);
  cdb[0] = ScsiOp.MODE_SENSE_6;
  cdb[1] = o.dbd ? 0x08 : 0;
  cdb[2] = modeSensePageByte(o);
  cdb[3] = checkUint('subpage', o.subpage ?? 0, 0xff);
  cdb[4] = checkUint('allocLen', o.allocLen, 0xff);
  return cdb;
}

export function buildModeSense10(o: ModeSenseOptions & { readonly llbaa?: boolean }): Buffer {
  const cdb = Buffer.alloc(10);
  cdb[0] = ScsiOp.MODE_SENSE_10;
  cdb[1] = (o.llbaa ? 0x10 : 0) | (o.dbd ? 0x08 : 0);
  cdb[2] = modeSensePageByte(o);
  cdb[3] = checkUint('subpage', o.subpage ?? 0, 0xff);
  cdb.writeUInt16BE(checkUint('allocLen', o.allocLen, 0xffff), 7);
  return cdb;
}

/** REQUEST SENSE; `descriptorFormat` sets the DESC bit. */
export function buildRequestSense(allocLen = 252, descriptorFormat = false): Buffer {
  const cdb = Buffer.alloc(6);
  cdb[0] = ScsiOp.REQUEST_SENSE;
  cdb[1] = descriptorFormat ? 0x01 : 0;
  cdb[4] = checkUint('allocLen', allocLen, 0xff);
  return cdb;
}

/**
 * CDB length implied by the opcode's group code (SPC-4 operation code groups): group 0 is
 * 6 bytes, groups 1 and 2 are 10, group 4 is 16, group 5 is 12. Group 3
 * (reserved, and 7Eh/7Fh variable length) and the vendor-specific groups 6
 * and 7 give undefined; see `cdbLengthOf` for the variable-length case.
 */
export function cdbLength(opcode: number): number | undefined {
  switch ((opcode >> 5) & 0x07) {
    case 0:
      return 6;
    case 1:
    case 2:
      return 10;
    case 4:
      return 16;
    case 5:
      return 12;
    default:
      return undefined;
  }
}

/** Like cdbLength, but also reads the ADDITIONAL CDB LENGTH of a variable-length (7Fh) CDB. */
export function cdbLengthOf(cdb: Buffer): number | undefined {
  if (cdb.length === 0) return undefined;
  if (cdb[0] === ScsiOp.VARIABLE_LENGTH) return cdb.length >= 8 ? 8 + cdb[7]! : undefined;
  return cdbLength(cdb[0]!);
}

function readLength(cdb: Buffer, f: Field): number | undefined {
  return cdb.length >= f.offset + f.bytes ? readField(cdb, f) : undefined;
}

function allocationField(cdb: Buffer): Field | undefined {
  const sa = cdbServiceAction(cdb);
  switch (cdb[0]) {
    case ScsiOp.REQUEST_SENSE:
    case ScsiOp.MODE_SENSE_6:
      return { offset: 4, bytes: 1 };
    case ScsiOp.INQUIRY:
    case ScsiOp.RECEIVE_DIAGNOSTIC_RESULTS:
      return { offset: 3, bytes: 2 };
    case ScsiOp.LOG_SENSE:
    case ScsiOp.MODE_SENSE_10:
    case ScsiOp.PERSISTENT_RESERVE_IN:
    case ScsiOp.READ_DEFECT_DATA_10:
      return { offset: 7, bytes: 2 };
    case ScsiOp.READ_BUFFER_10:
      return { offset: 6, bytes: 3 };
    case ScsiOp.REPORT_LUNS:
      return { offset: 6, bytes: 4 };
    case ScsiOp.RECEIVE_COPY_RESULTS:
      return { offset: 10, bytes: 4 };
    case ScsiOp.SERVICE_ACTION_IN_16:
      return sa === ServiceActionIn16.READ_CAPACITY_16 ||
        sa === ServiceActionIn16.GET_LBA_STATUS ||
        sa === ServiceActionIn16.REPORT_REFERRALS
        ? { offset: 10, bytes: 4 }
        : undefined;
    case ScsiOp.MAINTENANCE_IN:
      return sa === MaintenanceIn.REPORT_IDENTIFYING_INFORMATION ||
        sa === MaintenanceIn.REPORT_TARGET_PORT_GROUPS ||
        sa === MaintenanceIn.REPORT_SUPPORTED_OPERATION_CODES ||
        sa === MaintenanceIn.REPORT_SUPPORTED_TASK_MANAGEMENT_FUNCTIONS ||
        sa === MaintenanceIn.REPORT_PRIORITY ||
        sa === MaintenanceIn.REPORT_TIMESTAMP
        ? { offset: 6, bytes: 4 }
        : undefined;
    default:
      return undefined;
  }
}

/**
 * ALLOCATION LENGTH of a data-in command that has one (INQUIRY, MODE SENSE,
 * REQUEST SENSE, REPORT LUNS, READ CAPACITY(16), REPORT SUPPORTED OPERATION
 * CODES, PERSISTENT RESERVE IN, ...); undefined otherwise or if the buffer is
 * too short to hold it.
 */
export function cdbAllocationLength(cdb: Buffer): number | undefined {
  if (cdb.length === 0) return undefined;
  const f = allocationField(cdb);
  if (!f) return undefined;
  return readLength(cdb, f);
}

function parameterListField(cdb: Buffer): Field | undefined {
  const sa = cdbServiceAction(cdb);
  switch (cdb[0]) {
    case ScsiOp.MODE_SELECT_6:
      return { offset: 4, bytes: 1 };
    case ScsiOp.SEND_DIAGNOSTIC:
      return { offset: 3, bytes: 2 };
    case ScsiOp.UNMAP:
    case ScsiOp.LOG_SELECT:
    case ScsiOp.MODE_SELECT_10:
      return { offset: 7, bytes: 2 };
    case ScsiOp.WRITE_BUFFER:
      return { offset: 6, bytes: 3 };
    case ScsiOp.PERSISTENT_RESERVE_OUT:
      return { offset: 5, bytes: 4 };
    case ScsiOp.EXTENDED_COPY:
      return { offset: 10, bytes: 4 };
    case ScsiOp.MAINTENANCE_OUT:
      return sa === MaintenanceOut.SET_IDENTIFYING_INFORMATION ||
        sa === MaintenanceOut.SET_TARGET_PORT_GROUPS ||
        sa === MaintenanceOut.SET_PRIORITY ||
        sa === MaintenanceOut.SET_TIMESTAMP
        ? { offset: 6, bytes: 4 }
        : undefined;
    default:
      return undefined;
  }
}

/**
 * PARAMETER LIST LENGTH of a data-out command that has one (MODE SELECT,
 * UNMAP, PERSISTENT RESERVE OUT, EXTENDED COPY, WRITE BUFFER, ...).
 */
export function cdbParameterListLength(cdb: Buffer): number | undefined {
  if (cdb.length === 0) return undefined;
  const f = parameterListField(cdb);
  if (!f) return undefined;
  return readLength(cdb, f);
}

const noDataOpcodes = new Set<number>([
  ScsiOp.TEST_UNIT_READY,
  ScsiOp.START_STOP_UNIT,
  ScsiOp.PREVENT_ALLOW_MEDIUM_REMOVAL,
  ScsiOp.RESERVE_6,
  ScsiOp.RELEASE_6,
]);

/**
 * Bytes of data (in either direction) the CDB asks to move: blocks × blockSize
 * for block I/O (twice for COMPARE AND WRITE, one block for WRITE SAME), the
 * parameter list length for UNMAP and other data-out commands, the
 * allocation length for data-in commands, 8 for READ CAPACITY(10), 0 for
 * commands without data. Undefined for commands it does not know. It is what
 * the CDB announces, for comparison with the iSCSI Expected Data Transfer
 * Length; a data-in reply may legitimately be shorter.
 */
export function transferLengthBytes(cdb: Buffer, blockSize: number): number | undefined {
  if (cdb.length === 0) return undefined;
  checkUint('blockSize', blockSize, 0xffff_ffff);
  const block = decodeBlockCdb(cdb);
  if (block) {
    if (block.kind === 'unmap') return block.parameterListLength ?? 0;
    return (block.dataInBlocks + block.dataOutBlocks) * blockSize;
  }
  if (cdb[0] === ScsiOp.READ_CAPACITY_10) return 8;
  if (noDataOpcodes.has(cdb[0]!)) return 0;
  return cdbAllocationLength(cdb) ?? cdbParameterListLength(cdb);
}
