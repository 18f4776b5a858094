// Checking what a caller says about a new backup, and turning it into the manifest record.

import { isValidVolumeName } from './backup-id.ts';
import { DEFAULT_CHUNK_SIZE, FORMAT_ID, FORMAT_VERSION, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, chunkCountFor, type BackupRecord } from './format.ts';

/** What the copier (or the API) knows when a backup is created. */
export interface NewBackup {
  /** Default: newBackupId(volume, instructedAt). */
  id?: string;
  volume: string;
  label?: string | null;
  /** The main target's IQN and the LUN being backed up. */
  targetIqn: string;
  lun: number;
  /** Image size in bytes: a whole number of blocks. */
  sizeBytes: number;
  /** Logical block size of the LUN: a power of two, 512..65536. */
  blockSize: number;
  /** Default: the store's chunk size (4 MiB unless configured). A multiple of blockSize. */
  chunkSize?: number;
  /** The LUN's device identification VPD page (0x83): raw bytes, or hex. Opaque to the store. */
  deviceIdentity?: Uint8Array | string | null;
  initiators?: string[];
  /** When the backup was asked for. Default: now. */
  instructedAt?: Date | string;
  /** When the copy started (the freeze). May also be given to complete(). */
  startedAt?: Date | string | null;
  /** Sequence number of the last write before the freeze. May also be given to complete(). */
  freezeSeq?: number | null;
}

export function toIsoTime(v: Date | string | number, what: string): string {
  const d = v instanceof Date ? v : new Date(v);
  if (Number.isNaN(d.getTime())) throw new RangeError(`${what}: '${String(v)}' is not a time`);
  return d.toISOString();
}

export function normalizeDeviceIdentity(v: Uint8Array | string | null): string | null {
  if (v === null) return null;
  if (typeof v !== 'string') return Buffer.from(v.buffer, v.byteOffset, v.byteLength).toString('hex');
  const hex = v.toLowerCase();
  if (!/^(?:[0-9a-f]{2})*$/.test(hex)) throw new RangeError('deviceIdentity: not a hex string of whole bytes');
  return hex;
}

function positiveInt(v: unknown, what: string): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v <= 0) throw new RangeError(`${what} must be a positive integer, got ${String(v)}`);
  return v;
}

/** The "running" manifest record for a new backup; throws RangeError naming a bad field. */
export function newBackupRecord(id: string, meta: NewBackup, defaultChunkSize = DEFAULT_CHUNK_SIZE, now = new Date()): BackupRecord {
  if (!isValidVolumeName(meta.volume)) throw new RangeError(`volume: '${String(meta.volume)}' is not a volume name (1-63 letters, digits, '.', '_', '-')`);
  if (typeof meta.targetIqn !== 'string' || meta.targetIqn.length === 0) throw new RangeError('targetIqn is required');
  if (typeof meta.lun !== 'number' || !Number.isSafeInteger(meta.lun) || meta.lun < 0) throw new RangeError(`lun must be a non-negative integer, got ${String(meta.lun)}`);
  const blockSize = positiveInt(meta.blockSize, 'blockSize');
  if (blockSize < 512 || blockSize > 65536 || (blockSize & (blockSize - 1)) !== 0) throw new RangeError(`blockSize must be a power of two from 512 to 65536, got ${blockSize}`);
  const sizeBytes = positiveInt(meta.sizeBytes, 'sizeBytes');
  if (sizeBytes % blockSize !== 0) throw new RangeError(`sizeBytes ${sizeBytes} is not a multiple of the ${blockSize}-byte block`);
  const chunkSize = positiveInt(meta.chunkSize ?? defaultChunkSize, 'chunkSize');
  if (chunkSize < MIN_CHUNK_SIZE || chunkSize > MAX_CHUNK_SIZE || chunkSize % blockSize !== 0) {
    throw new RangeError(`chunkSize must be a multiple of the ${blockSize}-byte block from ${MIN_CHUNK_SIZE} to ${MAX_CHUNK_SIZE}, got ${chunkSize}`);
  }
  if (meta.freezeSeq != null && (!Number.isSafeInteger(meta.freezeSeq) || meta.freezeSeq < 0)) {
    throw new RangeError(`freezeSeq must be a non-negative integer, got ${meta.freezeSeq}`);
  }
  if (meta.initiators !== undefined && (!Array.isArray(meta.initiators) || meta.initiators.some((i) => typeof i !== 'string'))) {
    throw new RangeError('initiators must be a list of names');
  }
  return {
    format: FORMAT_ID,
    formatVersion: FORMAT_VERSION,
    id,
    volume: meta.volume,
    label: meta.label ?? null,
    state: 'running',
    error: null,
    targetIqn: meta.targetIqn,
    lun: meta.lun,
    sizeBytes,
    blockSize,
    chunkSize,
    chunkCount: chunkCountFor(sizeBytes, chunkSize),
    deviceIdentity: normalizeDeviceIdentity(meta.deviceIdentity ?? null),
    initiators: [...(meta.initiators ?? [])],
    instructedAt: toIsoTime(meta.instructedAt ?? now, 'instructedAt'),
    startedAt: meta.startedAt != null ? toIsoTime(meta.startedAt, 'startedAt') : null,
    finishedAt: null,
    freezeSeq: meta.freezeSeq ?? null,
    sha256: null,
  };
}
