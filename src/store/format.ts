// The on-disk format of one backup (format id "detour-backup", version 1). README.md beside this
// file describes it for operators; this module is its single implementation.
//
//   <store>/<backupId>/
//     manifest.json   the management record; written atomically. While the backup runs it holds
//                     state "running" and no chunk list. Its atomic replacement by a manifest with
//                     state "completed", the chunk list and the image SHA-256 is the commit point
//                     of a backup.
//     progress.log    while running only: append-only, one line per chunk made durable
//                       "C <index> <sha256>"  chunk stored in chunks/<name>
//                       "Z <index>"           chunk is all zero, stored as nothing
//                       "X <index>"           the stored copy failed verification; chunk missing again
//                     Later lines win. A torn last line (no newline) is ignored: that chunk is
//                     simply copied again.
//     chunks/<index>  the raw bytes of chunk <index>, 8+ decimal digits, zero-padded so that a
//                     directory listing is in image order. Absent for all-zero chunks.
//
// Chunk i covers image bytes [i * chunkSize, min((i + 1) * chunkSize, sizeBytes)); only the last
// chunk may be short. In the manifest each chunk is its lowercase hex SHA-256, or the word "zero"
// for a sparse all-zero chunk (whose SHA-256 follows from its length). `sha256` is the SHA-256 of
// the whole raw image, zero chunks included, computed over the bytes in order.

import { createHash, type Hash } from 'node:crypto';
import { z } from 'zod';

export const FORMAT_ID = 'detour-backup';
export const FORMAT_VERSION = 1;

export const MANIFEST_FILE = 'manifest.json';
export const PROGRESS_FILE = 'progress.log';
/**
 * Present once the volume being backed up may have been written since its freeze (a drain of the
 * capture journal began before the image was whole): its missing chunks must never be copied.
 */
export const SOURCE_WRITTEN_FILE = 'source-written';
export const CHUNKS_DIR = 'chunks';

export const DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024;
export const MIN_CHUNK_SIZE = 4096;
/** The writer and the reader each hold one chunk-sized buffer; this keeps that bounded. */
export const MAX_CHUNK_SIZE = 64 * 1024 * 1024;

export type BackupState = 'running' | 'completed' | 'failed' | 'cancelled';
export const BACKUP_STATES: readonly BackupState[] = ['running', 'completed', 'failed', 'cancelled'];

/**
 * Everything the manifest says about a backup except the chunk list: the management record kept
 * outside the image's LBA space.
 */
export interface BackupRecord {
  format: typeof FORMAT_ID;
  formatVersion: number;
  id: string;
  volume: string;
  label: string | null;
  state: BackupState;
  /** Why the backup failed or was cancelled; null otherwise. */
  error: string | null;
  targetIqn: string;
  lun: number;
  sizeBytes: number;
  blockSize: number;
  chunkSize: number;
  chunkCount: number;
  /** The device identification VPD page (0x83) as lowercase hex, opaque to the store. */
  deviceIdentity: string | null;
  /** Initiator names that were using the volume when the backup was taken. */
  initiators: string[];
  /** ISO 8601 UTC times. */
  instructedAt: string;
  startedAt: string | null;
  finishedAt: string | null;
  /** Sequence number of the last write included in the image (the freeze point). */
  freezeSeq: number | null;
  /** SHA-256 of the whole raw image (lowercase hex); set when completed. */
  sha256: string | null;
}

export const ZERO_CHUNK_ENTRY = 'zero';

// ---------------------------------------------------------------------------------------------
// Chunk geometry and the per-chunk table

export const CHUNK_MISSING = 0;
export const CHUNK_STORED = 1;
export const CHUNK_ZERO = 2;
export type ChunkState = typeof CHUNK_MISSING | typeof CHUNK_STORED | typeof CHUNK_ZERO;

export function chunkCountFor(sizeBytes: number, chunkSize: number): number {
  return Math.ceil(sizeBytes / chunkSize);
}

export function chunkFileName(index: number): string {
  return String(index).padStart(8, '0');
}

/**
 * Per-chunk state and SHA-256 in two flat arrays (1 + 32 bytes per chunk: 8.3 MiB for a TiB at
 * 4 MiB chunks), rather than an object or a hex string per chunk.
 */
export class ChunkTable {
  readonly count: number;
  private readonly states: Uint8Array;
  private readonly hashes: Buffer;
  private durableCount = 0;
  private zeroCount = 0;

  constructor(
    readonly sizeBytes: number,
    readonly chunkSize: number,
  ) {
    this.count = chunkCountFor(sizeBytes, chunkSize);
    this.states = new Uint8Array(this.count);
    this.hashes = Buffer.alloc(this.count * 32);
  }

  offset(index: number): number {
    return index * this.chunkSize;
  }

  length(index: number): number {
    return index < this.count - 1 ? this.chunkSize : this.sizeBytes - (this.count - 1) * this.chunkSize;
  }

  state(index: number): ChunkState {
    return this.states[index] as ChunkState;
  }

  isDurable(index: number): boolean {
    return this.states[index] !== CHUNK_MISSING;
  }

  /** The recorded SHA-256 (for zero chunks, the SHA-256 of that many zero bytes). */
  hash(index: number): Buffer {
    if (this.states[index] === CHUNK_ZERO) return zeroChunkSha256(this.length(index));
    return this.hashes.subarray(index * 32, index * 32 + 32);
  }

  setStored(index: number, sha256: Buffer): void {
    this.account(index, CHUNK_STORED);
    sha256.copy(this.hashes, index * 32);
  }

  setZero(index: number): void {
    this.account(index, CHUNK_ZERO);
    this.hashes.fill(0, index * 32, index * 32 + 32);
  }

  setMissing(index: number): void {
    this.account(index, CHUNK_MISSING);
  }

  get durable(): number {
    return this.durableCount;
  }

  get zero(): number {
    return this.zeroCount;
  }

  /** Bytes of image covered by durable chunks. */
  get durableBytes(): number {
    let bytes = this.durableCount * this.chunkSize;
    const last = this.count - 1;
    if (this.states[last] !== CHUNK_MISSING) bytes -= this.chunkSize - this.length(last);
    return bytes;
  }

  *missing(): Generator<number> {
    for (let i = 0; i < this.count; i++) if (this.states[i] === CHUNK_MISSING) yield i;
  }

  private account(index: number, next: ChunkState): void {
    const prev = this.states[index]!;
    if (prev !== CHUNK_MISSING) this.durableCount--;
    if (prev === CHUNK_ZERO) this.zeroCount--;
    if (next !== CHUNK_MISSING) this.durableCount++;
    if (next === CHUNK_ZERO) this.zeroCount++;
    this.states[index] = next;
  }
}

// ---------------------------------------------------------------------------------------------
// Zero chunks

const ZEROS = Buffer.alloc(1 << 20);
const zeroHashes = new Map<number, Buffer>();

/** True when every byte is zero. memcmp against a shared zero page, so about memory speed. */
export function isAllZero(data: Uint8Array): boolean {
  const buf = Buffer.isBuffer(data) ? data : Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  for (let off = 0; off < buf.length; off += ZEROS.length) {
    const n = Math.min(ZEROS.length, buf.length - off);
    if (!buf.subarray(off, off + n).equals(ZEROS.subarray(0, n))) return false;
  }
  return true;
}

/** Feeds `length` zero bytes to a hash without allocating them. */
export function hashZeros(hash: Hash, length: number): void {
  for (let left = length; left > 0; left -= ZEROS.length) hash.update(ZEROS.subarray(0, Math.min(left, ZEROS.length)));
}

/** `length` zero bytes as slices of the shared zero page, for writing zeros without allocating. */
export function* zeroPieces(length: number): Generator<Buffer> {
  for (let left = length; left > 0; left -= ZEROS.length) yield ZEROS.subarray(0, Math.min(left, ZEROS.length));
}

export function zeroChunkSha256(length: number): Buffer {
  let h = zeroHashes.get(length);
  if (!h) {
    const hash = createHash('sha256');
    hashZeros(hash, length);
    h = hash.digest();
    zeroHashes.set(length, h);
  }
  return h;
}

// ---------------------------------------------------------------------------------------------
// Manifest (de)serialization

/**
 * The manifest text, in pieces: the record with two-space indentation, then (completed backups)
 * the chunk list one entry per line, so that `grep`, `diff` and `jq` work on it and a large list
 * never has to exist as one string.
 */
export function* manifestPieces(record: BackupRecord, table?: ChunkTable): Generator<string> {
  const head = JSON.stringify(orderedRecord(record), null, 2);
  if (!table) {
    yield head + '\n';
    return;
  }
  yield head.slice(0, head.lastIndexOf('}')).trimEnd();
  yield ',\n  "chunks": [';
  let batch: string[] = [];
  for (let i = 0; i < table.count; i++) {
    const entry = table.state(i) === CHUNK_ZERO ? ZERO_CHUNK_ENTRY : table.hash(i).toString('hex');
    batch.push(`${i === 0 ? '' : ','}\n    "${entry}"`);
    if (batch.length === 4096) {
      yield batch.join('');
      batch = [];
    }
  }
  yield batch.join('');
  yield table.count ? '\n  ]\n}\n' : ']\n}\n';
}

/** Field order in the file; new fields are appended by later versions. */
function orderedRecord(r: BackupRecord): BackupRecord {
  return {
    format: r.format,
    formatVersion: r.formatVersion,
    id: r.id,
    volume: r.volume,
    label: r.label,
    state: r.state,
    error: r.error,
    targetIqn: r.targetIqn,
    lun: r.lun,
    sizeBytes: r.sizeBytes,
    blockSize: r.blockSize,
    chunkSize: r.chunkSize,
    chunkCount: r.chunkCount,
    deviceIdentity: r.deviceIdentity,
    initiators: r.initiators,
    instructedAt: r.instructedAt,
    startedAt: r.startedAt,
    finishedAt: r.finishedAt,
    freezeSeq: r.freezeSeq,
    sha256: r.sha256,
  };
}

const isoTime = z.string().refine((v) => /^\d{4}-\d{2}-\d{2}T/.test(v) && !Number.isNaN(Date.parse(v)), 'is not an ISO 8601 time');
const hex64 = z.string().regex(/^[0-9a-f]{64}$/, 'is not a lowercase hex SHA-256');
const count = z.number().int().min(0).max(Number.MAX_SAFE_INTEGER);

const recordSchema = z.object({
  format: z.literal(FORMAT_ID),
  formatVersion: z.number().int().min(1),
  id: z.string().min(1),
  volume: z.string().min(1),
  label: z.string().nullable(),
  state: z.enum(BACKUP_STATES as [BackupState, ...BackupState[]]),
  error: z.string().nullable(),
  targetIqn: z.string(),
  lun: count,
  sizeBytes: count.min(1),
  blockSize: count.min(1),
  chunkSize: count.min(MIN_CHUNK_SIZE).max(MAX_CHUNK_SIZE),
  chunkCount: count,
  deviceIdentity: z
    .string()
    .regex(/^(?:[0-9a-f]{2})*$/, 'is not lowercase hex')
    .nullable(),
  initiators: z.array(z.string()),
  instructedAt: isoTime,
  startedAt: isoTime.nullable(),
  finishedAt: isoTime.nullable(),
  freezeSeq: count.nullable(),
  sha256: hex64.nullable(),
  // Checked by hand below: a schema walk over a quarter of a million strings is needlessly slow.
  chunks: z.unknown().optional(),
});

export interface ParsedManifest {
  record: BackupRecord;
  /** Present exactly when the backup is completed. */
  table: ChunkTable | undefined;
}

/**
 * Parses and checks a manifest. Throws an Error whose message is the problem (the caller adds the
 * backup and file names). `expectedId` is the directory name: a manifest that claims another ID was
 * copied or renamed by hand and is not trusted.
 */
export function parseManifest(text: string, expectedId?: string): ParsedManifest {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (err) {
    throw new Error(`not valid JSON (${(err as Error).message})`);
  }
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) throw new Error('not a JSON object');
  const obj = raw as Record<string, unknown>;
  if (obj.format !== FORMAT_ID) throw new Error(`format is ${JSON.stringify(obj.format)}, expected "${FORMAT_ID}"`);
  if (typeof obj.formatVersion === 'number' && obj.formatVersion > FORMAT_VERSION) {
    throw new Error(`format version ${obj.formatVersion} is newer than this detour understands (${FORMAT_VERSION})`);
  }
  const r = recordSchema.safeParse(obj);
  if (!r.success) {
    const issue = r.error.issues[0]!;
    throw new Error(`${issue.path.map(String).join('.') || '(top level)'}: ${issue.message}`);
  }
  const { chunks, ...rest } = r.data;
  const record = rest as BackupRecord;
  if (expectedId !== undefined && record.id !== expectedId) throw new Error(`records the ID '${record.id}', but is stored under '${expectedId}'`);
  if (record.sizeBytes % record.blockSize !== 0) throw new Error(`sizeBytes ${record.sizeBytes} is not a multiple of blockSize ${record.blockSize}`);
  if (record.chunkCount !== chunkCountFor(record.sizeBytes, record.chunkSize)) {
    throw new Error(`chunkCount ${record.chunkCount} does not match sizeBytes ${record.sizeBytes} / chunkSize ${record.chunkSize}`);
  }
  if (record.state !== 'completed') return { record, table: undefined };

  if (record.sha256 === null) throw new Error('a completed backup has no sha256');
  if (!Array.isArray(chunks)) throw new Error('a completed backup has no chunk list');
  if (chunks.length !== record.chunkCount) throw new Error(`lists ${chunks.length} chunks, expected ${record.chunkCount}`);
  const table = new ChunkTable(record.sizeBytes, record.chunkSize);
  for (let i = 0; i < chunks.length; i++) {
    const entry: unknown = chunks[i];
    if (entry === ZERO_CHUNK_ENTRY) table.setZero(i);
    else if (typeof entry === 'string' && entry.length === 64 && /^[0-9a-f]{64}$/.test(entry)) table.setStored(i, Buffer.from(entry, 'hex'));
    else throw new Error(`chunks[${i}]: ${JSON.stringify(entry)} is neither a lowercase hex SHA-256 nor "${ZERO_CHUNK_ENTRY}"`);
  }
  return { record, table };
}

// ---------------------------------------------------------------------------------------------
// Progress log

export function progressLineStored(index: number, sha256: Buffer): string {
  return `C ${index} ${sha256.toString('hex')}\n`;
}

export function progressLineZero(index: number): string {
  return `Z ${index}\n`;
}

export function progressLineDropped(index: number): string {
  return `X ${index}\n`;
}

const PROGRESS_LINE = /^(?:C (\d+) ([0-9a-f]{64})|Z (\d+)|X (\d+))$/;

/**
 * Applies a progress log to `table`. Only newline-terminated lines count: a crash during an
 * append can leave a partial last line, and a chunk whose record was torn is simply copied again.
 * Lines that do not parse are counted in `ignored` and otherwise skipped for the same reason.
 */
export function applyProgressLog(text: string, table: ChunkTable): { applied: number; ignored: number } {
  let applied = 0;
  let ignored = 0;
  let start = 0;
  for (let nl = text.indexOf('\n', start); nl !== -1; start = nl + 1, nl = text.indexOf('\n', start)) {
    const m = PROGRESS_LINE.exec(text.slice(start, nl));
    const index = m ? Number(m[1] ?? m[3] ?? m[4]) : -1;
    if (!m || !Number.isSafeInteger(index) || index >= table.count) {
      ignored++;
      continue;
    }
    if (m[2] !== undefined) table.setStored(index, Buffer.from(m[2], 'hex'));
    else if (m[3] !== undefined) table.setZero(index);
    else table.setMissing(index);
    applied++;
  }
  if (start < text.length) ignored++;
  return { applied, ignored };
}
