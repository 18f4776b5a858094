// The catalog of backups is the store itself: it is (re)built by scanning the backup directories
// and reading their manifests, so there is no second copy of the truth to drift or to lose. A
// manifest that cannot be read or trusted is skipped and reported in `problems`; one bad backup
// never hides the others or breaks the listing.
//
// Parsing a completed manifest costs time proportional to its chunk list (about 70 bytes per
// chunk), so parsed entries are cached per directory and re-read only when the manifest or the
// progress log changes (size, mtime or inode).

import type { Stats } from 'node:fs';
import { readdir, readFile, stat } from 'node:fs/promises';
import path from 'node:path';
import { checkBackupId, isValidBackupId } from './backup-id.ts';
import type { BackupStore } from './backup-store.ts';
import { ManifestError } from './errors.ts';
import { applyProgressLog, ChunkTable, MANIFEST_FILE, parseManifest, PROGRESS_FILE, type BackupRecord } from './format.ts';

/** A backup as the catalog lists it: the manifest record plus how much of the image is stored. */
export interface CatalogEntry extends BackupRecord {
  /** Image bytes durable in the store: sizeBytes once completed; progress so far while running. */
  bytesDurable: number;
  chunksDurable: number;
  /** Chunks stored sparsely as all zero. */
  chunksZero: number;
}

export interface CatalogProblem {
  /** The directory name under the store (normally the backup ID). */
  id: string;
  path: string;
  problem: string;
}

export interface CatalogListing {
  /** Sorted by instructedAt, then ID. */
  backups: CatalogEntry[];
  problems: CatalogProblem[];
}

const READ_CONCURRENCY = 16;

interface Cached {
  stamp: string;
  entry: CatalogEntry;
}

export class Catalog {
  readonly path: string;
  private readonly cache = new Map<string, Cached>();

  constructor(store: BackupStore | string) {
    this.path = path.resolve(typeof store === 'string' ? store : store.path);
  }

  /** Every backup in the store, and every directory that looked like one but could not be read. */
  async list(): Promise<CatalogListing> {
    let names: string[];
    try {
      names = (await readdir(this.path, { withFileTypes: true })).filter((d) => d.isDirectory() && !d.name.startsWith('.')).map((d) => d.name);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { backups: [], problems: [] };
      throw err;
    }
    const backups: CatalogEntry[] = [];
    const problems: CatalogProblem[] = [];
    const seen = new Set<string>();
    let next = 0;
    const worker = async () => {
      while (next < names.length) {
        const name = names[next++]!;
        const dir = path.join(this.path, name);
        if (!isValidBackupId(name)) {
          problems.push({ id: name, path: dir, problem: 'directory name is not a valid backup ID' });
          continue;
        }
        seen.add(name);
        try {
          const entry = await this.read(name);
          if (entry) backups.push(entry);
        } catch (err) {
          this.cache.delete(name);
          const problem = err instanceof ManifestError ? err.problem : (err as Error).message;
          problems.push({ id: name, path: err instanceof ManifestError ? err.file : dir, problem });
        }
      }
    };
    await Promise.all(Array.from({ length: Math.min(READ_CONCURRENCY, names.length) }, worker));
    for (const id of this.cache.keys()) if (!seen.has(id)) this.cache.delete(id);
    backups.sort(byInstructedThenId);
    problems.sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
    return { backups, problems };
  }

  /**
   * One backup, or undefined when there is no such backup. Throws InvalidBackupIdError for an
   * unsafe ID and ManifestError when the backup exists but its manifest is corrupt.
   */
  async get(id: string): Promise<CatalogEntry | undefined> {
    checkBackupId(id);
    try {
      return await this.read(id);
    } catch (err) {
      this.cache.delete(id);
      throw err;
    }
  }

  /** The completed backup of `volume` with the latest freeze point (startedAt, else instructedAt). */
  async latestCompleted(volume: string): Promise<CatalogEntry | undefined> {
    let best: CatalogEntry | undefined;
    for (const b of (await this.list()).backups) {
      if (b.volume !== volume || b.state !== 'completed') continue;
      if (!best || compareFreeze(b, best) > 0) best = b;
    }
    return best;
  }

  /** Reads one backup directory; undefined if it does not exist. */
  private async read(id: string): Promise<CatalogEntry | undefined> {
    const dir = path.join(this.path, id);
    const manifestFile = path.join(dir, MANIFEST_FILE);
    const progressFile = path.join(dir, PROGRESS_FILE);
    const [mst, pst] = await Promise.all([statOrUndefined(manifestFile), statOrUndefined(progressFile)]);
    if (!mst) {
      if (!(await statOrUndefined(dir))) return undefined;
      throw new ManifestError(id, manifestFile, 'missing');
    }
    const stamp = `${fileStamp(mst)}|${pst ? fileStamp(pst) : '-'}`;
    const cached = this.cache.get(id);
    if (cached?.stamp === stamp) return copyEntry(cached.entry);

    let text: string;
    try {
      text = await readFile(manifestFile, 'utf8');
    } catch (err) {
      throw new ManifestError(id, manifestFile, `cannot read: ${(err as Error).message}`);
    }
    let parsed;
    try {
      parsed = parseManifest(text, id);
    } catch (err) {
      throw new ManifestError(id, manifestFile, (err as Error).message);
    }
    const { record } = parsed;
    let table = parsed.table;
    if (!table && pst) {
      // Running (or failed with its data kept): what the progress log says is durable.
      table = new ChunkTable(record.sizeBytes, record.chunkSize);
      const log = await readFile(progressFile, 'utf8').catch(() => '');
      applyProgressLog(log, table);
    }
    const entry: CatalogEntry = {
      ...record,
      bytesDurable: table ? table.durableBytes : 0,
      chunksDurable: table ? table.durable : 0,
      chunksZero: table ? table.zero : 0,
    };
    this.cache.set(id, { stamp, entry });
    return copyEntry(entry);
  }
}

function copyEntry(e: CatalogEntry): CatalogEntry {
  return { ...e, initiators: [...e.initiators] };
}

function fileStamp(st: Stats): string {
  return `${st.ino}:${st.size}:${st.mtimeMs}`;
}

async function statOrUndefined(p: string): Promise<Stats | undefined> {
  try {
    return await stat(p);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT' || (err as NodeJS.ErrnoException).code === 'ENOTDIR') return undefined;
    throw err;
  }
}

function byInstructedThenId(a: BackupRecord, b: BackupRecord): number {
  const t = Date.parse(a.instructedAt) - Date.parse(b.instructedAt);
  if (t !== 0) return t;
  return a.id < b.id ? -1 : a.id > b.id ? 1 : 0;
}

function compareFreeze(a: BackupRecord, b: BackupRecord): number {
  const t = Date.parse(a.startedAt ?? a.instructedAt) - Date.parse(b.startedAt ?? b.instructedAt);
  if (t !== 0) return t;
  return a.id < b.id ? -1 : a.id > b.id ? 1 : 0;
}
