// Journal space written in advance (the volume's journalSpare).
//
// A capture write is acknowledged only once its journal record is durable. On ext4 (and most
// file systems) a durable write that appends to a file, or fills blocks it has only reserved,
// also waits for a metadata commit (the new size, the new extents); a durable write into blocks
// the file already holds is only the data. Measured on the development host with 1-2 MiB
// O_DIRECT|O_DSYNC writes of random data: 440-490 MB/s appending to a new file, 790-970 MB/s
// overwriting a written one; a preallocated (fallocate) file did no better than a new one.
// Journal commit groups are such writes, so between backups detour writes segment-sized files
// here, and a backup's journal renames one into place for each new segment instead of creating
// an empty file. It is what databases do with their write-ahead log files.
//
// The files hold random bytes, not zeros: a file system or disk that compresses or discards
// zero blocks would not keep the space. Random bytes are not records of any journal (each
// record carries its journal's random id and a CRC), so a journal's recovery takes the first of
// them for the journal's end, as it takes the end of a file. They are written only while the
// volume has no backup running, and a refill under way stops before a backup starts: it would
// compete with the journal for the disk.
import { randomFillSync } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import { mkdir, open, readdir, rename, rm, stat, statfs, unlink, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import type { Logger } from 'pino';
import type { JournalSpareSource } from './journal.ts';
import { allocChunkBuffers, DIRECT_IO_ALIGN, O_DIRECT } from '../store/chunk-memory.ts';

export function spareDirFor(dataDir: string, volume: string): string {
  return path.join(dataDir, 'volumes', volume, 'journal-spare');
}

/**
 * Removes the spares of volumes that no longer keep any: a volume taken out of the configuration,
 * or one whose journalSpare was removed. Their space would otherwise stay taken with nothing to
 * show for it (no metric, no refill). Spares are filler, never records, so nothing is lost.
 * Resolves to the volumes whose spares went, with the bytes freed.
 */
export async function removeUnwantedSpares(dataDir: string, keep: ReadonlySet<string>, logger: Logger): Promise<Map<string, number>> {
  const removed = new Map<string, number>();
  let volumes: string[];
  try {
    volumes = await readdir(path.join(dataDir, 'volumes'));
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return removed;
    throw err;
  }
  for (const volume of volumes) {
    if (keep.has(volume)) continue;
    const dir = spareDirFor(dataDir, volume);
    let names: string[];
    try {
      names = await readdir(dir);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT' || (err as NodeJS.ErrnoException).code === 'ENOTDIR') continue;
      throw err;
    }
    let bytes = 0;
    for (const name of names) bytes += (await stat(path.join(dir, name)).catch(() => undefined))?.size ?? 0;
    await rm(dir, { recursive: true, force: true });
    removed.set(volume, bytes);
    logger.info({ volume, dir, freedBytes: bytes }, 'journal spares removed: the volume no longer has a journalSpare');
  }
  return removed;
}

const SPARE_RE = /^spare-(\d+)$/;
const WRITE_BYTES = 8 << 20;
/**
 * Free space a refill leaves on dataDir's file system: the other files there (the backup record,
 * its reserve, the journal beyond its spares) must still fit.
 */
export const SPARE_FREE_MARGIN = 1 << 30;

let fillBuffer: Buffer | undefined;

export interface JournalSparesOptions {
  dir: string;
  /** Bytes of spare files to keep ready. */
  targetBytes: number;
  /** Size of each file: the segment size of the volume's journals. */
  fileBytes: number;
  logger: Logger;
}

export class JournalSpares implements JournalSpareSource {
  readonly dir: string;
  readonly targetBytes: number;
  readonly fileBytes: number;
  private readonly log: Logger;
  /** Ready spares, oldest first; undefined until the directory was read. */
  private ready: Array<{ name: string; bytes: number }> | undefined;
  private nextNumber = 1;
  private filling: Promise<void> | undefined;
  private stopFill = false;

  constructor(opts: JournalSparesOptions) {
    this.dir = opts.dir;
    this.targetBytes = opts.targetBytes;
    // O_DIRECT writes whole aligned blocks; a larger spare is cut to what the segment used.
    this.fileBytes = Math.ceil(opts.fileBytes / DIRECT_IO_ALIGN) * DIRECT_IO_ALIGN;
    this.log = opts.logger;
  }

  /** Bytes of spare files ready for a journal. */
  get readyBytes(): number {
    return (this.ready ?? []).reduce((sum, f) => sum + f.bytes, 0);
  }

  async takeInto(file: string): Promise<number | undefined> {
    await this.load();
    while (this.ready!.length > 0) {
      const f = this.ready!.shift()!;
      try {
        await rename(path.join(this.dir, f.name), file);
        return f.bytes;
      } catch (err) {
        // Gone (removed by hand): the next one. Anything else (another file system): none, and
        // the file stays counted as ready.
        if ((err as NodeJS.ErrnoException).code !== 'ENOENT') {
          this.ready!.unshift(f);
          throw err;
        }
      }
    }
    return undefined;
  }

  /**
   * Writes spare files until targetBytes are ready, in the background; resolves when done, when
   * stopped by pause(), or when the disk refused (logged, not thrown: spares only make the
   * journal faster). A call while a refill runs returns that refill.
   */
  refill(): Promise<void> {
    if (this.filling) return this.filling;
    this.stopFill = false;
    const run = this.fillLoop().catch((err: Error) => {
      this.log.warn({ dir: this.dir, readyBytes: this.readyBytes, err: err.message }, 'could not write journal spares: backups append to new journal files');
    });
    this.filling = run.finally(() => {
      this.filling = undefined;
    });
    return this.filling;
  }

  /** Stops a refill under way (its unfinished file is removed) and waits for it. */
  async pause(): Promise<void> {
    this.stopFill = true;
    await this.filling;
  }

  /** Reads the directory once: finished spares are kept, the leftover of an interrupted refill goes. */
  private async load(): Promise<void> {
    if (this.ready) return;
    let names: string[];
    try {
      names = await readdir(this.dir);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
      names = [];
    }
    const ready: Array<{ name: string; bytes: number; n: number }> = [];
    for (const name of names) {
      if (name.endsWith('.tmp')) {
        await unlink(path.join(this.dir, name)).catch(() => undefined);
        continue;
      }
      const m = SPARE_RE.exec(name);
      if (!m) continue;
      const n = Number(m[1]);
      this.nextNumber = Math.max(this.nextNumber, n + 1);
      ready.push({ name, bytes: (await stat(path.join(this.dir, name))).size, n });
    }
    ready.sort((a, b) => a.n - b.n);
    this.ready ??= ready.map(({ name, bytes }) => ({ name, bytes }));
  }

  private async fillLoop(): Promise<void> {
    await this.load();
    await mkdir(this.dir, { recursive: true });
    // A smaller journalSpare than before: the newest files beyond it go.
    while (this.ready!.length > 0 && this.readyBytes - this.ready!.at(-1)!.bytes >= this.targetBytes) {
      await unlink(path.join(this.dir, this.ready!.pop()!.name)).catch(() => undefined);
    }
    const started = performance.now();
    let written = 0;
    while (!this.stopFill && this.readyBytes < this.targetBytes) {
      const fs = await statfs(this.dir);
      const free = fs.bavail * fs.bsize;
      if (free - this.fileBytes < SPARE_FREE_MARGIN) {
        this.log.warn({ dir: this.dir, readyBytes: this.readyBytes, targetBytes: this.targetBytes, freeBytes: free }, `journal spares stop short of journalSpare: dataDir keeps ${SPARE_FREE_MARGIN >> 20} MiB free`);
        break;
      }
      const name = `spare-${this.nextNumber++}`;
      if (!(await this.writeOne(name))) break;
      this.ready!.push({ name, bytes: this.fileBytes });
      written += this.fileBytes;
    }
    if (written > 0 || this.stopFill) {
      this.log.info(
        { dir: this.dir, writtenBytes: written, readyBytes: this.readyBytes, seconds: Math.round((performance.now() - started) / 100) / 10, stopped: this.stopFill },
        'journal spares written',
      );
    }
  }

  /** One spare file, under a temporary name until it is whole; false when stopped before. */
  private async writeOne(name: string): Promise<boolean> {
    const tmp = path.join(this.dir, `${name}.tmp`);
    const buf = (fillBuffer ??= allocChunkBuffers(1, WRITE_BYTES)[0]!);
    // Fresh bytes for each file, so that a disk that deduplicates keeps every file's blocks.
    randomFillSync(buf);
    let fh: FileHandle | undefined;
    let done = false;
    try {
      fh = await openForFill(tmp, buf);
      for (let pos = 0; pos < this.fileBytes; pos += WRITE_BYTES) {
        if (this.stopFill) return false;
        const n = Math.min(WRITE_BYTES, this.fileBytes - pos);
        let off = 0;
        while (off < n) off += (await fh.write(buf, off, n - off, pos + off)).bytesWritten;
      }
      await fh.datasync();
      await fh.close();
      fh = undefined;
      await rename(tmp, path.join(this.dir, name));
      done = true;
      return true;
    } finally {
      await fh?.close().catch(() => undefined);
      if (!done) await unlink(tmp).catch(() => undefined);
    }
  }
}

/** O_DIRECT when the file system takes it: gigabytes of filler need not pass through the page cache. */
async function openForFill(file: string, alignedBytes: Buffer): Promise<FileHandle> {
  const flags = fsConstants.O_WRONLY | fsConstants.O_CREAT | fsConstants.O_TRUNC;
  if (O_DIRECT !== undefined) {
    try {
      const fh = await open(file, flags | O_DIRECT, 0o644);
      // Some file systems accept the flag and refuse the first write instead; find out now.
      try {
        await fh.write(alignedBytes, 0, DIRECT_IO_ALIGN, 0);
        return fh;
      } catch {
        await fh.close();
      }
    } catch {
      // Refused at open: buffered below.
    }
  }
  return open(file, flags, 0o644);
}
