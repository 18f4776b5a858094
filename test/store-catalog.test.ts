import { mkdir, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { InvalidBackupIdError, ManifestError } from '../src/store/backup-store.ts';
import { Catalog } from '../src/store/catalog.ts';
import { backupMeta, makeImage, tempStore, writeChunks, type TempStore } from './helpers/store-fixtures.ts';

const CHUNK = 16 * 1024;
const SIZE = 8 * CHUNK;

let t: TempStore;
beforeEach(async () => {
  t = await tempStore(CHUNK);
});
afterEach(async () => {
  await t.cleanup();
});

async function completed(volume: string, instructedAt: string, startedAt: string): Promise<string> {
  const image = makeImage(SIZE, CHUNK, [2]);
  const w = await t.store.createBackup(backupMeta(SIZE, { volume, instructedAt, startedAt }));
  await writeChunks(w, image, [7, 6, 5, 4, 3, 2, 1, 0]);
  await w.complete({ finishedAt: new Date(Date.parse(startedAt) + 60_000) });
  return w.id;
}

describe('Catalog', () => {
  it('lists an empty or absent store as empty', async () => {
    const c = new Catalog(t.store);
    expect(await c.list()).toEqual({ backups: [], problems: [] });
    expect(await c.latestCompleted('vol1')).toBeUndefined();
  });

  it('lists every backup by scanning, skips and reports corrupt ones', async () => {
    const old = await completed('vol1', '2026-11-01T00:00:00Z', '2026-11-01T00:00:05Z');
    const recent = await completed('vol1', '2026-11-02T00:00:00Z', '2026-11-02T00:00:05Z');
    const other = await completed('vol2', '2026-11-03T00:00:00Z', '2026-11-03T00:00:05Z');

    const running = await t.store.createBackup(backupMeta(SIZE, { volume: 'vol2', instructedAt: '2026-11-04T00:00:00Z' }));
    await writeChunks(running, makeImage(SIZE, CHUNK, [1]), [0, 1, 7]);
    const failed = await t.store.createBackup(backupMeta(SIZE, { volume: 'vol1', instructedAt: '2026-11-05T00:00:00Z' }));
    await failed.fail('main target unreachable');

    // Damage of every kind a real store sees: a torn manifest, one copied under another name, a
    // directory without a manifest, a stray directory, and a store-internal temporary.
    const broken = await completed('vol1', '2026-11-06T00:00:00Z', '2026-11-06T00:00:05Z');
    const brokenFile = path.join(t.store.path, broken, 'manifest.json');
    await writeFile(brokenFile, (await readFile(brokenFile, 'utf8')).slice(0, 300));
    await mkdir(path.join(t.store.path, 'vol1-copied'));
    await writeFile(path.join(t.store.path, 'vol1-copied', 'manifest.json'), await readFile(path.join(t.store.path, old, 'manifest.json')));
    await mkdir(path.join(t.store.path, 'vol3-empty'));
    await mkdir(path.join(t.store.path, 'not a backup'));
    await mkdir(path.join(t.store.path, '.creating-vol1-x'));
    await writeFile(path.join(t.store.path, 'README'), 'not a directory');

    const c = new Catalog(t.store.path);
    const listing = await c.list();
    expect(listing.backups.map((b) => b.id)).toEqual([old, recent, other, running.id, failed.id]);
    expect(listing.backups.map((b) => b.state)).toEqual(['completed', 'completed', 'completed', 'running', 'failed']);
    expect(listing.problems).toEqual([
      { id: 'not a backup', path: path.join(t.store.path, 'not a backup'), problem: 'directory name is not a valid backup ID' },
      { id: 'vol1-copied', path: path.join(t.store.path, 'vol1-copied', 'manifest.json'), problem: `records the ID '${old}', but is stored under 'vol1-copied'` },
      { id: 'vol3-empty', path: path.join(t.store.path, 'vol3-empty', 'manifest.json'), problem: 'missing' },
      { id: broken, path: brokenFile, problem: expect.stringMatching(/^not valid JSON/) },
    ].sort((a, b) => (a.id < b.id ? -1 : 1)));

    const first = listing.backups[0]!;
    expect(first).toMatchObject({ volume: 'vol1', label: 'test', sizeBytes: SIZE, bytesDurable: SIZE, chunksDurable: 8, chunksZero: 1, freezeSeq: 7 });
    expect(first.sha256).toMatch(/^[0-9a-f]{64}$/);
    expect(listing.backups[3]).toMatchObject({ state: 'running', bytesDurable: 3 * CHUNK, chunksDurable: 3, chunksZero: 1, sha256: null });
    expect(listing.backups[4]).toMatchObject({ state: 'failed', error: 'main target unreachable', bytesDurable: 0 });

    expect((await c.latestCompleted('vol1'))?.id).toBe(recent);
    expect((await c.latestCompleted('vol2'))?.id).toBe(other);
    expect(await c.latestCompleted('vol9')).toBeUndefined();

    expect((await c.get(other))?.volume).toBe('vol2');
    expect(await c.get('vol1-20990101T000000Z-0000')).toBeUndefined();
    await expect(c.get(broken)).rejects.toThrow(ManifestError);
    await expect(c.get('../etc')).rejects.toThrow(InvalidBackupIdError);

    // Progress and completion show up on the next scan.
    await writeChunks(running, makeImage(SIZE, CHUNK), [2, 3]);
    expect((await c.get(running.id))?.chunksDurable).toBe(5);
    await writeChunks(running, makeImage(SIZE, CHUNK), [4, 5, 6]);
    await running.complete();
    const after = await c.list();
    expect(after.backups.find((b) => b.id === running.id)).toMatchObject({ state: 'completed', bytesDurable: SIZE });

    // The catalog is only a view of the directories: a fresh one rebuilt from scratch agrees.
    expect(await new Catalog(t.store).list()).toEqual(after);

    // A deleted backup disappears.
    await t.store.deleteBackup(old);
    expect((await c.list()).backups.map((b) => b.id)).not.toContain(old);
  });

  it('reports a manifest from a newer format version instead of misreading it', async () => {
    const id = await completed('vol1', '2026-11-01T00:00:00Z', '2026-11-01T00:00:05Z');
    const file = path.join(t.store.path, id, 'manifest.json');
    const m = JSON.parse(await readFile(file, 'utf8'));
    m.formatVersion = 2;
    await writeFile(file, JSON.stringify(m));
    const listing = await new Catalog(t.store).list();
    expect(listing.backups).toEqual([]);
    expect(listing.problems).toEqual([{ id, path: file, problem: 'format version 2 is newer than this detour understands (1)' }]);
  });

  it('reports a manifest whose fields do not add up', async () => {
    const id = await completed('vol1', '2026-11-01T00:00:00Z', '2026-11-01T00:00:05Z');
    const file = path.join(t.store.path, id, 'manifest.json');
    const m = JSON.parse(await readFile(file, 'utf8'));
    const cases: [(x: Record<string, unknown>) => void, RegExp][] = [
      [(x) => (x.chunks = (x.chunks as string[]).slice(1)), /lists 7 chunks, expected 8/],
      [(x) => ((x.chunks as string[])[3] = 'nope'), /chunks\[3\]: "nope"/],
      [(x) => (x.sizeBytes = 'big'), /^sizeBytes: /],
      [(x) => (x.state = 'exploded'), /^state: /],
      [(x) => (x.chunkCount = 9), /chunkCount 9 does not match/],
      [(x) => delete x.sha256, /^sha256: /],
    ];
    for (const [damage, problem] of cases) {
      const copy = structuredClone(m);
      damage(copy);
      await writeFile(file, JSON.stringify(copy));
      const listing = await new Catalog(t.store).list();
      expect(listing.backups).toEqual([]);
      expect(listing.problems[0]?.problem).toMatch(problem);
    }
  });
});
