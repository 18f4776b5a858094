// The store writer's fast path, watched at the file system: every open, write, fdatasync and
// close the store makes goes through a recording wrapper (and can be held or failed), so the
// tests can check the order of what reaches the disk, not just the end result.

import { createHash } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import { readdir, readFile } from 'node:fs/promises';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { allocChunkBuffers, chunkHasher, directIoCapable } from '../src/store/chunk-memory.ts';
import type { BackupWriter } from '../src/store/backup-store.ts';
import { backupMeta, makeImage, sha256, tempStore, type TempStore } from './helpers/store-fixtures.ts';

interface FsEvent {
  op: 'open' | 'write' | 'datasync' | 'sync' | 'close';
  /** File name within its directory ('chunks' for the directory itself). */
  name: string;
  flags?: string | number;
  /** For writes to progress.log: what was appended. */
  text?: string;
}

const fsState = vi.hoisted(() => ({
  events: [] as FsEvent[],
  /** fdatasync of these file names waits for the promise. */
  holdDatasync: new Map<string, Promise<void>>(),
  /** fdatasync of these file names fails once with EIO. */
  failDatasync: new Set<string>(),
  /** Opening with O_DIRECT fails with EINVAL, as on a file system without it. */
  refuseDirect: false,
}));

vi.mock('node:fs/promises', async (importOriginal) => {
  const orig = await importOriginal<typeof import('node:fs/promises')>();
  const { O_DIRECT } = (await import('node:fs')).constants as Record<string, number>;
  const open: typeof orig.open = async (file, flags, mode) => {
    const name = path.basename(String(file));
    if (fsState.refuseDirect && typeof flags === 'number' && O_DIRECT !== undefined && flags & O_DIRECT) {
      throw Object.assign(new Error(`EINVAL: invalid argument, open '${String(file)}'`), { code: 'EINVAL' });
    }
    const fh = await orig.open(file, flags, mode);
    fsState.events.push({ op: 'open', name, ...(flags !== undefined ? { flags } : {}) });
    return new Proxy(fh, {
      get(target, prop, receiver) {
        const value: unknown = Reflect.get(target, prop, receiver);
        if (typeof value !== 'function') return value;
        if (prop === 'write') {
          return (...args: unknown[]) => {
            const first = args[0];
            fsState.events.push({ op: 'write', name, ...(typeof first === 'string' ? { text: first } : {}) });
            return (value as (...a: unknown[]) => unknown).apply(target, args);
          };
        }
        if (prop === 'datasync' || prop === 'sync') {
          return async () => {
            const hold = fsState.holdDatasync.get(name);
            if (prop === 'datasync' && hold) await hold;
            if (prop === 'datasync' && fsState.failDatasync.delete(name)) {
              throw Object.assign(new Error(`EIO: i/o error, fdatasync '${name}'`), { code: 'EIO' });
            }
            await (value as () => Promise<void>).call(target);
            fsState.events.push({ op: prop, name });
          };
        }
        if (prop === 'close') {
          return async () => {
            fsState.events.push({ op: 'close', name });
            return (value as () => Promise<void>).call(target);
          };
        }
        return (value as (...a: unknown[]) => unknown).bind(target);
      },
    });
  };
  return { ...orig, open, default: { ...orig, open } };
});

const CHUNK = 64 * 1024;
const COUNT = 8;
const SIZE = COUNT * CHUNK;
const chunkName = (i: number) => String(i).padStart(8, '0');

let t: TempStore;
beforeEach(async () => {
  t = await tempStore(CHUNK);
  fsState.events.length = 0;
  fsState.holdDatasync.clear();
  fsState.failDatasync.clear();
  fsState.refuseDirect = false;
});
afterEach(async () => {
  await t.cleanup();
});

/** Hands every chunk of `image` to the writer in ascending order, through one reused aligned buffer. */
async function putInOrder(w: BackupWriter, image: Buffer, buf: Buffer): Promise<Promise<void>[]> {
  const durable: Promise<void>[] = [];
  for (let i = 0; i < w.chunkCount; i++) {
    const data = buf.subarray(0, w.chunkLength(i));
    image.copy(data, 0, w.chunkOffset(i), w.chunkOffset(i) + data.length);
    durable.push((await w.putChunk(i, data)).durable);
  }
  return durable;
}

function logged(index: number): number {
  return fsState.events.findIndex((e) => e.op === 'write' && e.name === 'progress.log' && e.text?.split('\n').some((l) => l.startsWith(`C ${index} `)));
}

describe('backup writer durability', () => {
  it('hands the buffer back before the chunk is durable, and records a chunk only once its data is', async () => {
    const image = makeImage(SIZE, CHUNK, [5]);
    const w = await t.store.createBackup(backupMeta(SIZE));
    const dir = path.join(t.store.path, w.id);
    let release!: () => void;
    fsState.holdDatasync.set(chunkName(2), new Promise<void>((r) => (release = r)));
    const [buf] = allocChunkBuffers(1, CHUNK);
    expect(directIoCapable(buf!)).toBe(true);

    // Every putChunk() returned although chunk 2's fdatasync has not: the buffer was reused.
    const durable = await putInOrder(w, image, buf!);
    await Promise.all(durable.filter((_, i) => i !== 2));
    expect(w.isDurable(2)).toBe(false);
    expect(w.missingChunks()).toEqual([2]);
    expect(await readFile(path.join(dir, 'progress.log'), 'utf8')).not.toMatch(/^C 2 /m);
    // The whole-image hash took every chunk from the buffer as it came, chunk 2 included.
    expect(w.progress().bytesHashed).toBe(SIZE);

    release();
    await durable[2];
    expect(w.missingChunks()).toEqual([]);
    const log = await readFile(path.join(dir, 'progress.log'), 'utf8');
    expect(log).toMatch(new RegExp(`^C 2 ${sha256(image.subarray(2 * CHUNK, 3 * CHUNK))}$`, 'm'));
    expect(log).toMatch(/^Z 5$/m);

    // For every stored chunk: written with O_DIRECT, its data synced before its record was written.
    for (let i = 0; i < COUNT; i++) {
      if (i === 5) continue;
      const opened = fsState.events.find((e) => e.op === 'open' && e.name === chunkName(i));
      expect(Number(opened?.flags) & fsConstants.O_DIRECT).toBe(fsConstants.O_DIRECT);
      const synced = fsState.events.findIndex((e) => e.op === 'datasync' && e.name === chunkName(i));
      expect(synced).toBeGreaterThanOrEqual(0);
      expect(logged(i)).toBeGreaterThan(synced);
    }

    const rec = await w.complete();
    expect(rec.sha256).toBe(sha256(image));
    // Nothing was read back for the hash: no chunk file was opened other than to be written.
    expect(fsState.events.filter((e) => e.op === 'open' && /^\d{8}$/.test(e.name) && e.flags === 'r')).toEqual([]);
    const files = (await readdir(path.join(dir, 'chunks'))).sort();
    expect(files).toEqual([0, 1, 2, 3, 4, 6, 7].map(chunkName));
    expect(await readFile(path.join(dir, 'chunks', chunkName(6)))).toEqual(image.subarray(6 * CHUNK, 7 * CHUNK));
  });

  it('writes through the page cache when the file system refuses O_DIRECT', async () => {
    fsState.refuseDirect = true;
    const image = makeImage(SIZE, CHUNK);
    const w = await t.store.createBackup(backupMeta(SIZE));
    const [buf] = allocChunkBuffers(1, CHUNK);
    await Promise.all(await putInOrder(w, image, buf!));
    expect((await w.complete()).sha256).toBe(sha256(image));
    const chunkOpens = fsState.events.filter((e) => e.op === 'open' && /^\d{8}$/.test(e.name));
    expect(chunkOpens.map((e) => e.flags)).toEqual(Array.from({ length: COUNT }, () => 'w'));
    expect(await readFile(path.join(t.store.path, w.id, 'chunks', chunkName(3)))).toEqual(image.subarray(3 * CHUNK, 4 * CHUNK));
  });

  it('does not record a chunk whose data could not be synced, and rehashes when it is written again', async () => {
    const image = makeImage(SIZE, CHUNK);
    const w = await t.store.createBackup(backupMeta(SIZE));
    fsState.failDatasync.add(chunkName(3));
    const [buf] = allocChunkBuffers(1, CHUNK);
    const durable = await putInOrder(w, image, buf!);
    const results = await Promise.allSettled(durable);
    expect(results.map((r) => r.status)).toEqual(['fulfilled', 'fulfilled', 'fulfilled', 'rejected', 'fulfilled', 'fulfilled', 'fulfilled', 'fulfilled']);
    expect((results[3] as PromiseRejectedResult).reason.code).toBe('EIO');
    expect(w.missingChunks()).toEqual([3]);
    expect(logged(3)).toBe(-1);

    // Chunk 3's first bytes went into the running hash before its sync failed. Written again with
    // other bytes, the image hash must be of what is stored, not of what was first seen.
    const other = Buffer.from(image);
    other.fill(0x5a, 3 * CHUNK, 4 * CHUNK);
    await w.writeChunk(3, other.subarray(3 * CHUNK, 4 * CHUNK));
    const rec = await w.complete();
    expect(rec.sha256).toBe(sha256(other));
  });

  it('a close() waits until every chunk handed over is durable and recorded', async () => {
    const image = makeImage(SIZE, CHUNK);
    const w = await t.store.createBackup(backupMeta(SIZE));
    const id = w.id;
    const [buf] = allocChunkBuffers(1, CHUNK);
    await putInOrder(w, image, buf!);
    await w.close();
    const r = await t.store.openBackup(id);
    expect(r.missingChunks()).toEqual([]);
    expect((await r.complete()).sha256).toBe(sha256(image));
  });
});

describe('chunk hasher', () => {
  it('hashes shared buffers on its thread and plain ones inline, with the same result', async () => {
    const [a, b] = allocChunkBuffers(2, CHUNK);
    const image = makeImage(2 * CHUNK, CHUNK);
    image.copy(a!, 0, 0, CHUNK);
    image.copy(b!, 0, CHUNK);
    const expected = [0, 1].map((i) => createHash('sha256').update(image.subarray(i * CHUNK, (i + 1) * CHUNK)).digest('hex'));
    const [da, db, dPlain, dView] = await Promise.all([
      chunkHasher.sha256(a!),
      chunkHasher.sha256(b!),
      chunkHasher.sha256(image.subarray(CHUNK)),
      chunkHasher.sha256(a!.subarray(100, 200)),
    ]);
    expect([da!.toString('hex'), db!.toString('hex'), dPlain!.toString('hex')]).toEqual([expected[0], expected[1], expected[1]]);
    expect(dView!.toString('hex')).toBe(sha256(image.subarray(100, 200)));
  });

  it('aligned chunk buffers are shared, page-aligned, and only whole pages qualify for O_DIRECT', () => {
    const bufs = allocChunkBuffers(3, 10_000);
    expect(bufs.map((b) => b.length)).toEqual([10_000, 10_000, 10_000]);
    expect(bufs.every((b) => b.buffer instanceof SharedArrayBuffer)).toBe(true);
    expect(bufs.map((b) => b.byteOffset)).toEqual([0, 12_288, 24_576]);
    expect(directIoCapable(bufs[1]!.subarray(0, 8192))).toBe(true);
    expect(directIoCapable(bufs[1]!)).toBe(false);
    expect(directIoCapable(bufs[1]!.subarray(512, 4608))).toBe(false);
    expect(directIoCapable(Buffer.alloc(8192))).toBe(false);
  });
});
