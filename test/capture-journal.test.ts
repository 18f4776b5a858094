import { spawn } from 'node:child_process';
import { cp, mkdir, mkdtemp, readdir, readFile, readlink, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import {
  Journal,
  JournalClosedError,
  JournalCorruptError,
  JournalDataDrainedError,
  JournalFailedError,
  nodeJournalFs,
  type JournalFile,
  type JournalFileSystem,
  type JournalOptions,
  type JournalRecord,
  type JournalUsage,
} from '../src/capture/journal.ts';
import { crc32c } from 'iscsi-node-wire';
import pino from 'pino';
import { JournalSpares, removeUnwantedSpares, spareDirFor } from '../src/capture/journal-spares.ts';
import { mountTmpfs } from './helpers/small-disk.ts';
import { SnapshotMap, type MapExtent } from '../src/capture/snapshot-map.ts';

const repoRoot = path.resolve(import.meta.dirname, '..');
const journalModule = path.join(repoRoot, 'src/capture/journal.ts');
const sparesModule = path.join(repoRoot, 'src/capture/journal-spares.ts');

const dirs: string[] = [];
async function tempDir(): Promise<string> {
  const d = await mkdtemp(path.join(tmpdir(), 'detour-journal-'));
  dirs.push(d);
  return d;
}
afterEach(async () => {
  for (const d of dirs.splice(0)) await rm(d, { recursive: true, force: true });
});

/** Deterministic block contents derived from a seq (the crash child below has a JS copy). */
function pattern(seq: number, bytes: number): Buffer {
  const b = Buffer.allocUnsafe(bytes);
  let x = (seq * 2654435761) >>> 0 || 1;
  for (let i = 0; i < bytes; i += 4) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    b.writeUInt32LE(x, i);
  }
  return b;
}

function tick(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

/** A file system that counts fdatasyncs and can hold them (gate) or make them fail. */
function instrumentedFs() {
  const counters = { datasync: 0, syncDir: 0 };
  const control: { gate?: Promise<void>; failNextDatasync?: Error } = {};
  const fs: JournalFileSystem = {
    ...nodeJournalFs,
    async syncDir(dir) {
      counters.syncDir++;
      return nodeJournalFs.syncDir(dir);
    },
    async openFile(file, mode) {
      const f = await nodeJournalFs.openFile(file, mode);
      const wrapped: JournalFile = {
        write: (b, p) => f.write(b, p),
        read: (b, p) => f.read(b, p),
        truncate: (n) => f.truncate(n),
        size: () => f.size(),
        close: () => f.close(),
        async datasync() {
          counters.datasync++;
          if (control.gate) await control.gate;
          const err = control.failNextDatasync;
          if (err) {
            control.failNextDatasync = undefined;
            throw err;
          }
          return f.datasync();
        },
      };
      return wrapped;
    },
  };
  return { fs, counters, control };
}

/**
 * The real file system (segments opened O_DSYNC, one durable write per commit group) with every
 * durable write counted and its buffers kept; a test can hold the durable writes or fail one.
 */
function durableFs() {
  const calls = { writeDurable: 0, write: 0, datasync: 0 };
  const control: { hold?: Promise<void>; failNext?: Error; writes: Uint8Array[][]; positions: number[] } = { writes: [], positions: [] };
  const fs: JournalFileSystem = {
    ...nodeJournalFs,
    async openFile(file, mode) {
      const f = await nodeJournalFs.openFile(file, mode);
      expect(f.writeDurable).toBeTypeOf('function');
      return {
        write: (b, p) => {
          calls.write++;
          return f.write(b, p);
        },
        async writeDurable(b, p) {
          calls.writeDurable++;
          control.writes.push([...b]);
          control.positions.push(p);
          if (control.hold) await control.hold;
          const err = control.failNext;
          if (err) {
            control.failNext = undefined;
            throw err;
          }
          return f.writeDurable!(b, p);
        },
        read: (b, p) => f.read(b, p),
        truncate: (n) => f.truncate(n),
        size: () => f.size(),
        close: () => f.close(),
        datasync: () => {
          calls.datasync++;
          return f.datasync();
        },
      };
    },
  };
  return { fs, calls, control };
}

function gate(): { promise: Promise<void>; open: () => void } {
  let open!: () => void;
  const promise = new Promise<void>((resolve) => (open = resolve));
  return { promise, open };
}

async function segmentFiles(dir: string): Promise<string[]> {
  return (await readdir(dir)).filter((n) => n.endsWith('.jnl')).sort();
}

async function openJournal(dir: string, extra: Partial<JournalOptions> = {}): Promise<Journal> {
  return Journal.open({ dir, blockSize: 512, ...extra });
}

/** Opens with a reflect hook that collects the recovered records. */
async function reopen(dir: string, extra: Partial<JournalOptions> = {}): Promise<{ j: Journal; recs: JournalRecord[] }> {
  const recs: JournalRecord[] = [];
  const j = await openJournal(dir, { ...extra, reflect: (r) => recs.push(r) });
  return { j, recs };
}

describe('Journal append and readData', () => {
  it('round-trips every record kind with byte comparison, whole and in parts', async () => {
    const dir = await tempDir();
    const j = await Journal.open({ dir, blockSize: 4096 });
    const w = await j.append({ lba: 100, blocks: 8, data: pattern(1, 8 * 4096), receiveTime: 1234 });
    const same = await j.append({ lba: 5000, blocks: 1000, kind: 'write-same', data: pattern(2, 4096) });
    const un = await j.append({ lba: 9000, blocks: 3, kind: 'unmap' });
    expect([w.seq, same.seq, un.seq]).toEqual([1, 2, 3]);
    expect(w).toMatchObject({ lba: 100, blocks: 8, kind: 'write', receiveTime: 1234 });
    expect(w.location).toMatchObject({ kind: 'write', blocks: 8 });
    // Data starts one 512-byte header into its record, and records are 512-aligned. Each append
    // here was a commit group of its own, and a group is padded to the next 4 KiB boundary.
    expect(w.location.offset % 512).toBe(0);
    expect(w.location.offset).toBe(512);
    expect(same.location.offset).toBe(w.location.offset + 8 * 4096 + 4096);
    // The write-same record: 4 KiB of data and 3.5 KiB of padding, then the unmap record's header.
    expect(un.location.offset).toBe(same.location.offset + 4096 + 3584 + 512);

    expect((await j.readData(w.location)).equals(pattern(1, 8 * 4096))).toBe(true);
    expect((await j.readData(w.location, 3, 2)).equals(pattern(1, 8 * 4096).subarray(3 * 4096, 5 * 4096))).toBe(true);
    const s = await j.readData(same.location, 998, 2);
    expect(s.equals(Buffer.concat([pattern(2, 4096), pattern(2, 4096)]))).toBe(true);
    expect((await j.readData(un.location)).equals(Buffer.alloc(3 * 4096))).toBe(true);
    await expect(j.readData(w.location, 7, 2)).rejects.toThrow(RangeError);

    await j.close();
    const { j: j2, recs } = await reopen(dir, { blockSize: 4096 });
    expect(recs).toEqual([w, same, un]);
    expect((await j2.readData(recs[0]!.location, 1, 7)).equals(pattern(1, 8 * 4096).subarray(4096))).toBe(true);
    expect((await j2.readData(recs[1]!.location)).equals(Buffer.concat(Array(1000).fill(pattern(2, 4096))))).toBe(true);
    await j2.close();
  });

  it('copies the caller data at append time: later changes to the buffer do not matter', async () => {
    const dir = await tempDir();
    const j = await openJournal(dir);
    const data = pattern(7, 1024);
    const p = j.append({ lba: 0, blocks: 2, data });
    data.fill(0xee);
    const rec = await p;
    expect((await j.readData(rec.location)).equals(pattern(7, 1024))).toBe(true);
    await j.close();
    const { j: j2, recs } = await reopen(dir);
    expect((await j2.readData(recs[0]!.location)).equals(pattern(7, 1024))).toBe(true);
    await j2.close();
  });

  it('with borrow, writes the caller buffer itself; without, a copy of it', async () => {
    const dir = await tempDir();
    const { fs, control } = durableFs();
    const j = await openJournal(dir, { fs });
    const lent = pattern(8, 1024);
    const copied = pattern(9, 1024);
    const [a, b] = await Promise.all([j.append({ lba: 0, blocks: 2, data: lent, borrow: true }), j.append({ lba: 2, blocks: 2, data: copied })]);
    const iov = control.writes.flat();
    const same = (x: Uint8Array, y: Uint8Array) => x.buffer === y.buffer && x.byteOffset === y.byteOffset;
    expect(iov.some((x) => same(x, lent))).toBe(true);
    expect(iov.some((x) => same(x, copied))).toBe(false);
    expect(iov.some((x) => x.length === 1024 && Buffer.from(x).equals(pattern(9, 1024)))).toBe(true);
    // Both as they were at append time, also after a reopen.
    expect((await j.readData(a.location)).equals(pattern(8, 1024))).toBe(true);
    expect((await j.readData(b.location)).equals(pattern(9, 1024))).toBe(true);
    await j.close();
    const { j: j2, recs } = await reopen(dir);
    expect((await j2.readData(recs[0]!.location)).equals(pattern(8, 1024))).toBe(true);
    expect((await j2.readData(recs[1]!.location)).equals(pattern(9, 1024))).toBe(true);
    await j2.close();
  });

  it('rejects malformed requests without consuming a seq', async () => {
    const dir = await tempDir();
    const j = await openJournal(dir);
    await expect(j.append({ lba: 0, blocks: 2, data: Buffer.alloc(512) })).rejects.toThrow(/needs 1024 data bytes/);
    await expect(j.append({ lba: 0, blocks: 2, kind: 'write-same', data: Buffer.alloc(1024) })).rejects.toThrow(RangeError);
    await expect(j.append({ lba: 0, blocks: 2, kind: 'unmap', data: Buffer.alloc(512) })).rejects.toThrow(RangeError);
    await expect(j.append({ lba: -1, blocks: 1, data: Buffer.alloc(512) })).rejects.toThrow(RangeError);
    await expect(j.append({ lba: 0, blocks: 0, data: Buffer.alloc(0) })).rejects.toThrow(RangeError);
    expect(j.lastSeq).toBe(0);
    expect((await j.append({ lba: 0, blocks: 1, data: Buffer.alloc(512) })).seq).toBe(1);
    await j.close();
    await expect(j.append({ lba: 0, blocks: 1, data: Buffer.alloc(512) })).rejects.toBeInstanceOf(JournalClosedError);
  });

  it('refuses to reopen with another block size', async () => {
    const dir = await tempDir();
    await (await openJournal(dir)).close();
    await expect(Journal.open({ dir, blockSize: 4096 })).rejects.toThrow(/block size 512/);
  });
});

describe('Journal group commit', () => {
  it('covers 32 concurrent appends with one fdatasync and resolves them in seq order', async () => {
    const dir = await tempDir();
    const { fs, counters } = instrumentedFs();
    const j = await openJournal(dir, { fs });
    const order: number[] = [];
    const all = Array.from({ length: 32 }, (_, i) =>
      j.append({ lba: i * 8, blocks: 8, data: pattern(i + 1, 4096) }).then((r) => {
        order.push(r.seq);
        return r;
      }),
    );
    const recs = await Promise.all(all);
    expect(recs.map((r) => r.seq)).toEqual(Array.from({ length: 32 }, (_, i) => i + 1));
    expect(order).toEqual(recs.map((r) => r.seq));
    expect(counters.datasync).toBe(1);
    expect(j.stats.batches).toBe(1);
    expect(j.stats.largestBatch).toBe(32);
    for (const r of recs) expect((await j.readData(r.location)).equals(pattern(r.seq, 4096))).toBe(true);
    await j.close();
  });

  it('acknowledges nothing before the fdatasync returns; appends during it form the next group', async () => {
    const dir = await tempDir();
    const { fs, counters, control } = instrumentedFs();
    const j = await openJournal(dir, { fs });
    const g = gate();
    control.gate = g.promise;
    let firstDone = false;
    const first = j.append({ lba: 0, blocks: 1, data: pattern(1, 512) }).then((r) => {
      firstDone = true;
      return r;
    });
    for (const until = Date.now() + 10_000; counters.datasync === 0 && Date.now() < until; ) {
      await new Promise((r) => setTimeout(r, 1));
    }
    expect(counters.datasync).toBe(1); // the first group is in its fdatasync, held by the gate
    const later = Array.from({ length: 50 }, (_, i) => j.append({ lba: 10 + i, blocks: 1, data: pattern(i + 2, 512) }));
    for (let i = 0; i < 10; i++) await tick();
    expect(firstDone).toBe(false);
    expect(j.durableSeq).toBe(0);
    expect(j.lastSeq).toBe(51);
    control.gate = undefined;
    g.open();
    expect((await first).seq).toBe(1);
    const rest = await Promise.all(later);
    expect(rest.map((r) => r.seq)).toEqual(Array.from({ length: 50 }, (_, i) => i + 2));
    expect(counters.datasync).toBe(2);
    expect(j.stats.largestBatch).toBe(50);
    await j.close();
  });

  it('splits a flood into groups of at most maxBatchBytes', async () => {
    const dir = await tempDir();
    const { fs, counters } = instrumentedFs();
    // Each record is 512 + 4096 bytes; 10 fit in a 46080-byte group.
    const j = await openJournal(dir, { fs, maxBatchBytes: 46_080 });
    const recs = await Promise.all(Array.from({ length: 95 }, (_, i) => j.append({ lba: i, blocks: 8, data: pattern(i + 1, 4096) })));
    expect(recs.at(-1)!.seq).toBe(95);
    expect(counters.datasync).toBe(10);
    expect(j.stats.largestBatch).toBe(10);
    await j.close();
  });

  it('measures append and fdatasync rates with 32 concurrent 4 KiB writers', async () => {
    const dir = await tempDir();
    const j = await Journal.open({ dir, blockSize: 4096 });
    const data = pattern(1, 4096);
    const until = performance.now() + 2000;
    const start = performance.now();
    let n = 0;
    await Promise.all(
      Array.from({ length: 32 }, async (_, w) => {
        while (performance.now() < until) {
          await j.append({ lba: (w * 1000 + (n % 1000)) * 1, blocks: 1, data });
          n++;
        }
      }),
    );
    const secs = (performance.now() - start) / 1000;
    const { appends, batches } = j.stats;
    console.log(
      `journal group commit, 32 x 4 KiB writers: ${(appends / secs).toFixed(0)} appends/s, ` +
        `${(batches / secs).toFixed(0)} commit groups/s, ${(appends / batches).toFixed(1)} records per group`,
    );
    expect(appends).toBe(n);
    // Grouping must actually happen: far fewer data syncs than appends.
    expect(batches * 4).toBeLessThan(appends);
    await j.close();
  });
});

describe('Journal commit groups on the real file system (O_DSYNC)', () => {
  it('makes a group durable with one write and no separate fdatasync', async () => {
    const dir = await tempDir();
    const { fs, calls } = durableFs();
    const j = await openJournal(dir, { fs });
    const recs = await Promise.all(Array.from({ length: 32 }, (_, i) => j.append({ lba: i, blocks: 1, data: pattern(i + 1, 512), borrow: true })));
    expect(recs.map((r) => r.seq)).toEqual(Array.from({ length: 32 }, (_, i) => i + 1));
    expect(calls).toEqual({ writeDurable: 1, write: 0, datasync: 0 });
    expect(j.stats).toMatchObject({ batches: 1, largestBatch: 32, appends: 32 });
    await j.close();
    const { j: j2, recs: again } = await reopen(dir);
    expect(again.map((r) => r.seq)).toEqual(recs.map((r) => r.seq));
    for (const r of again) expect((await j2.readData(r.location)).equals(pattern(r.seq, 512))).toBe(true);
    await j2.close();
  });

  it('reports each commit group to onCommit with its write time and record count; a throwing observer changes nothing', async () => {
    const dir = await tempDir();
    const commits: Array<[number, number]> = [];
    const j = await openJournal(dir, { onCommit: (seconds, records) => commits.push([seconds, records]) });
    await Promise.all(Array.from({ length: 32 }, (_, i) => j.append({ lba: i, blocks: 1, data: pattern(i + 1, 512) })));
    await Promise.all(Array.from({ length: 3 }, (_, i) => j.append({ lba: 100 + i, blocks: 1, data: pattern(33 + i, 512) })));
    expect(commits.map(([, n]) => n)).toEqual([32, 3]);
    for (const [s] of commits) expect(s).toBeGreaterThan(0);
    expect(commits.length).toBe(j.stats.batches);
    await j.close();

    const dir2 = await tempDir();
    let calls = 0;
    const j2 = await openJournal(dir2, {
      onCommit: () => {
        calls++;
        throw new Error('observer bug');
      },
    });
    const recs = await Promise.all(Array.from({ length: 4 }, (_, i) => j2.append({ lba: i, blocks: 1, data: pattern(i + 1, 512) })));
    const more = await j2.append({ lba: 9, blocks: 1, data: pattern(5, 512) });
    expect([...recs, more].map((r) => r.seq)).toEqual([1, 2, 3, 4, 5]);
    expect(calls).toBe(2);
    for (const r of [...recs, more]) expect((await j2.readData(r.location)).equals(pattern(r.seq, 512))).toBe(true);
    await j2.close();
  });

  it('writes every commit group as whole 4 KiB blocks: it starts on a 4 KiB boundary, and its last record is padded to the next one', async () => {
    const dir = await tempDir();
    const { fs, control } = durableFs();
    const j = await openJournal(dir, { fs });
    const recs: JournalRecord[] = [];
    let seq = 0;
    // Groups of 1 to 5 records of 1 to 9 blocks of 512 bytes: almost none is a multiple of 4 KiB.
    for (const [count, blocks] of [[1, 1], [3, 2], [5, 9], [2, 7], [4, 3], [1, 8]] as const) {
      const round = Array.from({ length: count }, () => {
        seq++;
        return j.append({ lba: seq * 16, blocks, data: pattern(seq, blocks * 512) });
      });
      recs.push(...(await Promise.all(round)));
    }
    expect(control.writes.length).toBe(6);
    const lengths = control.writes.map((iov) => iov.reduce((a, b) => a + b.length, 0));
    for (let i = 0; i < lengths.length; i++) {
      const length = lengths[i]!;
      expect(control.positions[i]! % 4096, `group ${i}`).toBe(0);
      expect(length % 4096, `group ${i}`).toBe(0);
      // No more padding than it takes to get there: less than 4 KiB beyond its records.
      const start = control.positions[i]!;
      const inGroup = recs.filter((r) => r.location.offset - 512 >= start && r.location.offset - 512 < start + length);
      const unpadded = inGroup.reduce((a, r) => a + 512 + r.blocks * 512, 0);
      expect(length - unpadded, `group ${i}`).toBeGreaterThanOrEqual(0);
      expect(length - unpadded, `group ${i}`).toBeLessThan(4096);
      if (i > 0) expect(control.positions[i]).toBe(control.positions[i - 1]! + lengths[i - 1]!);
    }
    const [seg] = await segmentFiles(dir);
    expect((await stat(path.join(dir, seg!))).size % 4096).toBe(0);
    await j.close();
    const { j: j2, recs: again } = await reopen(dir);
    expect(again).toEqual(recs);
    expect(j2.recovery.tornTail).toBeUndefined();
    for (const r of again) expect((await j2.readData(r.location)).equals(pattern(r.seq, r.blocks * 512))).toBe(true);
    await j2.close();
  });

  it('acknowledges nothing before the durable write returns; what arrives meanwhile is the next group, written right after', async () => {
    const dir = await tempDir();
    const { fs, calls, control } = durableFs();
    const j = await openJournal(dir, { fs });
    const g = gate();
    control.hold = g.promise;
    const acked: number[] = [];
    const first = Array.from({ length: 3 }, (_, i) => j.append({ lba: i, blocks: 1, data: pattern(i + 1, 512) }).then((r) => (acked.push(r.seq), r)));
    for (const until = Date.now() + 10_000; calls.writeDurable === 0 && Date.now() < until; ) await tick();
    const later = Array.from({ length: 20 }, (_, i) => j.append({ lba: 10 + i, blocks: 1, data: pattern(i + 4, 512) }).then((r) => (acked.push(r.seq), r)));
    for (let i = 0; i < 20; i++) await tick();
    // One group under way, held: nothing acknowledged, the next group waits for it.
    expect(calls.writeDurable).toBe(1);
    expect(acked).toEqual([]);
    expect(j.durableSeq).toBe(0);
    control.hold = undefined;
    g.open();
    await Promise.all([...first, ...later]);
    expect(acked).toEqual(Array.from({ length: 23 }, (_, i) => i + 1));
    expect(calls.writeDurable).toBe(2);
    expect(control.writes[1]!.length).toBe(2 * 20); // header and data of each of the 20
    expect(j.stats).toMatchObject({ batches: 2, largestBatch: 20 });
    await j.close();
  });

  it('a failed durable write rejects its group and everything behind it; recovery returns only acknowledged records', async () => {
    const dir = await tempDir();
    const { fs, control } = durableFs();
    const j = await openJournal(dir, { fs });
    const failures: JournalFailedError[] = [];
    j.on('failed', (err) => failures.push(err));
    const ok = await Promise.all([1, 2].map((s) => j.append({ lba: s, blocks: 1, data: pattern(s, 512) })));
    const g = gate();
    control.hold = g.promise;
    control.failNext = Object.assign(new Error('EIO: i/o error'), { code: 'EIO' });
    const failing = [3, 4].map((s) => j.append({ lba: s, blocks: 1, data: pattern(s, 512) }));
    for (let i = 0; i < 10; i++) await tick();
    const behind = j.append({ lba: 5, blocks: 1, data: pattern(5, 512) });
    control.hold = undefined;
    g.open();
    const settled = await Promise.allSettled([...failing, behind]);
    expect(settled.map((r) => r.status)).toEqual(['rejected', 'rejected', 'rejected']);
    for (const r of settled) expect((r as PromiseRejectedResult).reason).toBeInstanceOf(JournalFailedError);
    expect(j.durableSeq).toBe(2);
    await expect(j.append({ lba: 6, blocks: 1, data: pattern(6, 512) })).rejects.toBeInstanceOf(JournalFailedError);
    // The owner hears of it once, and can tell afterwards; the refused records are nobody's to wait for.
    expect(failures).toHaveLength(1);
    expect(failures[0]!.message).toMatch(/EIO: i\/o error/);
    expect(j.failed).toBe(failures[0]);
    for (const lba of [3, 4, 5, 6]) expect(j.unreflectedOverlapping(lba, 1)).toBeUndefined();
    expect((await j.readData(ok[1]!.location)).equals(pattern(2, 512))).toBe(true);
    await j.close();
    const { j: r, recs } = await reopen(dir);
    expect(recs.map((x) => x.seq)).toEqual([1, 2]);
    await r.close();
  });

  it('leaves the segment a group is being written to for a later drain round', async () => {
    const dir = await tempDir();
    const { fs, control } = durableFs();
    const j = await openJournal(dir, { fs, reflect: () => {} });
    const a = await j.append({ lba: 0, blocks: 1, data: pattern(1, 512) });
    const g = gate();
    control.hold = g.promise;
    const b = j.append({ lba: 1, blocks: 1, data: pattern(2, 512) });
    for (let i = 0; i < 10; i++) await tick();
    // Record 1 is drained, and its segment holds nothing else that is durable, but record 2 is
    // on its way into it.
    await j.markDrained(1);
    expect(await segmentFiles(dir)).toHaveLength(1);
    control.hold = undefined;
    g.open();
    const rec = await b;
    expect(rec.location.segment).toBe(a.location.segment);
    expect((await j.readData(rec.location)).equals(pattern(2, 512))).toBe(true);
    await j.markDrained(2);
    expect(await segmentFiles(dir)).toHaveLength(0);
    // The next record goes to a new segment.
    const c = await j.append({ lba: 2, blocks: 1, data: pattern(3, 512) });
    expect(c.location.segment).toBeGreaterThan(a.location.segment);
    await j.close();
    const { j: j2, recs } = await reopen(dir);
    expect(recs.map((x) => x.seq)).toEqual([3]);
    await j2.close();
  });
});

describe('Journal segment files: direct (O_DIRECT|O_DSYNC) commit writes', () => {
  it('a group larger than the aligned staging memory goes in pieces and reads back byte-exact, before and after reopen', async () => {
    const dir = await tempDir();
    const j = await openJournal(dir);
    // 9 MiB and 5 MiB + 512 in one group, then small ones: several staging-sized pieces each.
    const sizes = [9 << 20, (5 << 20) + 512, 512, 4096];
    const recs = await Promise.all(sizes.map((n, i) => j.append({ lba: i * 65536, blocks: n / 512, data: pattern(i + 1, n) })));
    for (const [i, r] of recs.entries()) expect((await j.readData(r.location)).equals(pattern(i + 1, sizes[i]!))).toBe(true);
    await j.close();
    const { j: j2, recs: again } = await reopen(dir);
    expect(again.map((r) => r.seq)).toEqual([1, 2, 3, 4]);
    for (const [i, r] of again.entries()) expect((await j2.readData(r.location)).equals(pattern(i + 1, sizes[i]!))).toBe(true);
    await j2.close();
  });

  it('a write the direct descriptor refuses (EINVAL: misaligned) is done through the page cache instead, durable and exact', async () => {
    const dir = await tempDir();
    const file = path.join(dir, 'probe.bin');
    const f = await nodeJournalFs.openFile(file, 'create');
    // 512-aligned: the direct path. Then a misaligned position and length, which O_DIRECT refuses.
    await f.writeDurable!([pattern(1, 1024)], 0);
    await f.writeDurable!([pattern(2, 100), pattern(3, 36)], 1024 + 7);
    // And after that refusal, aligned writes still land (now buffered).
    await f.writeDurable!([pattern(4, 512)], 2048);
    expect(await f.size()).toBe(2560);
    await f.close();
    const bytes = await readFile(file);
    expect(bytes.subarray(0, 1024).equals(pattern(1, 1024))).toBe(true);
    expect(bytes.subarray(1031, 1131).equals(pattern(2, 100))).toBe(true);
    expect(bytes.subarray(1131, 1167).equals(pattern(3, 36))).toBe(true);
    expect(bytes.subarray(2048, 2560).equals(pattern(4, 512))).toBe(true);
  });

  it('only the segment being appended to holds a second (direct) descriptor', async () => {
    const dir = await tempDir();
    const j = await openJournal(dir, { segmentBytes: 64 << 10, maxBatchBytes: 64 << 10 });
    for (let i = 0; i < 12; i++) await j.append({ lba: i * 128, blocks: 120, data: pattern(i + 1, 120 * 512) });
    const segments = await segmentFiles(dir);
    expect(segments.length).toBeGreaterThanOrEqual(10);
    const open: string[] = [];
    for (const fd of await readdir('/proc/self/fd')) {
      try {
        const target = await readlink(path.join('/proc/self/fd', fd));
        if (target.startsWith(dir + path.sep)) open.push(path.basename(target));
      } catch {
        // closed meanwhile (the readdir's own descriptor)
      }
    }
    // One descriptor per live segment, and one more for the active segment.
    expect(open.length).toBe(segments.length + 1);
    await j.close();
  });

  it('reads through the buffered descriptor see what the direct descriptor wrote over them (no stale cached pages)', async () => {
    const dir = await tempDir();
    const f = await nodeJournalFs.openFile(path.join(dir, 'coherent.bin'), 'create');
    await f.writeDurable!([pattern(1, 8192)], 0);
    const before = Buffer.alloc(8192);
    expect(await f.read(before, 0)).toBe(8192);
    expect(before.equals(pattern(1, 8192))).toBe(true);
    // Overwrite half a cached page and a whole one.
    await f.writeDurable!([pattern(2, 2560)], 3584);
    const after = Buffer.alloc(8192);
    expect(await f.read(after, 0)).toBe(8192);
    expect(after.equals(Buffer.concat([pattern(1, 8192).subarray(0, 3584), pattern(2, 2560), pattern(1, 8192).subarray(6144)]))).toBe(true);
    await f.close();
  });
});

describe('Journal reflection', () => {
  it('tracks unreflected records, reflectedSeq and waiters; markReflected needs durability', async () => {
    const dir = await tempDir();
    const { fs, control } = instrumentedFs();
    const j = await openJournal(dir, { fs });
    const g = gate();
    control.gate = g.promise;
    const p1 = j.append({ lba: 10, blocks: 4, data: pattern(1, 2048) });
    const p2 = j.append({ lba: 100, blocks: 2, data: pattern(2, 1024) });
    expect(j.unreflected).toBe(2);
    expect(j.unreflectedBytes).toBe(6 * 512);
    expect(j.reflectedSeq).toBe(0);
    expect(j.unreflectedOverlapping(12, 1)).toBe(1);
    expect(j.unreflectedOverlapping(0, 200)).toBe(2);
    expect(j.unreflectedOverlapping(14, 86)).toBeUndefined();
    expect(() => j.markReflected(1)).toThrow(/not durable/);
    let waited = false;
    const w = j.waitReflected(2).then(() => (waited = true));
    control.gate = undefined;
    g.open();
    const [r1, r2] = await Promise.all([p1, p2]);
    expect([...j.unreflectedRecords()]).toEqual([r1, r2]);
    j.markReflected(2); // out of order is allowed; reflectedSeq only covers a gap-free prefix
    expect(j.reflectedSeq).toBe(0);
    await tick();
    expect(waited).toBe(false);
    j.markReflected(1);
    j.markReflected(1);
    expect(j.reflectedSeq).toBe(2);
    await w;
    expect(waited).toBe(true);
    expect(j.unreflected).toBe(0);
    expect(j.unreflectedBytes).toBe(0);
    await j.close();
  });

  it('calls the reflect hook in seq order before each append resolves', async () => {
    const dir = await tempDir();
    const events: string[] = [];
    const j = await openJournal(dir, {
      reflect: (r) => {
        expect(j.durableSeq).toBeGreaterThanOrEqual(r.seq);
        events.push(`reflect ${r.seq}`);
      },
    });
    await Promise.all(
      Array.from({ length: 10 }, (_, i) =>
        j.append({ lba: i, blocks: 1, data: pattern(i + 1, 512) }).then((r) => {
          events.push(`ack ${r.seq}`);
          expect(j.reflectedSeq).toBeGreaterThanOrEqual(r.seq);
        }),
      ),
    );
    const reflects = events.filter((e) => e.startsWith('reflect'));
    expect(reflects).toEqual(Array.from({ length: 10 }, (_, i) => `reflect ${i + 1}`));
    for (let s = 1; s <= 10; s++) expect(events.indexOf(`reflect ${s}`)).toBeLessThan(events.indexOf(`ack ${s}`));
    expect(j.reflectedSeq).toBe(10);
    expect(j.unreflected).toBe(0);
    await j.close();
  });

  it('a throwing reflect hook stops the journal instead of acknowledging', async () => {
    const dir = await tempDir();
    const j = await openJournal(dir, {
      reflect: (r) => {
        if (r.seq === 2) throw new Error('map refused');
      },
    });
    const results = await Promise.allSettled(
      [1, 2, 3].map((i) => j.append({ lba: i, blocks: 1, data: pattern(i, 512) })),
    );
    expect(results.map((r) => r.status)).toEqual(['fulfilled', 'rejected', 'rejected']);
    await expect(j.append({ lba: 0, blocks: 1, data: pattern(9, 512) })).rejects.toBeInstanceOf(JournalFailedError);
    await j.close();
  });

  it('recovery hands back every record unreflected, in order, when no hook is given', async () => {
    const dir = await tempDir();
    const j = await openJournal(dir);
    for (let i = 1; i <= 5; i++) {
      const r = await j.append({ lba: i * 3, blocks: 2, data: pattern(i, 1024) });
      j.markReflected(r.seq);
    }
    await j.close();
    const j2 = await openJournal(dir);
    expect(j2.reflectedSeq).toBe(0);
    expect(j2.unreflected).toBe(5);
    const recs = [...j2.unreflectedRecords()];
    expect(recs.map((r) => [r.seq, r.lba])).toEqual([1, 2, 3, 4, 5].map((i) => [i, i * 3]));
    for (const r of recs) j2.markReflected(r.seq);
    expect(j2.reflectedSeq).toBe(5);
    expect((await j2.append({ lba: 0, blocks: 1, data: pattern(6, 512) })).seq).toBe(6);
    await j2.close();
  });
});

describe('Journal crash recovery', () => {
  it('truncating the final record at every byte offset recovers exactly the complete records', async () => {
    const dir = await tempDir();
    const j = await openJournal(dir);
    const written: JournalRecord[] = [];
    for (let group = 0; group < 3; group++) {
      const recs = await Promise.all(
        Array.from({ length: 4 }, (_, i) => {
          const seq = group * 4 + i + 1;
          return j.append({ lba: seq * 10, blocks: 2, data: pattern(seq, 1024) });
        }),
      );
      written.push(...recs);
    }
    // The final record: a single-block write in a group of its own.
    written.push(await j.append({ lba: 7, blocks: 1, data: pattern(13, 512) }));
    await j.close();
    const [segName] = await segmentFiles(dir);
    const segPath = path.join(dir, segName!);
    const full = await readFile(segPath);
    const finalStart = written.at(-1)!.location.offset - 512;
    // Header, data, and the group's padding to the next 4 KiB boundary: a record is complete only
    // with its padding, which its group's durable write covered too.
    expect(finalStart % 4096).toBe(0);
    expect(full.length).toBe(finalStart + 4096);

    for (let len = finalStart; len <= full.length; len++) {
      await writeFile(segPath, full.subarray(0, len));
      const { j: r, recs } = await reopen(dir);
      const complete = len === full.length ? 13 : 12;
      expect(recs.map((x) => x.seq), `length ${len}`).toEqual(Array.from({ length: complete }, (_, i) => i + 1));
      expect(r.lastSeq).toBe(complete);
      const torn = len !== finalStart && len !== full.length;
      expect(r.recovery.tornTail !== undefined, `length ${len}`).toBe(torn);
      if (torn) expect(r.recovery.tornTail).toMatchObject({ offset: finalStart, discardedBytes: len - finalStart });
      if (len === finalStart + 300 || len === full.length) {
        for (const x of recs) expect((await r.readData(x.location)).equals(pattern(x.seq, x.blocks * 512))).toBe(true);
      }
      await r.close();
      // The torn bytes were cut off durably.
      expect((await stat(segPath)).size).toBe(complete === 13 ? full.length : finalStart);
    }

    // After a torn tail, appending reuses the lost seq in a new segment and everything reopens.
    await writeFile(segPath, full.subarray(0, finalStart + 700));
    const j2 = await openJournal(dir);
    const again = await j2.append({ lba: 8, blocks: 1, data: pattern(99, 512) });
    expect(again.seq).toBe(13);
    await j2.close();
    const { j: j3, recs } = await reopen(dir);
    expect(recs.map((x) => x.seq)).toEqual(Array.from({ length: 13 }, (_, i) => i + 1));
    expect((await j3.readData(recs[12]!.location)).equals(pattern(99, 512))).toBe(true);
    expect(await segmentFiles(dir)).toHaveLength(2);
    await j3.close();
  });

  it('a lost record inside the last commit group is a torn tail, even with intact records behind it', async () => {
    const dir = await tempDir();
    const j = await openJournal(dir);
    await Promise.all([1, 2].map((s) => j.append({ lba: s, blocks: 1, data: pattern(s, 512) })));
    // One group of three; its middle record's pages "never reached the disk".
    const group = await Promise.all([3, 4, 5].map((s) => j.append({ lba: s, blocks: 1, data: pattern(s, 512) })));
    await j.close();
    const segPath = path.join(dir, (await segmentFiles(dir))[0]!);
    const buf = await readFile(segPath);
    buf.fill(0, group[1]!.location.offset - 512, group[1]!.location.offset + 512);
    await writeFile(segPath, buf);
    const { j: r, recs } = await reopen(dir);
    expect(recs.map((x) => x.seq)).toEqual([1, 2, 3]);
    expect(r.recovery.tornTail).toMatchObject({ discardedRecords: 1, offset: group[1]!.location.offset - 512 });
    await r.close();
  });

  it('a corrupted record followed by later commit groups stops recovery and reports, changing nothing', async () => {
    const dir = await tempDir();
    const j = await openJournal(dir);
    const recs: JournalRecord[] = [];
    for (let s = 1; s <= 6; s++) recs.push(await j.append({ lba: s, blocks: 2, data: pattern(s, 1024) }));
    await j.close();
    const segPath = path.join(dir, (await segmentFiles(dir))[0]!);
    const buf = await readFile(segPath);
    buf[recs[3]!.location.offset + 100]! ^= 0x40; // one bit of record 4's data
    await writeFile(segPath, buf);

    const seen: number[] = [];
    const err = await Journal.open({ dir, blockSize: 512, reflect: (r) => seen.push(r.seq) }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(JournalCorruptError);
    const report = (err as JournalCorruptError).report;
    expect(report).toMatchObject({ offset: recs[3]!.location.offset - 512, intactThroughSeq: 3 });
    expect(report.reason).toMatch(/CRC mismatch.*later commit group/);
    // Only intact records were ever handed out, and the file was left alone for inspection.
    expect(seen).toEqual([1, 2, 3]);
    expect((await readFile(segPath)).equals(buf)).toBe(true);
  });

  it('recovers records of format version 1 (groups without padding); a version-1 record claiming padding is not one', async () => {
    // Rewrites every record of a segment as version 1, with its CRC made right again: what an
    // earlier detour wrote, when a group ended wherever its last record did.
    const asVersion1 = (buf: Buffer) => {
      for (let pos = 0; pos < buf.length; ) {
        const h = buf.subarray(pos, pos + 512);
        const dataBytes = h.readUInt32LE(48);
        h.writeUInt16LE(1, 4);
        const dataCrc = dataBytes > 0 ? crc32c(buf.subarray(pos + 512, pos + 512 + dataBytes)) : 0;
        h.writeUInt32LE(crc32c(h.subarray(0, 508), dataCrc), 508);
        pos += h.readUInt32LE(52);
      }
      return buf;
    };
    const dir = await tempDir();
    const j = await openJournal(dir);
    // Records of 7 blocks are 4 KiB with their header: these groups need no padding.
    const recs = await Promise.all(Array.from({ length: 3 }, (_, i) => j.append({ lba: i * 8, blocks: 7, data: pattern(i + 1, 3584) })));
    await j.close();
    const [seg] = await segmentFiles(dir);
    const segPath = path.join(dir, seg!);
    const v2 = await readFile(segPath);
    await writeFile(segPath, asVersion1(Buffer.from(v2)));
    const { j: j2, recs: again } = await reopen(dir);
    expect(again).toEqual(recs);
    expect(j2.recovery.tornTail).toBeUndefined();
    for (const r of again) expect((await j2.readData(r.location)).equals(pattern(r.seq, 3584))).toBe(true);
    await j2.close();

    // A last group whose record carries padding, relabelled version 1: its length is not what
    // version 1 allows, so it is a bad record, here the torn tail.
    const dir2 = await tempDir();
    const k = await openJournal(dir2);
    await Promise.all(Array.from({ length: 3 }, (_, i) => k.append({ lba: i * 8, blocks: 7, data: pattern(i + 1, 3584) })));
    const padded = await k.append({ lba: 100, blocks: 1, data: pattern(4, 512) });
    await k.close();
    const [seg2] = await segmentFiles(dir2);
    const seg2Path = path.join(dir2, seg2!);
    const buf = await readFile(seg2Path);
    expect(buf.length).toBe(3 * 4096 + 4096);
    expect(buf.readUInt32LE(3 * 4096 + 52)).toBe(4096);
    await writeFile(seg2Path, asVersion1(Buffer.from(buf)));
    const { j: k2, recs: kept } = await reopen(dir2);
    expect(kept.map((r) => r.seq)).toEqual([1, 2, 3]);
    expect(k2.recovery.tornTail).toMatchObject({ offset: 3 * 4096, reason: 'inconsistent record header' });
    expect(padded.seq).toBe(4);
    await k2.close();
  });

  it('damage in a segment that is not the last one is corruption', async () => {
    const dir = await tempDir();
    const j = await openJournal(dir, { segmentBytes: 4096 });
    for (let s = 1; s <= 12; s++) await j.append({ lba: s, blocks: 2, data: pattern(s, 1024) });
    await j.close();
    const segs = await segmentFiles(dir);
    expect(segs.length).toBeGreaterThan(2);
    const first = path.join(dir, segs[0]!);
    const buf = await readFile(first);
    await writeFile(first, buf.subarray(0, buf.length - 200)); // torn, but not at the journal's end
    await expect(openJournal(dir)).rejects.toBeInstanceOf(JournalCorruptError);
  });

  it('a missing segment (seq gap) and a missing state file are corruption', async () => {
    const dir = await tempDir();
    const j = await openJournal(dir, { segmentBytes: 2048 });
    for (let s = 1; s <= 6; s++) await j.append({ lba: s, blocks: 2, data: pattern(s, 1024) });
    await j.close();
    const segs = await segmentFiles(dir);
    await rm(path.join(dir, segs[1]!));
    await expect(openJournal(dir)).rejects.toThrow(/seq \d+ where \d+ was expected/);
    await rm(path.join(dir, 'journal-state.json'));
    await expect(openJournal(dir)).rejects.toThrow(/journal-state.json is missing/);
  });

  it('a failed fdatasync rejects its group, acknowledges nothing more, and recovery returns only acknowledged records', async () => {
    const dir = await tempDir();
    const { fs, control } = instrumentedFs();
    const j = await openJournal(dir, { fs });
    const ok = await Promise.all([1, 2, 3].map((s) => j.append({ lba: s, blocks: 1, data: pattern(s, 512) })));
    control.failNextDatasync = Object.assign(new Error('EIO: i/o error'), { code: 'EIO' });
    const failed = await Promise.allSettled([4, 5].map((s) => j.append({ lba: s, blocks: 1, data: pattern(s, 512) })));
    expect(failed.map((r) => r.status)).toEqual(['rejected', 'rejected']);
    expect((failed[0] as PromiseRejectedResult).reason).toBeInstanceOf(JournalFailedError);
    await expect(j.append({ lba: 6, blocks: 1, data: pattern(6, 512) })).rejects.toBeInstanceOf(JournalFailedError);
    await expect(j.markDrained(1)).rejects.toBeInstanceOf(JournalFailedError);
    expect(j.durableSeq).toBe(3);
    // Durable data stays readable.
    expect((await j.readData(ok[2]!.location)).equals(pattern(3, 512))).toBe(true);
    await j.close();
    const { j: r, recs } = await reopen(dir);
    expect(recs.map((x) => x.seq)).toEqual([1, 2, 3]);
    await r.close();
  });

  it('close() flushes appends already admitted', async () => {
    const dir = await tempDir();
    const j = await openJournal(dir);
    const pending = Array.from({ length: 10 }, (_, i) => j.append({ lba: i, blocks: 1, data: pattern(i + 1, 512) }));
    await j.close();
    expect((await Promise.all(pending)).map((r) => r.seq)).toEqual(Array.from({ length: 10 }, (_, i) => i + 1));
    const { j: r, recs } = await reopen(dir);
    expect(recs).toHaveLength(10);
    await r.close();
  });

  it.each([
    ['segments in new files', false],
    ['segments made of spare files', true],
  ])('survives SIGKILL of an appending process at random moments (real crash), %s', async (_label, withSpares) => {
    const root = await tempDir();
    const dir = path.join(root, 'journal');
    const spareDir = path.join(root, 'spare');
    // The child appends with 16 concurrent writers, prints every acknowledged seq, and now and
    // then marks older records drained. Its data, lba, length and receive time derive from seq.
    const child = `
      import { pathToFileURL } from 'node:url';
      const [dir, mod, sparesMod, spareDir] = process.argv.slice(1);
      const { Journal } = await import(pathToFileURL(mod).href);
      let spares;
      if (spareDir) {
        const { JournalSpares } = await import(pathToFileURL(sparesMod).href);
        const pino = (await import('pino')).default;
        spares = new JournalSpares({ dir: spareDir, targetBytes: 0, fileBytes: 128 * 1024, logger: pino({ level: 'silent' }) });
      }
      function pattern(seq, bytes) {
        const b = Buffer.allocUnsafe(bytes);
        let x = (seq * 2654435761) >>> 0 || 1;
        for (let i = 0; i < bytes; i += 4) {
          x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
          b.writeUInt32LE(x, i);
        }
        return b;
      }
      const j = await Journal.open({ dir, blockSize: 512, segmentBytes: 128 * 1024, reflect: () => {}, ...(spares ? { spares } : {}) });
      const out = (s) => process.stdout.write(s);
      out('ready ' + j.lastSeq + '\\n');
      async function writer() {
        for (;;) {
          const seq = j.lastSeq + 1;
          const blocks = 1 + (seq % 8);
          const rec = await j.append({ lba: (seq * 7919) % 100000, blocks, data: pattern(seq, blocks * 512), receiveTime: seq });
          if (rec.seq !== seq) { out('mismatch ' + seq + ' ' + rec.seq + '\\n'); process.exit(3); }
          out('ack ' + seq + '\\n');
          if (seq % 300 === 0 && j.reflectedSeq - 200 > j.drainedSeq) {
            const t = j.reflectedSeq - 200;
            await j.markDrained(t);
            out('drained ' + t + '\\n');
          }
        }
      }
      for (let i = 0; i < 16; i++) writer();
    `;
    let previousLast = 0;
    for (let round = 0; round < 4; round++) {
      // Enough spares for every segment of a round: each one is made of a spare.
      if (withSpares) await new JournalSpares({ dir: spareDir, targetBytes: 200 * 128 * 1024, fileBytes: 128 * 1024, logger: pino({ level: 'silent' }) }).refill();
      const proc = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', child, dir, journalModule, ...(withSpares ? [sparesModule, spareDir] : [])], {
        cwd: repoRoot,
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      let stdout = '';
      let stderr = '';
      proc.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
      proc.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
      const exited = new Promise<void>((resolve) => proc.once('exit', () => resolve()));
      // Kill after a random number of acknowledgements, so the moment varies.
      const killAfter = 500 + Math.floor(Math.random() * 3000);
      const deadline = Date.now() + 30_000;
      while (Date.now() < deadline && (stdout.match(/^ack /gm)?.length ?? 0) < killAfter && proc.exitCode === null) {
        await new Promise((r) => setTimeout(r, 2 + Math.random() * 10));
      }
      proc.kill('SIGKILL');
      await exited;
      expect(stderr, 'child stderr').not.toMatch(/Error/);
      expect(stdout).not.toMatch(/mismatch/);
      // Only complete lines count: a line cut by the kill is ignored.
      const lines = stdout.split('\n').slice(0, -1);
      expect(lines[0]).toBe(`ready ${previousLast}`);
      const acked = lines.filter((l) => l.startsWith('ack ')).map((l) => Number(l.slice(4)));
      const drainedMarks = lines.filter((l) => l.startsWith('drained ')).map((l) => Number(l.slice(8)));
      expect(acked.length).toBeGreaterThan(100);
      // The child's segments were made of spares (the refill tops them up to 200 every round).
      if (withSpares) expect((await readdir(spareDir)).filter((n) => n.startsWith('spare-')).length).toBeLessThan(200);

      const { j, recs } = await reopen(dir, { segmentBytes: 128 * 1024 });
      const drained = j.drainedSeq;
      expect(drained).toBeGreaterThanOrEqual(Math.max(0, ...drainedMarks));
      // A gap-free run from the drain point that includes every acknowledged write.
      expect(recs[0]?.seq ?? drained + 1).toBe(drained + 1);
      recs.forEach((r, i) => expect(r.seq).toBe(drained + 1 + i));
      expect(j.lastSeq).toBeGreaterThanOrEqual(Math.max(...acked));
      const recovered = new Set(recs.map((r) => r.seq));
      for (const s of acked) if (s > drained) expect(recovered.has(s), `acknowledged seq ${s}`).toBe(true);
      // Every recovered record, acknowledged or not, is complete and exactly what was written.
      let bad = 0;
      for (const r of recs) {
        const blocks = 1 + (r.seq % 8);
        if (r.blocks !== blocks || r.lba !== (r.seq * 7919) % 100000 || r.receiveTime !== r.seq) bad++;
        else if (!(await j.readData(r.location)).equals(pattern(r.seq, blocks * 512))) bad++;
      }
      expect(bad).toBe(0);
      previousLast = j.lastSeq;
      await j.close();
    }
  }, 180_000);
});

describe('Journal spares (segment files written in advance)', () => {
  const SEG = 64 * 1024;
  const MiB = 1024 * 1024;
  const silent = pino({ level: 'silent' });
  function sparesIn(dir: string, targetBytes: number, fileBytes = SEG): JournalSpares {
    return new JournalSpares({ dir, targetBytes, fileBytes, logger: silent });
  }

  it('a refill writes whole files of random bytes up to the target; pause() stops it without leaving a partial file', async () => {
    const dir = path.join(await tempDir(), 'spare');
    const s = sparesIn(dir, 5 * SEG);
    await s.refill();
    expect(s.readyBytes).toBe(5 * SEG);
    const names = (await readdir(dir)).sort();
    expect(names).toEqual(['spare-1', 'spare-2', 'spare-3', 'spare-4', 'spare-5']);
    const a = await readFile(path.join(dir, 'spare-1'));
    const b = await readFile(path.join(dir, 'spare-2'));
    expect(a.length).toBe(SEG);
    // Not zeros, and not the same bytes in every file.
    expect(a.equals(Buffer.alloc(SEG))).toBe(false);
    expect(a.equals(b)).toBe(false);
    // A second refill has nothing to do.
    await s.refill();
    expect((await readdir(dir)).length).toBe(5);
    // journalSpare made smaller: the newest files beyond it go.
    const smaller = sparesIn(dir, 2 * SEG);
    await smaller.refill();
    expect(smaller.readyBytes).toBe(2 * SEG);
    expect((await readdir(dir)).sort()).toEqual(['spare-1', 'spare-2']);

    const big = path.join(await tempDir(), 'spare');
    const t = sparesIn(big, 64 << 20, 16 << 20);
    const running = t.refill();
    await t.pause();
    await running;
    expect(t.readyBytes).toBeLessThan(64 << 20);
    expect((await readdir(big)).filter((n) => n.endsWith('.tmp'))).toEqual([]);
    // The leftover of a refill killed mid-file is removed when the directory is next read.
    await writeFile(path.join(big, 'spare-77.tmp'), 'x');
    const u = sparesIn(big, 64 << 20, 16 << 20);
    expect((await u.takeInto(path.join(big, 'taken'))) !== undefined).toBe(t.readyBytes > 0);
    expect((await readdir(big)).filter((n) => n.endsWith('.tmp'))).toEqual([]);
  });

  it('a refill leaves dataDir 1 GiB free (a file system without O_DIRECT: tmpfs)', async () => {
    const dir = path.join(await tempDir(), 'small');
    const unmount = await mountTmpfs(dir, (1 << 30) + 48 * MiB);
    try {
      const lines: string[] = [];
      const s = new JournalSpares({ dir: path.join(dir, 'spare'), targetBytes: 512 * MiB, fileBytes: 16 * MiB, logger: pino({ level: 'warn' }, { write: (l: string) => void lines.push(l) }) });
      await s.refill();
      // 48 MiB above the margin: three files of 16 MiB, then it stops and says why.
      expect(s.readyBytes).toBe(48 * MiB);
      expect(lines.join('')).toContain('journal spares stop short of journalSpare: dataDir keeps 1024 MiB free');
      const a = await readFile(path.join(dir, 'spare', 'spare-1'));
      expect(a.length).toBe(16 * MiB);
      expect(a.subarray(0, 4096).equals(Buffer.alloc(4096))).toBe(false);
    } finally {
      await unmount();
    }
  });

  it('a journal makes its segments of spares; only the newest runs past its records, and recovery finds every record, crashed or closed', async () => {
    const root = await tempDir();
    const dir = path.join(root, 'journal');
    const spares = sparesIn(path.join(root, 'spare'), 8 * SEG);
    await spares.refill();
    const j = await openJournal(dir, { segmentBytes: SEG, spares });
    const written: Array<{ seq: number; blocks: number }> = [];
    // Where each segment's records end: each group is one record, padded to a 4 KiB boundary.
    const recordsEnd = new Map<number, number>();
    // One record per group (each awaited), 4-12 KiB: about four segments.
    for (let seq = 1; seq <= 30; seq++) {
      const blocks = 8 + (seq % 3) * 8;
      const rec = await j.append({ lba: seq * 100, blocks, data: pattern(seq, blocks * 512) });
      expect(rec.seq).toBe(seq);
      written.push({ seq, blocks });
      recordsEnd.set(rec.location.segment, Math.ceil((rec.location.offset + blocks * 512) / 4096) * 4096);
    }
    const segs = await segmentFiles(dir);
    expect(segs.length).toBeGreaterThanOrEqual(3);
    // Every segment came from a spare.
    expect(spares.readyBytes).toBe((8 - segs.length) * SEG);
    const sizes = await Promise.all(segs.map(async (n) => (await stat(path.join(dir, n))).size));
    // Cut to their records before the next segment took writes...
    const ends = [...recordsEnd.entries()].sort((a, b) => a[0] - b[0]).map(([, end]) => end);
    expect(ends.length).toBe(segs.length);
    expect(sizes.slice(0, -1)).toEqual(ends.slice(0, -1));
    expect(ends.at(-1)).toBeLessThan(SEG);
    // ...except the one being written, which still has the spare's length.
    expect(sizes.at(-1)).toBe(SEG);

    const check = async (from: string, expectTornTail: boolean) => {
      const { j: r, recs } = await reopen(from, { segmentBytes: SEG });
      expect(recs.map((x) => x.seq)).toEqual(written.map((w) => w.seq));
      for (const w of written) {
        const rec = recs[w.seq - 1]!;
        expect(rec.lba).toBe(w.seq * 100);
        expect((await r.readData(rec.location)).equals(pattern(w.seq, w.blocks * 512)), `seq ${w.seq}`).toBe(true);
      }
      if (expectTornTail) expect(r.recovery.tornTail).toMatchObject({ discardedRecords: 0 });
      else expect(r.recovery.tornTail).toBeUndefined();
      await r.close();
    };
    // A crash: the files as they are on disk now, the last one still ending in spare bytes.
    const crashed = path.join(root, 'crashed');
    await cp(dir, crashed, { recursive: true });
    await check(crashed, true);
    // A clean close cuts the last segment to its records as well.
    await j.close();
    expect((await stat(path.join(dir, segs.at(-1)!))).size).toBe(ends.at(-1));
    await check(dir, false);
  });

  it('a drain round that removes the segment being cut to its records does not close the file under the cut', async () => {
    const root = await tempDir();
    const spares = sparesIn(path.join(root, 'spare'), 4 * SEG);
    await spares.refill();
    const hold = gate();
    let holding = false;
    // Each file is closed for good when close() is called: later calls fail as on a closed descriptor.
    const fs: JournalFileSystem = {
      ...nodeJournalFs,
      async openFile(file, mode) {
        const f = await nodeJournalFs.openFile(file, mode);
        let closed = false;
        const open = <T>(op: () => Promise<T>): Promise<T> => (closed ? Promise.reject(Object.assign(new Error('EBADF: file closed'), { code: 'EBADF' })) : op());
        return {
          write: (b, p) => open(() => f.write(b, p)),
          writeDurable: (b, p) => open(() => f.writeDurable!(b, p)),
          writesDone: () => f.writesDone?.() ?? Promise.resolve(),
          read: (b, p) => open(() => f.read(b, p)),
          truncate: async (n) => {
            if (holding) await hold.promise;
            return open(() => f.truncate(n));
          },
          size: () => open(() => f.size()),
          datasync: () => open(() => f.datasync()),
          close: () => {
            closed = true;
            return f.close();
          },
        };
      },
    };
    const j = await openJournal(path.join(root, 'journal'), { segmentBytes: SEG, spares, fs, reflect: () => {} });
    // Five groups of 12 KiB (8 KiB of data, header, padding) in the first segment; a sixth does not fit.
    for (let seq = 1; seq <= 5; seq++) await j.append({ lba: seq * 16, blocks: 16, data: pattern(seq, 16 * 512) });
    holding = true;
    const sixth = j.append({ lba: 96, blocks: 16, data: pattern(6, 16 * 512) });
    await tick();
    // The roll is cutting segment 1 to its records; a drain round now removes segment 1.
    await j.markDrained(5);
    expect(await segmentFiles(path.join(root, 'journal'))).not.toContain('segment-0000000000000001.jnl');
    hold.open();
    expect((await sixth).seq).toBe(6);
    expect(j.failed).toBeUndefined();
    await j.close();
    const { j: r, recs } = await reopen(path.join(root, 'journal'), { segmentBytes: SEG });
    expect(recs.map((x) => x.seq)).toEqual([6]);
    expect((await r.readData(recs[0]!.location)).equals(pattern(6, 16 * 512))).toBe(true);
    await r.close();
  });

  it('the spares of a volume without journalSpare (removed from the configuration, or its journalSpare dropped) are removed, and nothing else', async () => {
    const dataDir = await tempDir();
    expect((await removeUnwantedSpares(dataDir, new Set(), silent)).size).toBe(0);
    await sparesIn(spareDirFor(dataDir, 'kept'), 2 * SEG).refill();
    await sparesIn(spareDirFor(dataDir, 'dropped'), 3 * SEG).refill();
    await sparesIn(spareDirFor(dataDir, 'gone'), SEG).refill();
    // A leftover .tmp of a refill killed mid-file goes with its directory.
    await writeFile(path.join(spareDirFor(dataDir, 'gone'), 'spare-2.tmp'), Buffer.alloc(100));
    // The rest of a volume's directory is not the spares' to touch.
    await writeFile(path.join(dataDir, 'volumes', 'dropped', 'backup-state.json'), '{}');
    await mkdir(path.join(dataDir, 'volumes', 'nospares', 'journal'), { recursive: true });
    await writeFile(path.join(dataDir, 'volumes', 'nospares', 'journal', 'segment-0000000000000001.jnl'), 'records');
    const lines: string[] = [];
    const log = pino({ level: 'info' }, { write: (l: string) => void lines.push(l) });
    const removed = await removeUnwantedSpares(dataDir, new Set(['kept']), log);
    expect(Object.fromEntries(removed)).toEqual({ dropped: 3 * SEG, gone: SEG + 100 });
    expect((await readdir(spareDirFor(dataDir, 'kept'))).sort()).toEqual(['spare-1', 'spare-2']);
    expect((await readdir(path.join(dataDir, 'volumes', 'dropped'))).sort()).toEqual(['backup-state.json']);
    expect(await readdir(path.join(dataDir, 'volumes', 'gone'))).toEqual([]);
    expect(await readFile(path.join(dataDir, 'volumes', 'nospares', 'journal', 'segment-0000000000000001.jnl'), 'utf8')).toBe('records');
    expect(lines.map((l) => JSON.parse(l).volume).sort()).toEqual(['dropped', 'gone']);
    expect(JSON.parse(lines[0]!).freedBytes).toBeGreaterThan(0);
  });

  it('without spares left, new segments are new files again', async () => {
    const root = await tempDir();
    const dir = path.join(root, 'journal');
    const spares = sparesIn(path.join(root, 'spare'), SEG);
    await spares.refill();
    const j = await openJournal(dir, { segmentBytes: SEG, spares });
    for (let seq = 1; seq <= 20; seq++) await j.append({ lba: seq, blocks: 16, data: pattern(seq, 16 * 512) });
    expect(spares.readyBytes).toBe(0);
    await j.close();
    const { j: r, recs } = await reopen(dir, { segmentBytes: SEG });
    expect(recs.map((x) => x.seq)).toEqual(Array.from({ length: 20 }, (_, i) => i + 1));
    for (const rec of recs) expect((await r.readData(rec.location)).equals(pattern(rec.seq, 16 * 512))).toBe(true);
    await r.close();
  });
});

describe('Journal draining', () => {
  it('persists the drain point across reopen and deletes fully drained segments', async () => {
    const dir = await tempDir();
    const j = await openJournal(dir, { segmentBytes: 8192, reflect: () => {} });
    const recs: JournalRecord[] = [];
    // 1536-byte records, one group each, padded to 4 KiB: two per 8 KiB segment.
    for (let s = 1; s <= 10; s++) recs.push(await j.append({ lba: s * 4, blocks: 2, data: pattern(s, 1024) }));
    expect(await segmentFiles(dir)).toHaveLength(5);
    expect(j.records).toBe(10);
    expect(j.bytes).toBe(10 * 4096);
    await expect(j.markDrained(11)).rejects.toThrow(RangeError);
    let drainedWaiter = false;
    const w = j.waitDrained(5).then(() => (drainedWaiter = true));
    await j.markDrained(5); // segments holding 1-2 and 3-4 go; 5-6 stays (6 is not drained)
    await w;
    expect(drainedWaiter).toBe(true);
    expect(j.drainedSeq).toBe(5);
    expect(j.records).toBe(5);
    expect(await segmentFiles(dir)).toHaveLength(3);
    expect(j.bytes).toBe(6 * 4096);
    await expect(j.readData(recs[0]!.location)).rejects.toBeInstanceOf(JournalDataDrainedError);
    expect((await j.readData(recs[4]!.location)).equals(pattern(5, 1024))).toBe(true);
    await j.markDrained(3); // going backwards is a no-op
    expect(j.drainedSeq).toBe(5);
    await j.close();

    const { j: j2, recs: again } = await reopen(dir, { segmentBytes: 8192 });
    expect(j2.drainedSeq).toBe(5);
    expect(again.map((r) => r.seq)).toEqual([6, 7, 8, 9, 10]);
    expect(j2.recovery.records).toBe(5);
    // Draining everything removes every segment, and seqs still continue after a restart.
    await j2.markDrained(10);
    expect(await segmentFiles(dir)).toHaveLength(0);
    expect(j2.bytes).toBe(0);
    await j2.close();
    const { j: j3, recs: none } = await reopen(dir);
    expect(none).toEqual([]);
    expect(j3.lastSeq).toBe(10);
    expect((await j3.append({ lba: 0, blocks: 1, data: pattern(11, 512) })).seq).toBe(11);
    await j3.close();
  });

  it('open() deletes segments left behind by a crash between the drain-state update and the unlink', async () => {
    const dir = await tempDir();
    const j = await openJournal(dir, { segmentBytes: 2048, reflect: () => {} });
    for (let s = 1; s <= 4; s++) await j.append({ lba: s, blocks: 2, data: pattern(s, 1024) });
    await j.close();
    const before = await segmentFiles(dir);
    expect(before).toHaveLength(4);
    // Simulate: the state file says 2 is drained, but the segments are still there.
    const state = JSON.parse(await readFile(path.join(dir, 'journal-state.json'), 'utf8')) as { drainedSeq: number };
    state.drainedSeq = 2;
    await writeFile(path.join(dir, 'journal-state.json'), JSON.stringify(state));
    const { j: j2, recs } = await reopen(dir);
    expect(recs.map((r) => r.seq)).toEqual([3, 4]);
    expect(j2.recovery.removedSegments).toBe(2);
    expect(await segmentFiles(dir)).toEqual(before.slice(2));
    await j2.close();
  });

  it('a reader that pinned a segment keeps reading while the segment is drained away', async () => {
    const dir = await tempDir();
    const j = await openJournal(dir, { segmentBytes: 2048, reflect: () => {} });
    const a = await j.append({ lba: 0, blocks: 2, data: pattern(1, 1024) });
    await j.append({ lba: 9, blocks: 2, data: pattern(2, 1024) });
    const read = j.readData(a.location); // pinned synchronously
    const drain = j.markDrained(1);
    expect((await read).equals(pattern(1, 1024))).toBe(true);
    await drain;
    await expect(j.readData(a.location)).rejects.toBeInstanceOf(JournalDataDrainedError);
    await j.close();
  });
});

describe('Journal capacity', () => {
  it('alerts at the high-water mark, applies back-pressure at the limit, resumes after draining', async () => {
    const dir = await tempDir();
    // 4096-byte records (header and 3.5 KiB of data: groups of them need no padding); 2-record
    // segments; room for 8 records.
    const j = await Journal.open({
      dir,
      blockSize: 512,
      capacityBytes: 8 * 4096,
      segmentBytes: 2 * 4096,
      reflect: () => {},
    });
    const events: [string, JournalUsage][] = [];
    for (const e of ['high-water', 'below-high-water', 'blocked', 'unblocked'] as const) {
      j.on(e, (u) => events.push([e, u]));
    }
    const first = await Promise.all(Array.from({ length: 6 }, (_, i) => j.append({ lba: i, blocks: 7, data: pattern(i + 1, 3584) })));
    expect(events).toEqual([]);
    await j.append({ lba: 6, blocks: 7, data: pattern(7, 3584) }); // 7/8 = 87.5%
    expect(events.map((e) => e[0])).toEqual(['high-water']);
    expect(j.usage).toMatchObject({ usedBytes: 7 * 4096, highWater: true, waitingAppends: 0 });
    await j.append({ lba: 7, blocks: 7, data: pattern(8, 3584) }); // full

    const acked: number[] = [];
    const blocked = [9, 10, 11].map((s) => j.append({ lba: s, blocks: 7, data: pattern(s, 3584) }).then((r) => (acked.push(r.seq), r)));
    for (let i = 0; i < 20; i++) await tick();
    expect(acked).toEqual([]);
    expect(events.map((e) => e[0])).toEqual(['high-water', 'blocked']);
    expect(j.usage.waitingAppends).toBe(3);
    expect(j.lastSeq).toBe(11);
    expect(j.durableSeq).toBe(8);
    // Unreflected includes the waiting ones: a reader must not overtake them.
    expect(j.unreflectedOverlapping(10, 1)).toBe(10);

    await j.markDrained(2); // frees one segment = room for two records
    await Promise.all(blocked.slice(0, 2));
    for (let i = 0; i < 10; i++) await tick();
    expect(acked).toEqual([9, 10]);
    await j.markDrained(4);
    await blocked[2];
    expect(acked).toEqual([9, 10, 11]);
    expect(events.map((e) => e[0])).toEqual(['high-water', 'blocked', 'unblocked']);
    await j.markDrained(11);
    expect(events.map((e) => e[0])).toEqual(['high-water', 'blocked', 'unblocked', 'below-high-water']);
    expect(j.usage.usedBytes).toBe(0);
    expect(first[0]!.seq).toBe(1);
    await j.close();
  });

  it('a record larger than the whole capacity is refused; waiting appends are refused at close', async () => {
    const dir = await tempDir();
    const j = await Journal.open({ dir, blockSize: 512, capacityBytes: 4096, segmentBytes: 1024 });
    await expect(j.append({ lba: 0, blocks: 8, data: pattern(1, 4096) })).rejects.toThrow(/can never fit/);
    await Promise.all(Array.from({ length: 4 }, (_, i) => j.append({ lba: i, blocks: 1, data: pattern(i + 1, 512) })));
    const waiting = j.append({ lba: 9, blocks: 1, data: pattern(5, 512) }).catch((e: unknown) => e);
    await tick();
    expect(j.usage.waitingAppends).toBe(1);
    await j.close();
    expect(await waiting).toBeInstanceOf(JournalClosedError);
    const { j: j2, recs } = await reopen(dir, { capacityBytes: 4096, segmentBytes: 1024 });
    expect(recs.map((r) => r.seq)).toEqual([1, 2, 3, 4]);
    await j2.close();
  });
});

describe('Replay after a restart in the middle of a drain (journal + snapshot map + main)', () => {
  const BLOCKS = 256;
  const BS = 512;

  /** Writes extents of a map snapshot to `main`, as a drain round does (newest data per block). */
  async function drainTo(main: Buffer, j: Journal, extents: readonly MapExtent[]): Promise<void> {
    for (const e of extents) (await j.readData(e.location, e.offsetInRecord, e.blocks)).copy(main, e.lba * BS);
  }

  /** The capture view: the map over main. */
  async function view(main: Buffer, j: Journal, map: SnapshotMap): Promise<Buffer> {
    const out = Buffer.alloc(BLOCKS * BS);
    for (const p of map.lookup(0, BLOCKS)) {
      const data = p.source === 'journal' ? await j.readData(p.location, p.offsetInRecord, p.blocks) : main.subarray(p.lba * BS, (p.lba + p.blocks) * BS);
      data.copy(out, p.lba * BS, 0, p.blocks * BS);
    }
    return out;
  }

  it('rebuilds the map in seq order from the records above the drain point, drops a torn tail, and re-draining ends with main = every acknowledged write', async () => {
    const dir = await tempDir();
    const main = pattern(999, BLOCKS * BS);
    const model = Buffer.from(main); // what the initiator has been acknowledged, block by block
    let rng = 12345;
    const rand = (n: number) => {
      rng = (rng * 1103515245 + 12345) % 2 ** 31;
      return rng % n;
    };
    let map = new SnapshotMap({ blockSize: BS });
    let j = await openJournal(dir, { segmentBytes: 16 * 1024, reflect: (r) => map.insert(r) });
    // Overlapping writes of every kind, so that later records override parts of earlier ones.
    const writeSome = async (count: number, seed: number) => {
      for (let i = 0; i < count; i++) {
        const lba = rand(BLOCKS - 16);
        const blocks = 1 + rand(16);
        const kind = (['write', 'write', 'write', 'write-same', 'unmap'] as const)[rand(5)]!;
        const data = kind === 'write' ? pattern(seed * 1000 + i, blocks * BS) : kind === 'write-same' ? pattern(seed * 1000 + i, BS) : undefined;
        await j.append({ lba, blocks, kind, ...(data ? { data } : {}) });
        for (let b = 0; b < blocks; b++) {
          const src = kind === 'write' ? data!.subarray(b * BS, (b + 1) * BS) : kind === 'write-same' ? data! : Buffer.alloc(BS);
          src.copy(model, (lba + b) * BS);
        }
      }
    };

    await writeSome(60, 1);
    // Drain round 1, complete: main takes it, the drain point moves.
    const round1 = map.snapshot();
    await drainTo(main, j, round1.extents);
    map.release(round1);
    await j.markDrained(round1.atSeq);
    expect(j.drainedSeq).toBe(60);

    await writeSome(60, 2);
    // Drain round 2, cut off half way: main holds part of it, the drain point did not move.
    const round2 = map.snapshot();
    await drainTo(main, j, round2.extents.slice(0, Math.ceil(round2.extents.length / 2)));
    await writeSome(40, 3);
    expect((await view(main, j, map)).equals(model)).toBe(true);
    const acknowledged = Buffer.from(model);
    const lastSeq = j.lastSeq;
    // One more record whose fdatasync never completed (the process died in it): it was never
    // acknowledged, and the crash tore it.
    await j.append({ lba: 3, blocks: 8, data: pattern(77, 8 * BS) });
    await j.close();
    const segs = await segmentFiles(dir);
    const last = path.join(dir, segs.at(-1)!);
    const size = (await stat(last)).size;
    await writeFile(last, (await readFile(last)).subarray(0, size - 700));

    // The restart: the map is rebuilt from what the journal recovers, in seq order.
    map = new SnapshotMap({ blockSize: BS });
    const seqs: number[] = [];
    j = await openJournal(dir, {
      segmentBytes: 16 * 1024,
      reflect: (r) => {
        seqs.push(r.seq);
        map.insert(r);
      },
    });
    expect(j.recovery.tornTail).toBeDefined();
    expect(j.drainedSeq).toBe(60);
    expect(seqs).toEqual(Array.from({ length: lastSeq - 60 }, (_, i) => 61 + i));
    // main now holds half of round 2; with the rebuilt map over it the view is exactly what was
    // acknowledged, and the drain of the whole map (repeating what round 2 had written) makes
    // main the same.
    expect((await view(main, j, map)).equals(acknowledged)).toBe(true);
    const all = map.snapshot();
    await drainTo(main, j, all.extents);
    map.release(all);
    await j.markDrained(all.atSeq);
    expect(main.equals(acknowledged)).toBe(true);
    expect(j.records).toBe(0);
    // New writes continue after the recovered ones (the torn record's seq is reused).
    expect((await j.append({ lba: 0, blocks: 1, data: pattern(5, BS) })).seq).toBe(lastSeq + 1);
    await j.close();
  });
});
