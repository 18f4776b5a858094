// Shared pieces of the backup store tests: a throw-away store, images with known content, and a
// copier stand-in that writes chunks in a given order at a queue depth.

import { createHash, randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { BackupStore, type BackupWriter, type NewBackup } from '../../src/store/backup-store.ts';

export interface TempStore {
  root: string;
  store: BackupStore;
  cleanup(): Promise<void>;
}

export async function tempStore(chunkSize?: number): Promise<TempStore> {
  const root = await mkdtemp(path.join(os.tmpdir(), 'detour-store-'));
  const store = new BackupStore({ path: path.join(root, 'backups'), chunkSize });
  return { root, store, cleanup: () => rm(root, { recursive: true, force: true }) };
}

export function backupMeta(sizeBytes: number, extra: Partial<NewBackup> = {}): NewBackup {
  return {
    volume: 'vol1',
    label: 'test',
    targetIqn: 'iqn.2026-11.test:main',
    lun: 0,
    sizeBytes,
    blockSize: 512,
    deviceIdentity: Buffer.from('0103000800112233445566778899', 'hex'),
    instructedAt: '2026-11-05T14:30:00.000Z',
    startedAt: '2026-11-05T14:30:01.000Z',
    freezeSeq: 7,
    ...extra,
  };
}

/** Random bytes, with the chunks listed in `zeroChunks` all zero. */
export function makeImage(sizeBytes: number, chunkSize: number, zeroChunks: Iterable<number> = []): Buffer {
  const image = randomBytes(sizeBytes);
  for (const i of zeroChunks) image.fill(0, i * chunkSize, Math.min((i + 1) * chunkSize, sizeBytes));
  return image;
}

export function sha256(data: Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

/** A deterministic permutation of 0..n-1 (seeded, so a failure can be replayed). */
export function shuffled(n: number, seed = 1): number[] {
  const order = Array.from({ length: n }, (_, i) => i);
  let s = seed >>> 0 || 1;
  const next = () => {
    // xorshift32
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return s;
  };
  for (let i = n - 1; i > 0; i--) {
    const j = next() % (i + 1);
    [order[i], order[j]] = [order[j]!, order[i]!];
  }
  return order;
}

/** Writes the listed chunks of `image`, `depth` at a time, like a copier with a queue depth. */
export async function writeChunks(writer: BackupWriter, image: Buffer, indexes: number[], depth = 4): Promise<void> {
  let next = 0;
  const worker = async () => {
    while (next < indexes.length) {
      const i = indexes[next++]!;
      const off = writer.chunkOffset(i);
      await writer.writeChunk(i, image.subarray(off, off + writer.chunkLength(i)));
    }
  };
  await Promise.all(Array.from({ length: depth }, worker));
}
