// The backup store: where backup images are written while a volume is frozen, and read back from.
// One directory per backup under the store path; see format.ts for the layout and README.md for
// how the copier, the API and the restore command use it.

import { randomBytes } from 'node:crypto';
import { mkdir, open, readFile, rename, rm, stat } from 'node:fs/promises';
import path from 'node:path';
import { checkBackupId, newBackupId } from './backup-id.ts';
import { fsyncDir, writeFileAtomic } from './durable.ts';
import { BackupNotFoundError, BackupStateError, BackupStoreError, ManifestError } from './errors.ts';
import { CHUNKS_DIR, DEFAULT_CHUNK_SIZE, manifestPieces, MANIFEST_FILE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, parseManifest, PROGRESS_FILE, type BackupRecord, type ParsedManifest } from './format.ts';
import { newBackupRecord, type NewBackup } from './meta.ts';
import { ImageReader, type ImageReaderOptions } from './reader.ts';
import { restoreImage, type RestoreOptions, type RestoreResult } from './restore.ts';
import { BackupWriter } from './writer.ts';

export { checkBackupId, isValidBackupId, newBackupId } from './backup-id.ts';
export * from './errors.ts';
export { DEFAULT_CHUNK_SIZE, type BackupRecord, type BackupState } from './format.ts';
export type { NewBackup } from './meta.ts';
export { ImageReader, type ImageReaderOptions } from './reader.ts';
export type { RestoreOptions, RestoreResult } from './restore.ts';
export { BackupWriter, type CompleteFields, type DroppedChunk, type EndOptions, type WriterProgress } from './writer.ts';

export interface BackupStoreOptions {
  /** The store directory; created when the first backup is. */
  path: string;
  /** Chunk size for new backups. Default 4 MiB. */
  chunkSize?: number;
}

/** Directory entries that belong to the store's own housekeeping, not to a backup. */
export const STORE_TEMP_PREFIX = '.';

export class BackupStore {
  readonly path: string;
  readonly chunkSize: number;
  /** Backups with a live writer in this process: at most one writer per backup. */
  private readonly writing = new Set<string>();

  constructor(opts: BackupStoreOptions | string) {
    const o = typeof opts === 'string' ? { path: opts } : opts;
    this.path = path.resolve(o.path);
    this.chunkSize = o.chunkSize ?? DEFAULT_CHUNK_SIZE;
    if (!Number.isSafeInteger(this.chunkSize) || this.chunkSize < MIN_CHUNK_SIZE || this.chunkSize > MAX_CHUNK_SIZE) {
      throw new RangeError(`chunkSize must be from ${MIN_CHUNK_SIZE} to ${MAX_CHUNK_SIZE} bytes, got ${this.chunkSize}`);
    }
  }

  /** The directory of backup `id` (validated: never outside the store). */
  backupDir(id: string): string {
    return path.join(this.path, checkBackupId(id));
  }

  /**
   * Creates a backup in state "running" and returns its writer. The backup directory appears
   * under its ID only once its manifest and empty progress log are durable, so a crash during
   * creation leaves at most a hidden temporary directory, never a half-made backup.
   */
  async createBackup(meta: NewBackup): Promise<BackupWriter> {
    const now = new Date();
    const explicitId = meta.id !== undefined;
    let id = explicitId ? checkBackupId(meta.id!) : newBackupId(meta.volume, meta.instructedAt !== undefined ? new Date(meta.instructedAt) : now);
    let record = newBackupRecord(id, meta, this.chunkSize, now);
    await mkdir(this.path, { recursive: true });
    for (let attempt = 0; ; attempt++) {
      if (this.writing.has(id)) throw new BackupStoreError(`backup ${id}: already exists`, id);
      this.writing.add(id);
      try {
        const dir = path.join(this.path, id);
        if (await this.create(record, dir)) {
          return await BackupWriter.attach(record, dir, () => this.writing.delete(id));
        }
      } catch (err) {
        this.writing.delete(id);
        throw err;
      }
      this.writing.delete(id);
      if (explicitId || attempt >= 8) throw new BackupStoreError(`backup ${id}: already exists`, id);
      id = newBackupId(meta.volume, new Date(record.instructedAt));
      record = { ...record, id };
    }
  }

  /**
   * Re-attaches to a backup left "running" (detour restarted mid-copy). The writer knows which
   * chunks are durable (missingChunks()) and re-hashes those from disk in the background.
   */
  async openBackup(id: string): Promise<BackupWriter> {
    checkBackupId(id);
    if (this.writing.has(id)) throw new BackupStateError(`backup ${id}: already open for writing`, id);
    this.writing.add(id);
    try {
      const { record } = await this.load(id);
      if (record.state !== 'running') throw new BackupStateError(`backup ${id}: is ${record.state}, only a running backup can be resumed`, id);
      return await BackupWriter.attach(record, this.backupDir(id), () => this.writing.delete(id));
    } catch (err) {
      this.writing.delete(id);
      throw err;
    }
  }

  /** The manifest record of a backup (any state), without the chunk list. */
  async readRecord(id: string): Promise<BackupRecord> {
    return (await this.load(id)).record;
  }

  /** Random, verified read access to a completed backup's image. */
  async openImage(id: string, opts?: ImageReaderOptions): Promise<ImageReader> {
    const { record, table } = await this.loadCompleted(id);
    return new ImageReader(record, { backupId: id, dir: this.backupDir(id), table }, opts);
  }

  /**
   * Writes a completed backup's exact raw image to `dest` (see restore.ts), verifying every chunk
   * and the whole-image SHA-256.
   */
  async restoreToFile(id: string, dest: string, opts?: RestoreOptions): Promise<RestoreResult> {
    const { record, table } = await this.loadCompleted(id);
    return restoreImage(record, { backupId: id, dir: this.backupDir(id), table }, dest, opts);
  }

  /**
   * Removes a backup entirely. Refused while a writer has it open. The directory is first renamed
   * to a hidden name, so a crash half way through never leaves a damaged backup under its ID.
   */
  async deleteBackup(id: string): Promise<void> {
    const dir = this.backupDir(id);
    if (this.writing.has(id)) throw new BackupStateError(`backup ${id}: is open for writing`, id);
    const doomed = path.join(this.path, `${STORE_TEMP_PREFIX}deleting-${id}-${randomBytes(4).toString('hex')}`);
    try {
      await rename(dir, doomed);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') throw new BackupNotFoundError(id, this.path);
      throw err;
    }
    await fsyncDir(this.path);
    await rm(doomed, { recursive: true, force: true });
  }

  // -------------------------------------------------------------------------------------------

  /** Builds the backup in a hidden directory and renames it into place. False if `dir` exists. */
  private async create(record: BackupRecord, dir: string): Promise<boolean> {
    if (await exists(dir)) return false;
    const tmp = path.join(this.path, `${STORE_TEMP_PREFIX}creating-${record.id}-${randomBytes(4).toString('hex')}`);
    try {
      await mkdir(path.join(tmp, CHUNKS_DIR), { recursive: true });
      await fsyncDir(path.join(tmp, CHUNKS_DIR));
      const log = await open(path.join(tmp, PROGRESS_FILE), 'w', 0o644);
      try {
        await log.sync();
      } finally {
        await log.close();
      }
      await writeFileAtomic(path.join(tmp, MANIFEST_FILE), manifestPieces(record));
      try {
        // rename(2) would replace an empty directory; the exists() check above covers a real one,
        // and ENOTEMPTY/EEXIST covers a race with another creator.
        await rename(tmp, dir);
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if (code === 'ENOTEMPTY' || code === 'EEXIST') return false;
        throw err;
      }
      await fsyncDir(this.path);
      return true;
    } finally {
      await rm(tmp, { recursive: true, force: true });
    }
  }

  private async load(id: string): Promise<ParsedManifest> {
    const dir = this.backupDir(id);
    const file = path.join(dir, MANIFEST_FILE);
    let text: string;
    try {
      text = await readFile(file, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw new ManifestError(id, file, `cannot read: ${(err as Error).message}`);
      if (!(await exists(dir))) throw new BackupNotFoundError(id, this.path);
      throw new ManifestError(id, file, 'missing');
    }
    try {
      return parseManifest(text, id);
    } catch (err) {
      throw new ManifestError(id, file, (err as Error).message);
    }
  }

  private async loadCompleted(id: string): Promise<{ record: BackupRecord; table: NonNullable<ParsedManifest['table']> }> {
    const { record, table } = await this.load(id);
    if (record.state !== 'completed' || !table) {
      const why = record.error ? `: ${record.error}` : '';
      throw new BackupStateError(`backup ${id}: is ${record.state}${why}; only a completed backup has an image`, id);
    }
    return { record, table };
  }
}

async function exists(p: string): Promise<boolean> {
  try {
    await stat(p);
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return false;
    throw err;
  }
}
