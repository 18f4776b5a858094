// Backup IDs are directory names in the store, so every ID that comes from outside (CLI, HTTP API,
// a directory listing) is checked before it is joined to a path.
//
// Generated IDs read `<volume>-<UTC yyyymmddThhmmssZ>-<4 hex>`, e.g. `vol1-20261105T143012Z-a3f9`:
// within a volume they sort by creation time, and the random tail keeps two backups started in
// the same second apart.

import { randomBytes } from 'node:crypto';
import { InvalidBackupIdError } from './errors.ts';

const BACKUP_ID = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;

/** Same rule as volume names in the config file. */
const VOLUME_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;

const GENERATED_ID = /^(.+)-(\d{8}T\d{6}Z)-([0-9a-f]{4})$/;

/**
 * True for a name that is safe as a single path component: starts with a letter or digit, then
 * letters, digits, '.', '_' or '-', at most 128 characters, and no '..' anywhere (so neither
 * traversal nor names a shell or a dot-file listing would treat specially).
 */
export function isValidBackupId(id: unknown): id is string {
  return typeof id === 'string' && BACKUP_ID.test(id) && !id.includes('..');
}

/** Returns the ID unchanged, or throws InvalidBackupIdError. */
export function checkBackupId(id: string): string {
  if (!isValidBackupId(id)) throw new InvalidBackupIdError(String(id));
  return id;
}

export function isValidVolumeName(name: unknown): name is string {
  return typeof name === 'string' && VOLUME_NAME.test(name);
}

function utcStamp(at: Date): string {
  const iso = at.toISOString(); // 2026-11-05T14:30:12.345Z
  return `${iso.slice(0, 4)}${iso.slice(5, 7)}${iso.slice(8, 10)}T${iso.slice(11, 13)}${iso.slice(14, 16)}${iso.slice(17, 19)}Z`;
}

/** A fresh ID for a backup of `volume` instructed at `at`. */
export function newBackupId(volume: string, at: Date = new Date()): string {
  if (!isValidVolumeName(volume)) throw new RangeError(`'${volume}' is not a volume name (1-63 letters, digits, '.', '_', '-')`);
  if (Number.isNaN(at.getTime())) throw new RangeError('invalid date for a backup ID');
  // A volume may be called 'a..b'; IDs never contain '..', so such a run is folded to one dot (the
  // manifest keeps the real volume name).
  return `${volume.replace(/\.{2,}/g, '.')}-${utcStamp(at)}-${randomBytes(2).toString('hex')}`;
}

/**
 * The parts of an ID made by newBackupId, or undefined for any other (still valid) ID. The volume
 * part is informative only; the manifest's `volume` field is authoritative.
 */
export function parseGeneratedBackupId(id: string): { volume: string; stamp: string; random: string } | undefined {
  const m = GENERATED_ID.exec(id);
  if (!m || !isValidBackupId(id)) return undefined;
  return { volume: m[1]!, stamp: m[2]!, random: m[3]! };
}
