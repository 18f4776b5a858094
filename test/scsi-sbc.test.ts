// SBC commands of the embedded target, driven through EmbeddedTarget.execute() with hand-built
// CDBs against temporary image files.

import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { parseSense, type SenseData } from '../protocol/src/scsi/sense.ts';
import { BackingFile } from '../src/scsi/backing-file.ts';
import { EmbeddedTarget, type EmbeddedLunOptions } from '../src/scsi/embedded-target.ts';
import { RangeLock } from '../src/scsi/logical-unit.ts';
import type { ItNexus, ScsiOutcome } from '../src/scsi/task.ts';

const TARGET = 'iqn.2026-11.test:embedded';
const GOOD = 0x00;
const CHECK_CONDITION = 0x02;
const BS = 512;
const SIZE = 4 << 20;
const BLOCKS = SIZE / BS;

const A: ItNexus = {
  initiatorName: 'iqn.2026-11.test:host1',
  isid: '400001370000',
  tsih: 1,
  targetName: TARGET,
  portalGroupTag: 1,
  initiatorPort: 'iqn.2026-11.test:host1,i,0x400001370000',
};

function cdb(bytes: number[]): Buffer {
  const b = Buffer.alloc(Math.max(16, bytes.length));
  Buffer.from(bytes).copy(b);
  return b;
}

let dir: string;
let target: EmbeddedTarget;

async function open(luns: EmbeddedLunOptions[]): Promise<EmbeddedTarget> {
  const t = new EmbeddedTarget({ targetName: TARGET, luns });
  await t.open();
  // Consume the power-on unit attention of the test nexus.
  await t.execute(task([0x00, 0, 0, 0, 0, 0]));
  return t;
}

function task(bytes: number[], dataOut: Buffer = Buffer.alloc(0), signal = new AbortController().signal) {
  return { nexus: A, lun: 0, cdb: cdb(bytes), attr: 1, itt: 1, read: true, write: dataOut.length > 0, dataOut, dataInLength: 1 << 20, signal };
}

function exec(bytes: number[], dataOut?: Buffer): Promise<ScsiOutcome> {
  return target.execute(task(bytes, dataOut));
}

function expectCheck(r: ScsiOutcome, key: number, asc: number, ascq: number): SenseData {
  expect(r.status).toBe(CHECK_CONDITION);
  const s = parseSense(r.sense!);
  expect([s.key, s.asc, s.ascq]).toEqual([key, asc, ascq]);
  return s;
}

function expectGood(r: ScsiOutcome): Buffer {
  if (r.status !== GOOD) throw new Error(`status ${r.status}: ${r.sense ? JSON.stringify(parseSense(r.sense)) : ''}`);
  return r.dataIn ?? Buffer.alloc(0);
}

// --- hand-built CDBs ---------------------------------------------------------------------------

const be32 = (v: number): number[] => [v >>> 24, (v >>> 16) & 0xff, (v >>> 8) & 0xff, v & 0xff];
const be64 = (v: number | bigint): number[] => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(v));
  return [...b];
};
const be16 = (v: number): number[] => [(v >> 8) & 0xff, v & 0xff];

const read6 = (lba: number, n: number): number[] => [0x08, (lba >> 16) & 0x1f, (lba >> 8) & 0xff, lba & 0xff, n & 0xff, 0];
const write6 = (lba: number, n: number): number[] => [0x0a, (lba >> 16) & 0x1f, (lba >> 8) & 0xff, lba & 0xff, n & 0xff, 0];
const read10 = (lba: number, n: number, b1 = 0): number[] => [0x28, b1, ...be32(lba), 0, ...be16(n), 0];
const write10 = (lba: number, n: number, b1 = 0): number[] => [0x2a, b1, ...be32(lba), 0, ...be16(n), 0];
const read12 = (lba: number, n: number): number[] => [0xa8, 0, ...be32(lba), ...be32(n), 0, 0];
const write12 = (lba: number, n: number): number[] => [0xaa, 0, ...be32(lba), ...be32(n), 0, 0];
const read16 = (lba: number | bigint, n: number, b1 = 0): number[] => [0x88, b1, ...be64(lba), ...be32(n), 0, 0];
const write16 = (lba: number | bigint, n: number, b1 = 0): number[] => [0x8a, b1, ...be64(lba), ...be32(n), 0, 0];
const verify10 = (lba: number, n: number, bytchk: number): number[] => [0x2f, bytchk << 1, ...be32(lba), 0, ...be16(n), 0];
const verify16 = (lba: number, n: number, bytchk: number): number[] => [0x8f, bytchk << 1, ...be64(lba), ...be32(n), 0, 0];
const writeVerify10 = (lba: number, n: number, bytchk: number): number[] => [0x2e, bytchk << 1, ...be32(lba), 0, ...be16(n), 0];
const orwrite = (lba: number, n: number): number[] => [0x8b, 0, ...be64(lba), ...be32(n), 0, 0];
const caw = (lba: number, n: number, b1 = 0): number[] => [0x89, b1, ...be64(lba), 0, 0, 0, n, 0, 0];
const writeSame10 = (lba: number, n: number, b1 = 0): number[] => [0x41, b1, ...be32(lba), 0, ...be16(n), 0];
const writeSame16 = (lba: number, n: number, b1 = 0): number[] => [0x93, b1, ...be64(lba), ...be32(n), 0, 0];
const unmapCdb = (len: number, b1 = 0): number[] => [0x42, b1, 0, 0, 0, 0, 0, ...be16(len), 0];
const sync10 = (lba: number, n: number, b1 = 0): number[] => [0x35, b1, ...be32(lba), 0, ...be16(n), 0];
const sync16 = (lba: number, n: number): number[] => [0x91, 0, ...be64(lba), ...be32(n), 0, 0];
const prefetch10 = (lba: number, n: number): number[] => [0x34, 0, ...be32(lba), 0, ...be16(n), 0];
const prefetch16 = (lba: number, n: number): number[] => [0x90, 0x02, ...be64(lba), ...be32(n), 0, 0];
const getLbaStatus = (lba: number, alloc: number): number[] => [0x9e, 0x12, ...be64(lba), ...be32(alloc), 0, 0];
const readCapacity16 = (alloc: number): number[] => [0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, ...be32(alloc), 0, 0];

function unmapList(extents: [number, number][]): Buffer {
  const b = Buffer.alloc(8 + 16 * extents.length);
  b.writeUInt16BE(6 + 16 * extents.length, 0);
  b.writeUInt16BE(16 * extents.length, 2);
  extents.forEach(([lba, n], i) => {
    b.writeBigUInt64BE(BigInt(lba), 8 + 16 * i);
    b.writeUInt32BE(n, 16 + 16 * i);
  });
  return b;
}

/** Distinct contents per block, so misplaced data cannot go unnoticed. */
function pattern(blocks: number, seed: number): Buffer {
  const b = Buffer.alloc(blocks * BS);
  for (let i = 0; i < b.length; i++) b[i] = (i * 7 + seed * 13 + (i >> 9)) & 0xff;
  return b;
}

async function readBlocks(lba: number, n: number): Promise<Buffer> {
  return expectGood(await exec(read16(lba, n)));
}

beforeEach(async () => {
  dir = mkdtempSync(path.join(tmpdir(), 'detour-scsi-sbc-'));
  target = await open([{ file: path.join(dir, 'disk.img'), size: SIZE }]);
});

afterEach(async () => {
  await target.close();
  rmSync(dir, { recursive: true, force: true });
});

describe('READ CAPACITY', () => {
  it('(10) returns the last LBA and the block length', async () => {
    const d = expectGood(await exec([0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]));
    expect(d.readUInt32BE(0)).toBe(BLOCKS - 1);
    expect(d.readUInt32BE(4)).toBe(BS);
    expectCheck(await exec([0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0]), 0x5, 0x24, 0x00);
  });

  it('(16) returns 32 bytes with LBPME and LBPRZ, truncated to the allocation length', async () => {
    const d = expectGood(await exec(readCapacity16(32)));
    expect(d.length).toBe(32);
    expect(d.readBigUInt64BE(0)).toBe(BigInt(BLOCKS - 1));
    expect(d.readUInt32BE(8)).toBe(BS);
    expect(d[12]).toBe(0); // no protection information
    expect(d[13]).toBe(0); // one logical block per physical block
    expect(d.readUInt16BE(14)).toBe(0xc000);
    expect(expectGood(await exec(readCapacity16(12))).length).toBe(12);
    expect(expectGood(await exec(readCapacity16(0))).length).toBe(0);
  });

  it('(10) reports FFFFFFFFh when the capacity does not fit', async () => {
    await target.close();
    const big = 2 ** 32 * BS + 8 * BS;
    target = await open([{ file: path.join(dir, 'big.img'), size: big }]);
    const d = expectGood(await exec([0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]));
    expect(d.readUInt32BE(0)).toBe(0xffffffff);
    const d16 = expectGood(await exec(readCapacity16(32)));
    expect(d16.readBigUInt64BE(0)).toBe(BigInt(2 ** 32 + 7));
  });

  it('uses the configured block size', async () => {
    await target.close();
    target = await open([{ file: path.join(dir, 'b4k.img'), size: 1 << 20, blockSize: 4096 }]);
    const d = expectGood(await exec([0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]));
    expect(d.readUInt32BE(0)).toBe(255);
    expect(d.readUInt32BE(4)).toBe(4096);
  });
});

describe('READ and WRITE', () => {
  it('reads back what was written, with every CDB size', async () => {
    const a = pattern(8, 1);
    expectGood(await exec(write10(100, 8), a));
    expect((await readBlocks(100, 8)).equals(a)).toBe(true);
    expect(expectGood(await exec(read10(100, 8))).equals(a)).toBe(true);
    expect(expectGood(await exec(read12(100, 8))).equals(a)).toBe(true);
    expect(expectGood(await exec(read6(100, 8))).equals(a)).toBe(true);

    const b = pattern(3, 2);
    expectGood(await exec(write12(BLOCKS - 3, 3), b));
    expect((await readBlocks(BLOCKS - 3, 3)).equals(b)).toBe(true);
    const c = pattern(5, 3);
    expectGood(await exec(write16(2000, 5), c));
    expect((await readBlocks(2000, 5)).equals(c)).toBe(true);
    // READ(6)/WRITE(6) with TRANSFER LENGTH 0 move 256 blocks.
    const d = pattern(256, 4);
    expectGood(await exec(write6(3000, 0), d));
    const back = expectGood(await exec(read6(3000, 0)));
    expect(back.length).toBe(256 * BS);
    expect(back.equals(d)).toBe(true);
  });

  it('reports the Data-Out length the CDB asks for', async () => {
    const r = await exec(write10(0, 4), pattern(4, 5));
    expect(r.dataOutLength).toBe(4 * BS);
    const err = await exec(write10(BLOCKS, 4), pattern(4, 5));
    expect(err.dataOutLength).toBe(4 * BS);
  });

  it('persists across a restart', async () => {
    const a = pattern(16, 6);
    expectGood(await exec(write10(4000, 16), a));
    await target.close();
    target = await open([{ file: path.join(dir, 'disk.img') }]);
    expect((await readBlocks(4000, 16)).equals(a)).toBe(true);
    expect(readFileSync(path.join(dir, 'disk.img')).subarray(4000 * BS, 4016 * BS).equals(a)).toBe(true);
  });

  it('rejects LBAs beyond the end with LOGICAL BLOCK ADDRESS OUT OF RANGE', async () => {
    expectCheck(await exec(read10(BLOCKS, 1)), 0x5, 0x21, 0x00);
    expectCheck(await exec(read10(BLOCKS - 1, 2)), 0x5, 0x21, 0x00);
    expectCheck(await exec(write10(BLOCKS - 1, 2), pattern(2, 0)), 0x5, 0x21, 0x00);
    expectCheck(await exec(read10(0xffffffff, 1)), 0x5, 0x21, 0x00);
    expectCheck(await exec(read16(0x8000000000000000n, 1)), 0x5, 0x21, 0x00);
    expectCheck(await exec(write16(0xffffffffffffffffn, 1), pattern(1, 0)), 0x5, 0x21, 0x00);
    expectCheck(await exec(read6(0x1fffff, 1)), 0x5, 0x21, 0x00);
    // Zero blocks: fine inside the medium, out of range past its end.
    expect(expectGood(await exec(read10(0, 0))).length).toBe(0);
    expectGood(await exec(write10(BLOCKS - 1, 0)));
    expectCheck(await exec(read10(BLOCKS, 0)), 0x5, 0x21, 0x00);
    expectCheck(await exec(write16(BLOCKS + 1, 0)), 0x5, 0x21, 0x00);
  });

  it('rejects transfers above the block limits and protection fields', async () => {
    await target.close();
    target = await open([{ file: path.join(dir, 'b64k.img'), size: 1 << 30 }]);
    const max = target.logicalUnit(0)!.limits.maxTransferBlocks;
    const s = expectCheck(await exec(read16(0, max + 1)), 0x5, 0x24, 0x00);
    expect(s.senseKeySpecific).toEqual({ type: 'field-pointer', inCdb: true, fieldPointer: 10 });
    for (let p = 1; p < 8; p++) {
      expectCheck(await exec(read10(0, 1, p << 5)), 0x5, 0x24, 0x00);
      expectCheck(await exec(write10(0, 1, p << 5), pattern(1, 0)), 0x5, 0x24, 0x00);
    }
  });

  it('accepts DPO, FUA and FUA_NV, and makes FUA writes durable before GOOD', async () => {
    const flush = vi.spyOn(target.logicalUnit(0)!.backing, 'flush');
    expectGood(await exec(read10(0, 1, 0x18)));
    expectGood(await exec(write10(0, 1, 0x10), pattern(1, 0)));
    expect(flush).not.toHaveBeenCalled();
    expectGood(await exec(write10(0, 1, 0x08), pattern(1, 0)));
    expect(flush).toHaveBeenCalledTimes(1);
    expectGood(await exec(write16(0, 1, 0x0a), pattern(1, 0)));
    expect(flush).toHaveBeenCalledTimes(2);
  });

  it('writes through when the write cache is disabled', async () => {
    const lu = target.logicalUnit(0)!;
    const flush = vi.spyOn(lu.backing, 'flush');
    lu.wce = false;
    expectGood(await exec(write10(0, 1), pattern(1, 0)));
    expect(flush).toHaveBeenCalledTimes(1);
  });

  it('writes only the whole blocks that arrived when the initiator sent less', async () => {
    const old = pattern(2, 7);
    expectGood(await exec(write10(10, 2), old));
    const fresh = pattern(2, 8);
    const r = await exec(write10(10, 2), fresh.subarray(0, BS));
    expect(r.status).toBe(GOOD);
    expect(r.dataOutLength).toBe(2 * BS);
    const back = await readBlocks(10, 2);
    expect(back.subarray(0, BS).equals(fresh.subarray(0, BS))).toBe(true);
    expect(back.subarray(BS).equals(old.subarray(BS))).toBe(true);
    // A partial block is refused, and nothing is written.
    expectCheck(await exec(write10(10, 1), fresh.subarray(0, 200)), 0x5, 0x0e, 0x03);
    // More data than the CDB asks for: the surplus is ignored.
    expectGood(await exec(write10(20, 1), pattern(3, 9)));
    expect((await readBlocks(20, 1)).equals(pattern(3, 9).subarray(0, BS))).toBe(true);
  });

  it('refuses writes on a read-only unit and says so in MODE SENSE', async () => {
    await target.close();
    writeFileSync(path.join(dir, 'ro.img'), Buffer.alloc(1 << 20));
    target = await open([{ file: path.join(dir, 'ro.img'), readOnly: true }]);
    expectCheck(await exec(write10(0, 1), pattern(1, 0)), 0x7, 0x27, 0x00);
    expectCheck(await exec(writeSame10(0, 1, 0x08), pattern(1, 0)), 0x7, 0x27, 0x00);
    expectCheck(await exec(unmapCdb(24), unmapList([[0, 1]])), 0x7, 0x27, 0x00);
    expectCheck(await exec(caw(0, 1), Buffer.alloc(2 * BS)), 0x7, 0x27, 0x00);
    expectGood(await exec(read10(0, 1)));
    const ms = expectGood(await exec([0x1a, 0x08, 0x3f, 0, 255, 0]));
    expect(ms[2]).toBe(0x90); // WP and DPOFUA
  });

  it('serves many commands concurrently', async () => {
    const writes = Array.from({ length: 64 }, (_, i) => exec(write10(i * 8, 8), pattern(8, i)));
    for (const r of await Promise.all(writes)) expectGood(r);
    const reads = await Promise.all(Array.from({ length: 64 }, (_, i) => exec(read10(i * 8, 8))));
    reads.forEach((r, i) => expect(expectGood(r).equals(pattern(8, i))).toBe(true));
  });
});

describe('VERIFY and WRITE AND VERIFY', () => {
  it('compares Data-Out with the medium and reports the offset of the first difference', async () => {
    const a = pattern(4, 11);
    expectGood(await exec(write10(50, 4), a));
    expectGood(await exec(verify10(50, 4, 1), a));
    const wrong = Buffer.from(a);
    wrong[1234] ^= 0x58;
    const s = expectCheck(await exec(verify16(50, 4, 1), wrong), 0xe, 0x1d, 0x00);
    expect(s.information).toBe(1234n);
  });

  it('checks only the range with BYTCHK 0, and compares one block against all with BYTCHK 3', async () => {
    expectGood(await exec(verify10(0, 16, 0)));
    expectCheck(await exec(verify10(BLOCKS - 1, 2, 0)), 0x5, 0x21, 0x00);
    const block = pattern(1, 12);
    const same = Buffer.concat(Array.from({ length: 6 }, () => block));
    expectGood(await exec(write10(60, 6), same));
    expectGood(await exec(verify10(60, 6, 3), block));
    const off = Buffer.from(same);
    off[3 * BS + 7] ^= 1;
    expectGood(await exec(write10(60, 6), off));
    const s = expectCheck(await exec(verify10(60, 6, 3), block), 0xe, 0x1d, 0x00);
    expect(s.information).toBe(BigInt(3 * BS + 7));
    expectCheck(await exec(verify10(60, 6, 2), block), 0x5, 0x24, 0x00);
  });

  it('writes and verifies', async () => {
    const a = pattern(3, 13);
    const r = await exec(writeVerify10(70, 3, 1), a);
    expectGood(r);
    expect(r.dataOutLength).toBe(3 * BS);
    expect((await readBlocks(70, 3)).equals(a)).toBe(true);
    expectGood(await exec(writeVerify10(70, 0, 0)));
    expectCheck(await exec(writeVerify10(BLOCKS, 1, 1), a), 0x5, 0x21, 0x00);
  });
});

describe('COMPARE AND WRITE', () => {
  it('writes the second half when the first half matches the medium', async () => {
    const old = pattern(2, 21);
    const fresh = pattern(2, 22);
    expectGood(await exec(write10(80, 2), old));
    const r = await exec(caw(80, 2), Buffer.concat([old, fresh]));
    expectGood(r);
    expect(r.dataOutLength).toBe(4 * BS);
    expect((await readBlocks(80, 2)).equals(fresh)).toBe(true);
  });

  it('writes nothing on a miscompare and reports the offset of the first differing byte', async () => {
    const old = pattern(2, 23);
    expectGood(await exec(write10(90, 2), old));
    const compare = Buffer.from(old);
    compare[BS + 100] ^= 0xff;
    const s = expectCheck(await exec(caw(90, 2), Buffer.concat([compare, pattern(2, 24)])), 0xe, 0x1d, 0x00);
    expect(s.information).toBe(BigInt(BS + 100));
    expect((await readBlocks(90, 2)).equals(old)).toBe(true);
  });

  it('is atomic: of many concurrent identical swaps exactly one succeeds', async () => {
    const old = pattern(1, 25);
    expectGood(await exec(write10(100, 1), old));
    const results = await Promise.all(
      Array.from({ length: 40 }, (_, i) => exec(caw(100, 1), Buffer.concat([old, pattern(1, 100 + i)]))),
    );
    const winners = results.filter((r) => r.status === GOOD);
    expect(winners.length).toBe(1);
    for (const r of results.filter((x) => x.status !== GOOD)) expectCheck(r, 0xe, 0x1d, 0x00);
    const winner = results.indexOf(winners[0]!);
    expect((await readBlocks(100, 1)).equals(pattern(1, 100 + winner))).toBe(true);
  });

  it('checks the Data-Out size, the range and zero blocks', async () => {
    expectGood(await exec(caw(0, 0)));
    const s = expectCheck(await exec(caw(0, 1), Buffer.alloc(4 * BS)), 0x5, 0x24, 0x00);
    expect(s.senseKeySpecific).toEqual({ type: 'field-pointer', inCdb: true, fieldPointer: 13 });
    // NUMBER OF LOGICAL BLOCKS 0 with data attached: the CDB and the transfer disagree.
    expectCheck(await exec(caw(0, 0), Buffer.alloc(2 * BS)), 0x5, 0x24, 0x00);
    expectCheck(await exec(caw(BLOCKS - 1, 2), Buffer.alloc(4 * BS)), 0x5, 0x21, 0x00);
    expectGood(await exec(caw(0, 1, 0x18), Buffer.alloc(2 * BS)));
    expectCheck(await exec(caw(0, 1, 0x20), Buffer.alloc(2 * BS)), 0x5, 0x24, 0x00);
  });
});

describe('ORWRITE', () => {
  it('ORs the Data-Out into the medium', async () => {
    expectGood(await exec(write10(110, 2), Buffer.alloc(2 * BS, 0xa0)));
    expectGood(await exec(orwrite(110, 2), Buffer.alloc(2 * BS, 0x05)));
    expect((await readBlocks(110, 2)).equals(Buffer.alloc(2 * BS, 0xa5))).toBe(true);
    expectGood(await exec(orwrite(110, 0)));
    expectCheck(await exec(orwrite(BLOCKS, 1), Buffer.alloc(BS)), 0x5, 0x21, 0x00);
  });
});

describe('WRITE SAME', () => {
  it('replicates one block over the range', async () => {
    const block = pattern(1, 31);
    const r = await exec(writeSame10(200, 9), block);
    expectGood(r);
    expect(r.dataOutLength).toBe(BS);
    const back = await readBlocks(199, 11);
    expect(back.subarray(BS, 10 * BS).equals(Buffer.concat(Array.from({ length: 9 }, () => block)))).toBe(true);
    expect(back.subarray(0, BS).equals(Buffer.alloc(BS))).toBe(true);
    expect(back.subarray(10 * BS).equals(Buffer.alloc(BS))).toBe(true);
  });

  it('deallocates with UNMAP whatever the Data-Out holds, and writes zeros with NDOB', async () => {
    expectGood(await exec(write10(300, 4), pattern(4, 32)));
    expectGood(await exec(writeSame16(300, 2, 0x08), Buffer.alloc(BS, 0xff)));
    const back = await readBlocks(300, 4);
    expect(back.subarray(0, 2 * BS).equals(Buffer.alloc(2 * BS))).toBe(true);
    expect(back.subarray(2 * BS).equals(pattern(4, 32).subarray(2 * BS))).toBe(true);
    const r = await exec(writeSame16(302, 2, 0x01));
    expectGood(r);
    expect(r.dataOutLength).toBe(0);
    expect((await readBlocks(302, 2)).equals(Buffer.alloc(2 * BS))).toBe(true);
  });

  it('goes to the end of the medium with zero blocks, within the maximum length', async () => {
    expectGood(await exec(write10(BLOCKS - 5, 5), pattern(5, 33)));
    expectGood(await exec(writeSame10(BLOCKS - 5, 0, 0x08), Buffer.alloc(BS)));
    expect((await readBlocks(BLOCKS - 5, 5)).equals(Buffer.alloc(5 * BS))).toBe(true);
    expectCheck(await exec(writeSame10(BLOCKS, 0), Buffer.alloc(BS)), 0x5, 0x21, 0x00);
    expectCheck(await exec(writeSame10(BLOCKS - 1, 2), Buffer.alloc(BS)), 0x5, 0x21, 0x00);
    target.logicalUnit(0)!.limits.maxWriteSameBlocks = 100;
    const s = expectCheck(await exec(writeSame16(0, 101), Buffer.alloc(BS)), 0x5, 0x24, 0x00);
    expect(s.senseKeySpecific).toEqual({ type: 'field-pointer', inCdb: true, fieldPointer: 10 });
    expectCheck(await exec(writeSame10(0, 0), Buffer.alloc(BS)), 0x5, 0x24, 0x00);
  });

  it('refuses ANCHOR, protection and a Data-Out that is not one block', async () => {
    expectCheck(await exec(writeSame10(0, 1, 0x10), Buffer.alloc(BS)), 0x5, 0x24, 0x00);
    expectCheck(await exec(writeSame10(0, 1, 0x18), Buffer.alloc(BS)), 0x5, 0x24, 0x00);
    expectCheck(await exec(writeSame10(0, 1, 0x20), Buffer.alloc(BS)), 0x5, 0x24, 0x00);
    expectCheck(await exec(writeSame10(0, 1), Buffer.alloc(BS / 2)), 0x5, 0x1a, 0x00);
    expectCheck(await exec(writeSame10(0, 1), Buffer.alloc(2 * BS)), 0x5, 0x1a, 0x00);
  });
});

describe('UNMAP and GET LBA STATUS', () => {
  it('makes unmapped blocks read as zeros and leaves the rest alone', async () => {
    const a = pattern(32, 41);
    expectGood(await exec(write10(400, 32), a));
    const list = unmapList([
      [400, 4],
      [410, 2],
      [430, 0],
    ]);
    const r = await exec(unmapCdb(list.length), list);
    expectGood(r);
    expect(r.dataOutLength).toBe(list.length);
    const back = await readBlocks(400, 32);
    const expected = Buffer.from(a);
    expected.fill(0, 0, 4 * BS);
    expected.fill(0, 10 * BS, 12 * BS);
    expect(back.equals(expected)).toBe(true);
  });

  it('validates the whole parameter list before unmapping anything', async () => {
    const a = pattern(4, 42);
    expectGood(await exec(write10(500, 4), a));
    const bad = unmapList([
      [500, 4],
      [BLOCKS - 1, 2],
    ]);
    expectCheck(await exec(unmapCdb(bad.length), bad), 0x5, 0x21, 0x00);
    expect((await readBlocks(500, 4)).equals(a)).toBe(true);
    expectGood(await exec(unmapCdb(0)));
    expectGood(await exec(unmapCdb(8), unmapList([])));
    expectCheck(await exec(unmapCdb(4), Buffer.alloc(4)), 0x5, 0x1a, 0x00);
    const inconsistent = unmapList([[0, 1]]);
    inconsistent.writeUInt16BE(2, 0);
    expectCheck(await exec(unmapCdb(inconsistent.length), inconsistent), 0x5, 0x26, 0x00);
    const many = unmapList(Array.from({ length: 257 }, (_, i): [number, number] => [i, 1]));
    expectCheck(await exec(unmapCdb(many.length), many), 0x5, 0x26, 0x00);
    target.logicalUnit(0)!.limits.maxUnmapBlocks = 10;
    expectCheck(await exec(unmapCdb(40), unmapList([[0, 6], [20, 6]])), 0x5, 0x26, 0x00);
    expectCheck(await exec(unmapCdb(24, 0x01), unmapList([[0, 1]])), 0x5, 0x24, 0x00);
  });

  it('does not allocate never-written space when unmapping a large range', async () => {
    await target.close();
    target = await open([{ file: path.join(dir, 'sparse.img'), size: 64 << 20 }]);
    const before = statSync(path.join(dir, 'sparse.img')).blocks;
    expectGood(await exec(unmapCdb(24), unmapList([[0, 65536]])));
    expect(statSync(path.join(dir, 'sparse.img')).blocks).toBe(before);
  });

  it('reports every LBA mapped, from the requested LBA on', async () => {
    const d = expectGood(await exec(getLbaStatus(100, 64)));
    expect(d.length).toBe(24);
    expect(d.readUInt32BE(0)).toBe(20);
    expect(d.readBigUInt64BE(8)).toBe(100n);
    expect(d.readUInt32BE(16)).toBe(BLOCKS - 100);
    expect(d[20]).toBe(0);
    expect(expectGood(await exec(getLbaStatus(0, 8))).length).toBe(8);
    expectCheck(await exec(getLbaStatus(BLOCKS, 24)), 0x5, 0x21, 0x00);
  });
});

describe('SYNCHRONIZE CACHE and PRE-FETCH', () => {
  it('flushes the backing store, within range', async () => {
    const flush = vi.spyOn(target.logicalUnit(0)!.backing, 'flush');
    expectGood(await exec(sync10(0, 0)));
    expectGood(await exec(sync16(10, 10)));
    expect(flush).toHaveBeenCalledTimes(2);
    expectGood(await exec(sync10(0, 0, 0x02))); // IMMED
    expect(flush).toHaveBeenCalledTimes(3);
    expectCheck(await exec(sync10(BLOCKS, 0)), 0x5, 0x21, 0x00);
    expectCheck(await exec(sync16(BLOCKS - 1, 2)), 0x5, 0x21, 0x00);
  });

  it('accepts PRE-FETCH with GOOD and checks its range', async () => {
    expectGood(await exec(prefetch10(0, 16)));
    expectGood(await exec(prefetch16(BLOCKS - 1, 1)));
    expectGood(await exec(prefetch10(0, 0)));
    expectCheck(await exec(prefetch10(BLOCKS, 1)), 0x5, 0x21, 0x00);
    expectCheck(await exec(prefetch16(BLOCKS + 1, 0)), 0x5, 0x21, 0x00);
  });
});

describe('I/O errors of the backing store', () => {
  it('become MEDIUM ERROR for the command', async () => {
    const lu = target.logicalUnit(0)!;
    vi.spyOn(lu.backing, 'read').mockRejectedValueOnce(Object.assign(new Error('eio'), { code: 'EIO' }));
    expectCheck(await exec(read10(0, 1)), 0x3, 0x11, 0x00);
    vi.spyOn(lu.backing, 'write').mockRejectedValueOnce(Object.assign(new Error('eio'), { code: 'EIO' }));
    expectCheck(await exec(write10(0, 1), pattern(1, 0)), 0x3, 0x0c, 0x00);
    vi.spyOn(lu.backing, 'write').mockRejectedValueOnce(Object.assign(new Error('full'), { code: 'ENOSPC' }));
    expectCheck(await exec(write10(0, 1), pattern(1, 0)), 0x7, 0x27, 0x07);
    // The range lock was released on the error path.
    expectGood(await exec(write10(0, 1), pattern(1, 0)));
    expect(lu.locks.size).toBe(0);
  });
});

describe('RangeLock', () => {
  it('runs disjoint ranges together and overlapping ones in arrival order', async () => {
    const lock = new RangeLock();
    const order: string[] = [];
    const r1 = await lock.acquire(0, 10);
    const r2 = await lock.acquire(10, 10); // disjoint: granted at once
    const p3 = lock.acquire(5, 10).then((rel) => (order.push('c'), rel));
    const p4 = lock.acquire(12, 1).then((rel) => (order.push('d'), rel));
    const p5 = lock.acquire(30, 1).then((rel) => (order.push('e'), rel));
    (await p5)();
    expect(order).toEqual(['e']);
    r1();
    await Promise.resolve();
    expect(order).toEqual(['e']); // c still overlaps r2
    r2();
    const rel3 = await p3;
    expect(order).toEqual(['e', 'c']);
    rel3();
    (await p4)();
    expect(order).toEqual(['e', 'c', 'd']);
    expect(lock.size).toBe(0);
  });
});

describe('BackingFile', () => {
  it('creates a sparse image, grows a smaller one and never truncates', async () => {
    const f = path.join(dir, 'new.img');
    const b = await BackingFile.open(f, { size: 1 << 20 });
    expect(b.size).toBe(1 << 20);
    await b.write(4096, Buffer.from('hello'));
    await b.close();
    const grown = await BackingFile.open(f, { size: 2 << 20 });
    expect(statSync(f).size).toBe(2 << 20);
    expect((await grown.read(4096, 5)).toString()).toBe('hello');
    await grown.close();
    const same = await BackingFile.open(f, { size: 1 << 20 });
    expect(same.size).toBe(1 << 20);
    await same.close();
    expect(statSync(f).size).toBe(2 << 20);
    await expect(BackingFile.open(path.join(dir, 'missing.img'))).rejects.toThrow(/no size/);
  });

  it('shares one flush between callers that arrive while it runs', async () => {
    const b = await BackingFile.open(path.join(dir, 'f.img'), { size: 1 << 20 });
    const results = await Promise.all([b.flush(), b.flush(), b.flush(), b.flush()]);
    expect(results).toEqual([undefined, undefined, undefined, undefined]);
    await b.close();
    await expect(b.flush()).rejects.toThrow(/closed/);
  });
});
