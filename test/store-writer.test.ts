import { appendFile, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import {
  BackupIncompleteError,
  BackupStateError,
  BackupStoreError,
  InvalidBackupIdError,
  checkBackupId,
  isValidBackupId,
  newBackupId,
} from '../src/store/backup-store.ts';
import { parseGeneratedBackupId } from '../src/store/backup-id.ts';
import { backupMeta, makeImage, sha256, shuffled, tempStore, writeChunks, type TempStore } from './helpers/store-fixtures.ts';

const CHUNK = 64 * 1024;
// Ten full chunks and a short last one of three blocks.
const SIZE = 10 * CHUNK + 3 * 512;
const COUNT = 11;

let t: TempStore;
beforeEach(async () => {
  t = await tempStore(CHUNK);
});
afterEach(async () => {
  await t.cleanup();
});

function chunkSha(image: Buffer, i: number): string {
  return sha256(image.subarray(i * CHUNK, Math.min((i + 1) * CHUNK, image.length)));
}

async function manifestJson(id: string): Promise<Record<string, unknown>> {
  return JSON.parse(await readFile(path.join(t.store.path, id, 'manifest.json'), 'utf8'));
}

describe('backup IDs', () => {
  it('generates sortable IDs of the form volume-UTCstamp-hex', () => {
    const a = newBackupId('vol1', new Date('2026-11-05T14:30:12.345Z'));
    expect(a).toMatch(/^vol1-20261105T143012Z-[0-9a-f]{4}$/);
    expect(parseGeneratedBackupId(a)).toEqual({ volume: 'vol1', stamp: '20261105T143012Z', random: a.slice(-4) });
    const b = newBackupId('vol1', new Date('2026-11-05T14:30:13.000Z'));
    expect([b, a].sort()).toEqual([a, b]);
    expect(newBackupId('a..b', new Date(0))).toMatch(/^a\.b-19700101T000000Z-/);
  });

  it('rejects IDs that could leave the store directory', () => {
    for (const bad of ['', '.', '..', '../x', 'a/b', '/etc', 'a\\b', 'a..b', '.hidden', '-x', 'x\0y', 'x y', 'a'.repeat(129)]) {
      expect(isValidBackupId(bad), bad).toBe(false);
      expect(() => checkBackupId(bad)).toThrow(InvalidBackupIdError);
    }
    for (const good of ['vol1-20261105T143012Z-a3f9', 'A', 'x.y_z-1']) expect(isValidBackupId(good)).toBe(true);
  });

  it('refuses unsafe IDs at every entry point of the store', async () => {
    await expect(t.store.createBackup(backupMeta(SIZE, { id: '../evil' }))).rejects.toThrow(InvalidBackupIdError);
    await expect(t.store.openBackup('../../etc')).rejects.toThrow(InvalidBackupIdError);
    await expect(t.store.openImage('a/b')).rejects.toThrow(InvalidBackupIdError);
    await expect(t.store.restoreToFile('..', path.join(t.root, 'out'))).rejects.toThrow(InvalidBackupIdError);
    await expect(t.store.deleteBackup('.')).rejects.toThrow(InvalidBackupIdError);
  });
});

describe('BackupWriter', () => {
  it('stores chunks written in shuffled order, sparse zero chunks, and the whole-image SHA-256', async () => {
    const zero = [2, 5, COUNT - 1];
    const image = makeImage(SIZE, CHUNK, zero);
    const w = await t.store.createBackup(backupMeta(SIZE));
    expect(w.chunkCount).toBe(COUNT);
    expect(w.chunkLength(COUNT - 1)).toBe(1536);
    expect(w.missingChunks()).toEqual(Array.from({ length: COUNT }, (_, i) => i));
    await writeChunks(w, image, shuffled(COUNT, 7), 4);
    expect(w.missingChunks()).toEqual([]);
    // The whole-image hash catches up in the background, reading back chunks written ahead of it.
    expect(w.progress()).toMatchObject({ chunksTotal: COUNT, chunksDurable: COUNT, chunksZero: 3, bytesTotal: SIZE, bytesDurable: SIZE });

    const rec = await w.complete({ finishedAt: new Date('2026-11-05T14:31:00Z'), freezeSeq: 42 });
    expect(w.progress().bytesHashed).toBe(SIZE);
    expect(rec.state).toBe('completed');
    expect(rec.sha256).toBe(sha256(image));
    expect(rec.freezeSeq).toBe(42);

    const m = await manifestJson(w.id);
    expect(m).toMatchObject({
      format: 'detour-backup',
      formatVersion: 1,
      id: w.id,
      volume: 'vol1',
      label: 'test',
      state: 'completed',
      error: null,
      targetIqn: 'iqn.2026-11.test:main',
      lun: 0,
      sizeBytes: SIZE,
      blockSize: 512,
      chunkSize: CHUNK,
      chunkCount: COUNT,
      deviceIdentity: '0103000800112233445566778899',
      instructedAt: '2026-11-05T14:30:00.000Z',
      startedAt: '2026-11-05T14:30:01.000Z',
      finishedAt: '2026-11-05T14:31:00.000Z',
      freezeSeq: 42,
      sha256: sha256(image),
    });
    expect(m.chunks).toEqual(Array.from({ length: COUNT }, (_, i) => (zero.includes(i) ? 'zero' : chunkSha(image, i))));

    // Zero chunks have no file; the others hold exactly their bytes. No temporaries, no log left.
    const files = (await readdir(path.join(t.store.path, w.id, 'chunks'))).sort();
    expect(files).toEqual(['00000000', '00000001', '00000003', '00000004', '00000006', '00000007', '00000008', '00000009']);
    expect(await readFile(path.join(t.store.path, w.id, 'chunks', '00000004'))).toEqual(image.subarray(4 * CHUNK, 5 * CHUNK));
    expect((await readdir(path.join(t.store.path, w.id))).sort()).toEqual(['chunks', 'manifest.json']);
  });

  it('gives the same manifest after a restart half way as without one', async () => {
    const image = makeImage(SIZE, CHUNK, [3, 8]);
    const order = shuffled(COUNT, 3);

    const straight = await t.store.createBackup(backupMeta(SIZE));
    await writeChunks(straight, image, order);
    await straight.complete({ finishedAt: '2026-11-05T14:31:00Z' });

    const first = await t.store.createBackup(backupMeta(SIZE));
    const id = first.id;
    await writeChunks(first, image, order.slice(0, 6));
    await first.close(); // detour stops here
    await expect(first.writeChunk(order[6]!, image.subarray(0, CHUNK))).rejects.toThrow(BackupStateError);

    const resumed = await t.store.openBackup(id);
    expect(resumed.missingChunks()).toEqual(order.slice(6).sort((a, b) => a - b));
    expect(resumed.progress().chunksDurable).toBe(6);
    await writeChunks(resumed, image, shuffled(COUNT, 99).filter((i) => order.slice(6).includes(i)));
    const rec = await resumed.complete({ finishedAt: '2026-11-05T14:31:00Z' });

    expect(rec.sha256).toBe(sha256(image));
    const a = await manifestJson(straight.id);
    const b = await manifestJson(id);
    expect(b.sha256).toBe(a.sha256);
    expect(b.chunks).toEqual(a.chunks);
  });

  it('resumes after a crash: a torn log line and a lost chunk file are copied again', async () => {
    const image = makeImage(SIZE, CHUNK);
    const w = await t.store.createBackup(backupMeta(SIZE));
    await writeChunks(w, image, [0, 1, 2, 4, 6]);
    await w.close();
    const dir = path.join(t.store.path, w.id);
    // A crash in the middle of appending chunk 7's record, chunk 4's file lost with the disk cache
    // (its directory entry never reached the platter), chunk 9's file written but the crash came
    // before its record, and a temporary left over by an older version from chunk 8.
    await appendFile(path.join(dir, 'progress.log'), `C 7 ${'ab'.repeat(16)}`);
    await rm(path.join(dir, 'chunks', '00000004'));
    await writeFile(path.join(dir, 'chunks', '00000009'), image.subarray(9 * CHUNK, 9 * CHUNK + 100));
    await writeFile(path.join(dir, 'chunks', '00000008.tmp'), 'partial');

    const r = await t.store.openBackup(w.id);
    expect(r.missingChunks()).toEqual([3, 4, 5, 7, 8, 9, 10]);
    // Only files the log vouches for are left.
    expect((await readdir(path.join(dir, 'chunks'))).sort()).toEqual(['00000000', '00000001', '00000002', '00000006']);
    await writeChunks(r, image, r.missingChunks().reverse());
    expect((await r.complete()).sha256).toBe(sha256(image));
    // The log after the torn line stayed readable: the manifest lists every chunk.
    expect(((await manifestJson(w.id)).chunks as string[]).length).toBe(COUNT);
  });

  it('drops a chunk whose stored copy is damaged before it is hashed, and takes it again', async () => {
    const image = makeImage(SIZE, CHUNK);
    const w = await t.store.createBackup(backupMeta(SIZE));
    // Everything but chunk 0: the others are written ahead of the hash cursor and must be read back.
    await writeChunks(w, image, Array.from({ length: COUNT - 1 }, (_, i) => i + 1));
    await w.close();
    const file5 = path.join(t.store.path, w.id, 'chunks', '00000005');
    const bytes = await readFile(file5);
    bytes[100] ^= 0xff;
    await writeFile(file5, bytes);

    const r = await t.store.openBackup(w.id);
    await writeChunks(r, image, [0]);
    const err = await r.complete().catch((e: unknown) => e);
    expect(err).toBeInstanceOf(BackupIncompleteError);
    expect((err as Error).message).toMatch(/chunk 5 \(.*SHA-256/);
    expect(r.missingChunks()).toEqual([5]);
    expect(r.dropped.map((d) => d.index)).toEqual([5]);
    await writeChunks(r, image, [5]);
    expect((await r.complete()).sha256).toBe(sha256(image));
  });

  it('checks what it is given', async () => {
    const image = makeImage(SIZE, CHUNK);
    const w = await t.store.createBackup(backupMeta(SIZE));
    await expect(w.writeChunk(COUNT, Buffer.alloc(CHUNK))).rejects.toThrow(RangeError);
    await expect(w.writeChunk(-1, Buffer.alloc(CHUNK))).rejects.toThrow(RangeError);
    await expect(w.writeChunk(0, Buffer.alloc(CHUNK - 1))).rejects.toThrow(/must be 65536 bytes/);
    await expect(w.writeChunk(COUNT - 1, Buffer.alloc(CHUNK))).rejects.toThrow(/must be 1536 bytes/);

    // The same index twice at once is a copier bug; a repeat with identical bytes is harmless.
    const p = w.writeChunk(0, image.subarray(0, CHUNK));
    await expect(w.writeChunk(0, image.subarray(0, CHUNK))).rejects.toThrow(/already being written/);
    await p;
    await w.writeChunk(0, image.subarray(0, CHUNK));
    await expect(w.writeChunk(0, Buffer.alloc(CHUNK, 1))).rejects.toThrow(/different content/);

    const err = await w.complete().catch((e: unknown) => e);
    expect(err).toBeInstanceOf(BackupIncompleteError);
    expect((err as BackupIncompleteError).missingCount).toBe(COUNT - 1);
    // Still usable after a refused complete().
    await writeChunks(w, image, Array.from({ length: COUNT - 1 }, (_, i) => i + 1));
    expect((await w.complete()).sha256).toBe(sha256(image));
    await expect(w.complete()).rejects.toThrow(BackupStateError);
  });

  it('refuses bad backup metadata and duplicate IDs', async () => {
    await expect(t.store.createBackup(backupMeta(SIZE + 1))).rejects.toThrow(/multiple of the 512-byte block/);
    await expect(t.store.createBackup(backupMeta(SIZE, { volume: 'a/b' }))).rejects.toThrow(RangeError);
    await expect(t.store.createBackup(backupMeta(SIZE, { chunkSize: 1000 }))).rejects.toThrow(/chunkSize/);
    await expect(t.store.createBackup(backupMeta(SIZE, { blockSize: 500 }))).rejects.toThrow(/blockSize/);
    const w = await t.store.createBackup(backupMeta(SIZE, { id: 'fixed-id' }));
    await expect(t.store.createBackup(backupMeta(SIZE, { id: 'fixed-id' }))).rejects.toThrow(/already exists/);
    await expect(t.store.openBackup('fixed-id')).rejects.toThrow(/already open/);
    await w.close();
    await expect(t.store.createBackup(backupMeta(SIZE, { id: 'fixed-id' }))).rejects.toThrow(/already exists/);
  });

  it('fail() records the reason and frees the chunk data; cancel(keepData) keeps it', async () => {
    const image = makeImage(SIZE, CHUNK);
    const w = await t.store.createBackup(backupMeta(SIZE));
    await writeChunks(w, image, [0, 1, 2]);
    const rec = await w.fail('main target lost during copy', { finishedAt: '2026-11-05T15:00:00Z' });
    expect(rec).toMatchObject({ state: 'failed', error: 'main target lost during copy', finishedAt: '2026-11-05T15:00:00.000Z', sha256: null });
    expect(await readdir(path.join(t.store.path, w.id))).toEqual(['manifest.json']);
    expect(await manifestJson(w.id)).toMatchObject({ state: 'failed', error: 'main target lost during copy' });
    await expect(t.store.openBackup(w.id)).rejects.toThrow(/is failed, only a running backup can be resumed/);
    await expect(t.store.openImage(w.id)).rejects.toThrow(/is failed: main target lost during copy/);

    const c = await t.store.createBackup(backupMeta(SIZE));
    await writeChunks(c, image, [4]);
    await c.cancel('operator', { keepData: true });
    expect((await t.store.readRecord(c.id)).state).toBe('cancelled');
    expect((await stat(path.join(t.store.path, c.id, 'chunks', '00000004'))).size).toBe(CHUNK);

    await t.store.deleteBackup(c.id);
    await expect(t.store.readRecord(c.id)).rejects.toThrow(/not found/);
    expect(await readdir(t.store.path)).toEqual([w.id]);
  });

  it('reports a store error, not a crash, for a backup whose manifest is damaged', async () => {
    const w = await t.store.createBackup(backupMeta(SIZE));
    await w.close();
    await writeFile(path.join(t.store.path, w.id, 'manifest.json'), '{"format":"detour-backup",');
    await expect(t.store.openBackup(w.id)).rejects.toThrow(BackupStoreError);
    await expect(t.store.openBackup(w.id)).rejects.toThrow(/manifest .*not valid JSON/);
  });
});
