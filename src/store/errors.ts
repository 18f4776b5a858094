// Errors of the backup store. Each names the backup (and the chunk, where there is one) so that an
// operator reading a log line or an API answer knows what to look at without a stack trace.

/** Base class: anything the store refuses or finds wrong. */
export class BackupStoreError extends Error {
  constructor(
    message: string,
    readonly backupId?: string,
  ) {
    super(message);
    this.name = new.target.name;
  }
}

/** A backup ID that is not a safe directory name (path traversal, empty, too long...). */
export class InvalidBackupIdError extends BackupStoreError {
  constructor(readonly input: string) {
    super(`'${printable(input)}' is not a valid backup ID (letters, digits, '.', '_', '-'; no '/' or '..'; at most 128 characters)`);
  }
}

export class BackupNotFoundError extends BackupStoreError {
  constructor(id: string, storePath: string) {
    super(`backup ${id}: not found in the store ${storePath}`, id);
  }
}

/** The backup exists but is in the wrong state for the request (restore of a running backup...). */
export class BackupStateError extends BackupStoreError {}

/** complete() was asked for while some chunks are not durable yet. The writer stays usable. */
export class BackupIncompleteError extends BackupStoreError {
  constructor(
    id: string,
    readonly missing: number[],
    readonly missingCount: number,
    detail = '',
  ) {
    const shown = missing.slice(0, 8).join(', ');
    super(`backup ${id}: ${missingCount} chunk(s) not stored yet (first: ${shown}${missingCount > 8 ? ', ...' : ''})${detail}`, id);
  }
}

/** A manifest that cannot be read, parsed or trusted. */
export class ManifestError extends BackupStoreError {
  constructor(
    id: string,
    readonly file: string,
    readonly problem: string,
  ) {
    super(`backup ${id}: manifest ${file}: ${problem}`, id);
  }
}

/**
 * A chunk whose stored bytes do not match the SHA-256 recorded for it, or whose file is missing or
 * of the wrong length. Never returned as data.
 */
export class ChunkCorruptError extends BackupStoreError {
  constructor(
    id: string,
    readonly index: number,
    readonly file: string,
    readonly offset: number,
    readonly length: number,
    readonly problem: string,
  ) {
    super(`backup ${id}: chunk ${index} (image bytes ${offset}..${offset + length - 1}, file ${file}) is corrupt: ${problem}`, id);
  }
}

/** The chunks are all intact but the whole image does not hash to the recorded SHA-256. */
export class ImageHashMismatchError extends BackupStoreError {
  constructor(id: string, readonly expected: string, readonly actual: string) {
    super(`backup ${id}: the image's SHA-256 is ${actual}, the manifest records ${expected}`, id);
  }
}

function printable(s: string): string {
  const cut = s.length > 80 ? `${s.slice(0, 80)}...` : s;
  return cut.replace(/[^\x20-\x7e]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`);
}
