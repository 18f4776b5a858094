// The file backing store of an embedded logical unit: a (usually sparse) regular file read and
// written with positional I/O. Every call is asynchronous so that the event loop never waits on the
// disk; many commands can be in flight at once, and ordering between overlapping writes is the
// caller's business (see RangeLock in logical-unit.ts).

import { constants as fsConstants, read as fsRead, write as fsWrite } from 'node:fs';
import { open, realpath, stat, type FileHandle } from 'node:fs/promises';

export interface BackingFileOptions {
  /**
   * Capacity in bytes. When the file is smaller it is extended (sparsely) to this size; a larger
   * file is never shrunk, the logical unit simply ends at `size`. Without it the capacity is the
   * file's current size.
   */
  size?: number;
  /** Create the file when it does not exist (requires `size`). Default true. */
  create?: boolean;
  /** Open read-only; writes then fail with EROFS-like errors and the LU reports write protect. */
  readOnly?: boolean;
}

/** Zeroing works through a shared zero buffer in pieces of this size. */
const ZERO_CHUNK = 1 << 20;
const zeroChunk = Buffer.alloc(ZERO_CHUNK);
const SMALL_ZERO = 64 << 10;

export class BackingFile {
  private closed = false;
  /** The flush currently running, and the one queued behind it (group commit). */
  private flushRunning: Promise<void> | undefined;
  private flushQueued: Promise<void> | undefined;

  private constructor(
    private readonly fh: FileHandle,
    /** Absolute path with symlinks resolved: the stable identity of the image. */
    readonly path: string,
    /** Usable bytes, as presented to the initiator. */
    readonly size: number,
    readonly readOnly: boolean,
  ) {}

  static async open(file: string, opts: BackingFileOptions = {}): Promise<BackingFile> {
    const readOnly = opts.readOnly ?? false;
    let existing: number | undefined;
    try {
      const st = await stat(file);
      if (!st.isFile()) throw new Error(`${file}: not a regular file`);
      existing = st.size;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
    }
    if (existing === undefined) {
      if (readOnly) throw new Error(`${file}: does not exist (read-only image)`);
      if (opts.create === false) throw new Error(`${file}: does not exist`);
      if (opts.size === undefined) throw new Error(`${file}: does not exist and no size was given to create it`);
    }
    if (opts.size !== undefined && (!Number.isSafeInteger(opts.size) || opts.size <= 0)) {
      throw new RangeError(`size must be a positive integer, got ${opts.size}`);
    }
    // O_CREAT without O_TRUNC: an existing image keeps its data.
    const flags = readOnly ? fsConstants.O_RDONLY : fsConstants.O_RDWR | fsConstants.O_CREAT;
    const fh = await open(file, flags, 0o644);
    try {
      let size = existing ?? 0;
      if (opts.size !== undefined) {
        if (size < opts.size) {
          if (readOnly) throw new Error(`${file}: read-only image is smaller (${size}) than the requested size ${opts.size}`);
          await fh.truncate(opts.size);
        }
        size = opts.size;
      }
      if (size === 0) throw new Error(`${file}: empty image`);
      return new BackingFile(fh, await realpath(file), size, readOnly);
    } catch (err) {
      await fh.close();
      throw err;
    }
  }

  /**
   * Reads `length` bytes at `position` into a new Buffer of exactly that size. Bytes past the
   * end of the file (an image truncated behind our back) read as zeros, like a hole.
   */
  read(position: number, length: number): Promise<Buffer> {
    const buf = Buffer.allocUnsafe(length);
    return this.readInto(buf, position).then(() => buf);
  }

  // The callback API on the handle's descriptor, rather than FileHandle.read/write: one promise
  // per command instead of one per call plus FileHandle bookkeeping, which is measurable at the
  // small-block rates an iSCSI target sees. The FileHandle still owns the descriptor's lifetime.
  // The loops are methods, not local closures: the TypeScript loader wraps every named closure
  // in a property definition each time one is created, which shows at small-block rates.
  readInto(buf: Buffer, position: number): Promise<void> {
    if (buf.length === 0) return Promise.resolve();
    return new Promise((resolve, reject) => this.readStep(this.fh.fd, buf, 0, position, resolve, reject));
  }

  private readStep(fd: number, buf: Buffer, done: number, position: number, resolve: () => void, reject: (err: unknown) => void): void {
    fsRead(fd, buf, done, buf.length - done, position + done, (err, n) => {
      if (err) return reject(err);
      if (n === 0) {
        buf.fill(0, done);
        return resolve();
      }
      if (done + n < buf.length) this.readStep(fd, buf, done + n, position, resolve, reject);
      else resolve();
    });
  }

  write(position: number, data: Buffer): Promise<void> {
    if (data.length === 0) return Promise.resolve();
    return new Promise((resolve, reject) => this.writeStep(this.fh.fd, data, 0, position, resolve, reject));
  }

  private writeStep(fd: number, data: Buffer, done: number, position: number, resolve: () => void, reject: (err: unknown) => void): void {
    fsWrite(fd, data, done, data.length - done, position + done, (err, n) => {
      if (err) return reject(err);
      if (n === 0) return reject(Object.assign(new Error('short write'), { code: 'EIO' }));
      if (done + n < data.length) this.writeStep(fd, data, done + n, position, resolve, reject);
      else resolve();
    });
  }

  /**
   * Makes `length` bytes at `position` read back as zeros. Node has no fallocate(PUNCH_HOLE), so
   * this writes zeros; pieces that already read as zeros (typically holes of a sparse image, which
   * the kernel returns without touching the disk) are skipped so that discarding never-written
   * space does not allocate it.
   */
  async zero(position: number, length: number, signal?: AbortSignal): Promise<void> {
    // Small ranges: allocating them costs less than the read that could avoid it.
    if (length <= SMALL_ZERO) return this.write(position, zeroChunk.subarray(0, length));
    const scratch = Buffer.allocUnsafe(Math.min(length, ZERO_CHUNK));
    let done = 0;
    while (done < length) {
      if (signal?.aborted) return;
      const n = Math.min(ZERO_CHUNK, length - done);
      const piece = scratch.subarray(0, n);
      await this.readInto(piece, position + done);
      if (!piece.equals(zeroChunk.subarray(0, n))) await this.write(position + done, zeroChunk.subarray(0, n));
      done += n;
    }
  }

  /**
   * fdatasync, shared between concurrent callers: a caller that arrives while a flush is running
   * waits for the next one (its data may have been written after the running flush started), and
   * every caller arriving meanwhile shares that next flush.
   */
  flush(): Promise<void> {
    if (this.closed) return Promise.reject(new Error('backing file is closed'));
    if (!this.flushRunning) {
      this.flushRunning = this.runFlush();
      return this.flushRunning;
    }
    if (!this.flushQueued) {
      const after = this.flushRunning.catch(() => undefined);
      this.flushQueued = after.then(() => {
        this.flushQueued = undefined;
        this.flushRunning = this.runFlush();
        return this.flushRunning;
      });
    }
    return this.flushQueued;
  }

  private async runFlush(): Promise<void> {
    try {
      if (!this.readOnly) await this.fh.datasync();
    } finally {
      this.flushRunning = undefined;
    }
  }

  async close(): Promise<void> {
    if (this.closed) return;
    await Promise.allSettled([this.flushQueued, this.flushRunning]);
    this.closed = true;
    await this.fh.close();
  }
}
