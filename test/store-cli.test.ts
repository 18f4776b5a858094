// `detour restore` end to end, as an operator runs it: a real process, real exit codes.

import { execFile } from 'node:child_process';
import { readFile, realpath, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { backupMeta, makeImage, sha256, shuffled, tempStore, writeChunks, type TempStore } from './helpers/store-fixtures.ts';

const repoRoot = path.resolve(import.meta.dirname, '..');
const CHUNK = 64 * 1024;
const SIZE = 12 * CHUNK + 512;

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

function detour(args: string[], cwd = repoRoot): Promise<Run> {
  return new Promise((resolve) => {
    execFile(process.execPath, [path.join(repoRoot, 'bin/detour.js'), ...args], { cwd, timeout: 30_000 }, (err, stdout, stderr) => {
      const code = err ? (typeof err.code === 'number' ? err.code : -1) : 0;
      resolve({ code, stdout, stderr });
    });
  });
}

let t: TempStore;
let image: Buffer;
let good: string;
let corrupt: string;

beforeAll(async () => {
  t = await tempStore(CHUNK);
  image = makeImage(SIZE, CHUNK, [0, 5, 12]);
  for (const name of ['good', 'corrupt']) {
    const w = await t.store.createBackup(backupMeta(SIZE, { label: name }));
    await writeChunks(w, image, shuffled(13, 11));
    await w.complete();
    if (name === 'good') good = w.id;
    else corrupt = w.id;
  }
  const file = path.join(t.store.path, corrupt, 'chunks', '00000003');
  const b = await readFile(file);
  b[9] ^= 0x80;
  await writeFile(file, b);
});
afterAll(async () => {
  await t.cleanup();
});

describe('detour restore', () => {
  it('restores a backup to a file: exit 0, identical bytes', async () => {
    const out = path.join(t.root, 'out.img');
    const r = await detour(['restore', good, '--to-file', out, '--store', t.store.path]);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    expect(r.stdout).toBe(`restored ${good} to ${out}: ${SIZE} bytes, sha256 ${sha256(image)}\n`);
    const restored = await readFile(out);
    expect(restored.equals(image)).toBe(true);
  });

  it('takes the store from --config, and prints JSON with --json', async () => {
    const config = path.join(t.root, 'detour.yaml');
    await writeFile(
      config,
      [
        'backupStore:',
        `  path: ${path.relative(t.root, t.store.path)}`,
        'volumes:',
        '  - name: vol1',
        '    target: iqn.2026-11.test:main',
        '    main: 127.0.0.1:3261',
        '    topology: proxy-directed',
        '',
      ].join('\n'),
    );
    const out = path.join(t.root, 'out-config.img');
    const r = await detour(['restore', good, '--to-file', out, '--config', config, '--json']);
    expect(r.code).toBe(0);
    expect(JSON.parse(r.stdout)).toEqual({ id: good, path: out, bytes: SIZE, sha256: sha256(image) });
    expect((await readFile(out)).equals(image)).toBe(true);
  });

  it('uses ./data/backups by default, relative to the working directory', async () => {
    const out = path.join(t.root, 'out-default.img');
    // The temp store lives at <root>/backups; run from a directory where ./data/backups is absent.
    const r = await detour(['restore', good, '--to-file', out], t.root);
    expect(r.code).toBe(1);
    expect(r.stderr).toBe(`detour restore: backup ${good}: not found in the store ${path.join(await realpath(t.root), 'data', 'backups')}\n`);
  });

  it('fails with exit 1 and names the chunk when a chunk is corrupt', async () => {
    const out = path.join(t.root, 'out-corrupt.img');
    const r = await detour(['restore', corrupt, '--to-file', out, '--store', t.store.path]);
    expect(r.code).toBe(1);
    expect(r.stdout).toBe('');
    expect(r.stderr).toMatch(new RegExp(`^detour restore: backup ${corrupt}: chunk 3 \\(image bytes ${3 * CHUNK}\\.\\.${4 * CHUNK - 1}, file .*00000003\\) is corrupt: its SHA-256 is`));
    await expect(readFile(out)).rejects.toThrow(/ENOENT/);
  });

  it('fails with exit 1 for an unknown backup or an unreadable config', async () => {
    const r = await detour(['restore', 'vol1-20990101T000000Z-beef', '--to-file', path.join(t.root, 'x'), '--store', t.store.path]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/not found in the store/);
    const c = await detour(['restore', good, '--to-file', path.join(t.root, 'x'), '--config', path.join(t.root, 'nope.yaml')]);
    expect(c.code).toBe(1);
    expect(c.stderr).toMatch(/nope\.yaml: \(top level\): cannot read/);
  });

  it('exits 2 on bad arguments', async () => {
    const cases: [string[], RegExp][] = [
      [['restore'], /a backup ID is required/],
      [['restore', good], /--to-file PATH is required/],
      [['restore', '../etc', '--to-file', '/tmp/x'], /'..\/etc' is not a backup ID/],
      [['restore', good, '--to-file', '/tmp/x', '--bogus'], /Unknown option '--bogus'/],
      [['restore', good, '--to-file', '/tmp/x', '--store', 'a', '--config', 'b'], /give --store or --config, not both/],
      [['restore', good, 'extra', '--to-file', '/tmp/x'], /unexpected argument 'extra'/],
    ];
    const runs = await Promise.all(cases.map(([args]) => detour(args)));
    runs.forEach((r, i) => {
      expect(r.code, cases[i]![0].join(' ')).toBe(2);
      expect(r.stderr).toMatch(cases[i]![1]);
    });
  });
});
