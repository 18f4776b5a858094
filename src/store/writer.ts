// Writing one backup image, chunk by chunk, in any order, so that a restarted detour can resume.
//
// Durability of a chunk, in order: the bytes go to chunks/<name>.tmp, are fdatasync'd, the file is
// renamed to chunks/<name>, the chunks directory is fsync'd, then "C <index> <sha256>" is appended
// to progress.log and fdatasync'd. Only then is the chunk durable and writeChunk() resolves. An
// all-zero chunk gets no file, only a "Z <index>" line. The directory and log fsyncs are group
// commits, so a copier with N chunks in flight pays for about two of each, not N.
//
// The whole-image SHA-256 has to see the image bytes in order, but chunks arrive in any order. The
// writer keeps one running hash and a cursor (the first chunk not yet hashed). A chunk that lands
// at the cursor is hashed from the caller's buffer; chunks that land ahead of it are only written,
// and are read back from their files (one chunk-sized buffer, reused) when the cursor reaches them,
// so memory does not grow with the volume or with how far ahead the copier runs. Reading back also
// re-verifies the chunk's own SHA-256: a chunk damaged between write and read-back is dropped
// (unlinked, "X <index>" logged) and reported missing, so the copier can write it again.
//
// node:crypto cannot export a hash's internal state, so the cursor is not persisted. After a
// restart, openBackup() starts the cursor at chunk 0 and the same read-back loop re-hashes the
// durable chunks from disk, in the background, while the copier writes the missing ones; this
// costs one local read of what was already copied, not a second copy from the volume.

import { createHash, type Hash } from 'node:crypto';
import { mkdir, open, readdir, readFile, rename, rm, stat, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { fsyncDir, GroupSync, writeFileAtomic } from './durable.ts';
import { BackupIncompleteError, BackupStateError, BackupStoreError, ChunkCorruptError } from './errors.ts';
import {
  applyProgressLog,
  ChunkTable,
  CHUNK_MISSING,
  CHUNK_STORED,
  CHUNK_ZERO,
  CHUNKS_DIR,
  chunkFileName,
  hashZeros,
  isAllZero,
  manifestPieces,
  MANIFEST_FILE,
  progressLineDropped,
  progressLineStored,
  progressLineZero,
  PROGRESS_FILE,
  zeroChunkSha256,
  type BackupRecord,
  type BackupState,
} from './format.ts';
import { chunkPath, readVerifiedChunk } from './reader.ts';
import { normalizeDeviceIdentity, toIsoTime } from './meta.ts';

export interface WriterProgress {
  chunksTotal: number;
  /** Chunks durable on disk (stored or zero). */
  chunksDurable: number;
  chunksZero: number;
  bytesTotal: number;
  /** Image bytes covered by durable chunks: the backup object's bytesCopied. */
  bytesDurable: number;
  /** Image bytes already fed, in order, to the whole-image SHA-256. */
  bytesHashed: number;
}

/** Fields known only late in a backup; complete() records them. All optional. */
export interface CompleteFields {
  /** Default: now. */
  finishedAt?: Date | string;
  startedAt?: Date | string;
  freezeSeq?: number;
  deviceIdentity?: string | Uint8Array;
  initiators?: string[];
}

export interface EndOptions {
  /** Default: now. */
  finishedAt?: Date | string;
  /**
   * Keep the chunk files and progress log for diagnosis. Default false: a failed or cancelled
   * backup can never be resumed (the freeze is over), so its data is deleted and only the
   * manifest, with its state and error, stays in the catalog.
   */
  keepData?: boolean;
}

/** A chunk dropped because its stored copy failed verification when read back. */
export interface DroppedChunk {
  index: number;
  problem: string;
}

const STAT_BATCH = 64;

export class BackupWriter {
  private readonly inFlight = new Map<number, Promise<void>>();
  private readonly logSync: GroupSync;
  private readonly dirSync: GroupSync;
  private readonly hash: Hash = createHash('sha256');
  /** The first chunk not yet fed to `hash`. */
  private cursor = 0;
  private advancing: Promise<void> | undefined;
  private readBuffer: Buffer | undefined;
  /** An I/O error of the read-back loop: complete() reports it. */
  private hashFailure: Error | undefined;
  private readonly droppedChunks: DroppedChunk[] = [];
  /** complete(), fail() or cancel() is running: no new chunk writes. */
  private ending = false;
  /** Closed (by close(), or after complete/fail/cancel): nothing more may be done. */
  private closed = false;

  private constructor(
    private record: BackupRecord,
    private readonly dir: string,
    private readonly table: ChunkTable,
    private readonly log: FileHandle,
    private readonly release: () => void,
  ) {
    this.logSync = new GroupSync(() => this.log.datasync());
    const chunksDir = path.join(dir, CHUNKS_DIR);
    this.dirSync = new GroupSync(() => fsyncDir(chunksDir));
  }

  /**
   * Attaches a writer to a backup directory whose manifest says "running": replays progress.log,
   * drops records whose chunk file is gone or of the wrong length, removes leftover temporaries,
   * and starts re-hashing whatever is durable. Used by BackupStore for both create and resume.
   */
  static async attach(record: BackupRecord, dir: string, release: () => void): Promise<BackupWriter> {
    const table = new ChunkTable(record.sizeBytes, record.chunkSize);
    const logFile = path.join(dir, PROGRESS_FILE);
    let logText = '';
    try {
      logText = await readFile(logFile, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
    }
    const { ignored } = applyProgressLog(logText, table);
    const chunksDir = path.join(dir, CHUNKS_DIR);
    await mkdir(chunksDir, { recursive: true });
    const names = new Set(await readdir(chunksDir));
    for (const name of names) if (name.endsWith('.tmp')) await rm(path.join(chunksDir, name), { force: true });
    const stored: number[] = [];
    for (let i = 0; i < table.count; i++) {
      if (table.state(i) !== CHUNK_STORED) continue;
      if (names.has(chunkFileName(i))) stored.push(i);
      else table.setMissing(i);
    }
    for (let b = 0; b < stored.length; b += STAT_BATCH) {
      await Promise.all(
        stored.slice(b, b + STAT_BATCH).map(async (i) => {
          const st = await stat(chunkPath(dir, i)).catch(() => undefined);
          if (!st || st.size !== table.length(i)) table.setMissing(i);
        }),
      );
    }
    const log = await open(logFile, 'a', 0o644);
    // A torn last line would glue itself to the next record; start appends on a fresh line.
    if (ignored && logText.length && !logText.endsWith('\n')) await log.write('\n');
    const writer = new BackupWriter(record, dir, table, log, release);
    writer.kickAdvance();
    return writer;
  }

  get id(): string {
    return this.record.id;
  }

  /** The manifest record as it stands (state "running" until complete/fail/cancel). */
  get manifest(): Readonly<BackupRecord> {
    return { ...this.record, initiators: [...this.record.initiators] };
  }

  get sizeBytes(): number {
    return this.table.sizeBytes;
  }

  get chunkSize(): number {
    return this.table.chunkSize;
  }

  get chunkCount(): number {
    return this.table.count;
  }

  /** Image offset of chunk `index`. */
  chunkOffset(index: number): number {
    this.checkIndex(index);
    return this.table.offset(index);
  }

  /** Byte length of chunk `index`: chunkSize, except possibly the last one. */
  chunkLength(index: number): number {
    this.checkIndex(index);
    return this.table.length(index);
  }

  isDurable(index: number): boolean {
    this.checkIndex(index);
    return this.table.isDurable(index);
  }

  /** Indexes of the chunks that are not durable yet, ascending: what a (resumed) copy must write. */
  missingChunks(): number[] {
    return [...this.table.missing()];
  }

  progress(): WriterProgress {
    return {
      chunksTotal: this.table.count,
      chunksDurable: this.table.durable,
      chunksZero: this.table.zero,
      bytesTotal: this.table.sizeBytes,
      bytesDurable: this.table.durableBytes,
      bytesHashed: this.cursor >= this.table.count ? this.table.sizeBytes : this.table.offset(this.cursor),
    };
  }

  /** Chunks dropped because their stored copy failed verification (they are missing again). */
  get dropped(): readonly DroppedChunk[] {
    return this.droppedChunks;
  }

  /**
   * Stores chunk `index` (image bytes chunkOffset(index) onward; exactly chunkLength(index) bytes)
   * and resolves once it is durable. Chunks may be written in any order and concurrently, but one
   * index at a time. The caller must not modify `data` until the promise settles; the writer keeps
   * no reference to it after that. Writing a chunk that is already durable with identical bytes is
   * a no-op (a resumed copier may repeat itself); with different bytes it is an error.
   */
  async writeChunk(index: number, data: Uint8Array): Promise<void> {
    this.checkWritable();
    this.checkIndex(index);
    const buf = Buffer.isBuffer(data) ? data : Buffer.from(data.buffer, data.byteOffset, data.byteLength);
    const length = this.table.length(index);
    if (buf.length !== length) throw new RangeError(`backup ${this.id}: chunk ${index} must be ${length} bytes, got ${buf.length}`);
    if (this.inFlight.has(index)) throw new BackupStoreError(`backup ${this.id}: chunk ${index} is already being written`, this.id);
    const job = this.table.isDurable(index) ? this.checkRewrite(index, buf) : this.storeChunk(index, buf);
    this.inFlight.set(index, job);
    try {
      await job;
    } finally {
      this.inFlight.delete(index);
    }
  }

  /**
   * Verifies that every chunk is durable, finishes the whole-image SHA-256, and atomically replaces
   * the manifest with the completed one (the commit point). If chunks are missing it throws
   * BackupIncompleteError and the writer stays usable: write them and call complete() again.
   */
  async complete(fields: CompleteFields = {}): Promise<BackupRecord> {
    this.checkWritable();
    const finishedAt = toIsoTime(fields.finishedAt ?? new Date(), 'finishedAt');
    const startedAt = fields.startedAt !== undefined ? toIsoTime(fields.startedAt, 'startedAt') : this.record.startedAt;
    const deviceIdentity = fields.deviceIdentity !== undefined ? normalizeDeviceIdentity(fields.deviceIdentity) : this.record.deviceIdentity;
    if (fields.freezeSeq !== undefined && (!Number.isSafeInteger(fields.freezeSeq) || fields.freezeSeq < 0)) {
      throw new RangeError(`freezeSeq must be a non-negative integer, got ${fields.freezeSeq}`);
    }
    this.ending = true;
    let record: BackupRecord;
    try {
      await this.settleInFlight();
      this.throwIfIncomplete();
      await this.hashToEnd();
      if (this.hashFailure) throw this.hashFailure;
      this.throwIfIncomplete();
      record = {
        ...this.record,
        state: 'completed',
        error: null,
        startedAt,
        finishedAt,
        deviceIdentity,
        freezeSeq: fields.freezeSeq ?? this.record.freezeSeq,
        initiators: fields.initiators ? [...fields.initiators] : this.record.initiators,
        // copy(): if writing the manifest fails, the running hash is still there for a retry.
        sha256: this.hash.copy().digest('hex'),
      };
      await writeFileAtomic(path.join(this.dir, MANIFEST_FILE), manifestPieces(record, this.table));
    } catch (err) {
      this.ending = false;
      throw err;
    }
    this.record = record;
    try {
      await this.shutdown();
      // The manifest now holds everything the log did; a crash before this removal is harmless.
      await rm(path.join(this.dir, PROGRESS_FILE), { force: true });
      await fsyncDir(this.dir);
    } finally {
      this.releaseOnce();
    }
    return this.manifest;
  }

  /** Marks the backup failed, with the reason. See EndOptions.keepData for what happens to data. */
  fail(reason: string, opts: EndOptions = {}): Promise<BackupRecord> {
    return this.end('failed', reason, opts);
  }

  /** Marks the backup cancelled (an operator's decision rather than an error). */
  cancel(reason = 'cancelled', opts: EndOptions = {}): Promise<BackupRecord> {
    return this.end('cancelled', reason, opts);
  }

  /**
   * Lets go of the backup without changing its state: it stays "running" and can be resumed with
   * BackupStore.openBackup(). Waits for chunk writes already started. For shutdown.
   */
  async close(): Promise<void> {
    if (this.closed) return;
    this.ending = true;
    await this.settleInFlight();
    try {
      await this.shutdown();
    } finally {
      this.releaseOnce();
    }
  }

  // -------------------------------------------------------------------------------------------

  private async storeChunk(index: number, data: Buffer): Promise<void> {
    const zero = isAllZero(data);
    let sha256: Buffer;
    if (zero) {
      sha256 = zeroChunkSha256(data.length);
      await this.appendLog(progressLineZero(index));
    } else {
      sha256 = createHash('sha256').update(data).digest();
      const file = chunkPath(this.dir, index);
      const tmp = `${file}.tmp`;
      try {
        const fh = await open(tmp, 'w', 0o644);
        try {
          await fh.writeFile(data);
          await fh.datasync();
        } finally {
          await fh.close();
        }
        await rename(tmp, file);
      } catch (err) {
        await rm(tmp, { force: true }).catch(() => {});
        throw err;
      }
      await this.dirSync.sync();
      await this.appendLog(progressLineStored(index, sha256));
    }
    if (zero) this.table.setZero(index);
    else this.table.setStored(index, sha256);
    // The common case under a queue depth: the chunk is the next one the hash needs, and its bytes
    // are at hand, so no read-back.
    if (!this.advancing && index === this.cursor && !this.hashFailure) {
      this.hash.update(data);
      this.cursor++;
    }
    this.kickAdvance();
  }

  private async checkRewrite(index: number, data: Buffer): Promise<void> {
    const same =
      this.table.state(index) === CHUNK_ZERO ? isAllZero(data) : createHash('sha256').update(data).digest().equals(this.table.hash(index));
    if (!same) {
      throw new BackupStoreError(`backup ${this.id}: chunk ${index} is already stored with different content (the source changed under a frozen backup?)`, this.id);
    }
  }

  private async appendLog(line: string): Promise<void> {
    await this.log.write(line);
    await this.logSync.sync();
  }

  private kickAdvance(): void {
    if (this.advancing || this.closed || this.hashFailure) return;
    if (this.cursor >= this.table.count || !this.table.isDurable(this.cursor)) return;
    this.advancing = this.advance().finally(() => {
      this.advancing = undefined;
      // A chunk may have become durable at the cursor after the loop's last look.
      this.kickAdvance();
    });
  }

  /** Feeds durable chunks at the cursor to the hash, reading stored ones back from disk. */
  private async advance(): Promise<void> {
    try {
      while (!this.closed && this.cursor < this.table.count) {
        const index = this.cursor;
        const state = this.table.state(index);
        if (state === CHUNK_MISSING) return;
        if (state === CHUNK_ZERO) {
          hashZeros(this.hash, this.table.length(index));
        } else {
          this.readBuffer ??= Buffer.allocUnsafe(this.table.chunkSize);
          let data: Buffer;
          try {
            data = await readVerifiedChunk({ backupId: this.id, dir: this.dir, table: this.table }, index, this.readBuffer);
          } catch (err) {
            if (!(err instanceof ChunkCorruptError)) throw err;
            await this.dropChunk(index, err.problem);
            return;
          }
          if (this.closed) return;
          this.hash.update(data);
        }
        this.cursor++;
      }
    } catch (err) {
      this.hashFailure = err as Error;
    }
  }

  private async dropChunk(index: number, problem: string): Promise<void> {
    this.table.setMissing(index);
    this.droppedChunks.push({ index, problem });
    await rm(chunkPath(this.dir, index), { force: true });
    await this.appendLog(progressLineDropped(index));
  }

  private async hashToEnd(): Promise<void> {
    this.kickAdvance();
    while (this.advancing) await this.advancing;
  }

  private throwIfIncomplete(): void {
    const missingCount = this.table.count - this.table.durable;
    if (missingCount === 0) return;
    const missing: number[] = [];
    for (const i of this.table.missing()) {
      missing.push(i);
      if (missing.length === 8) break;
    }
    const dropped = this.droppedChunks.filter((d) => !this.table.isDurable(d.index));
    const detail = dropped.length ? `; failed verification after being stored: ${dropped.map((d) => `chunk ${d.index} (${d.problem})`).join('; ')}` : '';
    throw new BackupIncompleteError(this.id, missing, missingCount, detail);
  }

  private async end(state: BackupState, reason: string, opts: EndOptions): Promise<BackupRecord> {
    this.checkWritable();
    const finishedAt = toIsoTime(opts.finishedAt ?? new Date(), 'finishedAt');
    this.ending = true;
    try {
      await this.settleInFlight();
      await this.shutdown();
      // If this write fails the backup stays "running" on disk; openBackup() and fail() again.
      const record: BackupRecord = { ...this.record, state, error: String(reason), finishedAt, sha256: null };
      await writeFileAtomic(path.join(this.dir, MANIFEST_FILE), manifestPieces(record));
      this.record = record;
      if (!opts.keepData) {
        await rm(path.join(this.dir, CHUNKS_DIR), { recursive: true, force: true });
        await rm(path.join(this.dir, PROGRESS_FILE), { force: true });
        await fsyncDir(this.dir);
      }
    } finally {
      this.releaseOnce();
    }
    return this.manifest;
  }

  private async settleInFlight(): Promise<void> {
    while (this.inFlight.size) await Promise.allSettled([...this.inFlight.values()]);
  }

  private async shutdown(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    while (this.advancing) await this.advancing;
    this.readBuffer = undefined;
    await this.log.close();
  }

  private released = false;

  /** Lets the store hand this backup to another writer; last, once the files are settled. */
  private releaseOnce(): void {
    if (this.released) return;
    this.released = true;
    this.release();
  }

  private checkWritable(): void {
    if (this.closed) throw new BackupStateError(`backup ${this.id}: the writer is closed (state ${this.record.state})`, this.id);
    if (this.ending) throw new BackupStateError(`backup ${this.id}: the backup is being completed, failed or closed`, this.id);
  }

  private checkIndex(index: number): void {
    if (!Number.isInteger(index) || index < 0 || index >= this.table.count) {
      throw new RangeError(`backup ${this.id}: chunk ${index} does not exist (0..${this.table.count - 1})`);
    }
  }
}
