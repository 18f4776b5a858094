// The snapshot map of capture mode: for every block written since the freeze, where its newest data
// is in the journal. It lives in memory only; after a restart it is rebuilt by inserting the
// journal's recovered records in seq order.
//
// Representation: non-overlapping extents sorted by LBA, each pointing into one journal record.
// Memory is proportional to the number of extents (at most 2 per write more than before, and never
// more than the number of distinct written ranges), never to the volume size.
//
// Index structure: a sorted list of sorted leaves (each at most LEAF_MAX extents) with a parallel
// array of leaf start LBAs: a two-level B+-tree without interior nodes. Lookup is two binary
// searches, O(log n). An insert splices at most a few entries of one leaf, plus the leaf index on
// the rare split or merge, and touches contiguous memory. A plain sorted array would memmove the
// whole index on every insert (fine to ~1e5 extents, not to the millions a long backup of a
// random-write workload can produce); a full B-tree or a skip list buys nothing measurable at these
// sizes for considerably more code, and a library (sorted-btree was the candidate) would still need
// this interval-splitting layer on top.

import type { JournalLocation } from './journal.ts';

/** Blocks [lba, lba+blocks) whose newest data is blocks [offsetInRecord, +blocks) of a record. */
export interface MapExtent {
  readonly lba: number;
  readonly blocks: number;
  /** Journal seq of the write these blocks come from. */
  readonly seq: number;
  readonly location: JournalLocation;
  /** Block offset of `lba` inside the record (pass it to Journal.readData). */
  readonly offsetInRecord: number;
}

/** Part of a looked-up range served from the journal. */
export interface JournalPiece extends MapExtent {
  readonly source: 'journal';
}

/** Part of a looked-up range that was not written since the freeze: read it from the main volume. */
export interface BasePiece {
  readonly source: 'base';
  readonly lba: number;
  readonly blocks: number;
}

export type MapPiece = JournalPiece | BasePiece;

/** What insert() needs of a durable journal record (a JournalRecord fits). */
export interface MappableRecord {
  readonly seq: number;
  readonly lba: number;
  readonly blocks: number;
  readonly location: JournalLocation;
}

/**
 * A frozen copy of the map for one drain round. `extents` are sorted by LBA and never change;
 * every block written by a record <= atSeq appears with its newest data as of atSeq.
 */
export interface MapSnapshot {
  readonly atSeq: number;
  readonly extents: readonly MapExtent[];
  /** Sum of the extents' blocks. */
  readonly blocks: number;
}

const LEAF_MAX = 512;
/** Below this a leaf is merged with a neighbour, so the leaf index stays about n / LEAF_MIN long. */
const LEAF_MIN = 64;

function endOf(e: MapExtent): number {
  return e.lba + e.blocks;
}

/** A position in the leaf structure. */
interface Cursor {
  leaf: number;
  index: number;
}

/**
 * LBA -> newest journal location, for one volume.
 *
 * Inserts must come in strictly increasing seq order (the journal's reflection order): that is
 * what makes "newest" well defined, and what makes release() exact.
 *
 * Drain round protocol:
 *   const snap = map.snapshot();          // stamped with T = snap.atSeq
 *   ...write every snap extent to the main volume, make it durable there...
 *   map.release(snap);                    // forget what main now holds, unless overwritten after T
 *   await journal.markDrained(snap.atSeq);  // only after release: segments may then be deleted
 */
export class SnapshotMap {
  readonly blockSize: number;
  private leaves: MapExtent[][] = [];
  /** leafStart[i] === leaves[i][0].lba. */
  private leafStart: number[] = [];
  private extentCount = 0;
  private blockCount = 0;
  private highestSeq = 0;
  private readonly issued = new WeakSet<MapSnapshot>();

  constructor(opts: { blockSize: number }) {
    if (!Number.isInteger(opts.blockSize) || opts.blockSize <= 0) {
      throw new RangeError(`bad blockSize ${opts.blockSize}`);
    }
    this.blockSize = opts.blockSize;
  }

  /** Number of extents. */
  get size(): number {
    return this.extentCount;
  }

  /** Blocks the map serves (logical: write-same and unmap extents count in full). */
  get mappedBlocks(): number {
    return this.blockCount;
  }

  /** mappedBlocks x blockSize: what a drain of the whole map would write, at most. */
  get mappedBytes(): number {
    return this.blockCount * this.blockSize;
  }

  /** Highest seq inserted: the seq a snapshot taken now is stamped with. */
  get lastSeq(): number {
    return this.highestSeq;
  }

  /**
   * Makes [rec.lba, rec.lba+rec.blocks) point at the record, trimming or splitting whatever it
   * covers. O(log n + extents covered).
   * @throws RangeError if rec.seq is not above every seq inserted before.
   */
  insert(rec: MappableRecord): void {
    const { lba, blocks, seq } = rec;
    if (!Number.isSafeInteger(seq) || seq <= this.highestSeq) {
      throw new RangeError(`insert of seq ${seq} after seq ${this.highestSeq}: inserts must follow seq order`);
    }
    if (!Number.isSafeInteger(lba) || lba < 0 || !Number.isInteger(blocks) || blocks < 1 || !Number.isSafeInteger(lba + blocks)) {
      throw new RangeError(`bad range lba ${lba} blocks ${blocks}`);
    }
    if (blocks > rec.location.blocks) {
      throw new RangeError(`record location covers ${rec.location.blocks} blocks, insert asks for ${blocks}`);
    }
    this.highestSeq = seq;
    const end = lba + blocks;
    const start = this.firstEndingAfter(lba);
    let first: MapExtent | undefined;
    let last: MapExtent | undefined;
    let count = 0;
    for (const c = { ...start }; ; ) {
      const e = this.at(c);
      if (!e || e.lba >= end) break;
      first ??= e;
      last = e;
      count++;
      this.advance(c);
    }
    if (count > 0) this.removeRun(start, count);
    if (first && first.lba < lba) this.add(this.slice(first, first.lba, lba));
    this.add({ lba, blocks, seq, location: rec.location, offsetInRecord: 0 });
    if (last && endOf(last) > end) this.add(this.slice(last, end, endOf(last)));
  }

  /**
   * Splits [lba, lba+blocks) into pieces, in LBA order and covering it exactly: parts mapped to
   * the journal (with the record location and block offset to read) and parts to read from the
   * main volume ('base'). Adjacent base parts are merged. O(log n + pieces).
   */
  lookup(lba: number, blocks: number): MapPiece[] {
    if (!Number.isSafeInteger(lba) || lba < 0 || !Number.isInteger(blocks) || blocks < 0 || !Number.isSafeInteger(lba + blocks)) {
      throw new RangeError(`bad range lba ${lba} blocks ${blocks}`);
    }
    const end = lba + blocks;
    const out: MapPiece[] = [];
    let pos = lba;
    for (const c = this.firstEndingAfter(lba); pos < end; this.advance(c)) {
      const e = this.at(c);
      if (!e || e.lba >= end) break;
      if (e.lba > pos) out.push({ source: 'base', lba: pos, blocks: e.lba - pos });
      const from = Math.max(e.lba, pos);
      const to = Math.min(endOf(e), end);
      out.push({
        source: 'journal',
        lba: from,
        blocks: to - from,
        seq: e.seq,
        location: e.location,
        offsetInRecord: e.offsetInRecord + (from - e.lba),
      });
      pos = to;
    }
    if (pos < end) out.push({ source: 'base', lba: pos, blocks: end - pos });
    return out;
  }

  /** True when any block of the range is mapped. */
  overlaps(lba: number, blocks: number): boolean {
    const e = this.at(this.firstEndingAfter(lba));
    return e !== undefined && e.lba < lba + blocks;
  }

  /** All extents in LBA order (live view: do not insert or release while iterating). */
  *extents(): IterableIterator<MapExtent> {
    for (const leaf of this.leaves) yield* leaf;
  }

  /**
   * A copy of the map stamped with atSeq = lastSeq. O(n) pointer copies; extents are immutable and
   * shared. Take it only after every record <= the seq you will drain has been inserted.
   */
  snapshot(): MapSnapshot {
    const extents: MapExtent[] = new Array<MapExtent>(this.extentCount);
    let i = 0;
    for (const leaf of this.leaves) for (const e of leaf) extents[i++] = e;
    const snap: MapSnapshot = Object.freeze({ atSeq: this.highestSeq, extents: Object.freeze(extents), blocks: this.blockCount });
    this.issued.add(snap);
    return snap;
  }

  /**
   * Call once the snapshot's data is durable on the main volume: removes from the live map exactly
   * the extents, or remaining parts of extents, whose seq is still <= snap.atSeq. Blocks written
   * after the snapshot keep their newer mapping. Idempotent; O(k log n) for k snapshot extents.
   * Returns the number of blocks released.
   */
  release(snap: MapSnapshot): number {
    if (!this.issued.has(snap)) throw new Error('release() of a snapshot this map did not issue');
    const t = snap.atSeq;
    let released = 0;
    // A live extent with seq <= t is what remains of the snapshot extent with the same range (all
    // inserts since carry seq > t), so walking the snapshot's ranges finds every one of them.
    for (const x of snap.extents) {
      const end = endOf(x);
      const c = this.firstEndingAfter(x.lba);
      for (;;) {
        const e = this.at(c);
        if (!e || e.lba >= end) break;
        if (e.seq <= t) {
          released += e.blocks;
          this.removeRun(c, 1);
        } else {
          this.advance(c);
        }
      }
    }
    return released;
  }

  // ---- leaf structure ----------------------------------------------------------------------

  private at(c: Cursor): MapExtent | undefined {
    return this.leaves[c.leaf]?.[c.index];
  }

  private advance(c: Cursor): void {
    c.index++;
    if (c.index >= this.leaves[c.leaf]!.length) {
      c.leaf++;
      c.index = 0;
    }
  }

  /** Cursor at the first extent whose end is > lba (it contains lba or starts after it). */
  private firstEndingAfter(lba: number): Cursor {
    const starts = this.leafStart;
    // Last leaf starting at or before lba.
    let lo = 0;
    let hi = starts.length - 1;
    let leaf = -1;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      if (starts[mid]! <= lba) {
        leaf = mid;
        lo = mid + 1;
      } else hi = mid - 1;
    }
    if (leaf < 0) return { leaf: 0, index: 0 };
    const items = this.leaves[leaf]!;
    lo = 0;
    hi = items.length - 1;
    let idx = 0;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      if (items[mid]!.lba <= lba) {
        idx = mid;
        lo = mid + 1;
      } else hi = mid - 1;
    }
    const c = { leaf, index: idx };
    if (endOf(items[idx]!) <= lba) this.advance(c);
    return c;
  }

  /** Removes `count` consecutive extents starting at the cursor, which then points past them. */
  private removeRun(c: Cursor, count: number): void {
    while (count > 0) {
      const items = this.leaves[c.leaf]!;
      const n = Math.min(count, items.length - c.index);
      const gone = items.splice(c.index, n);
      for (const e of gone) this.blockCount -= e.blocks;
      this.extentCount -= n;
      count -= n;
      if (items.length === 0) {
        this.leaves.splice(c.leaf, 1);
        this.leafStart.splice(c.leaf, 1);
        c.index = 0;
        continue;
      }
      this.leafStart[c.leaf] = items[0]!.lba;
      if (items.length < LEAF_MIN && this.leaves.length > 1) {
        this.rebalance(c);
        continue;
      }
      if (c.index >= items.length) {
        c.leaf++;
        c.index = 0;
      }
    }
  }

  /** Merges the cursor's small leaf with a neighbour, keeping the cursor on the same element. */
  private rebalance(c: Cursor): void {
    const left = c.leaf > 0 ? c.leaf - 1 : c.leaf;
    const a = this.leaves[left]!;
    const b = this.leaves[left + 1]!;
    const offset = c.leaf === left ? c.index : a.length + c.index; // position within a ++ b
    const merged = a.concat(b);
    if (merged.length <= LEAF_MAX) {
      this.leaves.splice(left, 2, merged);
      this.leafStart.splice(left, 2, merged[0]!.lba);
      this.setCursor(c, left, offset, [merged]);
    } else {
      const half = merged.length >>> 1;
      const x = merged.slice(0, half);
      const y = merged.slice(half);
      this.leaves.splice(left, 2, x, y);
      this.leafStart.splice(left, 2, x[0]!.lba, y[0]!.lba);
      this.setCursor(c, left, offset, [x, y]);
    }
  }

  private setCursor(c: Cursor, firstLeaf: number, offset: number, parts: MapExtent[][]): void {
    let leaf = firstLeaf;
    for (const p of parts) {
      if (offset < p.length) {
        c.leaf = leaf;
        c.index = offset;
        return;
      }
      offset -= p.length;
      leaf++;
    }
    c.leaf = leaf;
    c.index = 0;
  }

  /** Inserts an extent that overlaps nothing. */
  private add(e: MapExtent): void {
    this.extentCount++;
    this.blockCount += e.blocks;
    if (this.leaves.length === 0) {
      this.leaves.push([e]);
      this.leafStart.push(e.lba);
      return;
    }
    // The last leaf starting before e (or the first leaf, if e goes in front of everything).
    const starts = this.leafStart;
    let lo = 0;
    let hi = starts.length - 1;
    let leaf = 0;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      if (starts[mid]! < e.lba) {
        leaf = mid;
        lo = mid + 1;
      } else hi = mid - 1;
    }
    const items = this.leaves[leaf]!;
    lo = 0;
    hi = items.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (items[mid]!.lba < e.lba) lo = mid + 1;
      else hi = mid;
    }
    items.splice(lo, 0, e);
    starts[leaf] = items[0]!.lba;
    if (items.length > LEAF_MAX) {
      const half = items.length >>> 1;
      const tail = items.splice(half);
      this.leaves.splice(leaf + 1, 0, tail);
      starts.splice(leaf + 1, 0, tail[0]!.lba);
    }
  }

  private slice(e: MapExtent, from: number, to: number): MapExtent {
    return {
      lba: from,
      blocks: to - from,
      seq: e.seq,
      location: e.location,
      offsetInRecord: e.offsetInRecord + (from - e.lba),
    };
  }
}
