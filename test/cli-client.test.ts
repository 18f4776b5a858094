import { execFile } from 'node:child_process';
import path from 'node:path';
import { BarView, PlainView, progressFields, summary } from '../src/control/commands/backup.ts';
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
    expect(r.stdout).toMatch(/^backup bk-\d+ of vol2 completed in \d+s: 64\.0 MiB( at [\d.]+ [KMGT]?i?B\/s)?, sha256 (ab){32}\n$/);

    const failed = await detour(['backup', 'start', 'broken', '--wait', '--poll', '20ms', ...api]);
    expect(failed.code).toBe(1);
    expect(failed.stdout).toMatch(/^backup bk-\d+ of broken failed in phase draining after \d+s: main target went away during drain\n$/);
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
    const other = await engine.startBackup('vol2', {});
    const json = await detour(['backup', 'cancel', other.id, '--json', ...api]);
    expect(json.code).toBe(0);
    expect(JSON.parse(json.stdout)).toEqual({ id: other.id, cancelRequested: true });
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

describe('backup start --wait on a terminal', () => {
  let engine: FakeEngine;
  let server: RunningApiServer;

  beforeAll(async () => {
    engine = new FakeEngine();
    server = await startApiServer({ host: '127.0.0.1', port: 0, engine, registry: createMetrics({ defaultMetrics: false }).registry, logger: recordingLogger().logger });
  });
  afterAll(() => server.close());

  it('draws a redrawn progress bar under a pseudo-terminal, then the summary', async () => {
    const base = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('DETOUR_')));
    const inner = `stty cols 132; exec '${process.execPath}' '${path.join(repoRoot, 'bin/detour.js')}' backup start vol2 --wait --poll 250ms --api ${server.url}`;
    // script(1) gives the command a real terminal; its output is the terminal's.
    const r = await new Promise<Run>((resolve) => {
      execFile('script', ['-qfec', inner, '/dev/null'], { cwd: repoRoot, env: base, timeout: 30_000 }, (err, stdout, stderr) =>
        resolve({ code: err ? (typeof err.code === 'number' ? err.code : -1) : 0, stdout, stderr }),
      );
    });
    expect(r.code, r.stdout + r.stderr).toBe(0);
    const out = r.stdout;
    expect(out).toMatch(/backup bk-\d+ of vol2: switching\r?\n/);
    for (const phase of ['copying', 'draining', 'cutover', 'done']) expect(out).toMatch(new RegExp(`\\r\\x1b\\[K  ${phase}\\r?\\n`));
    // Redrawn in place: carriage return, the line, erase to the end of the line.
    expect(out).toMatch(/\rcopying {3}\s+\[█+░*\] +\d+% {2}\d+\.\d MiB\/64\.0 MiB .*journal \d+\/\d+ \(.+\) {2}\d+s elapsed\x1b\[K/);
    expect(out).toMatch(/\rdraining {2}\s+\[█*░*\] +\d+% {2}\d+\/\d+ records/);
    expect(out).toMatch(/backup bk-\d+ of vol2 completed in \d+s: 64\.0 MiB/);
  });
});

describe('progress views', () => {
  const MiB = 1024 * 1024;
  const t0 = Date.parse('2026-11-03T12:00:00Z');
  function backup(over: Partial<BackupObject>): BackupObject {
    return {
      id: 'bk-0001',
      volume: 'vol1',
      label: null,
      state: 'running',
      phase: 'copying',
      freezeSeq: 7,
      bytesTotal: 64 * MiB,
      bytesCopied: 0,
      journal: { records: 0, bytes: 0, unreflected: 0 },
      startedAt: new Date(t0).toISOString(),
      finishedAt: null,
      error: null,
      sha256: null,
      ...over,
    };
  }
  function terminal(columns: number) {
    const writes: string[] = [];
    return { columns, writes, write: (t: string) => void writes.push(t), text: () => writes.join('') };
  }

  it('copying: percent, bytes, rate and ETA from the last seconds, journal depth, elapsed', () => {
    const tty = terminal(120);
    const bar = new BarView(tty);
    bar.update(backup({ phase: 'switching' }), t0 + 500);
    bar.update(backup({ bytesCopied: 16 * MiB, journal: { records: 10, bytes: 40960, unreflected: 2 } }), t0 + 2000);
    bar.update(backup({ bytesCopied: 32 * MiB, journal: { records: 40, bytes: 163840, unreflected: 3 } }), t0 + 3000);
    const lines = tty.text().split('\r');
    expect(tty.writes[0]).toBe('backup bk-0001 of vol1: switching\n');
    expect(tty.text()).toContain('\r\x1b[K  copying\n');
    const last = lines.at(-1)!;
    expect(last).toBe(`copying    [${'█'.repeat(10)}${'░'.repeat(10)}]   50%  32.0 MiB/64.0 MiB  16.0 MiB/s  ETA 2s  journal 3/40 (160 KiB)  3s elapsed\x1b[K`);
    // While switching there is nothing to measure yet.
    expect(lines.find((l) => l.startsWith('switching'))).toBe(`switching  [${'·'.repeat(20)}]       0 B/64.0 MiB  journal 0/0 (0 B)  1s elapsed\x1b[K`);
  });

  it('draining: the bar and the rate follow journal records reaching the main target', () => {
    const tty = terminal(120);
    const bar = new BarView(tty);
    bar.update(backup({ phase: 'draining', bytesCopied: 64 * MiB, journal: { records: 40, bytes: 163840, unreflected: 30 } }), t0 + 10_000);
    bar.update(backup({ phase: 'draining', bytesCopied: 64 * MiB, journal: { records: 40, bytes: 163840, unreflected: 10 } }), t0 + 11_000);
    expect(tty.text().split('\r').at(-1)).toBe(`draining   [${'█'.repeat(15)}${'░'.repeat(5)}]   75%  30/40 records  20 rec/s  ETA 1s  journal 10/40 (160 KiB)  11s elapsed\x1b[K`);
    bar.finish(backup({ state: 'completed', phase: 'done', bytesCopied: 64 * MiB }));
    expect(tty.text().endsWith('\r\x1b[K  done\n')).toBe(true);
  });

  it('drops the bar on a narrow terminal and never writes past its width', () => {
    const tty = terminal(60);
    new BarView(tty).update(backup({ bytesCopied: 16 * MiB, journal: { records: 123456, bytes: 5 * MiB, unreflected: 99999 } }), t0 + 1000);
    const line = tty.text().split('\r').at(-1)!.replace('\x1b[K', '');
    expect(line).not.toContain('[');
    expect(line.length).toBeLessThanOrEqual(59);
    expect(line.startsWith('copying     25%  16.0 MiB/64.0 MiB')).toBe(true);
  });

  it('plain lines: a line per phase, then progress at most once per interval, without control characters', () => {
    const out = terminal(0);
    const plain = new PlainView(out, 1000);
    plain.update(backup({ bytesCopied: 0 }), t0);
    plain.update(backup({ bytesCopied: 8 * MiB }), t0 + 500);
    plain.update(backup({ bytesCopied: 16 * MiB }), t0 + 1000);
    plain.update(backup({ bytesCopied: 24 * MiB }), t0 + 1500);
    expect(out.writes).toEqual([
      'backup bk-0001 of vol1: phase copying\n',
      'backup bk-0001 of vol1: copying 25%, 16.0 MiB/64.0 MiB, 16.0 MiB/s, ETA 3s, journal 0/0 (0 B), elapsed 1s\n',
    ]);
    plain.finish(backup({ state: 'completed', phase: 'done' }));
    expect(out.writes.at(-1)).toBe('backup bk-0001 of vol1: phase done\n');
    expect(out.text()).not.toMatch(/[\r\x1b]/);
  });

  it('progress fields and the final summary', () => {
    expect(progressFields(backup({ phase: 'cutover' }), {}, t0 + 65_000)).toMatchObject({ fraction: 1, rate: undefined, eta: undefined, elapsed: '1m05s' });
    expect(progressFields(backup({ phase: 'draining', journal: { records: 0, bytes: 0, unreflected: 0 } }), {}, t0)).toMatchObject({ fraction: 1, done: '0/0 records' });
    const done = backup({ state: 'completed', phase: 'done', bytesCopied: 64 * MiB, finishedAt: new Date(t0 + 8000).toISOString(), sha256: 'cd'.repeat(32) });
    expect(summary(done)).toBe(`backup bk-0001 of vol1 completed in 8s: 64.0 MiB at 8.0 MiB/s, sha256 ${'cd'.repeat(32)}`);
    expect(summary(backup({ state: 'failed', phase: 'copying', error: 'main target went away', finishedAt: new Date(t0 + 3000).toISOString() }))).toBe(
      'backup bk-0001 of vol1 failed in phase copying after 3s: main target went away',
    );
    expect(summary(backup({ state: 'cancelled', phase: 'draining', finishedAt: new Date(t0 + 61_000).toISOString() }))).toBe('backup bk-0001 of vol1 cancelled in phase draining after 1m01s');
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
