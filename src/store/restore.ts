// Writing a completed backup back out as one raw image file.
//
// To a regular file (new or existing), the image is built in a temporary file beside it and
// renamed over PATH only after every chunk and the whole-image SHA-256 have verified, so PATH never
// holds a half-written or corrupt image that looks like a good one. Zero chunks are skipped in the
// fresh file and the file is sized with ftruncate, so a sparse volume restores to a sparse file.
// To a block or character device the image is written in place, zero chunks included, since the
// device's old contents are not zero.

import { createHash, randomBytes } from 'node:crypto';
import { lstat, open, realpath, rename, rm, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { fsyncDir } from './durable.ts';
import { ImageHashMismatchError } from './errors.ts';
import { CHUNK_ZERO, hashZeros, zeroPieces, type BackupRecord } from './format.ts';
import { readVerifiedChunk, type ChunkSource } from './reader.ts';

export interface RestoreOptions {
  /** Called after each chunk with the image bytes done so far. */
  onProgress?: (bytesDone: number, bytesTotal: number) => void;
}

export interface RestoreResult {
  id: string;
  /** The file written (symlinks resolved). */
  path: string;
  bytes: number;
  sha256: string;
  /** Chunks left as holes (regular file) or written as zeros (device). */
  zeroChunks: number;
  /** True when PATH was a device written in place. */
  device: boolean;
}

async function writeAll(fh: FileHandle, data: Buffer, position: number): Promise<void> {
  let done = 0;
  while (done < data.length) {
    const { bytesWritten } = await fh.write(data, done, data.length - done, position + done);
    done += bytesWritten;
  }
}

/** Resolves PATH to what should be written: a device in place, or a regular file via rename. */
async function destination(dest: string): Promise<{ file: string; device: boolean }> {
  let st;
  try {
    st = await lstat(dest);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { file: path.resolve(dest), device: false };
    throw err;
  }
  if (st.isSymbolicLink()) {
    const target = await realpath(dest).catch(() => undefined);
    return target ? destination(target) : { file: path.resolve(dest), device: false };
  }
  if (st.isDirectory()) throw new Error(`${dest} is a directory`);
  if (st.isBlockDevice() || st.isCharacterDevice()) return { file: dest, device: true };
  if (!st.isFile()) throw new Error(`${dest} is neither a regular file nor a device`);
  return { file: path.resolve(dest), device: false };
}

export async function restoreImage(record: BackupRecord, src: ChunkSource, dest: string, opts: RestoreOptions = {}): Promise<RestoreResult> {
  const { table } = src;
  const target = await destination(dest);
  const writeTo = target.device ? target.file : path.join(path.dirname(target.file), `.${path.basename(target.file)}.restore-${randomBytes(4).toString('hex')}`);
  let fh: FileHandle;
  try {
    fh = await open(writeTo, target.device ? 'r+' : 'wx', 0o644);
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    throw new Error(`cannot write ${dest}: ${e.code === 'ENOENT' ? `directory ${path.dirname(target.file)} does not exist` : (e.code ?? e.message)}`);
  }
  let ok = false;
  try {
    const hash = createHash('sha256');
    const buf = Buffer.allocUnsafe(table.chunkSize);
    let zeroChunks = 0;
    for (let i = 0; i < table.count; i++) {
      const offset = table.offset(i);
      const length = table.length(i);
      if (table.state(i) === CHUNK_ZERO) {
        zeroChunks++;
        hashZeros(hash, length);
        if (target.device) {
          let pos = offset;
          for (const piece of zeroPieces(length)) {
            await writeAll(fh, piece, pos);
            pos += piece.length;
          }
        }
      } else {
        const data = await readVerifiedChunk(src, i, buf);
        hash.update(data);
        await writeAll(fh, data, offset);
      }
      opts.onProgress?.(offset + length, table.sizeBytes);
    }
    const actual = hash.digest('hex');
    if (actual !== record.sha256) throw new ImageHashMismatchError(record.id, record.sha256 ?? '(none)', actual);
    if (!target.device) await fh.truncate(table.sizeBytes);
    await fh.sync().catch((err: NodeJS.ErrnoException) => {
      // Character devices such as /dev/null cannot be synced, and need not be.
      if (!(target.device && err.code === 'EINVAL')) throw err;
    });
    ok = true;
    return { id: record.id, path: target.file, bytes: table.sizeBytes, sha256: actual, zeroChunks, device: target.device };
  } finally {
    await fh.close();
    if (!target.device) {
      if (ok) {
        await rename(writeTo, target.file);
        await fsyncDir(path.dirname(target.file));
      } else {
        await rm(writeTo, { force: true });
      }
    }
  }
}
