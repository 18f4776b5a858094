// Reading a completed backup image. Every chunk is checked against its recorded SHA-256 before any
// of its bytes are handed out: a bad chunk is a ChunkCorruptError naming it, never data.

import { createHash } from 'node:crypto';
import { open } from 'node:fs/promises';
import path from 'node:path';
import { ChunkCorruptError } from './errors.ts';
import { CHUNK_MISSING, CHUNK_ZERO, CHUNKS_DIR, chunkFileName, type BackupRecord, type ChunkTable } from './format.ts';

/** Where a backup's chunks live, for messages and file names. */
export interface ChunkSource {
  backupId: string;
  dir: string;
  table: ChunkTable;
}

export function chunkPath(backupDir: string, index: number): string {
  return path.join(backupDir, CHUNKS_DIR, chunkFileName(index));
}

/**
 * Reads stored chunk `index` into `buf` (at least the chunk's length) and verifies it. Returns the
 * verified bytes as a view of `buf`. Zero chunks have no file: callers handle them first.
 */
export async function readVerifiedChunk(src: ChunkSource, index: number, buf: Buffer): Promise<Buffer> {
  const { table } = src;
  const file = chunkPath(src.dir, index);
  const length = table.length(index);
  const corrupt = (problem: string) => new ChunkCorruptError(src.backupId, index, file, table.offset(index), length, problem);
  let fh;
  try {
    fh = await open(file, 'r');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') throw corrupt('its file is missing');
    throw err;
  }
  try {
    const st = await fh.stat();
    if (st.size !== length) throw corrupt(`its file is ${st.size} bytes, expected ${length}`);
    let done = 0;
    while (done < length) {
      const { bytesRead } = await fh.read(buf, done, length - done, done);
      if (bytesRead === 0) throw corrupt(`its file ended after ${done} of ${length} bytes`);
      done += bytesRead;
    }
  } finally {
    await fh.close();
  }
  const data = buf.subarray(0, length);
  const actual = createHash('sha256').update(data).digest();
  const expected = table.hash(index);
  if (!actual.equals(expected)) throw corrupt(`its SHA-256 is ${actual.toString('hex')}, the manifest records ${expected.toString('hex')}`);
  return data;
}

export interface ImageReaderOptions {
  /**
   * Verified chunks kept in memory for repeated or sequential small reads (an initiator's 4 KiB
   * reads should not re-read and re-hash a 4 MiB chunk each time). Default 4.
   */
  cacheChunks?: number;
}

/** Random access to a completed backup's raw image. */
export class ImageReader {
  readonly size: number;
  private readonly cache = new Map<number, Buffer>();
  private readonly loading = new Map<number, Promise<Buffer>>();
  private readonly cacheChunks: number;
  private closed = false;

  constructor(
    readonly record: Readonly<BackupRecord>,
    private readonly src: ChunkSource,
    opts: ImageReaderOptions = {},
  ) {
    this.size = record.sizeBytes;
    this.cacheChunks = Math.max(1, opts.cacheChunks ?? 4);
  }

  get id(): string {
    return this.record.id;
  }

  get chunkSize(): number {
    return this.src.table.chunkSize;
  }

  get chunkCount(): number {
    return this.src.table.count;
  }

  /** True for a chunk stored sparsely as all zero. */
  isZeroChunk(index: number): boolean {
    this.checkIndex(index);
    return this.src.table.state(index) === CHUNK_ZERO;
  }

  /** `length` bytes of the image from `offset`, every chunk touched verified. */
  async read(offset: number, length: number): Promise<Buffer> {
    if (this.closed) throw new Error(`backup ${this.id}: image reader is closed`);
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new RangeError(`backup ${this.id}: read of ${length} bytes at ${offset} is outside the ${this.size}-byte image`);
    }
    const out = Buffer.allocUnsafe(length);
    const { table } = this.src;
    let pos = offset;
    while (pos < offset + length) {
      const index = Math.floor(pos / table.chunkSize);
      const within = pos - table.offset(index);
      const n = Math.min(table.length(index) - within, offset + length - pos);
      if (table.state(index) === CHUNK_ZERO) out.fill(0, pos - offset, pos - offset + n);
      else (await this.chunk(index)).copy(out, pos - offset, within, within + n);
      pos += n;
    }
    return out;
  }

  /** A copy of chunk `index`, verified. */
  async readChunk(index: number): Promise<Buffer> {
    this.checkIndex(index);
    if (this.src.table.state(index) === CHUNK_ZERO) return Buffer.alloc(this.src.table.length(index));
    return Buffer.from(await this.chunk(index));
  }

  close(): void {
    this.closed = true;
    this.cache.clear();
  }

  private checkIndex(index: number): void {
    if (!Number.isInteger(index) || index < 0 || index >= this.src.table.count) {
      throw new RangeError(`backup ${this.id}: chunk ${index} does not exist (0..${this.src.table.count - 1})`);
    }
  }

  private async chunk(index: number): Promise<Buffer> {
    const hit = this.cache.get(index);
    if (hit) {
      // Re-insert: Map order is the LRU order.
      this.cache.delete(index);
      this.cache.set(index, hit);
      return hit;
    }
    let pending = this.loading.get(index);
    if (!pending) {
      if (this.src.table.state(index) === CHUNK_MISSING) throw new Error(`backup ${this.id}: chunk ${index} is not in the manifest`);
      pending = readVerifiedChunk(this.src, index, Buffer.allocUnsafe(this.src.table.length(index))).finally(() => this.loading.delete(index));
      this.loading.set(index, pending);
    }
    const data = await pending;
    if (!this.closed && !this.cache.has(index)) {
      this.cache.set(index, data);
      while (this.cache.size > this.cacheChunks) this.cache.delete(this.cache.keys().next().value!);
    }
    return data;
  }
}
