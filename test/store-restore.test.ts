import { readdir, readFile, stat, truncate, unlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { BackupStateError, ChunkCorruptError, ImageHashMismatchError } from '../src/store/backup-store.ts';
import { backupMeta, makeImage, sha256, shuffled, tempStore, writeChunks, type TempStore } from './helpers/store-fixtures.ts';

const CHUNK = 64 * 1024;
const SIZE = 16 * CHUNK + 4096;
const COUNT = 17;
const ZERO = [1, 2, 3, 9, 16];

let t: TempStore;
let image: Buffer;
let id: string;

beforeEach(async () => {
  t = await tempStore(CHUNK);
  image = makeImage(SIZE, CHUNK, ZERO);
  const w = await t.store.createBackup(backupMeta(SIZE));
  await writeChunks(w, image, shuffled(COUNT, 5), 8);
  await w.complete();
  id = w.id;
});
afterEach(async () => {
  await t.cleanup();
});

function chunkFile(i: number): string {
  return path.join(t.store.path, id, 'chunks', String(i).padStart(8, '0'));
}

async function flipByte(file: string, at: number): Promise<void> {
  const b = await readFile(file);
  b[at] ^= 0x01;
  await writeFile(file, b);
}

describe('restoreToFile', () => {
  it('writes the exact raw image, with zero chunks left as holes', async () => {
    const out = path.join(t.root, 'restored.img');
    const r = await t.store.restoreToFile(id, out);
    expect(r).toEqual({ id, path: out, bytes: SIZE, sha256: sha256(image), zeroChunks: ZERO.length, device: false });
    const restored = await readFile(out);
    expect(restored.length).toBe(SIZE);
    expect(restored.equals(image)).toBe(true);
    expect(sha256(restored)).toBe(sha256(image));
    // Four whole zero chunks (256 KiB) were never written: the file has fewer blocks than bytes.
    const st = await stat(out);
    expect(st.blocks * 512).toBeLessThanOrEqual(SIZE - 4 * CHUNK);
    // No temporary left behind.
    expect(await readdir(t.root)).toEqual(['backups', 'restored.img']);
  });

  it('replaces an existing file, trailing garbage included', async () => {
    const out = path.join(t.root, 'existing.img');
    await writeFile(out, Buffer.alloc(SIZE * 2, 0xee));
    await t.store.restoreToFile(id, out);
    expect((await readFile(out)).equals(image)).toBe(true);
  });

  it('writes a device in place, zero chunks included', async () => {
    const r = await t.store.restoreToFile(id, '/dev/null');
    expect(r).toMatchObject({ device: true, bytes: SIZE, sha256: sha256(image) });
  });

  it('stops at a corrupted chunk, names it, and leaves the destination untouched', async () => {
    await flipByte(chunkFile(7), 1234);
    const out = path.join(t.root, 'existing.img');
    await writeFile(out, 'previous content');
    const err = await t.store.restoreToFile(id, out).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ChunkCorruptError);
    expect((err as ChunkCorruptError).index).toBe(7);
    expect((err as Error).message).toContain(`backup ${id}: chunk 7 (image bytes ${7 * CHUNK}..${8 * CHUNK - 1}`);
    expect((err as Error).message).toMatch(/its SHA-256 is [0-9a-f]{64}, the manifest records [0-9a-f]{64}/);
    expect(await readFile(out, 'utf8')).toBe('previous content');
    expect(await readdir(t.root)).toEqual(['backups', 'existing.img']);
  });

  it('names a chunk whose file is missing or short', async () => {
    await unlink(chunkFile(4));
    await expect(t.store.restoreToFile(id, path.join(t.root, 'a'))).rejects.toThrow(/chunk 4 .*its file is missing/);
    await writeFile(chunkFile(4), image.subarray(4 * CHUNK, 5 * CHUNK));
    await truncate(chunkFile(10), CHUNK - 1);
    await expect(t.store.restoreToFile(id, path.join(t.root, 'a'))).rejects.toThrow(/chunk 10 .*is 65535 bytes, expected 65536/);
  });

  it('checks the whole-image SHA-256 even when every chunk is intact', async () => {
    const file = path.join(t.store.path, id, 'manifest.json');
    const m = JSON.parse(await readFile(file, 'utf8'));
    m.sha256 = 'f'.repeat(64);
    await writeFile(file, JSON.stringify(m));
    await expect(t.store.restoreToFile(id, path.join(t.root, 'b'))).rejects.toThrow(ImageHashMismatchError);
    await expect(t.store.restoreToFile(id, path.join(t.root, 'b'))).rejects.toThrow(`the manifest records ${'f'.repeat(64)}`);
  });

  it('refuses a backup that is not completed, and a directory as destination', async () => {
    const w = await t.store.createBackup(backupMeta(SIZE));
    await expect(t.store.restoreToFile(w.id, path.join(t.root, 'c'))).rejects.toThrow(BackupStateError);
    await w.close();
    await expect(t.store.restoreToFile(id, t.root)).rejects.toThrow(/is a directory/);
    await expect(t.store.restoreToFile('vol1-nonexistent', path.join(t.root, 'c'))).rejects.toThrow(/not found/);
    await expect(t.store.restoreToFile(id, path.join(t.root, 'no-such-dir', 'c'))).rejects.toThrow(/cannot write .*: directory .*no-such-dir does not exist/);
  });
});

describe('ImageReader', () => {
  it('reads any range, across chunk boundaries and through zero chunks', async () => {
    const r = await t.store.openImage(id, { cacheChunks: 2 });
    expect(r.size).toBe(SIZE);
    expect(r.isZeroChunk(2)).toBe(true);
    expect(r.isZeroChunk(4)).toBe(false);
    const ranges: [number, number][] = [
      [0, SIZE],
      [0, 1],
      [CHUNK - 10, 20],
      [5 * CHUNK + 7, 3 * CHUNK],
      [SIZE - 4096, 4096],
      [SIZE - 1, 1],
      [100, 0],
    ];
    for (let i = 0; i < 40; i++) {
      const off = Math.floor(Math.random() * SIZE);
      ranges.push([off, Math.floor(Math.random() * (SIZE - off))]);
    }
    for (const [off, len] of ranges) expect((await r.read(off, len)).equals(image.subarray(off, off + len)), `${off}+${len}`).toBe(true);
    expect((await r.readChunk(16)).equals(image.subarray(16 * CHUNK))).toBe(true);
    await expect(r.read(SIZE - 1, 2)).rejects.toThrow(RangeError);
    await expect(r.read(-1, 1)).rejects.toThrow(RangeError);
    r.close();
  });

  it('never returns the bytes of a corrupted chunk', async () => {
    await flipByte(chunkFile(12), 0);
    const r = await t.store.openImage(id);
    // Other chunks read fine, including one that shares a read with nothing corrupt.
    expect((await r.read(11 * CHUNK, CHUNK)).equals(image.subarray(11 * CHUNK, 12 * CHUNK))).toBe(true);
    const err = await r.read(12 * CHUNK + 100, 10).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ChunkCorruptError);
    expect(err).toMatchObject({ index: 12, backupId: id });
    // A read spanning into it fails too, rather than returning a partial buffer.
    await expect(r.read(11 * CHUNK, 2 * CHUNK)).rejects.toThrow(/chunk 12 /);
  });
});
