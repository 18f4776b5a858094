import { describe, expect, it } from 'vitest';
import type { JournalLocation } from '../src/capture/journal.ts';
import { SnapshotMap, type MapPiece, type MapSnapshot, type MappableRecord } from '../src/capture/snapshot-map.ts';

/** Small deterministic PRNG so failures reproduce. */
function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function record(seq: number, lba: number, blocks: number): MappableRecord {
  const location: JournalLocation = { segment: 1 + (seq % 5), offset: seq * 4096, kind: 'write', blocks };
  return { seq, lba, blocks, location };
}

/** The reference: block -> the record that last wrote it. */
type Model = Map<number, MappableRecord>;

function modelWrite(model: Model, rec: MappableRecord): void {
  for (let b = rec.lba; b < rec.lba + rec.blocks; b++) model.set(b, rec);
}

/**
 * Checks that pieces cover [lba, lba+blocks) exactly, in order, and agree with the model block by
 * block. Returns the first discrepancy (plain comparisons: per-block expect() calls are too slow).
 */
function lookupError(map: SnapshotMap, model: Model, lba: number, blocks: number): string | undefined {
  const pieces: MapPiece[] = map.lookup(lba, blocks);
  let pos = lba;
  let prevSource: string | undefined;
  for (const p of pieces) {
    if (p.lba !== pos) return `piece at ${p.lba}, expected ${pos}`;
    if (!(p.blocks > 0)) return `empty piece at ${p.lba}`;
    if (p.source === 'base') {
      if (prevSource === 'base') return `adjacent base pieces at ${p.lba}`;
      for (let b = p.lba; b < p.lba + p.blocks; b++) if (model.has(b)) return `block ${b} is written but looked up as base`;
    } else {
      for (let b = p.lba; b < p.lba + p.blocks; b++) {
        const rec = model.get(b);
        if (!rec) return `block ${b} was never written but maps to seq ${p.seq}`;
        if (p.seq !== rec.seq) return `block ${b}: seq ${p.seq}, expected ${rec.seq}`;
        if (p.location !== rec.location) return `block ${b}: wrong location`;
        if (p.offsetInRecord + (b - p.lba) !== b - rec.lba) return `block ${b}: wrong offset in record`;
      }
    }
    prevSource = p.source;
    pos += p.blocks;
  }
  if (pos !== lba + blocks) return `pieces end at ${pos}, expected ${lba + blocks}`;
  return undefined;
}

function checkLookup(map: SnapshotMap, model: Model, lba: number, blocks: number): void {
  expect(lookupError(map, model, lba, blocks), `lookup(${lba}, ${blocks})`).toBeUndefined();
}

/** Structural invariants plus full agreement of the extent list with the model. */
function checkWhole(map: SnapshotMap, model: Model): void {
  let count = 0;
  let blocks = 0;
  let prevEnd = -1;
  const seen = new Map<number, number>();
  let err: string | undefined;
  for (const e of map.extents()) {
    if (!(e.blocks > 0)) err ??= `empty extent at ${e.lba}`;
    if (e.lba < prevEnd) err ??= `extent at ${e.lba} overlaps or is out of order`;
    prevEnd = e.lba + e.blocks;
    count++;
    blocks += e.blocks;
    for (let b = e.lba; b < prevEnd; b++) seen.set(b, e.seq);
  }
  for (const [b, rec] of model) if (seen.get(b) !== rec.seq) err ??= `block ${b}: seq ${seen.get(b)}, expected ${rec.seq}`;
  expect(err).toBeUndefined();
  expect(map.size).toBe(count);
  expect(map.mappedBlocks).toBe(blocks);
  expect(map.mappedBytes).toBe(blocks * map.blockSize);
  expect(seen.size).toBe(model.size);
}

/** Block -> seq of a snapshot; also checks its extents are sorted and disjoint. */
function snapshotModel(snap: MapSnapshot): Map<number, number> {
  const m = new Map<number, number>();
  let prevEnd = -1;
  for (const e of snap.extents) {
    if (e.lba < prevEnd) throw new Error(`snapshot extent at ${e.lba} overlaps or is out of order`);
    prevEnd = e.lba + e.blocks;
    for (let b = e.lba; b < prevEnd; b++) m.set(b, e.seq);
  }
  return m;
}

function sameEntries(a: Map<number, number>, b: Map<number, number>): boolean {
  if (a.size !== b.size) return false;
  for (const [k, v] of a) if (b.get(k) !== v) return false;
  return true;
}

describe('SnapshotMap basics', () => {
  it('maps nothing at first: the whole range is base', () => {
    const map = new SnapshotMap({ blockSize: 512 });
    expect(map.lookup(10, 5)).toEqual([{ source: 'base', lba: 10, blocks: 5 }]);
    expect(map.lookup(10, 0)).toEqual([]);
    expect(map.size).toBe(0);
    expect(map.overlaps(0, 1_000_000)).toBe(false);
  });

  it('splits an older extent around a newer write and keeps offsets into the old record', () => {
    const map = new SnapshotMap({ blockSize: 4096 });
    const a = record(1, 100, 20);
    const b = record(2, 105, 5);
    map.insert(a);
    map.insert(b);
    expect(map.size).toBe(3);
    expect(map.mappedBlocks).toBe(20);
    expect(map.mappedBytes).toBe(20 * 4096);
    expect(map.lookup(98, 30)).toEqual([
      { source: 'base', lba: 98, blocks: 2 },
      { source: 'journal', lba: 100, blocks: 5, seq: 1, location: a.location, offsetInRecord: 0 },
      { source: 'journal', lba: 105, blocks: 5, seq: 2, location: b.location, offsetInRecord: 0 },
      { source: 'journal', lba: 110, blocks: 10, seq: 1, location: a.location, offsetInRecord: 10 },
      { source: 'base', lba: 120, blocks: 8 },
    ]);
    expect(map.lookup(112, 3)).toEqual([
      { source: 'journal', lba: 112, blocks: 3, seq: 1, location: a.location, offsetInRecord: 12 },
    ]);
    expect(map.overlaps(119, 1)).toBe(true);
    expect(map.overlaps(120, 10)).toBe(false);
  });

  it('replaces every extent a write covers completely', () => {
    const map = new SnapshotMap({ blockSize: 512 });
    map.insert(record(1, 0, 4));
    map.insert(record(2, 10, 4));
    map.insert(record(3, 20, 4));
    map.insert(record(4, 2, 20)); // trims 1 and 3, swallows 2
    expect([...map.extents()].map((e) => [e.lba, e.blocks, e.seq, e.offsetInRecord])).toEqual([
      [0, 2, 1, 0],
      [2, 20, 4, 0],
      [22, 2, 3, 2],
    ]);
  });

  it('refuses inserts out of seq order and bad ranges', () => {
    const map = new SnapshotMap({ blockSize: 512 });
    map.insert(record(5, 0, 1));
    expect(() => map.insert(record(5, 1, 1))).toThrow(RangeError);
    expect(() => map.insert(record(4, 1, 1))).toThrow(RangeError);
    expect(() => map.insert({ ...record(6, 0, 1), blocks: 0 })).toThrow(RangeError);
    expect(() => map.insert({ ...record(6, -1, 1) })).toThrow(RangeError);
    expect(() => map.insert({ ...record(6, 0, 2), location: { segment: 1, offset: 0, kind: 'write', blocks: 1 } })).toThrow(
      RangeError,
    );
    expect(map.lastSeq).toBe(5);
    expect(map.size).toBe(1);
  });

  it('release keeps blocks overwritten after the snapshot', () => {
    const map = new SnapshotMap({ blockSize: 512 });
    map.insert(record(1, 0, 10));
    map.insert(record(2, 20, 10));
    const snap = map.snapshot();
    expect(snap.atSeq).toBe(2);
    expect(snap.blocks).toBe(20);
    map.insert(record(3, 5, 20)); // overwrites the tail of 1 and the head of 2
    expect(map.release(snap)).toBe(5 + 5);
    expect(map.lookup(0, 30)).toEqual([
      { source: 'base', lba: 0, blocks: 5 },
      { source: 'journal', lba: 5, blocks: 20, seq: 3, location: record(3, 5, 20).location, offsetInRecord: 0 },
      { source: 'base', lba: 25, blocks: 5 },
    ]);
    // Idempotent.
    expect(map.release(snap)).toBe(0);
    expect(map.size).toBe(1);
    expect(() => new SnapshotMap({ blockSize: 512 }).release(snap)).toThrow(/did not issue/);
  });

  it('works at LBAs far beyond any per-block structure', () => {
    const map = new SnapshotMap({ blockSize: 4096 });
    const far = 2 ** 45;
    map.insert(record(1, far, 8));
    map.insert(record(2, 0, 8));
    map.insert(record(3, far + 4, 8));
    expect(map.size).toBe(3);
    expect(map.lookup(far - 1, 14).map((p) => [p.source, p.lba, p.blocks])).toEqual([
      ['base', far - 1, 1],
      ['journal', far, 4],
      ['journal', far + 4, 8],
      ['base', far + 12, 1],
    ]);
  });
});

describe('SnapshotMap against a per-block reference model', () => {
  function run(seed: number, space: number, ops: number, maxLen: number, fullEvery: number): void {
    const rand = rng(seed);
    const map = new SnapshotMap({ blockSize: 512 });
    const model: Model = new Map();
    const outstanding: { snap: MapSnapshot; model: Map<number, number> }[] = [];
    let seq = 0;
    for (let op = 0; op < ops; op++) {
      const r = rand();
      if (r < 0.8) {
        const long = rand() < 0.05;
        const blocks = 1 + Math.floor(rand() * (long ? maxLen * 10 : maxLen));
        const lba = Math.floor(rand() * (space - blocks));
        const rec = record(++seq, lba, blocks);
        map.insert(rec);
        modelWrite(model, rec);
      } else if (r < 0.87) {
        const snap = map.snapshot();
        const m = snapshotModel(snap);
        // A snapshot is the model as of now.
        expect(sameEntries(m, new Map([...model].map(([b, rec]) => [b, rec.seq])))).toBe(true);
        expect(snap.atSeq).toBe(seq);
        outstanding.push({ snap, model: m });
      } else if (r < 0.94 && outstanding.length > 0) {
        const i = Math.floor(rand() * outstanding.length);
        const { snap, model: m } = outstanding.splice(i, 1)[0]!;
        let expectReleased = 0;
        for (const [b, rec] of model) {
          if (rec.seq <= snap.atSeq && m.has(b)) {
            model.delete(b);
            expectReleased++;
          }
        }
        expect(map.release(snap)).toBe(expectReleased);
        // The snapshot itself is unchanged by later activity.
        expect(sameEntries(snapshotModel(snap), m)).toBe(true);
      }
      for (let k = 0; k < 3; k++) {
        const blocks = Math.floor(rand() * maxLen * 4);
        const lba = Math.floor(rand() * (space - blocks));
        checkLookup(map, model, lba, blocks);
      }
      if (op % fullEvery === fullEvery - 1) {
        checkWhole(map, model);
        checkLookup(map, model, 0, space);
      }
    }
    checkWhole(map, model);
    checkLookup(map, model, 0, space);
  }

  for (const seed of [1, 2, 3, 4, 5]) {
    it(`small volume, dense overlaps (seed ${seed})`, () => run(seed, 300, 3000, 24, 50));
  }

  it('large extent counts exercise leaf splits and merges (seed 11)', () => {
    // ~thousands of extents: many leaves, and releases that empty and merge them.
    run(11, 60_000, 12_000, 6, 2000);
  });

  it('large extent counts exercise leaf splits and merges (seed 12)', () => {
    run(12, 20_000, 12_000, 3, 2000);
  });

  it('emptying the map completely through releases', () => {
    const rand = rng(99);
    const map = new SnapshotMap({ blockSize: 512 });
    for (let seq = 1; seq <= 5000; seq++) {
      const lba = Math.floor(rand() * 50_000);
      map.insert(record(seq, lba, 1 + Math.floor(rand() * 4)));
    }
    expect(map.size).toBeGreaterThan(1000);
    const snap = map.snapshot();
    expect(map.release(snap)).toBe(snap.blocks);
    expect(map.size).toBe(0);
    expect(map.mappedBlocks).toBe(0);
    expect(map.lookup(0, 60_000)).toEqual([{ source: 'base', lba: 0, blocks: 60_000 }]);
    map.insert(record(5001, 7, 3));
    expect(map.size).toBe(1);
  });
});

describe('SnapshotMap memory is proportional to extents, not to writes or volume size', () => {
  it('1e5 writes to the same 10 extents keep 10 extents', () => {
    const rand = rng(7);
    const map = new SnapshotMap({ blockSize: 4096 });
    const regions = Array.from({ length: 10 }, (_, i) => ({ lba: i * 1_000_000_000, blocks: 256 }));
    for (let seq = 1; seq <= 100_000; seq++) {
      const r = regions[Math.floor(rand() * regions.length)]!;
      map.insert(record(seq, r.lba, r.blocks));
    }
    expect(map.size).toBe(10);
    expect(map.mappedBlocks).toBe(2560);
  });

  it('1e5 random partial overwrites inside 10 small regions stay bounded by the regions', () => {
    const rand = rng(8);
    const map = new SnapshotMap({ blockSize: 4096 });
    for (let seq = 1; seq <= 100_000; seq++) {
      const region = Math.floor(rand() * 10) * 2 ** 40;
      const off = Math.floor(rand() * 30);
      const len = 1 + Math.floor(rand() * (32 - off));
      map.insert(record(seq, region + off, len));
    }
    // At most one extent per block of the 10 x 32-block regions.
    expect(map.size).toBeLessThanOrEqual(320);
    expect(map.mappedBlocks).toBeLessThanOrEqual(320);
  });
});
