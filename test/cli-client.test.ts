import { execFile } from 'node:child_process';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startApiServer, type RunningApiServer } from '../src/control/api-server.ts';
import { createMetrics } from '../src/control/metrics.ts';
import type { BackupObject } from '../src/control/model.ts';
import { FAKE_VOLUME_BYTES, FakeEngine, recordingLogger } from './helpers/fake-engine.ts';

const repoRoot = path.resolve(import.meta.dirname, '..');

const BACKUP_FIELDS = [
  'bytesCopied',
  'bytesTotal',
  'error',
  'finishedAt',
  'freezeSeq',
  'id',
  'journal',
  'label',
  'phase',
  'sha256',
  'startedAt',
  'state',
  'volume',
];

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

/** `detour ARGS` as a user runs it: a separate process, stdout and stderr pipes (no TTY). */
function detour(args: string[], env: Record<string, string> = {}): Promise<Run> {
  const base = { ...process.env };
  delete base.DETOUR_API;
  delete base.DETOUR_TOKEN;
  return new Promise((resolve) => {
    execFile(
      process.execPath,
      [path.join(repoRoot, 'bin/detour.js'), ...args],
      { cwd: repoRoot, env: { ...base, ...env }, timeout: 30_000 },
      (err, stdout, stderr) => {
        const code = err ? (typeof err.code === 'number' ? err.code : -1) : 0;
        resolve({ code, stdout, stderr });
      },
    );
  });
}

function lines(text: string): string[] {
  return text.split('\n').filter((l) => l !== '');
}

function expectBackupShape(b: unknown): asserts b is BackupObject {
  expect(Object.keys(b as object).sort()).toEqual(BACKUP_FIELDS);
  expect(Object.keys((b as BackupObject).journal).sort()).toEqual(['bytes', 'records', 'unreflected']);
}

describe('client commands against a running API', () => {
  let engine: FakeEngine;
  let server: RunningApiServer;
  let api: string[];

  beforeAll(async () => {
    engine = new FakeEngine();
    server = await startApiServer({ host: '127.0.0.1', port: 0, engine, registry: createMetrics({ defaultMetrics: false }).registry, logger: recordingLogger().logger });
    api = ['--api', server.url];
  });
  afterAll(() => server.close());

  it('backup start prints the id; with --json the backup object', async () => {
    const plain = await detour(['backup', 'start', 'vol1', '--label', 'before upgrade', ...api]);
    expect(plain.stderr).toBe('');
    expect(plain.code).toBe(0);
    expect(plain.stdout).toMatch(/^bk-\d{4}\n$/);
    const id = plain.stdout.trim();
    expect(engine.calls).toContainEqual({ method: 'startBackup', args: ['vol1', { label: 'before upgrade' }] });

    // A second backup of the same volume is refused while the first runs.
    const busy = await detour(['backup', 'start', 'vol1', '--json', ...api]);
    expect(busy.code).toBe(1);
    expect(busy.stdout).toBe('');
    expect(busy.stderr).toBe('detour backup start: a backup of vol1 is already running\n');
    engine.finish(id);

    const json = await detour(['backup', 'start', 'vol1', '--json', ...api]);
    expect(json.code).toBe(0);
    expect(lines(json.stdout)).toHaveLength(1);
    const b = JSON.parse(json.stdout) as unknown;
    expectBackupShape(b);
    expect(b).toMatchObject({ volume: 'vol1', label: null, state: 'running', phase: 'switching', bytesTotal: FAKE_VOLUME_BYTES });
    engine.finish(b.id);
  });

  it('backup start of an unknown volume exits 1 with the reason', async () => {
    const r = await detour(['backup', 'start', 'nope', ...api]);
    expect(r.code).toBe(1);
    expect(r.stderr).toBe("detour backup start: no volume 'nope'\n");
  });

  it('backup start --wait --json prints JSON lines ending with the completed backup, exit 0', async () => {
    const r = await detour(['backup', 'start', 'vol2', '--wait', '--json', '--poll', '20ms', ...api]);
    expect(r.code).toBe(0);
    const out = lines(r.stdout).map((l) => JSON.parse(l) as BackupObject);
    expect(out.length).toBeGreaterThanOrEqual(2);
    for (const b of out) expectBackupShape(b);
    const last = out.at(-1)!;
    expect(last).toMatchObject({ volume: 'vol2', state: 'completed', phase: 'done', bytesCopied: FAKE_VOLUME_BYTES, sha256: 'ab'.repeat(32) });
    expect(last.finishedAt).not.toBeNull();
    // Progress lines follow the phases in order and are all of the same backup.
    expect(new Set(out.map((b) => b.id))).toEqual(new Set([last.id]));
    expect([...new Set(out.map((b) => b.phase))]).toEqual(['switching', 'copying', 'draining', 'cutover', 'done']);
    expect(r.stderr).toBe('');
  });

  it('backup start --wait --json exits 1 when the backup fails, the failed object last', async () => {
    const r = await detour(['backup', 'start', 'broken', '--wait', '--json', '--poll', '20ms', ...api]);
    expect(r.code).toBe(1);
    const last = JSON.parse(lines(r.stdout).at(-1)!) as BackupObject;
    expectBackupShape(last);
    expect(last).toMatchObject({ volume: 'broken', state: 'failed', error: 'main target went away during drain' });
  });

  it('backup start --wait without a TTY prints plain phase lines (no bar) and a summary', async () => {
    const r = await detour(['backup', 'start', 'vol2', '--wait', '--poll', '20ms', ...api]);
    expect(r.code).toBe(0);
    expect(r.stderr).not.toMatch(/[\r\x1b]/);
    const progress = lines(r.stderr);
    expect(progress.map((l) => l.replace(/^backup bk-\d+ of vol2: /, ''))).toEqual([
      'phase switching',
      'phase copying',
      'phase draining',
      'phase cutover',
      'phase done',
    ]);
    expect(r.stdout).toMatch(/^backup bk-\d+ of vol2 completed: 64\.0 MiB, sha256 (ab){32}\n$/);

    const failed = await detour(['backup', 'start', 'broken', '--wait', '--poll', '20ms', ...api]);
    expect(failed.code).toBe(1);
    expect(failed.stdout).toMatch(/failed in phase draining: main target went away during drain\n$/);
  });

  it('backup list --json answers backup objects; the table has the contract columns', async () => {
    const json = await detour(['backup', 'list', '--json', ...api]);
    expect(json.code).toBe(0);
    const list = JSON.parse(json.stdout) as BackupObject[];
    expect(list.length).toBe(engine.listBackups().length);
    for (const b of list) expectBackupShape(b);
    // Options may come before the subcommand.
    const reordered = await detour(['backup', ...api, 'list', '--json']);
    expect(reordered.code).toBe(0);
    expect(JSON.parse(reordered.stdout)).toEqual(list);

    const table = await detour(['backup', 'list', ...api]);
    expect(table.code).toBe(0);
    const [header, ...rows] = lines(table.stdout);
    expect(header!.split(/\s+/)).toEqual(['ID', 'VOLUME', 'STATE', 'PHASE', 'STARTED', 'SIZE', 'SHA256']);
    expect(rows).toHaveLength(list.length);
    const done = list.find((b) => b.state === 'completed')!;
    const row = rows.find((r) => r.startsWith(done.id + ' '))!;
    expect(row.split(/\s{2,}/)).toEqual([done.id, done.volume, 'completed', 'done', expect.stringMatching(/^\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ$/), '64.0 MiB', 'abababababab']);
  });

  it('backup show ID --json answers the backup object; an unknown ID exits 1', async () => {
    const id = engine.listBackups()[0]!.id;
    const r = await detour(['backup', 'show', id, '--json', ...api]);
    expect(r.code).toBe(0);
    const b = JSON.parse(r.stdout) as unknown;
    expectBackupShape(b);
    expect(b.id).toBe(id);

    const text = await detour(['backup', 'show', id, ...api]);
    expect(text.code).toBe(0);
    expect(text.stdout).toContain(`id         ${id}\n`);
    expect(text.stdout).toContain('state      completed\n');

    const missing = await detour(['backup', 'show', 'bk-9999', '--json', ...api]);
    expect(missing.code).toBe(1);
    expect(missing.stdout).toBe('');
    expect(missing.stderr).toBe("detour backup show: no backup 'bk-9999'\n");
  });

  it('backup cancel ID exits 0 on 202, 1 when the backup is not running', async () => {
    const started = await engine.startBackup('vol2', {});
    const r = await detour(['backup', 'cancel', started.id, ...api]);
    expect(r.code).toBe(0);
    expect(r.stdout).toBe(`cancel requested for backup ${started.id}\n`);
    expect(engine.listBackups().find((b) => b.id === started.id)!.state).toBe('cancelled');

    const again = await detour(['backup', 'cancel', started.id, ...api]);
    expect(again.code).toBe(1);
    expect(again.stderr).toBe(`detour backup cancel: backup ${started.id} is already cancelled\n`);
  });

  it('sync prints reflectedSeq and passes the timeout; exit 1 on timeout', async () => {
    const ok = await detour(['sync', 'vol1', '--timeout', '2s', ...api]);
    expect(ok.code).toBe(0);
    expect(ok.stdout).toBe('42\n');
    expect(engine.calls).toContainEqual({ method: 'sync', args: ['vol1', 2000] });

    const json = await detour(['sync', 'vol1', '--json', ...api]);
    expect(json.code).toBe(0);
    expect(JSON.parse(json.stdout)).toEqual({ reflectedSeq: 42 });
    expect(engine.calls).toContainEqual({ method: 'sync', args: ['vol1', 10_000] });

    const late = await detour(['sync', 'stuck', '--timeout', '150ms', ...api]);
    expect(late.code).toBe(1);
    expect(late.stdout).toBe('');
    expect(late.stderr).toMatch(/^detour sync: stuck: writes not yet on the main target after 150ms/);
  });

  it('status --json prints {volumes, backups} with the backups in progress only', async () => {
    const running = await engine.startBackup('vol1', { label: 'status check' });
    try {
      const r = await detour(['status', '--json', ...api]);
      expect(r.code).toBe(0);
      expect(lines(r.stdout)).toHaveLength(1);
      const s = JSON.parse(r.stdout) as { volumes: Record<string, unknown>[]; backups: BackupObject[] };
      expect(Object.keys(s).sort()).toEqual(['backups', 'volumes']);
      expect(s.volumes.map((v) => v.name)).toEqual(['vol1', 'vol2', 'broken', 'stuck']);
      for (const v of s.volumes) expect(Object.keys(v).sort()).toEqual(['name', 'phase', 'sessions', 'target', 'topology']);
      expect(s.volumes[0]!.sessions).toEqual([{ initiator: 'iqn.2026-11.test:host1', isid: '0x023d00000001', tsih: 7, mode: 'redirected' }]);
      expect(s.backups.map((b) => b.id)).toEqual([running.id]);
      expectBackupShape(s.backups[0]);

      const text = await detour(['status', ...api]);
      expect(text.code).toBe(0);
      expect(text.stdout).toMatch(/^VOLUME\s+TARGET\s+TOPOLOGY\s+PHASE\s+SESSIONS\n/);
      expect(text.stdout).toMatch(/\nvol1\s+iqn\.2026-11\.test:main\s+proxy-directed\s+switching\s+1\n/);
      expect(text.stdout).toMatch(/\nvol1\s+iqn\.2026-11\.test:host1\s+0x023d00000001\s+7\s+redirected\n/);
      expect(text.stdout).toMatch(new RegExp(`\\n${running.id}\\s+vol1\\s+switching\\s`));
    } finally {
      engine.finish(running.id);
    }
    const idle = await detour(['status', ...api]);
    expect(idle.stdout).toContain('\nno backup in progress\n');
  });

  it('takes the API address from DETOUR_API when --api is absent', async () => {
    const r = await detour(['status', '--json'], { DETOUR_API: server.url });
    expect(r.code).toBe(0);
    expect((JSON.parse(r.stdout) as { volumes: unknown[] }).volumes).toHaveLength(4);
  });

  it('reports bad arguments with exit code 2 and no stack trace', async () => {
    const cases: [string[], RegExp][] = [
      [['backup'], /^detour backup: a subcommand is required/],
      [['backup', 'frob'], /^detour backup: unknown subcommand 'frob'/],
      [['backup', 'start'], /^detour backup: VOLUME is required/],
      [['backup', 'start', 'vol1', 'vol2'], /^detour backup: unexpected argument 'vol2'/],
      [['backup', 'start', 'vol1', '--bogus'], /^detour backup: Unknown option '--bogus'/],
      [['backup', 'start', 'vol1', '--wait', '--poll', 'often'], /^detour backup: --poll: 'often'/],
      [['backup', 'show'], /^detour backup: ID is required/],
      [['backup', 'cancel'], /^detour backup: ID is required/],
      [['backup', 'list', 'extra'], /^detour backup: unexpected argument 'extra'/],
      [['sync'], /^detour sync: VOLUME is required/],
      [['sync', 'vol1', '--timeout', 'soon'], /^detour sync: --timeout: 'soon' is not a duration/],
      [['status', 'extra'], /^detour status: unexpected argument 'extra'/],
      [['status', '--api', 'ftp://example'], /^detour status: --api: 'ftp:\/\/example' must be an http/],
    ];
    const runs = await Promise.all(cases.map(([args]) => detour([...args, ...api.filter(() => !args.includes('--api'))])));
    runs.forEach((r, i) => {
      const [args, message] = cases[i]!;
      expect(r.code, args.join(' ')).toBe(2);
      expect(r.stderr, args.join(' ')).toMatch(message);
      expect(r.stderr, args.join(' ')).not.toMatch(/\n\s+at /);
    });
  });
});

describe('client commands when the API cannot be used', () => {
  const TOKEN = 'a-sufficiently-long-test-token';
  let server: RunningApiServer;
  let closedUrl: string;

  beforeAll(async () => {
    const registry = createMetrics({ defaultMetrics: false }).registry;
    // A port that was just free and is closed again: nothing listens there.
    const gone = await startApiServer({ host: '127.0.0.1', port: 0, engine: new FakeEngine(), registry, logger: recordingLogger().logger });
    closedUrl = gone.url;
    await gone.close();
    server = await startApiServer({ host: '127.0.0.1', port: 0, engine: new FakeEngine(), registry, token: TOKEN, logger: recordingLogger().logger });
  });
  afterAll(() => server.close());

  it('exits 1 with a clear message when detour is not reachable', async () => {
    for (const args of [['status'], ['backup', 'list', '--json'], ['backup', 'start', 'vol1'], ['sync', 'vol1']]) {
      const r = await detour([...args, '--api', closedUrl]);
      expect(r.code, args.join(' ')).toBe(1);
      expect(r.stdout).toBe('');
      expect(r.stderr, args.join(' ')).toContain(`cannot reach detour at ${closedUrl}: is \`detour serve\` running?`);
    }
  });

  it('exits 1 on 401 and says how to pass a token', async () => {
    const none = await detour(['status', '--api', server.url]);
    expect(none.code).toBe(1);
    expect(none.stderr).toBe('detour status: authentication required: pass --token or set DETOUR_TOKEN\n');

    const wrong = await detour(['backup', 'list', '--api', server.url, '--token', 'not-the-token']);
    expect(wrong.code).toBe(1);
    expect(wrong.stderr).toMatch(/^detour backup list: authentication required: detour rejected the token/);
    expect(wrong.stderr).not.toContain('not-the-token');
  });

  it('works with the token from --token or DETOUR_TOKEN', async () => {
    const flag = await detour(['backup', 'start', 'vol1', '--api', server.url, '--token', TOKEN]);
    expect(flag.code).toBe(0);
    expect(flag.stdout).toMatch(/^bk-\d{4}\n$/);
    const env = await detour(['backup', 'show', flag.stdout.trim(), '--json'], { DETOUR_API: server.url, DETOUR_TOKEN: TOKEN });
    expect(env.code).toBe(0);
    expect((JSON.parse(env.stdout) as BackupObject).id).toBe(flag.stdout.trim());
  });
});
