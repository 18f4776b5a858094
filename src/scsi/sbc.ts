// SBC-3 block commands of the embedded target: READ/WRITE 6/10/12/16, VERIFY, WRITE AND VERIFY,
// ORWRITE, COMPARE AND WRITE, WRITE SAME, UNMAP, GET LBA STATUS, SYNCHRONIZE CACHE, PRE-FETCH,
// READ CAPACITY and START STOP UNIT.
//
// Plain READ and WRITE move data with one positional I/O into or out of a single buffer of the
// transfer size. Every command that changes the medium holds a range lock on its LBAs while it
// does, which makes COMPARE AND WRITE, ORWRITE, WRITE SAME and WRITE AND VERIFY atomic against
// overlapping writes without serialising anything else.

import { ScsiCdbError, decodeBlockCdb, decodeUnmapParameterList, type BlockCdb } from '../../protocol/src/scsi/cdb.ts';
import { ScsiStatus } from '../../protocol/src/scsi/status.ts';
import type { CommandContext } from './embedded-target.ts';
import {
  CheckCondition,
  invalidFieldInCdb,
  invalidFieldInInformationUnit,
  invalidFieldInParameterList,
  lbaOutOfRange,
  miscompare,
  parameterListLengthError,
  writeProtected,
  type LogicalUnit,
} from './logical-unit.ts';
import { BufferPool, dataBuffers } from './buffer-pool.ts';
import { good, truncate } from './spc.ts';
import type { ScsiOutcome } from './task.ts';

const EMPTY = Buffer.alloc(0);
/** Commands that stream over a range (VERIFY without data, WRITE SAME) work in pieces this large. */
const CHUNK_BYTES = 1 << 20;

/** Byte offset of the transfer length field, by CDB length, for sense field pointers. */
const LENGTH_FIELD: Record<number, number> = { 6: 4, 10: 7, 12: 6, 16: 10 };

export function decodeBlock(cdb: Buffer): BlockCdb {
  try {
    const c = decodeBlockCdb(cdb);
    if (!c) throw invalidFieldInCdb(0);
    return c;
  } catch (err) {
    if (err instanceof ScsiCdbError) throw fromCdbError(err, true);
    throw err;
  }
}

function fromCdbError(err: ScsiCdbError, inCdb: boolean): CheckCondition {
  const s = err.sense;
  return new CheckCondition(
    s.key,
    s.asc,
    s.ascq,
    err.fieldPointer !== undefined ? { field: { inCdb, byte: err.fieldPointer } } : {},
  );
}

function checkTransferLength(lu: LogicalUnit, c: BlockCdb): void {
  if (c.blocks > lu.limits.maxTransferBlocks) throw invalidFieldInCdb(LENGTH_FIELD[c.cdbLength]!);
}

/** Offset of the first byte where the two buffers differ; they are known to differ. */
function firstDifference(a: Buffer, b: Buffer): number {
  // Narrow down by halves with memcmp, then finish byte by byte.
  let lo = 0;
  let hi = Math.min(a.length, b.length);
  while (hi - lo > 64) {
    const mid = lo + ((hi - lo) >> 1);
    if (a.compare(b, lo, mid, lo, mid) !== 0) hi = mid;
    else lo = mid;
  }
  for (let i = lo; i < hi; i++) if (a[i] !== b[i]) return i;
  return hi;
}

async function durable(lu: LogicalUnit, fua: boolean): Promise<void> {
  // FUA, or a disabled write cache, means the data must be on stable storage before GOOD.
  if (fua || !lu.wce) await lu.backing.flush();
}

function requireWritable(lu: LogicalUnit): void {
  if (lu.readOnly) throw writeProtected();
}

// ---------------------------------------------------------------------------------------------
// READ / WRITE

export async function read(ctx: CommandContext): Promise<ScsiOutcome> {
  const { lu } = ctx;
  const c = decodeBlock(ctx.cdb);
  checkTransferLength(lu, c);
  lu.checkRange(c.lba, c.blocks);
  if (c.blocks === 0) return good(EMPTY);
  const bs = lu.blockSize;
  const length = c.blocks * bs;
  if (!BufferPool.pooled(length)) return good(await lu.backing.read(c.lba * bs, length));
  // A pooled buffer, given back by the transport once the data is sent (see buffer-pool.ts). The
  // read has finished either way when the await returns, so a failure can give it back at once.
  const buf = dataBuffers.take(length);
  try {
    await lu.backing.readInto(buf.subarray(0, length), c.lba * bs);
  } catch (err) {
    dataBuffers.release(buf);
    throw err;
  }
  return { status: ScsiStatus.GOOD, dataIn: buf.subarray(0, length), release: dataBuffers.release.bind(dataBuffers, buf) };
}

/**
 * The blocks of Data-Out that can be written. When the initiator sent less than the CDB asks for,
 * the whole blocks that did arrive are written and the transport reports the overflow residual; a
 * partial block cannot be written and is refused.
 */
function receivedBlocks(ctx: CommandContext, blocks: number): number {
  const bs = ctx.lu.blockSize;
  const got = ctx.task.dataOut.length;
  if (got >= blocks * bs) return blocks;
  if (got % bs !== 0) throw invalidFieldInInformationUnit();
  return got / bs;
}

export async function write(ctx: CommandContext): Promise<ScsiOutcome> {
  const { lu } = ctx;
  const c = decodeBlock(ctx.cdb);
  requireWritable(lu);
  checkTransferLength(lu, c);
  lu.checkRange(c.lba, c.blocks);
  const bs = lu.blockSize;
  const outcome: ScsiOutcome = { status: ScsiStatus.GOOD, dataOutLength: c.blocks * bs };
  const blocks = receivedBlocks(ctx, c.blocks);
  if (blocks === 0) return outcome;
  const release = await lu.locks.acquire(c.lba, blocks);
  try {
    await lu.backing.write(c.lba * bs, ctx.task.dataOut.subarray(0, blocks * bs));
  } finally {
    release();
  }
  await durable(lu, c.fua);
  return outcome;
}

export async function writeAndVerify(ctx: CommandContext): Promise<ScsiOutcome> {
  const { lu } = ctx;
  const c = decodeBlock(ctx.cdb);
  requireWritable(lu);
  // BYTCHK 00b: verify the medium, 01b: compare with the Data-Out. 11b is not defined for writes.
  if (c.bytchk !== 0 && c.bytchk !== 1) throw invalidFieldInCdb(1, 2);
  checkTransferLength(lu, c);
  lu.checkRange(c.lba, c.blocks);
  const bs = lu.blockSize;
  const outcome: ScsiOutcome = { status: ScsiStatus.GOOD, dataOutLength: c.blocks * bs };
  const blocks = receivedBlocks(ctx, c.blocks);
  if (blocks === 0) return outcome;
  const data = ctx.task.dataOut.subarray(0, blocks * bs);
  const release = await lu.locks.acquire(c.lba, blocks);
  try {
    await lu.backing.write(c.lba * bs, data);
    // The verification reads back through the host's cache; durability follows the same rules
    // as WRITE (write cache enabled: SYNCHRONIZE CACHE makes it durable).
    const back = await lu.backing.read(c.lba * bs, data.length);
    if (!back.equals(data)) throw miscompare(firstDifference(back, data));
  } finally {
    release();
  }
  await durable(lu, false);
  return outcome;
}

// ---------------------------------------------------------------------------------------------
// VERIFY

export async function verify(ctx: CommandContext): Promise<ScsiOutcome> {
  const { lu, task } = ctx;
  const c = decodeBlock(ctx.cdb);
  if (c.bytchk === 2) throw invalidFieldInCdb(1, 2);
  checkTransferLength(lu, c);
  lu.checkRange(c.lba, c.blocks);
  const bs = lu.blockSize;
  const outcome: ScsiOutcome = { status: ScsiStatus.GOOD, dataOutLength: c.dataOutBlocks * bs };
  if (c.blocks === 0) return outcome;
  const start = c.lba * bs;
  const total = c.blocks * bs;
  if (c.bytchk === 0) {
    // Medium verification: every block must be readable.
    const buf = Buffer.allocUnsafe(Math.min(total, CHUNK_BYTES));
    for (let done = 0; done < total && !task.signal.aborted; done += buf.length) {
      await lu.backing.readInto(buf.subarray(0, Math.min(buf.length, total - done)), start + done);
    }
    return outcome;
  }
  if (c.bytchk === 1) {
    if (task.dataOut.length < total) throw invalidFieldInInformationUnit();
    const expected = task.dataOut.subarray(0, total);
    const medium = await lu.backing.read(start, total);
    if (!medium.equals(expected)) throw miscompare(firstDifference(medium, expected));
    return outcome;
  }
  // BYTCHK 11b: one block of Data-Out is compared with every block of the range. The
  // INFORMATION field counts as if that block had been sent once per LBA.
  if (task.dataOut.length < bs) throw invalidFieldInInformationUnit();
  const pattern = task.dataOut.subarray(0, bs);
  const perChunk = Math.max(1, Math.floor(CHUNK_BYTES / bs));
  for (let b = 0; b < c.blocks; b += perChunk) {
    const n = Math.min(perChunk, c.blocks - b);
    const medium = await lu.backing.read(start + b * bs, n * bs);
    for (let i = 0; i < n; i++) {
      const block = medium.subarray(i * bs, (i + 1) * bs);
      if (!block.equals(pattern)) throw miscompare((b + i) * bs + firstDifference(block, pattern));
    }
  }
  return outcome;
}

// ---------------------------------------------------------------------------------------------
// ORWRITE, COMPARE AND WRITE

export async function orWrite(ctx: CommandContext): Promise<ScsiOutcome> {
  const { lu } = ctx;
  const c = decodeBlock(ctx.cdb);
  requireWritable(lu);
  checkTransferLength(lu, c);
  lu.checkRange(c.lba, c.blocks);
  const bs = lu.blockSize;
  const outcome: ScsiOutcome = { status: ScsiStatus.GOOD, dataOutLength: c.blocks * bs };
  const blocks = receivedBlocks(ctx, c.blocks);
  if (blocks === 0) return outcome;
  const data = ctx.task.dataOut;
  const release = await lu.locks.acquire(c.lba, blocks);
  try {
    const medium = await lu.backing.read(c.lba * bs, blocks * bs);
    orInto(medium, data);
    await lu.backing.write(c.lba * bs, medium);
  } finally {
    release();
  }
  await durable(lu, c.fua);
  return outcome;
}

/** dst |= src over dst's length, 32 bits at a time when both are aligned. */
function orInto(dst: Buffer, src: Buffer): void {
  const n = dst.length;
  let i = 0;
  if (dst.byteOffset % 4 === 0 && src.byteOffset % 4 === 0) {
    const words = n >> 2;
    const d32 = new Uint32Array(dst.buffer, dst.byteOffset, words);
    const s32 = new Uint32Array(src.buffer, src.byteOffset, words);
    for (let w = 0; w < words; w++) d32[w]! |= s32[w]!;
    i = words << 2;
  }
  for (; i < n; i++) dst[i]! |= src[i]!;
}

export async function compareAndWrite(ctx: CommandContext): Promise<ScsiOutcome> {
  const { lu, task } = ctx;
  const c = decodeBlock(ctx.cdb);
  requireWritable(lu);
  const blocks = c.blocks;
  if (blocks > lu.limits.maxCompareAndWriteBlocks) throw invalidFieldInCdb(13);
  lu.checkRange(c.lba, blocks);
  const bs = lu.blockSize;
  const half = blocks * bs;
  const outcome: ScsiOutcome = { status: ScsiStatus.GOOD, dataOutLength: 2 * half };
  // The Data-Out must be exactly the compare data and the write data: anything else means the
  // initiator and the CDB disagree about NUMBER OF LOGICAL BLOCKS, and guessing could write garbage.
  if (task.dataOut.length !== 2 * half) throw invalidFieldInCdb(13);
  if (blocks === 0) return outcome;
  const expected = task.dataOut.subarray(0, half);
  const release = await lu.locks.acquire(c.lba, blocks);
  try {
    const medium = await lu.backing.read(c.lba * bs, half);
    if (!medium.equals(expected)) throw miscompare(firstDifference(medium, expected));
    await lu.backing.write(c.lba * bs, task.dataOut.subarray(half, 2 * half));
  } finally {
    release();
  }
  await durable(lu, c.fua);
  return outcome;
}

// ---------------------------------------------------------------------------------------------
// WRITE SAME, UNMAP, GET LBA STATUS

export async function writeSame(ctx: CommandContext): Promise<ScsiOutcome> {
  const { lu, task } = ctx;
  const c = decodeBlock(ctx.cdb);
  requireWritable(lu);
  // ANCHOR needs UNMAP, and anchored LBAs are not supported (ANC_SUP 0).
  if (c.anchor) throw invalidFieldInCdb(1, 4);
  const bs = lu.blockSize;
  const outcome: ScsiOutcome = { status: ScsiStatus.GOOD, dataOutLength: c.ndob ? 0 : bs };
  let blocks = c.blocks;
  if (blocks === 0) {
    // WSNZ is 0: zero blocks means from the LBA to the end of the medium.
    if (c.lba >= lu.capacity) throw lbaOutOfRange();
    blocks = lu.capacity - c.lba;
  }
  if (blocks > lu.limits.maxWriteSameBlocks) throw invalidFieldInCdb(LENGTH_FIELD[c.cdbLength]!);
  lu.checkRange(c.lba, blocks);
  let pattern: Buffer | undefined;
  if (!c.ndob) {
    if (task.dataOut.length !== bs) throw parameterListLengthError();
    pattern = task.dataOut;
  }
  // With UNMAP the blocks are deallocated whatever the Data-Out holds, and deallocated blocks read
  // as zeros (LBPRZ 1); that is also the fast path for writing a zero pattern.
  const zeros = c.unmap || !pattern || isZero(pattern);
  const release = await lu.locks.acquire(c.lba, blocks);
  try {
    if (zeros) await lu.backing.zero(c.lba * bs, blocks * bs, task.signal);
    else await writeRepeated(lu, c.lba, blocks, pattern!, task.signal);
  } finally {
    release();
  }
  await durable(lu, false);
  return outcome;
}

function isZero(b: Buffer): boolean {
  for (let i = 0; i < b.length; i++) if (b[i] !== 0) return false;
  return true;
}

async function writeRepeated(lu: LogicalUnit, lba: number, blocks: number, pattern: Buffer, signal: AbortSignal): Promise<void> {
  const bs = lu.blockSize;
  const perChunk = Math.max(1, Math.min(blocks, Math.floor(CHUNK_BYTES / bs)));
  const chunk = Buffer.allocUnsafe(perChunk * bs);
  for (let i = 0; i < perChunk; i++) pattern.copy(chunk, i * bs);
  for (let done = 0; done < blocks && !signal.aborted; done += perChunk) {
    const n = Math.min(perChunk, blocks - done);
    await lu.backing.write((lba + done) * bs, chunk.subarray(0, n * bs));
  }
}

export async function unmap(ctx: CommandContext): Promise<ScsiOutcome> {
  const { lu, task, cdb } = ctx;
  requireWritable(lu);
  if (cdb[1]! & 0x01) throw invalidFieldInCdb(1, 0); // ANCHOR: ANC_SUP is 0
  const length = cdb.readUInt16BE(7);
  const outcome: ScsiOutcome = { status: ScsiStatus.GOOD, dataOutLength: length };
  if (length === 0) return outcome;
  if (length < 8) throw parameterListLengthError();
  const list = task.dataOut.subarray(0, Math.min(length, task.dataOut.length));
  if (list.length < 8) throw parameterListLengthError();
  let extents;
  try {
    extents = decodeUnmapParameterList(list);
  } catch (err) {
    if (err instanceof ScsiCdbError) throw fromCdbError(err, false);
    throw err;
  }
  if (extents.length > lu.limits.maxUnmapDescriptors) throw invalidFieldInParameterList(2);
  // Validate the whole list first: a bad descriptor must not leave the others half applied.
  let total = 0;
  extents.forEach((e, i) => {
    if (e.lba + e.blocks > lu.capacity) throw lbaOutOfRange();
    total += e.blocks;
    if (total > lu.limits.maxUnmapBlocks) throw invalidFieldInParameterList(8 + 16 * i + 8);
  });
  const bs = lu.blockSize;
  // The descriptors are independent: zero them in parallel (overlapping ones queue on the lock).
  await Promise.all(
    extents.map(async (e) => {
      if (e.blocks === 0) return;
      const release = await lu.locks.acquire(e.lba, e.blocks);
      try {
        await lu.backing.zero(e.lba * bs, e.blocks * bs, task.signal);
      } finally {
        release();
      }
    }),
  );
  await durable(lu, false);
  return outcome;
}

/**
 * Every LBA is reported mapped: deallocation writes zeros, so no LBA is ever without storage,
 * which is consistent with LBPRZ 1 and needs no allocation map.
 */
export function getLbaStatus(ctx: CommandContext): ScsiOutcome {
  const { lu, cdb } = ctx;
  const c = readLba16(cdb, 2);
  const alloc = cdb.readUInt32BE(10);
  if (c >= lu.capacity) throw lbaOutOfRange();
  const d = Buffer.alloc(24);
  d.writeUInt32BE(20, 0); // PARAMETER DATA LENGTH: 4 reserved bytes + one descriptor
  d.writeBigUInt64BE(BigInt(c), 8);
  d.writeUInt32BE(Math.min(lu.capacity - c, 0xffff_ffff), 16);
  d[20] = 0x00; // PROVISIONING STATUS: mapped
  return good(truncate(d, alloc));
}

function readLba16(cdb: Buffer, offset: number): number {
  const hi = cdb.readUInt32BE(offset);
  const lo = cdb.readUInt32BE(offset + 4);
  // Beyond 2^53 no medium can exist; report such an LBA as out of range rather than lose bits.
  if (hi > 0x1fffff) throw lbaOutOfRange();
  return hi * 0x1_0000_0000 + lo;
}

// ---------------------------------------------------------------------------------------------
// SYNCHRONIZE CACHE, PRE-FETCH

export async function synchronizeCache(ctx: CommandContext): Promise<ScsiOutcome> {
  const { lu } = ctx;
  const c = decodeBlock(ctx.cdb);
  lu.checkRange(c.lba, c.blocks);
  if (c.immed) {
    // IMMED: status as soon as the CDB is validated; a failing flush is reported by the next one.
    lu.backing.flush().catch(() => undefined);
    return good();
  }
  await lu.backing.flush();
  return good();
}

export function preFetch(ctx: CommandContext): ScsiOutcome {
  const { lu } = ctx;
  const c = decodeBlock(ctx.cdb);
  lu.checkRange(c.lba, c.blocks);
  // GOOD, not CONDITION MET: the blocks are not guaranteed to be held in a cache, the page cache
  // of the host decides. SBC allows a device server to do nothing here.
  return good();
}

// ---------------------------------------------------------------------------------------------
// READ CAPACITY, START STOP UNIT

export function readCapacity10(ctx: CommandContext): ScsiOutcome {
  const { lu, cdb } = ctx;
  // Without PMI the (obsolete) LOGICAL BLOCK ADDRESS field must be zero.
  if ((cdb[8]! & 0x01) === 0 && cdb.readUInt32BE(2) !== 0) throw invalidFieldInCdb(2);
  const d = Buffer.alloc(8);
  d.writeUInt32BE(Math.min(lu.capacity - 1, 0xffff_ffff), 0);
  d.writeUInt32BE(lu.blockSize, 4);
  return good(d);
}

export function readCapacity16(ctx: CommandContext): ScsiOutcome {
  const { lu, cdb } = ctx;
  if ((cdb[14]! & 0x01) === 0 && (cdb.readUInt32BE(2) !== 0 || cdb.readUInt32BE(6) !== 0)) throw invalidFieldInCdb(2);
  const alloc = cdb.readUInt32BE(10);
  const d = Buffer.alloc(32);
  d.writeBigUInt64BE(BigInt(lu.capacity - 1), 0);
  d.writeUInt32BE(lu.blockSize, 8);
  // No protection information; one logical block per physical block; LBPME and LBPRZ.
  d.writeUInt16BE(0x8000 | 0x4000, 14);
  return good(truncate(d, alloc));
}

export function startStopUnit(_ctx: CommandContext): ScsiOutcome {
  // Nothing spins and nothing ejects: START, LOEJ and POWER CONDITION are accepted and ignored.
  return good();
}
