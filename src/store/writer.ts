// Writing one backup image, chunk by chunk, in any order, so that a restarted detour can resume.
//
// Durability of a chunk, in order: its bytes are written to chunks/<name> and fdatasync'd, the
// chunks directory is fsync'd and "C <index> <sha256>" is appended to progress.log and
// fdatasync'd. Only then is the chunk durable. An all-zero chunk gets no file, only a "Z <index>"
// line. The log is the only authority on what is durable: a chunk file without its record (a
// crash came between the two) is removed on resume and the chunk copied again; a record whose
// file is missing or short is discarded the same way.
//
// putChunk() returns as soon as the bytes are written (with O_DIRECT from the copier's aligned
// buffers, see chunk-memory.ts), so the caller can reuse its buffer while the chunk becomes
// durable behind it: each file is fdatasync'd on its own as soon as it is written, a few at a
// time, and the directory fsync and the log append+fdatasync are group commits taking every chunk
// whose data became durable while the previous commit ran. A copier pays about one fdatasync per
// chunk, done in parallel, and a handful of small syncs per commit, not three syncs in a row per
// chunk.
//
// The whole-image SHA-256 has to see the image bytes in order, but chunks may arrive in any order.
// The writer keeps one running hash and a cursor (the first chunk not yet hashed). A chunk handed
// over exactly at the cursor is hashed from the caller's buffer, at once; a copier that hands its
// chunks over in ascending order (BackupRun does) never costs more than that. Chunks that land
// ahead of the cursor are only written, and are read back from their files (one chunk-sized
// buffer, reused) once they are durable and the cursor reaches them, so memory does not grow with
// the volume or with how far ahead a writer runs. Reading back also re-verifies the chunk's own
// SHA-256: a chunk damaged between write and read-back is dropped (unlinked, "X <index>" logged)
// and reported missing, so the copier can write it again.
//
// node:crypto cannot export a hash's internal state, so the cursor is not persisted. After a
// restart, openBackup() starts the cursor at chunk 0 and the same read-back loop re-hashes the
// durable chunks from disk, in the background, while the copier writes the missing ones; this
// costs one local read of what was already copied, not a second copy from the volume.

import { createHash } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import { mkdir, open, readdir, readFile, rm, stat, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { allocChunkBuffers, chunkHasher, directIoCapable, O_DIRECT, type ImageHash } from './chunk-memory.ts';
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
  isAllZero,
  manifestPieces,
  MANIFEST_FILE,
  progressLineDropped,
  progressLineStored,
  progressLineZero,
  PROGRESS_FILE,
  SOURCE_WRITTEN_FILE,
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

/** What putChunk() gives back once the writer is done with the caller's buffer. */
export interface ChunkPut {
  /** Settles when the chunk is durable (or its write failed): what writeChunk() waits for. */
  durable: Promise<void>;
}

export interface BackupWriterTuning {
  /**
   * Bytes of chunk files written but not durable yet above which putChunk() waits for syncs to
   * catch up before it returns: bounds the chunks waiting on the disk (and their open files).
   * Default 128 MiB, at least two chunks.
   */
  maxUnsyncedBytes?: number;
  /** Chunk files fdatasync'd at once. Default 4. */
  syncParallel?: number;
}

const STAT_BATCH = 64;
const CHUNK_FILE_NAME = /^\d{8,}$/;
const DEFAULT_MAX_UNSYNCED_BYTES = 128 * 1024 * 1024;
// fdatasync blocks a libuv threadpool thread for as long as the disk takes; with every thread
// syncing, the chunk writes queue behind (detour runs 16 threads, libuv's default is 4).
const DEFAULT_SYNC_PARALLEL = 4;

/** A chunk written (or found all-zero) on its way to being durable. */
interface CommitEntry {
  index: number;
  length: number;
  /** Undefined for an all-zero chunk, which has no file. */
  file: FileHandle | undefined;
  sha256: Buffer;
  resolve(): void;
  reject(err: unknown): void;
}

export class BackupWriter {
  /** Every chunk from its putChunk() (or writeChunk()) until it is durable or has failed. */
  private readonly inFlight = new Map<number, Promise<void>>();
  private readonly logSync: GroupSync;
  private readonly dirSync: GroupSync;
  /** Chunks whose data is durable, waiting for the next group commit of directory and log. */
  private recordQueue: CommitEntry[] = [];
  private recording: Promise<void> | undefined;
  private syncsRunning = 0;
  private syncWaiters: Array<() => void> = [];
  /** Bytes of chunk files written and not yet durable. */
  private unsyncedBytes = 0;
  private roomWaiters: Array<() => void> = [];
  private readonly maxUnsyncedBytes: number;
  private readonly syncParallel: number;
  /** Until the filesystem refuses O_DIRECT. */
  private directIo = true;
  private logTorn = false;
  /** The whole-image SHA-256, running on the hashing thread. */
  private image: ImageHash = chunkHasher.openImage();
  /** The first chunk not yet fed to `image`. */
  private cursor = 0;
  /** Bumped when the hash starts over, so a read-back loop of the old hash stops feeding it. */
  private hashEpoch = 0;
  private advancing: Promise<void> | undefined;
  private readBuffer: Buffer | undefined;
  /** An I/O error of the read-back loop: complete() reports it. */
  private hashFailure: Error | undefined;
  private readonly droppedChunks: DroppedChunk[] = [];
  /** complete(), fail() or cancel() is running: no new chunk writes. */
  private ending = false;
  /** Closed (by close(), or after complete/fail/cancel): nothing more may be done. */
  private closed = false;
  private sourceWrittenSince = false;

  private constructor(
    private record: BackupRecord,
    /** The backup's directory in the store. */
    readonly dir: string,
    private readonly table: ChunkTable,
    private readonly log: FileHandle,
    private readonly release: () => void,
    tuning: BackupWriterTuning,
  ) {
    this.logSync = new GroupSync(() => this.log.datasync());
    const chunksDir = path.join(dir, CHUNKS_DIR);
    this.dirSync = new GroupSync(() => fsyncDir(chunksDir));
    this.maxUnsyncedBytes = Math.max(tuning.maxUnsyncedBytes ?? DEFAULT_MAX_UNSYNCED_BYTES, 2 * table.chunkSize);
    this.syncParallel = Math.max(1, tuning.syncParallel ?? DEFAULT_SYNC_PARALLEL);
  }

  /**
   * Attaches a writer to a backup directory whose manifest says "running": replays progress.log,
   * drops records whose chunk file is gone or of the wrong length, removes leftover temporaries,
   * and starts re-hashing whatever is durable. Used by BackupStore for both create and resume.
   */
  static async attach(record: BackupRecord, dir: string, release: () => void, tuning: BackupWriterTuning = {}): Promise<BackupWriter> {
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
    // Files the log does not vouch for: written before a crash that came ahead of their record, or
    // cut short. Their chunks are copied again; a stale file must not outlive a chunk that turns
    // out to be all-zero (stored as no file).
    for (const name of names) {
      if (!CHUNK_FILE_NAME.test(name)) continue;
      const i = Number(name);
      if (i < table.count && table.state(i) === CHUNK_STORED) continue;
      await rm(path.join(chunksDir, name), { force: true });
    }
    const log = await open(logFile, 'a', 0o644);
    // A torn last line would glue itself to the next record; start appends on a fresh line.
    if (ignored && logText.length && !logText.endsWith('\n')) await log.write('\n');
    const writer = new BackupWriter(record, dir, table, log, release, tuning);
    writer.sourceWrittenSince = await stat(path.join(dir, SOURCE_WRITTEN_FILE)).then(
      () => true,
      () => false,
    );
    writer.kickAdvance();
    return writer;
  }

  /** The volume may have been written since the freeze (markSourceWritten), here or before a restart. */
  get sourceWritten(): boolean {
    return this.sourceWrittenSince;
  }

  /**
   * Records, durably, that the volume may be written from now on while chunks are still missing:
   * a resumed backup must not copy them. Kept in the store as well as by the caller, because the
   * caller's own record may be on a disk that has just failed.
   */
  async markSourceWritten(): Promise<void> {
    if (this.sourceWrittenSince) return;
    await writeFileAtomic(path.join(this.dir, SOURCE_WRITTEN_FILE), `${new Date().toISOString()}\n`);
    this.sourceWrittenSince = true;
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
    const { durable } = await this.putChunk(index, data);
    await durable;
  }

  /**
   * writeChunk() in two steps: resolves as soon as the writer is done with `data` (written to the
   * chunk file, hashed), so the caller can reuse its buffer for the next chunk while this one is
   * synced; `durable` settles when the chunk is durable. Until then the chunk is not counted in
   * progress() nor left out of missingChunks(), and may not be written again. It resolves late
   * when too much written data is waiting for its syncs (back-pressure).
   *
   * The whole-image hash takes the chunk within this call (it is posted to the hashing thread
   * before the first await) when `index` is the next chunk it needs: a caller handing chunks over
   * in ascending order has them hashed from its own buffers, in the order of its calls, and never
   * read back.
   */
  async putChunk(index: number, data: Uint8Array): Promise<ChunkPut> {
    this.checkWritable();
    this.checkIndex(index);
    const buf = Buffer.isBuffer(data) ? data : Buffer.from(data.buffer, data.byteOffset, data.byteLength);
    const length = this.table.length(index);
    if (buf.length !== length) throw new RangeError(`backup ${this.id}: chunk ${index} must be ${length} bytes, got ${buf.length}`);
    if (this.inFlight.has(index)) throw new BackupStoreError(`backup ${this.id}: chunk ${index} is already being written`, this.id);
    if (this.table.isDurable(index)) {
      this.checkRewrite(index, buf);
      return { durable: Promise.resolve() };
    }
    const written = this.writeData(index, buf);
    const durable: Promise<void> = written
      .then((entry) => this.commit(entry))
      .then(
        () => this.settled(index, durable),
        (err: unknown) => {
          // Its bytes may already be in the running hash although the chunk is not durable: the
          // copier could write it again with other bytes, so the hash starts over from what is.
          if (this.cursor > index) this.restartHash();
          this.settled(index, durable);
          throw err;
        },
      );
    // The caller sees a failure through putChunk() or `durable`, whichever it waits for.
    durable.catch(() => {});
    this.inFlight.set(index, durable);
    await written;
    if (this.unsyncedBytes > this.maxUnsyncedBytes) await new Promise<void>((resolve) => this.roomWaiters.push(resolve));
    return { durable };
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
        // The image hash goes on: if writing the manifest fails, it is still there for a retry.
        sha256: await this.imageDigest(),
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

  /**
   * Hashes chunk `index` and writes it to its file (not synced): afterwards the caller's buffer is
   * free. Written directly under the final name: the file counts only once the progress log says
   * so, and a resume overwrites a file the log does not list.
   */
  private async writeData(index: number, data: Buffer): Promise<Omit<CommitEntry, 'resolve' | 'reject'>> {
    const length = data.length;
    const zero = isAllZero(data);
    // Posted to the hashing thread synchronously, before anything else can take the cursor's
    // turn: the order of putChunk() calls is the order of hashing.
    let image: ImageHash | undefined;
    if (!this.advancing && index === this.cursor && !this.hashFailure) {
      image = this.image;
      this.cursor++;
    }
    if (zero) {
      if (image) await chunkHasher.zeros(image, length);
      return { index, length, file: undefined, sha256: zeroChunkSha256(length) };
    }
    this.unsyncedBytes += length;
    // Both hashes on the hashing thread, beside the file write.
    const digest = chunkHasher.hashChunk(data, image) as Promise<Buffer>;
    const file = chunkPath(this.dir, index);
    let fh: FileHandle | undefined;
    try {
      fh = await this.writeFile(file, data);
      return { index, length, file: fh, sha256: await digest };
    } catch (err) {
      digest.catch(() => {});
      this.unsynced(length);
      await fh?.close().catch(() => {});
      await rm(file, { force: true }).catch(() => {});
      throw err;
    }
  }

  /**
   * Creates `file` with `data` in it, not synced, and returns it open. With O_DIRECT when the
   * buffer allows it (see chunk-memory.ts); a filesystem that refuses O_DIRECT (EINVAL) gets
   * buffered writes from then on.
   */
  private async writeFile(file: string, data: Buffer): Promise<FileHandle> {
    if (this.directIo && directIoCapable(data)) {
      const { O_WRONLY, O_CREAT, O_TRUNC } = fsConstants;
      let fh: FileHandle | undefined;
      try {
        fh = await open(file, O_WRONLY | O_CREAT | O_TRUNC | O_DIRECT!, 0o644);
        await writeAll(fh, data);
        return fh;
      } catch (err) {
        await fh?.close().catch(() => {});
        if ((err as NodeJS.ErrnoException).code !== 'EINVAL') throw err;
        this.directIo = false;
      }
    }
    const fh = await open(file, 'w', 0o644);
    try {
      await writeAll(fh, data);
    } catch (err) {
      await fh.close().catch(() => {});
      throw err;
    }
    return fh;
  }

  private settled(index: number, job: Promise<void>): void {
    if (this.inFlight.get(index) === job) this.inFlight.delete(index);
  }

  /**
   * Resolves once the chunk is durable. Its file is fdatasync'd on its own, as soon as it is
   * written (a few at a time); then it waits for the next group commit of the directory and the
   * log, which takes every chunk whose data became durable meanwhile.
   */
  private async commit(entry: Omit<CommitEntry, 'resolve' | 'reject'>): Promise<void> {
    const fh = entry.file;
    if (fh) {
      try {
        await this.syncSlot();
        try {
          await fh.datasync();
        } finally {
          this.releaseSyncSlot();
          await fh.close();
        }
      } catch (err) {
        await fh.close().catch(() => {});
        this.unsynced(entry.length);
        throw err;
      }
    }
    await new Promise<void>((resolve, reject) => {
      this.recordQueue.push({ ...entry, resolve, reject });
      this.recording ??= this.runRecords();
    });
  }

  private syncSlot(): Promise<void> {
    if (this.syncsRunning < this.syncParallel) {
      this.syncsRunning++;
      return Promise.resolve();
    }
    return new Promise<void>((resolve) => this.syncWaiters.push(resolve));
  }

  private releaseSyncSlot(): void {
    const next = this.syncWaiters.shift();
    if (next) next();
    else this.syncsRunning--;
  }

  /** Group commits, one after the other, each taking whatever became ready while the last ran. */
  private async runRecords(): Promise<void> {
    try {
      do {
        const batch = this.recordQueue;
        this.recordQueue = [];
        await this.recordBatch(batch);
      } while (this.recordQueue.length);
    } finally {
      // In the same step as the last look at the queue: an entry queued later starts a new run.
      this.recording = undefined;
    }
  }

  /**
   * The directory entries of the batch's files, and one log record per chunk in one append made
   * durable by one fdatasync. The two go together: a record whose file did not survive a crash is
   * found out on resume (missing or short file) and the chunk copied again, while a file without
   * its record is simply not counted.
   */
  private async recordBatch(batch: CommitEntry[]): Promise<void> {
    // After a failed append the log may end in a torn line: a newline keeps it off the next record.
    const lines = (this.logTorn ? '\n' : '') + batch.map((e) => (e.file ? progressLineStored(e.index, e.sha256) : progressLineZero(e.index))).join('');
    const results = await Promise.allSettled([
      batch.some((e) => e.file) ? this.dirSync.sync() : undefined,
      (async () => {
        try {
          await this.log.write(lines);
          this.logTorn = false;
        } catch (err) {
          this.logTorn = true;
          throw err;
        }
        await this.logSync.sync();
      })(),
    ]);
    const failure = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    for (const e of batch) {
      if (e.file) this.unsynced(e.length);
      if (failure) {
        e.reject(failure.reason);
        continue;
      }
      if (e.file) this.table.setStored(e.index, e.sha256);
      else this.table.setZero(e.index);
      e.resolve();
    }
    this.kickAdvance();
  }

  /** Accounts for `length` bytes that are durable now (or will never be), and lets waiting writers on. */
  private unsynced(length: number): void {
    this.unsyncedBytes -= length;
    if (this.unsyncedBytes > this.maxUnsyncedBytes || !this.roomWaiters.length) return;
    const waiters = this.roomWaiters;
    this.roomWaiters = [];
    for (const w of waiters) w();
  }

  private checkRewrite(index: number, data: Buffer): void {
    const same =
      this.table.state(index) === CHUNK_ZERO ? isAllZero(data) : createHash('sha256').update(data).digest().equals(this.table.hash(index));
    if (!same) {
      throw new BackupStoreError(`backup ${this.id}: chunk ${index} is already stored with different content (the source changed under a frozen backup?)`, this.id);
    }
  }

  /** The running hash starts again at chunk 0; the read-back loop re-reads what is durable. */
  private restartHash(): void {
    chunkHasher.closeImage(this.image);
    this.image = chunkHasher.openImage();
    this.cursor = 0;
    this.hashEpoch++;
    this.kickAdvance();
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
    const epoch = this.hashEpoch;
    try {
      while (!this.closed && this.cursor < this.table.count && epoch === this.hashEpoch) {
        const index = this.cursor;
        const state = this.table.state(index);
        if (state === CHUNK_MISSING) return;
        if (state === CHUNK_ZERO) {
          await chunkHasher.zeros(this.image, this.table.length(index));
        } else {
          // Shared memory: the hashing thread takes the bytes where they are.
          this.readBuffer ??= allocChunkBuffers(1, this.table.chunkSize)[0]!;
          let data: Buffer;
          try {
            data = await readVerifiedChunk({ backupId: this.id, dir: this.dir, table: this.table }, index, this.readBuffer);
          } catch (err) {
            if (!(err instanceof ChunkCorruptError)) throw err;
            await this.dropChunk(index, err.problem);
            return;
          }
          if (this.closed || epoch !== this.hashEpoch) return;
          await chunkHasher.hashChunk(data, this.image, false);
        }
        if (epoch !== this.hashEpoch) return;
        this.cursor++;
      }
    } catch (err) {
      if (epoch === this.hashEpoch) this.hashFailure = err as Error;
    }
  }

  private async dropChunk(index: number, problem: string): Promise<void> {
    this.table.setMissing(index);
    this.droppedChunks.push({ index, problem });
    await rm(chunkPath(this.dir, index), { force: true });
    await this.appendLog(progressLineDropped(index));
  }

  /** The image hash's digest; if the hashing thread lost it, the hash starts over for next time. */
  private async imageDigest(): Promise<string> {
    try {
      return await chunkHasher.digest(this.image);
    } catch (err) {
      this.restartHash();
      throw err;
    }
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
    while (this.recording) await this.recording;
    while (this.advancing) await this.advancing;
    chunkHasher.closeImage(this.image);
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

async function writeAll(fh: FileHandle, data: Buffer): Promise<void> {
  for (let done = 0; done < data.length; ) {
    const { bytesWritten } = await fh.write(data, done, data.length - done, done);
    done += bytesWritten;
  }
}
