// Memory stays bounded whatever the volume size: a 1 GiB image (mostly zero chunks, as volumes
// are sparse) goes through the writer in shuffled order and back out through restore, with the
// retained heap and Buffer memory sampled after forced garbage collections.

import { createCipheriv, createHash } from 'node:crypto';
import { open, readdir, stat } from 'node:fs/promises';
import path from 'node:path';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { backupMeta, shuffled, tempStore, type TempStore } from './helpers/store-fixtures.ts';

const MiB = 1024 * 1024;
const CHUNK = 4 * MiB;
const SIZE = 1024 * MiB;
const COUNT = SIZE / CHUNK;
/** Every 16th chunk holds data (64 MiB in all); the rest are zero. */
const isDataChunk = (i: number) => i % 16 === 7;
const LIMIT = 64 * MiB;

// Forced GCs make the samples measure what is retained, not garbage not yet collected.
setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;

const KEYSTREAM_INPUT = Buffer.alloc(CHUNK);

/**
 * Chunk i's content, regenerated on demand (AES-CTR keystream) instead of kept. Zero chunks are
 * fresh buffers too, so a writer that held on to what it was given would show in the samples.
 */
function chunkData(i: number): Buffer {
  if (!isDataChunk(i)) return Buffer.alloc(CHUNK);
  const iv = Buffer.alloc(16);
  iv.writeUInt32BE(i, 0);
  return createCipheriv('aes-128-ctr', Buffer.alloc(16, 0x5a), iv).update(KEYSTREAM_INPUT);
}

function retained(): { heap: number; buffers: number } {
  gc();
  const m = process.memoryUsage();
  return { heap: m.heapUsed, buffers: m.arrayBuffers };
}

let t: TempStore;
beforeAll(async () => {
  t = await tempStore();
});
afterAll(async () => {
  await t.cleanup();
});

describe('backup store memory', () => {
  it('writes and restores a 1 GiB image with bounded memory', async () => {
    const base = retained();
    let peak = { heap: 0, buffers: 0 };
    const sample = () => {
      const now = retained();
      peak = { heap: Math.max(peak.heap, now.heap - base.heap), buffers: Math.max(peak.buffers, now.buffers - base.buffers) };
    };

    const w = await t.store.createBackup(backupMeta(SIZE));
    expect(w.chunkSize).toBe(CHUNK);
    const order = shuffled(COUNT, 2026);
    let next = 0;
    let done = 0;
    await Promise.all(
      Array.from({ length: 4 }, async () => {
        while (next < order.length) {
          const i = order[next++]!;
          await w.writeChunk(i, chunkData(i));
          if (++done % 8 === 0) sample();
        }
      }),
    );
    const rec = await w.complete();
    sample();
    expect((await readdir(path.join(t.store.path, w.id, 'chunks'))).length).toBe(COUNT / 16);

    const out = path.join(t.root, 'restored.img');
    let progressCalls = 0;
    const r = await t.store.restoreToFile(w.id, out, {
      onProgress: () => {
        if (++progressCalls % 16 === 0) sample();
      },
    });
    sample();
    const st = await stat(out);
    expect(st.size).toBe(SIZE);
    // Only the data chunks were written: the restored file is as sparse as the volume.
    expect(st.blocks * 512).toBeLessThan(SIZE / 8);

    // Byte for byte: the data chunks hold their data, everything else reads back as zero; and the
    // file's own SHA-256 is the one the writer recorded.
    const fileHash = createHash('sha256');
    const fh = await open(out, 'r');
    try {
      const buf = Buffer.alloc(CHUNK);
      const zero = Buffer.alloc(CHUNK);
      for (let i = 0; i < COUNT; i++) {
        const { bytesRead } = await fh.read(buf, 0, CHUNK, i * CHUNK);
        expect(bytesRead).toBe(CHUNK);
        if (!buf.equals(isDataChunk(i) ? chunkData(i) : zero)) expect.fail(`restored chunk ${i} differs from the source`);
        fileHash.update(buf);
      }
    } finally {
      await fh.close();
    }
    expect(rec.sha256).toBe(fileHash.digest('hex'));
    expect(r.sha256).toBe(rec.sha256);

    expect(peak.heap).toBeLessThan(LIMIT);
    expect(peak.buffers).toBeLessThan(LIMIT);
  });
});
